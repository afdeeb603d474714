//! The binary's `[admin]` listener: refused where it would be open to all, and served with the
//! Prometheus exposition of what the proxy recorded.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::binary::{check, Proxy};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTE: &str = r#"
listen = "127.0.0.1:0"

[[route]]
path = "/files"
name = "files"
strip_prefix = true
health_path = "/"

[route.process]
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
"#;

#[test]
fn an_admin_listener_off_loopback_needs_a_token() {
    let (code, stderr) = check(&format!("{ROUTE}\n[admin]\nlisten = \"0.0.0.0:0\"\n"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("admin.token"), "{stderr}");

    let (code, stderr) = check(&format!(
        "{ROUTE}\n[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"long-and-random\"\n"
    ));
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = check(&format!("{ROUTE}\n[admin]\nlisten = \"127.0.0.1:0\"\n"));
    assert_eq!(code, 0, "{stderr}");

    let (code, stderr) = check(&format!(
        "{ROUTE}\n[admin]\nlisten = \"127.0.0.1:0\"\nbind = \"x\"\n"
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("admin.bind"), "{stderr}");
}

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut req = http::Request::get(path).header("host", addr.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let res = common::send(addr, req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let ctype = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_binary_serves_the_admin_api_and_its_metrics() {
    let config = format!("{ROUTE}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken\"\n");
    let mut proxy = Proxy::start(&config, &[]);
    let admin = proxy.admin_addr();

    let (status, _, body) = common::get_text(proxy.addr, "/files/").await;
    assert_eq!(status, 200, "{body}\n{}", proxy.log());

    let (status, _, _) = get(admin, "/metrics", None).await;
    assert_eq!(status, 401);
    let (status, ctype, text) = get(admin, "/metrics", Some("t0ken")).await;
    assert_eq!(status, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    for line in [
        "vmproxy_cold_starts_total{machine=\"files\",result=\"ok\"} 1",
        "vmproxy_requests_total{machine=\"files\",code=\"200\"} 1",
        "vmproxy_machine_state{machine=\"files\",state=\"running\"} 1",
        "vmproxy_backend_calls_total{machine=\"files\",call=\"spawn\",result=\"ok\"} 1",
        "vmproxy_in_flight{machine=\"files\"} 0",
        "vmproxy_waiting{machine=\"files\"} 0",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains(
            "vmproxy_cold_start_seconds_bucket{machine=\"files\",phase=\"total\",le=\"600\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("vmproxy_idle_stop_seconds{machine=\"files\"} "),
        "{text}"
    );
    if let Some((ok, said)) = common::promtool_check(&text) {
        assert!(ok, "promtool check metrics: {said}\n{text}");
    }

    let (status, ctype, body) = get(admin, "/machines", Some("t0ken")).await;
    assert_eq!(
        (status, ctype.as_str()),
        (200, "application/json"),
        "{body}"
    );
    let machines: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(machines[0]["name"], "files");
    assert_eq!(machines[0]["state"], "running");

    // An event stream left open does not hold up the shutdown.
    let mut events = tokio::net::TcpStream::connect(admin).await.unwrap();
    events
        .write_all(b"GET /events HTTP/1.1\r\nhost: a\r\nauthorization: Bearer t0ken\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = events.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let code = proxy
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
        .await;
    assert_eq!(code, Some(0), "{}", proxy.log());
}
