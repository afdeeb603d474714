//! Learned boot time: the machine's past cold starts give `Retry-After` on the 503s of a start
//! and of its back-off, the waiting page's bar, the admin's `boot_seconds` and
//! `ready_in_seconds`, and deadline admission (a request that would outlast its
//! `cold_start_timeout` is refused at once, and the machine starts all the same).
//!
//! The machines boot in a known time (a fake backend that sleeps, a process that sleeps before
//! it listens); the assertions are on behaviour, with bounds wide enough for a loaded machine.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use vmproxy::admin::Admin;
use vmproxy::backend::process::ProcessBackend;
use vmproxy::{Admission, Handle, Route, State, VmProxyLayer};

/// `Retry-After` in seconds (RFC 9110 §10.2.3: a non-negative integer).
fn retry_after(headers: &HeaderMap) -> u64 {
    let v = headers
        .get("retry-after")
        .expect("a 503 carries Retry-After")
        .to_str()
        .unwrap();
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not delay-seconds"))
}

/// The learned boot time in whole seconds, rounded up: the most a `Retry-After` may say.
fn learned_secs(handle: &Handle) -> u64 {
    let boot = handle.status().boot_time.expect("a start was learned");
    boot.as_secs() + u64::from(boot.subsec_nanos() > 0)
}

/// A fake machine that takes `boot` to start.
fn booting(boot: Duration) -> FakeBackend {
    FakeBackend::new(boot)
}

/// Learns one cold start, then takes the machine down again.
async fn learn_one_start(handle: &Handle) {
    // A pre-warm waits whatever the admission, up to cold_start_timeout; the start goes on
    // past that.
    let _ = handle.start().await;
    until_running(handle).await;
    handle.stop().await;
    assert_eq!(handle.state(), State::Absent);
}

/// Waits until the machine runs.
async fn until_running(handle: &Handle) {
    let mut rx = handle.watch();
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| matches!(s, State::Running(_))),
    )
    .await
    .expect("the machine comes up")
    .unwrap();
}

#[tokio::test]
async fn before_any_start_a_503_says_one_second_and_deadline_admission_waits() {
    let backend = booting(Duration::from_millis(1500));
    let route = route(backend.clone())
        .max_pending(1)
        .cold_start_timeout(Duration::from_millis(300))
        .admission(Admission::Deadline)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    // Nothing to judge by: the first request waits, as with `wait`, and meets its 504.
    let first = tokio::spawn(async move { get_text(addr, "/app/first").await });
    eventually(Duration::from_secs(10), || handle.pending() == 1).await;
    // A request past max_pending: 503 at once, with the constant of old.
    let (status, headers, body) = get_text(addr, "/app/second").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("already waiting"), "{body}");
    assert_eq!(retry_after(&headers), 1);
    let (status, _, body) = first.await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    // The start went on, and is the first one learned.
    until_running(&handle).await;
    assert!(handle.status().boot_time.unwrap() >= Duration::from_millis(1500));
    handle.stop().await;
}

#[tokio::test]
async fn a_503_during_a_start_tells_the_time_left_of_the_learned_start() {
    let backend = booting(Duration::from_secs(4));
    let route = route(backend.clone())
        .max_pending(1)
        .waiting_page(true)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    learn_one_start(&handle).await;
    let most = learned_secs(&handle);
    assert!(most >= 4, "the start took its 4 s: {most}");

    // One waiter starts the machine; the next request is one too many.
    let waiter = tokio::spawn(async move { get_text(addr, "/app/waiter").await });
    eventually(Duration::from_secs(10), || handle.pending() == 1).await;
    let (status, headers, body) = get_text(addr, "/app/overflow").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let after = retry_after(&headers);
    // What is left of a 4 s start begun a moment ago: not the constant 1 s of old, and never
    // more than the whole learned start.
    assert!(
        (2..=most).contains(&after),
        "Retry-After {after}, learned {most}"
    );

    // A browser's waiting page says the same, and shows a bar.
    let req = http::Request::get("/app/page")
        .header("host", "front.test")
        .header("accept", "text/html")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let page_after = retry_after(res.headers());
    assert!(
        (2..=after).contains(&page_after),
        "later than the 503 before it: {page_after} > {after}"
    );
    let page =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(page.contains("<progress max=\"100\" value="), "{page}");
    assert!(page.contains("to go"), "{page}");
    assert!(
        page.contains("http-equiv=\"refresh\" content=\"1\""),
        "the page still reloads every second, so the bar moves without JavaScript: {page}"
    );
    assert!(!page.contains("<script"), "{page}");

    let (status, _, body) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(backend.starts(), 2);
    handle.stop().await;
}

#[tokio::test]
async fn a_503_in_the_back_off_tells_the_back_off_left() {
    let backend = booting(Duration::ZERO);
    backend.knobs.fail_starts.store(1, Ordering::SeqCst);
    let route = route(backend.clone())
        .start_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .unwrap();
    let addr = front(route).await;
    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        (4..=5).contains(&retry_after(&headers)),
        "{:?}",
        headers["retry-after"]
    );
    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no capacity"), "{body}");
    let after = retry_after(&headers);
    assert!((2..=5).contains(&after), "{after}");
    assert_eq!(backend.starts(), 1, "no start in the back-off");
}

#[tokio::test]
async fn deadline_admission_refuses_at_once_a_request_the_learned_start_would_outlast() {
    let backend = booting(Duration::from_secs(3));
    let route = route(backend.clone())
        .cold_start_timeout(Duration::from_secs(1))
        .admission(Admission::Deadline)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    learn_one_start(&handle).await;
    let most = learned_secs(&handle);

    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("should be ready in about") && body.contains("cold_start_timeout 1s"),
        "the body says why: {body}"
    );
    // It found the machine absent: a whole learned start is ahead.
    let after = retry_after(&headers);
    assert_eq!(after, most);
    // Answered before the start it set going was done: it did not wait for it.
    assert_eq!(handle.state(), State::Creating);
    assert_eq!(handle.pending(), 0);
    assert_eq!(
        backend.starts(),
        2,
        "the refused request started the machine"
    );

    // Others meanwhile: refused too, with no more time left than the first was told.
    let (status, headers, _) = get_text(addr, "/app/y").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after(&headers) <= after);
    assert_eq!(backend.starts(), 2, "one start");

    // The start finishes with nobody waiting, and later requests are served.
    until_running(&handle).await;
    let (status, headers, body) = get_text(addr, "/app/z").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers.get("retry-after").is_none());
    handle.stop().await;
}

#[tokio::test]
async fn deadline_admission_waits_when_the_learned_start_fits() {
    let backend = booting(Duration::from_millis(500));
    let route = route(backend.clone())
        .cold_start_timeout(Duration::from_secs(60))
        .admission(Admission::Deadline)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    learn_one_start(&handle).await;

    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        headers.get("server-timing").is_some(),
        "it waited for the start"
    );
    assert_eq!(backend.starts(), 2);
    handle.stop().await;
}

#[tokio::test]
async fn the_default_admission_waits_as_before() {
    let backend = booting(Duration::from_millis(800));
    let route = route(backend.clone())
        .cold_start_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    learn_one_start(&handle).await;
    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(
        status,
        StatusCode::GATEWAY_TIMEOUT,
        "waited to the 504: {body}"
    );
    until_running(&handle).await;
    handle.stop().await;
}

#[tokio::test]
async fn a_deadline_refusal_during_a_stop_still_brings_the_machine_back() {
    let backend = FakeBackend::with(Knobs {
        boot: Duration::from_secs(1),
        stop_delay: Duration::from_secs(1),
        ..Knobs::default()
    });
    let route = route(backend.clone())
        .cold_start_timeout(Duration::from_millis(200))
        .admission(Admission::Deadline)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    let _ = handle.start().await;
    until_running(&handle).await;

    let stopping = tokio::spawn({
        let handle = handle.clone();
        async move { handle.stop().await }
    });
    eventually(Duration::from_secs(10), || {
        handle.state() == State::Stopping
    })
    .await;
    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after(&headers) >= 1);
    stopping.await.unwrap();
    // Nobody waits, yet the machine comes back: refusals must not starve it.
    until_running(&handle).await;
    assert_eq!(backend.starts(), 2);
    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    handle.stop().await;
}

/// `GET /machines/{name}` of an admin on 127.0.0.1:0.
async fn machine_json(admin: SocketAddr, name: &str) -> Value {
    let req = http::Request::get(format!("/machines/{name}"))
        .header("host", admin.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = send(admin, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn the_admin_api_shows_the_learned_boot_time() {
    let backend = booting(Duration::from_millis(1500));
    let route = route(backend.clone()).name("gpu").build().unwrap();
    let handle = route.handle();
    let layer = VmProxyLayer::new(route);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    tokio::spawn(vmproxy::server::Server::new().serve(
        listener,
        Admin::for_layer(&layer),
        std::future::pending(),
    ));

    let m = machine_json(admin, "gpu").await;
    for key in [
        "boot_seconds",
        "boot_phases",
        "ready_in_seconds",
        "last_start",
    ] {
        assert!(m[key].is_null(), "{key} before any start: {m}");
    }

    handle.start().await.unwrap();
    let m = machine_json(admin, "gpu").await;
    let boot = m["boot_seconds"].as_f64().expect("a number after a start");
    let learned = handle.status().boot_time.unwrap().as_secs_f64();
    assert!((boot - learned).abs() < 0.002, "{boot} vs {learned}");
    assert!(boot >= 1.5, "{m}");
    let backend_s = m["boot_phases"]["backend_seconds"].as_f64().unwrap();
    let readiness_s = m["boot_phases"]["readiness_seconds"].as_f64().unwrap();
    assert!(backend_s >= 1.5 && readiness_s >= 0.0, "{m}");
    assert!(m["ready_in_seconds"].is_null(), "running: {m}");

    // Absent: a whole start is ahead.
    handle.stop().await;
    let m = machine_json(admin, "gpu").await;
    assert_eq!(m["ready_in_seconds"], m["boot_seconds"], "{m}");

    // During a start: what is left of it, no more than the whole.
    let starting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.start().await }
    });
    eventually(Duration::from_secs(10), || {
        handle.status().starting.is_some()
    })
    .await;
    let m = machine_json(admin, "gpu").await;
    assert_eq!(m["state"], "creating");
    let left = m["ready_in_seconds"]
        .as_f64()
        .expect("known during a start");
    assert!(left <= boot, "{left} > {boot}");
    starting.await.unwrap().unwrap();
    handle.stop().await;
}

#[tokio::test]
async fn deadline_admission_with_a_process_that_takes_two_seconds_to_listen() {
    // The platform's start is a spawn; the readiness phase is the process's two seconds.
    let backend = ProcessBackend::new([
        "python3",
        "-c",
        "import http.server, os, time\n\
         time.sleep(2)\n\
         http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), \
         http.server.SimpleHTTPRequestHandler).serve_forever()\n",
    ])
    .unwrap()
    .quiet(true)
    .stop_grace(Duration::from_secs(2));
    let route = Route::builder("/", backend)
        .health_path("/")
        .probe_interval(Duration::from_millis(10), Duration::from_millis(50))
        .cold_start_timeout(Duration::from_millis(500))
        .admission(Admission::Deadline)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    learn_one_start(&handle).await;
    let phases = handle.status().boot_phases.unwrap();
    assert!(
        phases.readiness >= Duration::from_secs(2) && phases.readiness > phases.backend,
        "{phases:?}"
    );
    let most = learned_secs(&handle);

    let (status, headers, body) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("cold_start_timeout"), "{body}");
    assert_eq!(
        retry_after(&headers),
        most,
        "a whole learned start is ahead"
    );
    assert_eq!(
        handle.state(),
        State::Creating,
        "refused before the start was done"
    );

    until_running(&handle).await;
    let (status, _, body) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    handle.stop().await;
    assert_eq!(handle.state(), State::Absent);
}
