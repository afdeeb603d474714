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
