//! Deadline admission on the Compute Engine emulator: a VM whose boot outlasts the route's
//! `cold_start_timeout` is learned from its first start; the next cold request is answered
//! 503 + `Retry-After` at once, and the VM is created all the same.
#![cfg(feature = "emulator")]

mod gce_support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gce_support::*;
use http_body_util::BodyExt;
use tower::ServiceExt;
use vmproxy::emulator::{Emulator, EmulatorOptions};
use vmproxy::{Admission, Route, State};

/// A VM that answers 1.5 s after it is RUNNING: the readiness phase of every start.
async fn slow_booting_emulator() -> Emulator {
    Emulator::start(
        EmulatorOptions::fast()
            .require_content_length(true)
            .boot_delay(ms(1500)),
    )
    .await
    .expect("emulator starts")
}

fn deadline_route(emu: &Emulator, name: &str, wait: Duration) -> Route {
    Route::builder("/vm", backend(emu, name).build().unwrap())
        .health_path("/healthz")
        .idle_timeout(None)
        .probe_interval(ms(5), ms(20))
        .cold_start_timeout(wait)
        .start_timeout(Duration::from_secs(20))
        .admission(Admission::Deadline)
        .build()
        .expect("route builds")
}

/// One request through the app: status, `Retry-After` if any, body.
async fn get(app: &axum::Router, path: &str) -> (StatusCode, Option<u64>, String) {
    let req = Request::get(path)
        .header("host", "front.test")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().expect("delay-seconds"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, after, String::from_utf8_lossy(&body).into_owned())
}

fn creations(emu: &Emulator) -> usize {
    emu.count("instances.insert") + emu.count("instances.start")
}

#[tokio::test]
async fn a_vm_that_boots_longer_than_the_wait_is_refused_at_once_and_created_anyway() {
    let emu = slow_booting_emulator().await;
    let route = deadline_route(&emu, "slow", Duration::from_millis(500));
    let handle = route.handle();
    let app = app(route.clone());

    // Nothing learned yet: the first request waits, as with `wait`, and meets its 504; the
    // start goes on, and is learned.
    let (status, after, body) = get(&app, "/vm/first").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(after, None);
    state_becomes(&route, "running", |s| matches!(s, State::Running(_))).await;
    let learned = handle
        .status()
        .boot_time
        .expect("the first start is learned");
    assert!(learned >= ms(1500), "{learned:?}");
    let most = learned.as_secs() + u64::from(learned.subsec_nanos() > 0);

    handle.stop().await;
    assert_eq!(handle.state(), State::Absent);
    let before = creations(&emu);

    let (status, after, body) = get(&app, "/vm/second").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("cold_start_timeout 500ms"),
        "says why: {body}"
    );
    // It found the VM absent: a whole learned start is ahead.
    assert_eq!(after, Some(most), "learned {learned:?}");
    assert_eq!(
        handle.state(),
        State::Creating,
        "answered before the VM was up"
    );

    // Nobody waits, yet the VM is created and comes up; the next request is served.
    state_becomes(&route, "running", |s| matches!(s, State::Running(_))).await;
    assert_eq!(
        creations(&emu),
        before + 1,
        "one creation for the refused request"
    );
    let (status, _, body) = get(&app, "/vm/third").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    handle.stop().await;
}

#[tokio::test]
async fn a_vm_that_boots_within_the_wait_is_waited_for() {
    let emu = slow_booting_emulator().await;
    let route = deadline_route(&emu, "fits", Duration::from_secs(20));
    let handle = route.handle();
    let app = app(route.clone());
    handle.start().await.expect("first start");
    handle.stop().await;
    assert!(handle.status().boot_time.is_some());

    let (status, after, body) = get(&app, "/vm/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(after, None);
    handle.stop().await;
}
