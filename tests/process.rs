//! The local-process backend: real child processes, started, killed from outside, stopped, and
//! never left behind.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmproxy::backend::process::ProcessBackend;
use vmproxy::{Route, State};

fn python_backend() -> Arc<ProcessBackend> {
    Arc::new(
        ProcessBackend::new([
            "python3",
            "-m",
            "http.server",
            "{port}",
            "--bind",
            "127.0.0.1",
        ])
        .unwrap()
        .quiet(true)
        .stop_grace(Duration::from_secs(2)),
    )
}

fn python_route(backend: Arc<ProcessBackend>) -> Route {
    Route::builder("/", backend)
        .health_path("/")
        .probe_interval(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_process_killed_from_outside_is_started_again() {
    let backend = python_backend();
    let route = python_route(backend.clone());
    let handle = route.handle();
    let addr = front(route).await;

    let (status, _, _) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    let first = backend.pid().await.expect("running");
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    eventually(Duration::from_secs(5), || !alive(first)).await;

    let (status, _, body) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = backend.pid().await.expect("running again");
    assert_ne!(first, second);
    assert!(matches!(handle.state(), State::Running(_)));

    handle.stop().await;
    assert!(!alive(second), "stop must end the process");
    assert_eq!(handle.state(), State::Absent);
}

#[tokio::test]
async fn a_crash_during_boot_fails_the_start_quickly() {
    let backend = ProcessBackend::new(["sh", "-c", "exit 3"]).unwrap();
    let route = Route::builder("/", backend)
        .health_path("/")
        .start_backoff(Duration::from_millis(50), Duration::from_millis(50))
        .build()
        .unwrap();
    let addr = front(route).await;
    let (status, _, body) = get_text(addr, "/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("went down while starting"), "{body}");
}

#[tokio::test]
async fn a_command_that_does_not_exist_is_a_503_with_the_reason() {
    let backend = ProcessBackend::new(["/nonexistent/vmproxy-test-binary", "{port}"]).unwrap();
    let route = Route::builder("/", backend)
        .health_path("/")
        .build()
        .unwrap();
    let addr = front(route).await;
    let (status, _, body) = get_text(addr, "/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("/nonexistent/vmproxy-test-binary"), "{body}");
}

#[test]
fn no_process_outlives_the_proxy_when_it_is_dropped() {
    let backend = python_backend();
    let pid = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let pid = rt.block_on(async {
            let route = python_route(backend.clone());
            route.handle().start().await.unwrap();
            backend.pid().await.unwrap()
        });
        assert!(alive(pid));
        drop(rt); // every task, and with them the route, is dropped here
        pid
    };
    drop(backend);
    for _ in 0..200 {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("process {pid} outlived the proxy");
}
