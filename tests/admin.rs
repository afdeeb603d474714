//! The admin API and status page (`vmproxy::admin::Admin`), served in-process on its own
//! listener: the machines' JSON, start and stop, the token, events, mounting in a router.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmproxy::admin::Admin;
use vmproxy::{Handle, Route, State, VmProxyLayer};

/// Serves `admin` on 127.0.0.1:0 with the crate's server; returns its address.
async fn serve_admin(admin: Admin) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(vmproxy::server::Server::new().serve(listener, admin, std::future::pending()));
    addr
}

/// One request: status, headers, body.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = send(addr, req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn json(addr: SocketAddr, method: &str, path: &str) -> (StatusCode, Value) {
    let (status, headers, body) = call(addr, method, path, &[]).await;
    assert_eq!(
        headers["content-type"], "application/json",
        "{method} {path}: {body}"
    );
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, value)
}

/// Two fake machines, `alpha` (under /app) and `beta` (under /b).
fn two_machines() -> (VmProxyLayer, FakeBackend) {
    let backend = FakeBackend::new(Duration::from_millis(50));
    let alpha = route(backend.clone()).name("alpha").build().unwrap();
    let beta = Route::builder("/b", FakeBackend::new(Duration::ZERO))
        .name("beta")
        .health_path("/healthz")
        .build()
        .unwrap();
    (VmProxyLayer::from_routes([alpha, beta]), backend)
}

fn handle(layer: &VmProxyLayer, name: &str) -> Handle {
    layer
        .routes()
        .iter()
        .map(|r| r.handle())
        .find(|h| h.name() == name)
        .unwrap()
}

#[tokio::test]
async fn machines_lists_every_machine_with_its_status() {
    let (layer, _) = two_machines();
    let addr = serve_admin(Admin::for_layer(&layer)).await;
    let front = serve(front_app(layer.clone())).await.0;
    let (status, _, _) = get_text(front, "/app/hello").await;
    assert_eq!(status, 200);

    let (status, all) = json(addr, "GET", "/machines").await;
    assert_eq!(status, 200);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2);
    let (alpha, beta) = (&all[0], &all[1]);
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["state"], "running");
    assert!(
        alpha["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{alpha}"
    );
    assert_eq!(alpha["in_flight"], 0);
    assert_eq!(alpha["waiting"], 0);
    let since = alpha["state_since"].as_str().unwrap();
    humantime::parse_rfc3339(since).unwrap_or_else(|e| panic!("{since}: {e}"));
    let idle = alpha["idle_stop_in_seconds"].as_f64().unwrap();
    assert!(idle > 0.0 && idle <= 600.0, "{alpha}");
    assert!(alpha["last_error"].is_null());
    assert!(alpha["boot_seconds"].as_f64().unwrap() >= 0.05, "{alpha}");
    assert!(alpha["starting_phase"].is_null());

    assert_eq!(beta["name"], "beta");
    assert_eq!(beta["state"], "absent");
    for key in [
        "endpoint",
        "idle_stop_in_seconds",
        "last_error",
        "boot_seconds",
    ] {
        assert!(beta[key].is_null(), "{key}: {beta}");
    }

    let (status, one) = json(addr, "GET", "/machines/beta").await;
    assert_eq!(
        (status, one["name"].as_str()),
        (StatusCode::OK, Some("beta"))
    );
}

#[tokio::test]
async fn start_and_stop_change_the_state() {
    let (layer, backend) = two_machines();
    let alpha = handle(&layer, "alpha");
    let addr = serve_admin(Admin::for_layer(&layer)).await;

    // Without waiting: accepted, and the start is under way before the answer.
    let (status, m) = json(addr, "POST", "/machines/alpha/start").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{m}");
    assert_eq!(m["state"], "creating", "{m}");
    let mut rx = alpha.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| matches!(s, State::Running(_))),
    )
    .await
    .expect("the start goes on without a waiter")
    .unwrap();
    assert_eq!(backend.starts(), 1);

    // Already running: 200 at once.
    let (status, m) = json(addr, "POST", "/machines/alpha/start").await;
    assert_eq!(
        (status, m["state"].as_str()),
        (StatusCode::OK, Some("running"))
    );

    let (status, m) = json(addr, "POST", "/machines/alpha/stop?wait=true").await;
    assert_eq!(
        (status, m["state"].as_str()),
        (StatusCode::OK, Some("absent"))
    );
    assert_eq!(backend.stops(), 1);

    let (status, m) = json(addr, "POST", "/machines/alpha/start?wait=true").await;
    assert_eq!(
        (status, m["state"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    assert_eq!(backend.starts(), 2);

    // A start asked for without waiting holds no place among the waiters: a stop right after
    // it is not undone by a new start.
    let (status, _) = json(addr, "POST", "/machines/alpha/stop?wait=true").await;
    assert_eq!(status, StatusCode::OK);
    let (status, m) = json(addr, "POST", "/machines/alpha/start").await;
    assert_eq!(
        (status, m["state"].as_str()),
        (StatusCode::ACCEPTED, Some("creating"))
    );
    let (status, m) = json(addr, "POST", "/machines/alpha/stop?wait=true").await;
    assert_eq!(
        (status, m["state"].as_str()),
        (StatusCode::OK, Some("absent")),
        "{m}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alpha.state(), State::Absent);
    assert_eq!(backend.starts(), 3);

    json(addr, "POST", "/machines/alpha/start?wait=true").await;
    json(addr, "POST", "/machines/beta/start?wait=true").await;
    let (status, all) = json(addr, "POST", "/stop").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{all}");
    assert_eq!(all.as_array().unwrap().len(), 2);
    let beta = handle(&layer, "beta");
    eventually(Duration::from_secs(10), || {
        alpha.state() == State::Absent && beta.state() == State::Absent
    })
    .await;

    let (status, all) = json(addr, "POST", "/stop?wait=true").await;
    assert_eq!(status, StatusCode::OK, "nothing to stop: {all}");
}

#[tokio::test]
async fn a_failed_start_with_wait_answers_its_status() {
    let backend = FakeBackend::with(Knobs {
        fail_starts: 1.into(),
        ..Knobs::default()
    });
    let layer = VmProxyLayer::new(route(backend).name("flaky").build().unwrap());
    let addr = serve_admin(Admin::for_layer(&layer)).await;
    let (status, headers, body) = call(addr, "POST", "/machines/flaky/start?wait=true", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("no capacity"), "{body}");
    let (_, m) = json(addr, "GET", "/machines/flaky").await;
    assert!(
        m["last_error"].as_str().unwrap().contains("no capacity"),
        "{m}"
    );
}

#[tokio::test]
async fn unknown_names_paths_and_methods() {
    let (layer, _) = two_machines();
    let addr = serve_admin(Admin::for_layer(&layer)).await;

    for (method, path) in [
        ("POST", "/machines/nope/start"),
        ("POST", "/machines/nope/stop"),
        ("GET", "/machines/nope"),
    ] {
        let (status, m) = json(addr, method, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        assert!(m["error"].as_str().unwrap().contains("\"nope\""), "{m}");
    }
    for path in [
        "/nothing",
        "/machines/alpha/reboot",
        "/machines/alpha/start/x",
    ] {
        let (status, _) = json(addr, "GET", path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    for (method, path, allow) in [
        ("GET", "/machines/alpha/start", "POST"),
        ("GET", "/stop", "POST"),
        ("DELETE", "/machines", "GET, HEAD"),
        ("POST", "/events", "GET, HEAD"),
        ("PUT", "/", "GET, HEAD"),
    ] {
        let (status, headers, _) = call(addr, method, path, &[]).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(headers["allow"], allow, "{method} {path}");
    }
    // Without a render function there are no metrics here.
    let (status, _) = json(addr, "GET", "/metrics").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // HEAD is a GET without its body.
    let (status, headers, body) = call(addr, "HEAD", "/machines", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    assert_eq!(headers["content-type"], "application/json");
}

#[tokio::test]
async fn a_token_is_required_except_for_the_page() {
    let (layer, _) = two_machines();
    let admin = Admin::for_layer(&layer)
        .token("s3cret")
        .metrics(|| "# nothing\n".to_owned());
    let addr = serve_admin(admin).await;

    for (method, path) in [
        ("GET", "/machines"),
        ("GET", "/metrics"),
        ("GET", "/events"),
        ("POST", "/stop"),
        ("POST", "/machines/alpha/start"),
        ("GET", "/nothing"),
    ] {
        let (status, headers, body) = call(addr, method, path, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer "), "{challenge}");

        let (status, headers, _) =
            call(addr, method, path, &[("authorization", "Bearer wrong")]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains("invalid_token"),
            "{challenge}"
        );
    }
    for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
        let (status, _, _) = call(addr, "GET", "/machines", &[("authorization", wrong)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let (status, _, body) = call(
        addr,
        "GET",
        "/machines",
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = call(
        addr,
        "GET",
        "/machines",
        &[("authorization", "bearer s3cret")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the scheme is case-insensitive");

    // The page holds no data, and a browser cannot send the header when it loads it.
    let (status, headers, body) = call(addr, "GET", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(
        !body.contains("alpha"),
        "no machine data in the page itself"
    );
}

#[tokio::test]
async fn a_post_from_another_origin_is_refused() {
    let (layer, backend) = two_machines();
    let addr = serve_admin(Admin::for_layer(&layer)).await;
    let (status, _, _) = call(
        addr,
        "POST",
        "/machines/alpha/start",
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.starts(), 0);
    // The page's own calls carry its origin, which is this host.
    let origin = format!("http://{addr}");
    let (status, _, _) = call(
        addr,
        "POST",
        "/machines/alpha/start",
        &[("origin", origin.as_str())],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

/// DNS rebinding: an attacker's page whose name resolves to 127.0.0.1 is of the same origin as
/// a token-less admin API. Without a token, only requests to an IP address or `localhost` are
/// answered; with one, the name does not matter (the page has no token).
#[tokio::test]
async fn without_a_token_a_request_by_a_name_is_refused() {
    let (layer, backend) = two_machines();
    let open = serve_admin(Admin::for_layer(&layer)).await;
    let guarded = serve_admin(Admin::for_layer(&layer).token("t0ken")).await;
    let raw = |addr: SocketAddr, request: String| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    let port = open.port();
    let rebound = format!(
        "POST /machines/alpha/start HTTP/1.1\r\nHost: evil.example:{port}\r\n\
         Origin: http://evil.example:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let res = raw(open, rebound).await;
    assert!(res.starts_with("HTTP/1.1 403"), "{res}");
    let read =
        format!("GET /machines HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n");
    let res = raw(open, read).await;
    assert!(res.starts_with("HTTP/1.1 403"), "{res}");
    assert!(
        res.to_ascii_lowercase()
            .contains("\r\ncache-control: no-store\r\n"),
        "{res}"
    );
    for host in [
        format!("[::1]evil:{port}"),
        "127.0.0.1:x".to_owned(),
        format!("localhost.evil:{port}"),
    ] {
        let req = format!("GET /machines HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let res = raw(open, req).await;
        assert!(
            res.starts_with("HTTP/1.1 403") || res.starts_with("HTTP/1.1 400"),
            "{host}: {res}"
        );
    }
    // A Host that is no text at all is no address either.
    let mut odd =
        b"GET /machines HTTP/1.1\r\nHost: caf\xc3\xa9\r\nConnection: close\r\n\r\n".to_vec();
    let mut s = TcpStream::connect(open).await.unwrap();
    s.write_all(&odd).await.unwrap();
    odd.clear();
    s.read_to_end(&mut odd).await.unwrap();
    let res = String::from_utf8_lossy(&odd);
    assert!(
        res.starts_with("HTTP/1.1 403") || res.starts_with("HTTP/1.1 400"),
        "{res}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.starts(), 0);
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "127.0.0.1".to_owned(),
    ] {
        let req = format!("GET /machines HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let res = raw(open, req).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{host}: {res}");
    }
    // With a token a name is fine: the token is what guards it.
    let port = guarded.port();
    let named = format!(
        "GET /machines HTTP/1.1\r\nHost: admin.example:{port}\r\nAuthorization: Bearer t0ken\r\nConnection: close\r\n\r\n"
    );
    let res = raw(guarded, named).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
}

/// Reads from a raw event stream until `want` is seen in a `data:` line; returns that line.
async fn read_event(stream: &mut TcpStream, seen: &mut String, want: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = seen
            .lines()
            .find(|l| l.starts_with("data: ") && l.contains(want))
        {
            let line = line.to_owned();
            let end = seen.find(&line).unwrap() + line.len();
            seen.drain(..end);
            return line;
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no event with {want:?} in:\n{seen}"))
            .unwrap();
        assert!(n > 0, "the stream ended; read so far:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn events_stream_state_changes_and_snapshots() {
    let (layer, _) = two_machines();
    let alpha = handle(&layer, "alpha");
    let admin = Admin::for_layer(&layer).snapshot_interval(Duration::from_millis(200));
    let addr = serve_admin(admin).await;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let head = seen[..seen.find("\r\n\r\n").unwrap()].to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let first = read_event(&mut stream, &mut seen, "\"type\":\"snapshot\"").await;
    let snapshot: Value = serde_json::from_str(first.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(snapshot["machines"].as_array().unwrap().len(), 2);
    assert_eq!(snapshot["machines"][0]["state"], "absent");

    alpha.start().await.unwrap();
    let line = read_event(&mut stream, &mut seen, "\"state\":\"running\"").await;
    let event: Value = serde_json::from_str(line.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["type"], "state");
    assert_eq!(event["machine"]["name"], "alpha");
    assert!(event["machine"]["endpoint"].is_string());

    // Snapshots keep coming, with the counts and timers of the moment.
    let line = read_event(&mut stream, &mut seen, "\"type\":\"snapshot\"").await;
    assert!(line.contains("\"state\":\"running\""), "{line}");

    alpha.stop().await;
    read_event(&mut stream, &mut seen, "\"state\":\"absent\"").await;
}

#[tokio::test]
async fn the_events_head_says_event_stream() {
    let (layer, _) = two_machines();
    let addr = serve_admin(Admin::for_layer(&layer)).await;
    let (status, headers, body) = call(addr, "HEAD", "/events", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(body, "");
    // What the admin API says is for the token's holder only: no cache keeps it.
    for path in ["/events", "/machines", "/", "/nowhere"] {
        let (_, headers, _) = call(addr, "HEAD", path, &[]).await;
        assert_eq!(headers["cache-control"], "no-store", "{path}");
    }
}

#[tokio::test]
async fn the_status_page_is_self_contained() {
    let (layer, _) = two_machines();
    let addr = serve_admin(Admin::for_layer(&layer)).await;
    let (status, headers, page) = call(addr, "GET", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    for external in ["src=\"http", "href=\"http", "<link", "src=\"/", "@import"] {
        assert!(!page.contains(external), "external asset: {external}");
    }
    // What a browser test finds: rows by id with a live data-state, fed from /events.
    assert!(page.contains("\"machine-\" + name"), "row ids");
    assert!(page.contains("dataset.state"), "data-state");
    assert!(page.contains("\"events\""), "reads /events");
}

#[tokio::test]
async fn mounted_in_an_application_router() {
    let (layer, backend) = two_machines();
    let alpha = handle(&layer, "alpha");
    let app = Router::new()
        .route("/", get(|| async { "front" }))
        .route_service("/_ah/stop", Admin::for_layer(&layer).base("/_ah"))
        .nest_service("/admin", Admin::for_layer(&layer))
        .layer(layer);
    let (addr, _task) = serve(app).await;

    alpha.start().await.unwrap();
    let (status, _, body) = call(addr, "POST", "/_ah/stop?wait=true", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(alpha.state(), State::Absent);
    assert_eq!(backend.stops(), 1);

    // Only that path of the first mount is routed; the nested one serves everything.
    let (status, _, _) = call(addr, "GET", "/_ah/machines", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, all) = json(addr, "GET", "/admin/machines").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (status, _, page) = call(addr, "GET", "/admin/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<title>vmproxy</title>"));
}
