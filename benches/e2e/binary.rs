//! The `vmproxy` binary itself, as a user runs it.
//!
//! `parked-bin` starts the binary with a route whose machine never becomes ready (its process
//! runs, but nothing answers the readiness probe), opens N HTTP/1.1 connections with one
//! request each, and reads the binary's RSS before and once every request is parked: the
//! memory one parked connection costs the whole binary (hyper's buffers, the tasks, the log's
//! span), not only the layer's share that `parked-mem` measures.
//!
//! `accept-storm` starts the binary (optionally with a `listen_backlog`), has N clients
//! connect at once to a cold route, and reports when the last connection was established and
//! when the last response arrived.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{percentile, Args, BoxError};

/// A running `vmproxy` binary, killed when dropped (its machines' processes die with it).
struct Binary {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Binary {
    async fn start(bin: &str, config: &str) -> Result<Binary, BoxError> {
        let dir = std::env::temp_dir().join(format!(
            "vmproxy-bench-bin-{}-{}",
            std::process::id(),
            crate::common::now_ns()
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let path = dir.0.join("vmproxy.toml");
        std::fs::write(&path, config.replace("{listen_port}", &port.to_string()))?;
        let child = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the binary exited at once")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(Binary {
                    child,
                    pid,
                    addr,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err("the binary did not listen".into())
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A route whose process runs but never answers its probe: every request parks.
fn never_ready(extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{{listen_port}}\"\n{extra}\n\
         [[route]]\nname = \"never\"\npath = \"/app\"\nmax_pending = 1000000\n\
         cold_start_timeout = \"1h\"\nstart_timeout = \"1h\"\n\
         [route.process]\ncommand = [\"sleep\", \"3600\"]\n"
    )
}

const REQUEST: &[u8] = b"GET /app/x HTTP/1.1\r\nHost: bench\r\nUser-Agent: e2e\r\n\r\n";

pub async fn parked_bin(args: Args) -> Result<(), BoxError> {
    let bin = args.req("bin").to_owned();
    let n: usize = args.num("n", 5000);
    // Extra top-level keys, e.g. `--top "workers = 1"`.
    let proxy = Binary::start(&bin, &never_ready(args.get("top").unwrap_or(""))).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = proxy.rss_kib();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(proxy.addr).await?;
        s.write_all(REQUEST).await?;
        conns.push(s);
    }
    // Parked once the RSS stops growing.
    let mut last = 0;
    let mut rss = proxy.rss_kib();
    while rss != last {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = rss;
        rss = proxy.rss_kib();
    }
    // Every connection is still open and unanswered.
    let mut answered = 0;
    for s in &mut conns {
        let mut b = [0u8; 1];
        if let Ok(Ok(k)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await {
            if k > 0 {
                answered += 1;
            }
        }
    }
    let per = (rss.saturating_sub(base) as f64 * 1024.0) / n as f64;
    eprintln!(
        "parked-bin: {n} parked connections, binary RSS {base} KiB -> {rss} KiB: {per:.0} B each ({answered} answered early)"
    );
    println!(
        "{}",
        json!({ "n": n, "base_rss_kib": base, "parked_rss_kib": rss,
                "bytes_per_parked_connection": per, "answered_early": answered })
    );
    Ok(())
}

pub async fn accept_storm(args: Args) -> Result<(), BoxError> {
    let bin = args.req("bin").to_owned();
    let n: usize = args.num("n", 2000);
    let extra = match args.get("backlog") {
        Some(b) => format!("listen_backlog = {b}"),
        None => String::new(),
    };
    // The machine is this harness's backend server, started as the route's process: up in a
    // few milliseconds, and (unlike `python3 -m http.server`, whose listen backlog is 5) it
    // takes the burst of proxied requests without dropping SYNs of its own.
    let exe = std::env::current_exe()?;
    let addr_file = std::env::temp_dir().join(format!("vmproxy-storm-{}.addr", std::process::id()));
    let config = format!(
        "listen = \"127.0.0.1:{{listen_port}}\"\n{extra}\n\
         [[route]]\nname = \"storm\"\npath = \"/app\"\nhealth_path = \"/app/health\"\n\
         max_pending = 100000\n\
         [route.process]\ncommand = [{exe:?}, \"backend\", \"--port\", \"{{port}}\", \"--addr-file\", {addr_file:?}]\n"
    );
    let proxy = Binary::start(&bin, &config).await?;
    let addr = proxy.addr;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            let connected = started.elapsed();
            s.write_all(b"GET /app/ HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            let ok = out.starts_with(b"HTTP/1.1 200");
            Ok::<_, std::io::Error>((connected, started.elapsed(), ok))
        });
    }
    let mut connected = Vec::with_capacity(n);
    let mut answered = Vec::with_capacity(n);
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok((c, a, good)) => {
                connected.push(c.as_secs_f64() * 1e3);
                answered.push(a.as_secs_f64() * 1e3);
                if good {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            Err(_) => failed += 1,
        }
    }
    drop(proxy);
    let _ = std::fs::remove_file(&addr_file);
    connected.sort_by(f64::total_cmp);
    answered.sort_by(f64::total_cmp);
    let summary = json!({
        "n": n,
        "listen_backlog": args.get("backlog").unwrap_or("default"),
        "ok": ok,
        "failed": failed,
        "connected_p50_ms": percentile(&connected, 50.0),
        "connected_p99_ms": percentile(&connected, 99.0),
        "connected_max_ms": percentile(&connected, 100.0),
        "answered_max_ms": percentile(&answered, 100.0),
    });
    eprintln!("accept-storm: {summary}");
    println!("{summary}");
    Ok(())
}
