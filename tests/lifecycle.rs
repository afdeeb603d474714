//! The lifecycle end to end: coalescing, failures, deadlines, limits, idle, restarts.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use vmproxy::State;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_first_requests_share_one_start() {
    let backend = FakeBackend::new(Duration::from_millis(300));
    let route = route(backend.clone()).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let tasks: Vec<_> = (0..1000)
        .map(|i| tokio::spawn(async move { get_text(addr, &format!("/app/r{i}")).await }))
        .collect();
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert!(
            body.contains(&format!("/app/r{i}")),
            "request {i} got someone else's answer: {body}"
        );
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(backend.starts(), 1, "Backend::start must run exactly once");
    assert!(matches!(handle.state(), State::Running(_)));
}

#[tokio::test]
async fn a_client_that_leaves_during_the_cold_start_cancels_nothing() {
    let backend = FakeBackend::new(Duration::from_millis(300));
    let route = route(backend.clone()).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    // The first client starts the machine, then goes away.
    let first = tokio::spawn(async move { get_text(addr, "/app/first").await });
    eventually(Duration::from_secs(5), || backend.starts() == 1).await;
    first.abort();
    let _ = first.await;

    // Others that were waiting are still served.
    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get_text(addr, "/app/w").await }))
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(backend.starts(), 1);
    // And the next one is served warm, by the same machine.
    let (status, _, _) = get_text(addr, "/app/next").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.starts(), 1);
    assert!(matches!(handle.state(), State::Running(_)));
    assert_eq!(handle.pending(), 0);
}

#[tokio::test]
async fn a_failed_start_answers_every_waiter_then_backs_off_and_recovers() {
    let backend = FakeBackend::new(Duration::from_millis(100));
    backend.knobs.fail_starts.store(1, Ordering::SeqCst);
    let route = route(backend.clone())
        .start_backoff(Duration::from_millis(400), Duration::from_secs(2))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let waiters: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { get_text(addr, "/app/x").await }))
        .collect();
    for w in waiters {
        let (status, headers, body) = w.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("no capacity"),
            "the reason must reach the client: {body}"
        );
        assert!(headers.contains_key("retry-after"));
    }
    assert_eq!(backend.starts(), 1, "one start for all twenty");
    assert_eq!(handle.state(), State::Absent);
    assert_eq!(backend.stops(), 1, "a failed start is cleaned up");

    // During the back-off: refused at once, no new start.
    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no capacity"), "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(backend.starts(), 1);

    // After it: a new start that succeeds.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (status, _, _) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.starts(), 2);
}

#[tokio::test]
async fn a_backend_that_never_becomes_healthy_gets_504_and_the_lifecycle_recovers() {
    let backend = FakeBackend::new(Duration::ZERO);
    backend.knobs.unhealthy.store(true, Ordering::SeqCst);
    let route = route(backend.clone())
        .cold_start_timeout(Duration::from_millis(300))
        .start_timeout(Duration::from_millis(800))
        .start_backoff(Duration::from_millis(100), Duration::from_millis(100))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body.contains("did not become ready"), "{body}");
    assert_eq!(
        handle.state(),
        State::Creating,
        "the start goes on after the waiter's deadline"
    );

    // The start gives up at start_timeout, stops the machine, and the lifecycle is usable again.
    eventually(Duration::from_secs(5), || handle.state() == State::Absent).await;
    assert_eq!(backend.stops(), 1);
    backend.knobs.unhealthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, _, _) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.starts(), 2);
}

#[tokio::test]
async fn over_max_pending_gets_503_at_once_and_the_rest_are_served() {
    let backend = FakeBackend::new(Duration::from_millis(500));
    let route = route(backend.clone()).max_pending(5).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get_text(addr, "/app/x").await }))
        .collect();
    eventually(Duration::from_secs(5), || handle.pending() == 5).await;
    let (status, headers, body) = get_text(addr, "/app/extra").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("already waiting"), "{body}");
    assert_eq!(
        handle.state(),
        State::Creating,
        "the excess request was refused while the start was still going"
    );
    for w in waiters {
        assert_eq!(w.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(backend.starts(), 1);
}

#[tokio::test]
async fn idle_machine_is_stopped_once() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone())
        .idle_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    assert_eq!(get_text(addr, "/app/x").await.0, StatusCode::OK);
    assert!(matches!(handle.state(), State::Running(_)));
    eventually(Duration::from_secs(5), || handle.state() == State::Absent).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(backend.stops(), 1, "stopped exactly once");
    assert_eq!(backend.starts(), 1);
}

#[tokio::test]
async fn a_long_streaming_response_keeps_the_machine_alive() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone())
        .idle_timeout(Some(Duration::from_millis(200)))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    // 12 chunks, 100 ms apart: 1.2 s of streaming, six idle timeouts long.
    let req = http::Request::get("/app/stream?chunks=12&every_ms=100")
        .header("host", "front.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 12);
    assert_eq!(
        backend.stops(),
        0,
        "stopped while a response was still streaming"
    );
    assert!(matches!(handle.state(), State::Running(_)));
    eventually(Duration::from_secs(5), || handle.state() == State::Absent).await;
    assert_eq!(backend.stops(), 1);
}

#[tokio::test]
async fn an_open_websocket_keeps_the_machine_alive() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone())
        .idle_timeout(Some(Duration::from_millis(200)))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let (mut ws, res) = tokio_tungstenite::connect_async(format!("ws://{addr}/app/ws"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("hello {i}"));
        tokio::time::sleep(Duration::from_millis(300)).await; // longer than idle_timeout
    }
    assert_eq!(backend.stops(), 0, "stopped under an open WebSocket");
    assert_eq!(handle.in_flight(), 1);
    ws.close(None).await.unwrap();
    drop(ws);
    eventually(Duration::from_secs(5), || handle.state() == State::Absent).await;
    assert_eq!(backend.stops(), 1);
}

#[tokio::test]
async fn a_request_during_stopping_waits_and_is_served_after_a_restart() {
    let fake = FakeBackend::with(Knobs {
        stop_delay: Duration::from_millis(300),
        ..Knobs::default()
    });
    let route = route(fake.clone()).build().unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    assert_eq!(get_text(addr, "/app/x").await.0, StatusCode::OK);

    let stopper = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.stop().await })
    };
    eventually(Duration::from_secs(5), || handle.state() == State::Stopping).await;
    let (status, _, _) = get_text(addr, "/app/during-stop").await;
    assert_eq!(status, StatusCode::OK);
    stopper.await.unwrap();
    assert_eq!(fake.stops(), 1);
    assert_eq!(fake.starts(), 2, "served by a fresh start after the stop");
}

#[tokio::test]
async fn a_vanished_machine_is_started_again_and_the_request_retried() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone())
        .min_uptime(Duration::from_millis(200))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    assert_eq!(get_text(addr, "/app/x").await.0, StatusCode::OK);
    let first = backend.addr().unwrap();

    // Up longer than min_uptime: not a crash loop.
    tokio::time::sleep(Duration::from_millis(250)).await;
    backend.vanish(); // preempted, killed from outside: no stop call, connections refused
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _, body) = get_text(addr, "/app/after").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "retried once after a new start: {body}"
    );
    assert_eq!(backend.starts(), 2);
    assert_ne!(backend.addr().unwrap(), first, "served at the new address");
    assert!(matches!(handle.state(), State::Running(_)));
}

#[tokio::test]
async fn a_machine_that_dies_right_after_becoming_ready_is_a_failed_start() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone())
        .start_backoff(Duration::from_millis(400), Duration::from_secs(5))
        .min_uptime(Duration::from_secs(10))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    assert_eq!(get_text(addr, "/app/x").await.0, StatusCode::OK);

    // It answers once and dies: the next request gets 503 with the reason, not a new start.
    let first = backend.addr().unwrap();
    backend.vanish();
    until_refused(first).await;
    let (status, headers, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert!(
        body.contains("machine fake failed to start: it went down")
            && body.contains("after becoming ready"),
        "{body}"
    );
    assert_eq!(backend.starts(), 1, "no restart during the back-off");
    assert_eq!(handle.state(), State::Absent);
    let (status, _, _) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.starts(), 1);

    // After the back-off: started again, and served.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(backend.starts(), 2);

    // Dies right away again: the pause doubles (800 ms), so 450 ms later it is still refused.
    let second = backend.addr().unwrap();
    backend.vanish();
    until_refused(second).await;
    let (status, _, _) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(backend.starts(), 2);

    // And recovers once the pause is over.
    let mut served = false;
    for _ in 0..100 {
        if get_text(addr, "/app/x").await.0 == StatusCode::OK {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "never served again");
    assert_eq!(backend.starts(), 3);
    assert!(matches!(handle.state(), State::Running(_)));
}

#[tokio::test]
async fn handle_prewarms_and_stops() {
    let backend = FakeBackend::new(Duration::from_millis(50));
    let route = route(backend.clone()).build().unwrap();
    let handle = route.handle();
    let mut watch = handle.watch();
    let ep = handle.start().await.unwrap();
    assert_eq!(handle.state(), State::Running(ep));
    assert!(watch.has_changed().unwrap());
    handle.stop().await;
    assert_eq!(handle.state(), State::Absent);
    assert_eq!(backend.stops(), 1);
    handle.stop().await; // nothing to stop: returns at once
    assert_eq!(backend.stops(), 1);
    watch.borrow_and_update();
}

#[tokio::test]
async fn a_long_response_is_reported_as_activity_for_other_replicas() {
    let fake = FakeBackend::new(Duration::ZERO);
    let reports = &fake.knobs.activity_reports;
    let route = route(fake.clone())
        .idle_timeout(Some(Duration::from_millis(400)))
        .build()
        .unwrap();
    let addr = front(route).await;
    // One request, streaming for 1.2 s: three idle timeouts with no new request.
    let req = http::Request::get("/app/stream?chunks=12&every_ms=100")
        .header("host", "front.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let before = reports.load(Ordering::SeqCst);
    res.into_body().collect().await.unwrap();
    let during = reports.load(Ordering::SeqCst) - before;
    assert!(
        during >= 2,
        "only {during} activity reports while one response streamed for 1.2 s"
    );
}

#[tokio::test]
async fn a_failed_start_leaves_a_machine_that_another_replica_uses() {
    let backend = FakeBackend::new(Duration::ZERO);
    backend.knobs.fail_starts.store(1, Ordering::SeqCst);
    backend.knobs.shared.store(true, Ordering::SeqCst);
    let route = route(backend.clone()).build().unwrap();
    let addr = front(route).await;
    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        backend.stops(),
        0,
        "another replica serves through it: no cleanup stop"
    );
}

/// A machine whose readiness never comes; its start runs for `start_timeout`, and requests wait
/// ten minutes.
async fn never_ready(
    start_timeout: Duration,
) -> (FakeBackend, vmproxy::Handle, std::net::SocketAddr) {
    let backend = FakeBackend::new(Duration::ZERO);
    backend.knobs.unhealthy.store(true, Ordering::SeqCst);
    let route = route(backend.clone())
        .cold_start_timeout(Duration::from_secs(600))
        .start_timeout(start_timeout)
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;
    (backend, handle, addr)
}

#[tokio::test]
async fn a_forced_stop_cancels_a_start_that_never_becomes_ready_and_answers_its_waiter() {
    let (backend, handle, addr) = never_ready(Duration::from_secs(600)).await;
    let parked = tokio::spawn(async move { get_text(addr, "/app/x").await });
    eventually(Duration::from_secs(5), || {
        backend.starts() == 1 && handle.pending() == 1
    })
    .await;

    // A graceful stop waits for the start to finish, as before.
    let graceful = tokio::time::timeout(Duration::from_millis(300), handle.stop()).await;
    assert!(graceful.is_err(), "a graceful stop waits for the start");
    assert_eq!(handle.state(), State::Creating);

    // A forced one cancels it and cleans up what it started (bounded, so a hang fails).
    tokio::time::timeout(Duration::from_secs(10), handle.stop_now())
        .await
        .expect("stop_now waited for a start that never becomes ready");
    assert_eq!(handle.state(), State::Absent);
    assert_eq!(backend.stops(), 1, "what the start started is stopped");
    assert_eq!(backend.addr(), None);

    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(5), parked)
        .await
        .expect("the parked request was left hanging")
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("cancelled"), "{body}");
    assert!(headers.contains_key(http::header::RETRY_AFTER));

    // No back-off for a cancel: the next request starts the machine again at once.
    backend.knobs.unhealthy.store(false, Ordering::SeqCst);
    let (status, _, body) = get_text(addr, "/app/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(backend.starts(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_forced_stop_before_the_start_task_runs_is_not_lost() {
    use std::future::Future;
    let (backend, handle, _addr) = never_ready(Duration::from_secs(600)).await;
    // Admitted (the start task spawned, not yet run on this one thread), then cancelled.
    let h = handle.clone();
    let mut start = Box::pin(async move { h.start().await });
    std::future::poll_fn(|cx| {
        assert!(start.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    assert_eq!(handle.state(), State::Creating);
    tokio::time::timeout(Duration::from_secs(10), handle.stop_now())
        .await
        .expect("the cancel was lost");
    assert_eq!(handle.state(), State::Absent);
    let error = start.await.unwrap_err();
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(error.to_string().contains("cancelled"), "{error}");
    assert!(backend.starts() <= 1);
    assert_eq!(backend.stops(), 1, "cleaned up as a failed start is");
}

#[tokio::test]
async fn a_stop_asked_during_a_start_returns_when_the_start_fails() {
    let (backend, handle, addr) = never_ready(Duration::from_millis(300)).await;
    let parked = tokio::spawn(async move { get_text(addr, "/app/x").await });
    eventually(Duration::from_secs(5), || handle.state() == State::Creating).await;
    tokio::time::timeout(Duration::from_secs(10), handle.stop())
        .await
        .expect("the stop waited for a stop that a failed start never makes");
    assert_eq!(handle.state(), State::Absent);
    assert_eq!(backend.stops(), 1);
    let (status, _, body) = parked.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("start_timeout"), "{body}");
}

#[tokio::test]
async fn stop_now_takes_down_an_idle_running_machine() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone()).build().unwrap();
    let handle = route.handle();
    handle.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), handle.stop_now())
        .await
        .expect("stop_now issued no stop");
    assert_eq!(handle.state(), State::Absent);
    assert_eq!(backend.stops(), 1);
}
