//! What a machine tells the outside: `Server-Timing` on responses that waited for it, and the
//! status an operator reads from its handle.

mod common;

use std::time::Duration;

use common::*;
use vmproxy::{StartPhase, State};

/// `name;dur=…` entries of a Server-Timing value, as (name, milliseconds).
fn timings(v: &str) -> Vec<(String, f64)> {
    v.split(',')
        .map(|m| {
            let mut params = m.trim().split(';');
            let name = params.next().unwrap().to_owned();
            let dur = params
                .find_map(|p| p.trim().strip_prefix("dur="))
                .map(|d| d.parse().unwrap())
                .unwrap_or_else(|| panic!("no dur in {m:?}"));
            (name, dur)
        })
        .collect()
}

#[tokio::test]
async fn a_response_that_waited_says_where_the_time_went() {
    let backend = FakeBackend::new(Duration::from_millis(300));
    let addr = front(route(backend.clone()).build().unwrap()).await;
    let (status, headers, _) = get_text(addr, "/app/cold").await;
    assert_eq!(status, 200);
    let value = headers
        .get("server-timing")
        .expect("a cold response carries Server-Timing")
        .to_str()
        .unwrap();
    let t = timings(value);
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["vmproxy-wait", "vmproxy-backend", "vmproxy-readiness"],
        "{value}"
    );
    let (wait, backend_ms) = (t[0].1, t[1].1);
    assert!(
        backend_ms >= 300.0,
        "the fake machine boots for 300 ms: {value}"
    );
    assert!(
        wait >= backend_ms,
        "the wait covers the platform's start: {value}"
    );

    let (_, headers, _) = get_text(addr, "/app/warm").await;
    assert!(
        headers.get("server-timing").is_none(),
        "a warm response carries none"
    );
}

#[tokio::test]
async fn server_timing_can_be_turned_off() {
    let backend = FakeBackend::new(Duration::from_millis(50));
    let addr = front(route(backend).server_timing(false).build().unwrap()).await;
    let (status, headers, _) = get_text(addr, "/app/cold").await;
    assert_eq!(status, 200);
    assert!(headers.get("server-timing").is_none());
}

#[tokio::test]
async fn the_handle_reports_phase_counts_idle_time_and_boots() {
    let backend = FakeBackend::new(Duration::from_millis(300));
    let route = route(backend.clone())
        .idle_timeout(Some(Duration::from_secs(60)))
        .build()
        .unwrap();
    let handle = route.handle();
    let s = handle.status();
    assert_eq!((s.state, s.in_flight, s.waiting), (State::Absent, 0, 0));
    assert_eq!(
        (s.boot_time, s.last_error.clone(), s.idle_stop_in),
        (None, None, None)
    );

    let starting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.start().await }
    });
    eventually(Duration::from_secs(5), || {
        handle.status().starting.is_some()
    })
    .await;
    let s = handle.status();
    assert_eq!(s.state, State::Creating);
    assert_eq!(s.starting.unwrap().0, StartPhase::Backend);
    assert_eq!(s.waiting, 1);
    starting.await.unwrap().unwrap();

    let s = handle.status();
    assert!(matches!(s.state, State::Running(_)));
    assert!(s.starting.is_none());
    let boot = s.boot_time.expect("one boot recorded");
    assert!(boot >= Duration::from_millis(300), "{boot:?}");
    assert_eq!(s.last_start.unwrap().total(), boot);
    let idle = s.idle_stop_in.expect("running and idle: a stop is due");
    assert!(
        idle <= Duration::from_secs(60) && idle > Duration::from_secs(50),
        "{idle:?}"
    );

    // A failed start is the last error.
    handle.stop().await;
    backend
        .knobs
        .fail_starts
        .store(1, std::sync::atomic::Ordering::SeqCst);
    assert!(handle.start().await.is_err());
    let s = handle.status();
    assert!(
        s.last_error
            .as_deref()
            .unwrap_or("")
            .contains("no capacity"),
        "{:?}",
        s.last_error
    );
}

const BINARY_CONFIG: &str = r#"
listen = "127.0.0.1:0"

[[route]]
path = "/app"
strip_prefix = true
health_path = "/"
name = "files"

[route.process]
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
"#;

#[tokio::test]
async fn the_binary_logs_each_request_with_its_id_machine_and_wait() {
    let p = binary::Proxy::start(BINARY_CONFIG, &[]);
    let req = http::Request::get("/app/")
        .header("host", "front.test")
        .header("x-request-id", "client-chose-this")
        .header("authorization", "Bearer secret-token")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send(p.addr, req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["x-request-id"],
        "client-chose-this",
        "kept and returned"
    );
    let (_, headers, _) = get_text(p.addr, "/app/").await;
    let made = headers
        .get("x-request-id")
        .expect("an id is made when the client sent none")
        .to_str()
        .unwrap()
        .to_owned();
    let (status, _, _) = get_text(p.addr, "/elsewhere").await;
    assert_eq!(status, 404);

    eventually(Duration::from_secs(5), || {
        p.log().matches(" served").count() >= 3
    })
    .await;
    let log = p.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" served")).collect();
    let first = lines[0];
    for part in [
        "client-chose-this",
        "method=GET",
        "path=/app/",
        "status=200",
        "machine=files ",
        "waited_for_start=true",
        "latency_ms=",
    ] {
        assert!(first.contains(part), "{part} missing: {first}");
    }
    assert!(
        lines[1].contains(&made) && lines[1].contains("waited_for_start=false"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("status=404") && !lines[2].contains("machine="),
        "{}",
        lines[2]
    );
    assert!(
        !log.contains("secret-token"),
        "a credential reached the log"
    );
}

#[tokio::test]
async fn a_start_that_never_becomes_ready_says_why() {
    let config = BINARY_CONFIG.replace(
        "health_path = \"/\"",
        "health_path = \"/no-such-page\"\ncold_start_timeout = \"7s\"",
    );
    let p = binary::Proxy::start(&config, &[]);
    let (status, _, body) = get_text(p.addr, "/app/").await;
    assert_eq!(status, 504, "{body}");
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("not ready yet"))
        .unwrap_or_else(|| panic!("no progress line:\n{log}"));
    assert!(
        line.contains("INFO") && line.contains("404") && line.contains("files"),
        "{line}"
    );
}
