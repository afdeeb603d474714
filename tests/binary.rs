//! The `vmproxy` binary: config errors, serving, shutdown, and children that die with it.

mod common;

use std::time::{Duration, Instant};

use common::binary::{check, Parked, Proxy, TempFile, BIN};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const GOOD: &str = r#"
listen = "127.0.0.1:0"
shutdown_grace = "5s"

[[route]]
path = "/app"
strip_prefix = true
health_path = "/"
idle_timeout = "10m"
cold_start_timeout = "30s"
max_pending = 100

[route.process]
command = ["sh", "-c", "echo $$ > \"$PIDFILE\"; exec python3 -m http.server {port} --bind 127.0.0.1"]
stop_grace = "2s"
"#;

#[test]
fn bad_configs_exit_2_naming_the_key() {
    let cases = [
        ("listen = ", "", "syntax"),
        (
            "strip_prefix = true",
            "strip_prefix = true\nbogus = 1",
            "route[0].bogus",
        ),
        (
            "idle_timeout = \"10m\"",
            "idle_timeout = \"ten minutes\"",
            "route[0].idle_timeout",
        ),
        (
            "command = [\"sh\"",
            "command = [] #",
            "route[0].process.command",
        ),
        ("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"", "listen"),
        (
            "max_pending = 100",
            "max_pending = -1",
            "route[0].max_pending",
        ),
        ("path = \"/app\"", "path = \"app\"", "route[0].path"),
    ];
    for (from, to, key) in cases {
        let text = if key == "syntax" {
            "listen = \n[[route]\n".to_owned()
        } else {
            GOOD.replacen(from, to, 1)
        };
        let (code, stderr) = check(&text);
        assert_eq!(code, 2, "{key}: {stderr}");
        if key == "syntax" {
            assert!(
                stderr.contains("line"),
                "a syntax error names the line: {stderr}"
            );
        } else {
            assert!(
                stderr.contains(key),
                "the message must name {key}: {stderr}"
            );
        }
        assert!(
            stderr.contains("vmproxy-test-"),
            "the message must name the file: {stderr}"
        );
    }
    let (code, stderr) = check(GOOD);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_unusable_listen_address_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let file = TempFile::new(&GOOD.replace("127.0.0.1:0", &addr.to_string()));
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It names the address, the key it came from, and how to choose another.
    for needed in [&addr.to_string(), ": listen:", "--listen", "VMPROXY_LISTEN"] {
        assert!(stderr.contains(needed), "no {needed:?} in: {stderr}");
    }
    assert!(!stderr.contains("Os {"), "a debug dump: {stderr}");
}

/// `vmproxy ARGS` with `env`, neither variable inherited from the test's environment.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_remove("VMPROXY_CONFIG")
        .env_remove("VMPROXY_LISTEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_usage_exits_2_with_a_message() {
    let (code, _, stderr) = run_binary(&[], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
    let (code, _, stderr) = run_binary(&["--config", "x.toml", "--bogus"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--bogus") && stderr.contains("Usage"),
        "{stderr}"
    );
    let (code, _, stderr) = run_binary(&["--config", "x.toml", "--listen", "nowhere"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("nowhere"),
        "{stderr}"
    );
    let (code, _, stderr) = run_binary(&["--config"], &[]);
    assert_eq!(code, 2, "{stderr}");
    let (code, stdout, _) = run_binary(&["--help"], &[]);
    assert_eq!(code, 0);
    for option in [
        "--config",
        "--check",
        "--listen",
        "VMPROXY_CONFIG",
        "emulate",
    ] {
        assert!(stdout.contains(option), "--help lacks {option}: {stdout}");
    }
    let (code, stdout, _) = run_binary(&["-V"], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("vmproxy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_readmes_help_is_the_binarys() {
    let readme = include_str!("../README.md");
    let shown = readme
        .split("```text\n$ vmproxy --help\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README shows `vmproxy --help`");
    let (code, stdout, _) = run_binary(&["--help"], &[]);
    assert_eq!(code, 0);
    assert_eq!(shown.trim_end(), stdout.trim_end());
}

#[test]
fn the_config_file_can_come_from_vmproxy_config() {
    let file = TempFile::new(GOOD);
    let path = file.path().to_str().unwrap();
    let (code, stdout, stderr) = run_binary(&["--check"], &[("VMPROXY_CONFIG", path)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(path) && stdout.contains("ok"), "{stdout}");
    // The flag wins over the variable.
    let (code, _, stderr) = run_binary(
        &["--check", "--config", path],
        &[("VMPROXY_CONFIG", "/nonexistent/vmproxy.toml")],
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_binary(
        &["--check"],
        &[("VMPROXY_CONFIG", "/nonexistent/vmproxy.toml")],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/vmproxy.toml"), "{stderr}");
}

#[tokio::test]
async fn listen_overrides_the_files_address() {
    // The file names a port that is taken: only the override lets the binary serve.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = GOOD.replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    for (args, env) in [
        (&["--listen", "127.0.0.1:0"][..], &[][..]),
        (&[][..], &[("VMPROXY_LISTEN", "127.0.0.1:0")][..]),
    ] {
        let proxy = Proxy::start_with_args(&config, args, env);
        assert_ne!(proxy.addr, taken.local_addr().unwrap());
        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    }
}

/// The binary serving `config`, its backend command writing its pid to a file of its own.
struct Running {
    proxy: Proxy,
    addr: std::net::SocketAddr,
    pidfile: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

fn start_binary() -> Running {
    start_binary_with(GOOD)
}

fn start_binary_with(config: &str) -> Running {
    let pidfile = std::env::temp_dir().join(format!(
        "vmproxy-test-{}-{:?}.pid",
        std::process::id(),
        std::thread::current().id()
    ));
    let proxy = Proxy::start(config, &[("PIDFILE", pidfile.to_str().unwrap())]);
    Running {
        addr: proxy.addr,
        proxy,
        pidfile,
    }
}

fn backend_pid(r: &Running) -> i32 {
    std::fs::read_to_string(&r.pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// SIGKILLs a process the test found, if it is still alive when the guard drops (so that a
/// failed assertion leaves nothing running behind).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if common::alive(self.0 as u32) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit(')').next().unwrap();
    after_name
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

async fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !common::alive(pid as u32) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn every_log_line_names_the_machine_by_its_route_and_pids_are_numbers() {
    // The command is `sh`; the route names the machine "files".
    let config = GOOD.replace("path = \"/app\"", "path = \"/app\"\nname = \"files\"");
    let pidfile =
        std::env::temp_dir().join(format!("vmproxy-test-{}-names.pid", std::process::id()));
    let mut proxy = Proxy::start(
        &config,
        &[
            ("PIDFILE", pidfile.to_str().unwrap()),
            ("RUST_LOG", "info,vmproxy=debug"),
        ],
    );
    let (status, _, body) = common::get_text(proxy.addr, "/app/").await;
    assert_eq!(status, 200, "{body}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&pidfile);
    let _guard = KillOnDrop(pid);
    assert_eq!(proxy.signal_and_wait(Signal::SIGTERM).await, Some(0));
    let log = proxy.log();
    let started = log
        .lines()
        .find(|l| l.contains("process started"))
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert!(started.contains(&format!("pid={pid} ")), "{started}");
    assert!(
        log.lines().any(|l| l.contains("SIGTERM")),
        "the stop is logged:\n{log}"
    );
    let mut named = 0;
    for line in log.lines().filter(|l| l.contains("machine=")) {
        assert!(line.contains("machine=files"), "{line}");
        named += 1;
    }
    assert!(named >= 4, "start, ready, stop lines:\n{log}");
    assert!(!log.contains("Some("), "an Option printed as such:\n{log}");
}

#[tokio::test]
async fn serves_routes_404s_the_rest_and_stops_everything_on_sigterm() {
    let mut r = start_binary();
    let (status, headers, body) = common::get_text(r.addr, "/nothing-here").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no route"), "{body}");
    // It quotes the path: never to be sniffed as HTML.
    assert_eq!(headers["x-content-type-options"], "nosniff");

    let (status, _, body) = common::get_text(r.addr, "/app/").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("Directory listing"),
        "served by python's http.server: {body}"
    );
    let pid = backend_pid(&r);
    assert!(common::alive(pid as u32));
    // python answers HTTP/1.0; the client hears this hop's version (RFC 9110 §6.2).
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /app/ HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // `OPTIONS *` asks about the server itself (RFC 9110 §9.3.7): no route, no 404.
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"OPTIONS * HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("\r\nallow: get, head, post, put, delete, options, trace, patch\r\n"),
        "{text}"
    );

    let code = r.proxy.signal_and_wait(Signal::SIGTERM).await;
    assert_eq!(code, Some(0), "SIGTERM must exit 0:\n{}", r.proxy.log());
    assert!(
        wait_gone(pid).await,
        "the backend process outlived the proxy"
    );
}

#[tokio::test]
async fn the_backend_dies_with_a_killed_proxy() {
    let r = start_binary();
    let (status, _, _) = common::get_text(r.addr, "/app/").await;
    assert_eq!(status, 200);
    let pid = backend_pid(&r);
    kill(r.proxy.pid(), Signal::SIGKILL).unwrap();
    assert!(
        wait_gone(pid).await,
        "the backend process outlived a SIGKILLed proxy"
    );
}

#[tokio::test]
async fn the_backends_descendants_die_with_a_killed_proxy() {
    // The server is not the command itself but a child of the shell that the command is: only
    // the command had a parent-death signal of its own.
    let exec_in_place =
        r#"echo $$ > \"$PIDFILE\"; exec python3 -m http.server {port} --bind 127.0.0.1"#;
    let forking =
        r#"python3 -m http.server {port} --bind 127.0.0.1 & echo $! > \"$PIDFILE\"; wait"#;
    assert!(GOOD.contains(exec_in_place));
    let r = start_binary_with(&GOOD.replace(exec_in_place, forking));
    let (status, _, body) = common::get_text(r.addr, "/app/").await;
    assert_eq!(status, 200, "{body}");
    let server = backend_pid(&r);
    let _guard = KillOnDrop(server);
    let shell = parent_of(server);
    let _shell_guard = KillOnDrop(shell);
    assert_ne!(
        shell,
        r.proxy.pid().as_raw(),
        "the server must be a grandchild of the proxy"
    );
    assert!(common::alive(server as u32));

    kill(r.proxy.pid(), Signal::SIGKILL).unwrap();
    assert!(
        wait_gone(server).await,
        "the backend command's child outlived a SIGKILLed proxy"
    );
    assert!(
        wait_gone(shell).await,
        "the backend command outlived a SIGKILLed proxy"
    );
}

#[test]
fn configs_that_cannot_serve_exit_2_and_a_portless_command_warns() {
    let no_route = "listen = \"127.0.0.1:0\"\n";
    let hidden = format!("{GOOD}\n[[route]]\npath = \"/app/admin\"\n[route.process]\ncommand = [\"true\", \"{{port}}\"]\n");
    let no_dir = GOOD.replace("stop_grace", "cwd = \"/no/such/dir\"\nstop_grace");
    for (text, key) in [
        (no_route.to_owned(), "route"),
        (hidden, "route[1].path"),
        (no_dir, "route[0].process.cwd"),
    ] {
        let (code, stderr) = check(&text);
        assert_eq!(code, 2, "{key}: {stderr}");
        assert!(
            stderr.contains(key),
            "the message must name {key}: {stderr}"
        );
    }
    let portless = GOOD.replace("http.server {port} --bind", "http.server 8000 --bind");
    let (code, stderr) = check(&portless);
    assert_eq!(code, 0, "a warning, not an error: {stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("route[0].process.command"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_during_a_start_that_never_becomes_ready_cancels_it_and_exits_0() {
    // The process runs, but its readiness probe never passes; the start would go on for ten
    // minutes.
    let config = GOOD
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"")
        .replace(
            "health_path = \"/\"",
            "health_path = \"/nope\"\nstart_timeout = \"10m\"",
        );
    assert!(config.contains("\"/nope\"") && config.contains("\"1s\""));
    let mut r = start_binary_with(&config);
    let parked = Parked::get(r.addr, "/app/");
    common::eventually(Duration::from_secs(20), || {
        r.proxy.log().contains("probing readiness")
    })
    .await;
    let python = backend_pid(&r);
    let _guard = KillOnDrop(python);
    assert!(common::alive(python as u32));

    // Bounded (60 s): on a hang the test fails instead of waiting for start_timeout.
    let signalled = Instant::now();
    let code = r.proxy.signal_and_wait(Signal::SIGTERM).await;
    let log = r.proxy.log();
    assert_eq!(code, Some(0), "nothing is left running, so exit 0:\n{log}");
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(log.contains("start cancelled"), "{log}");
    assert!(
        wait_gone(python).await,
        "the machine's process outlived the proxy:\n{log}"
    );
    parked
        .assert_refused_or_closed(Duration::from_secs(5))
        .await;
}
