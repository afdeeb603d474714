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
use vmproxy::{Route, RouteBuilder, State};

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

/// A file in the temp dir for this test, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        TempFile(std::env::temp_dir().join(format!("vmproxy-test-{}-{name}", std::process::id())))
    }

    fn read(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// SIGKILLs a process the test found, if it is still alive when the guard drops (so that a
/// failed assertion leaves nothing running behind).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
        }
    }
}

/// Waits up to `limit` for `pid` to be gone; true if it is.
fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits up to 10 s for `file` to hold a pid.
fn pid_in(file: &TempFile) -> u32 {
    for _ in 0..1000 {
        if let Ok(pid) = file.read().trim().parse() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no pid in {:?}", file.0);
}

fn python_route_builder(backend: Arc<ProcessBackend>) -> RouteBuilder {
    Route::builder("/", backend)
        .health_path("/")
        .probe_interval(Duration::from_millis(10), Duration::from_millis(50))
}

fn python_route(backend: Arc<ProcessBackend>) -> Route {
    python_route_builder(backend).build().unwrap()
}

#[tokio::test]
async fn a_process_killed_from_outside_is_started_again() {
    let backend = python_backend();
    let route = python_route_builder(backend.clone())
        .min_uptime(Duration::from_millis(200))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let (status, _, _) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    let first = backend.pid().await.expect("running");
    // Up longer than min_uptime: killed, not crash-looping.
    tokio::time::sleep(Duration::from_millis(250)).await;
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
async fn a_process_that_exits_after_answering_once_is_not_restarted_by_every_request() {
    // Serves the readiness probe and one request, then exits at once (no interpreter shutdown
    // with the socket already closed): a crash loop.
    let backend = ProcessBackend::new([
        "python3",
        "-c",
        "import http.server, os\n\
         s = http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), \
         http.server.SimpleHTTPRequestHandler)\n\
         s.handle_request()\n\
         s.handle_request()\n\
         os._exit(0)\n",
    ])
    .unwrap()
    .quiet(true);
    let route = Route::builder("/", backend)
        .health_path("/")
        .probe_interval(Duration::from_millis(10), Duration::from_millis(50))
        .start_backoff(Duration::from_millis(300), Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = route.handle();
    let addr = front(route).await;

    let (status, _, body) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // (A request that connects while the process is on its way out gets 502.)
    let State::Running(ep) = handle.state() else {
        panic!("not running: {:?}", handle.state());
    };
    until_refused(ep.addr()).await;
    let (status, headers, body) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("after becoming ready"), "{body}");
    assert_eq!(handle.state(), State::Absent);

    // After the back-off it is started again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (status, _, body) = get_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    handle.stop().await;
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

#[test]
fn a_descendant_that_left_the_process_group_dies_with_the_backend() {
    // A daemon's way out of the group: its own session. It is re-parented when the shell dies.
    let pidfile = TempFile::new("setsid.pid");
    let backend = Arc::new(
        ProcessBackend::new([
            "sh",
            "-c",
            r#"setsid python3 -m http.server "$PORT" --bind 127.0.0.1 & echo $! > "$PIDFILE"; wait"#,
        ])
        .unwrap()
        .env("PIDFILE", pidfile.0.to_string_lossy())
        .quiet(true),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shell = rt.block_on(async {
        python_route(backend.clone())
            .handle()
            .start()
            .await
            .unwrap();
        backend.pid().await.unwrap()
    });
    let server = pid_in(&pidfile);
    let _guards = (KillOnDrop(server), KillOnDrop(shell));
    assert!(alive(server));
    drop(rt);
    drop(backend);
    assert!(
        gone_within(shell, Duration::from_secs(5)),
        "the command outlived its backend"
    );
    assert!(
        gone_within(server, Duration::from_secs(5)),
        "a descendant in a session of its own outlived the backend"
    );
}

#[tokio::test]
async fn stop_sends_one_sigterm_to_the_whole_group_and_waits_for_it() {
    let pidfile = TempFile::new("graceful.pid");
    let marks = TempFile::new("graceful.marks");
    let backend = Arc::new(
        ProcessBackend::new([
            "sh",
            "-c",
            r#"trap 'echo TERM >> "$MARKS"; exit 0' TERM
python3 -m http.server "$PORT" --bind 127.0.0.1 & echo $! > "$PIDFILE"; wait"#,
        ])
        .unwrap()
        .env("PIDFILE", pidfile.0.to_string_lossy())
        .env("MARKS", marks.0.to_string_lossy())
        .quiet(true)
        .stop_grace(Duration::from_secs(20)),
    );
    let route = python_route(backend.clone());
    let handle = route.handle();
    handle.start().await.unwrap();
    let shell = backend.pid().await.unwrap();
    let server = pid_in(&pidfile);
    let _guards = (KillOnDrop(server), KillOnDrop(shell));

    let began = std::time::Instant::now();
    handle.stop().await;
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "stop waited for the SIGKILL: the group did not get SIGTERM"
    );
    assert_eq!(
        marks.read(),
        "TERM\n",
        "exactly one SIGTERM reaches the command"
    );
    assert!(!alive(shell));
    assert!(gone_within(server, Duration::from_secs(5)));
}

#[test]
fn the_command_outlives_the_thread_that_started_it() {
    // The kernel's parent-death signal fires when the *thread* that forked ends, not only the
    // process: the machine must survive a runtime on a thread of its own that has finished.
    let backend = python_backend();
    let route = python_route(backend.clone());
    let pid = std::thread::spawn({
        let (backend, handle) = (backend.clone(), route.handle());
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                handle.start().await.unwrap();
                backend.pid().await.unwrap()
            })
        }
    })
    .join()
    .unwrap();
    let _guard = KillOnDrop(pid);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(pid),
        "the command died with the thread that started it"
    );
    drop(route);
    drop(backend);
    assert!(gone_within(pid, Duration::from_secs(5)));
}

/// `$PORT` and `${PORT}` as a shell would read them, in a command run without one.
#[tokio::test]
async fn the_port_variable_works_in_a_command_without_a_shell() {
    for spelling in ["${PORT}", "$PORT"] {
        let backend = Arc::new(
            ProcessBackend::new([
                "python3",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                spelling,
            ])
            .unwrap()
            .quiet(true),
        );
        let route = python_route(backend.clone());
        let handle = route.handle();
        let addr = front(route).await;
        let (status, _, body) = get_text(addr, "/").await;
        assert_eq!(status, StatusCode::OK, "{spelling}: {body}");
        handle.stop().await;
        assert_eq!(handle.state(), State::Absent);
    }
}
