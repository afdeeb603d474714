//! Cold start: N concurrent first requests against a machine with a known boot time.
//!
//! `coldstart` (the client) runs the backend server in its own process and spawns
//! `front-cold` (this same binary) as the proxy under test, so that the proxy's RSS holds the
//! proxy alone. The machine's `start()` sleeps `--boot-ms`, notes the moment it returns (the
//! server behind it already listens, so that is the moment it could first answer), and
//! counts its calls. The client opens N connections, sends one request on each, samples the
//! front's `/_stats` (RSS, pending) while they wait, and then reports the number of starts and
//! the distribution of (response end − ready moment).
//!
//! `parked-mem` measures, in one process and with no sockets, what one parked request costs the
//! layer itself: N `VmProxy::call` futures spawned as tasks against a start that never ends.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use serde_json::json;
use tower::{Service, ServiceExt};
use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
use vmproxy::{Route, VmProxyLayer};

use crate::common::{
    get_json, listen, median, now_ns, percentile, rss_kib, write_addr_file, Args, BoxError,
};

/// A machine that boots in a known time at an address that already serves.
struct Cold {
    addr: SocketAddr,
    boot: Duration,
    starts: AtomicU64,
    ready_at_ns: AtomicU64,
}

impl Backend for Cold {
    fn name(&self) -> &str {
        "cold"
    }
    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move {
            self.starts.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.boot).await;
            self.ready_at_ns.store(now_ns(), Ordering::SeqCst);
            Ok(Endpoint::new(self.addr))
        })
    }
    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async move { Ok(Status::Running(Endpoint::new(self.addr))) })
    }
}

pub async fn front_cold(args: Args) -> Result<(), BoxError> {
    let cold = Arc::new(Cold {
        addr: args.req("backend").parse()?,
        boot: Duration::from_millis(args.num("boot-ms", 5000)),
        starts: AtomicU64::new(0),
        ready_at_ns: AtomicU64::new(0),
    });
    let n: usize = args.num("n", 10_000);
    let route = Route::builder("/app", cold.clone())
        .health_path("/app/health")
        .idle_timeout(None)
        .max_pending(n.max(1))
        .cold_start_timeout(Duration::from_secs(120))
        .build()?;
    let layer = VmProxyLayer::new(route);
    let handle = layer.handle();
    let stats = move || {
        let body = json!({
            "rss_kib": rss_kib(),
            "starts": cold.starts.load(Ordering::SeqCst),
            "ready_at_ns": cold.ready_at_ns.load(Ordering::SeqCst),
            "pending": handle.pending(),
            "in_flight": handle.in_flight(),
        });
        async move { body.to_string() }
    };
    let app = Router::new().route("/_stats", get(stats)).layer(layer);
    let listener = listen(0)?;
    write_addr_file(args.req("addr-file"), listener.local_addr()?)?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

async fn wait_addr_file(path: &std::path::Path) -> Result<SocketAddr, BoxError> {
    for _ in 0..600 {
        if let Ok(s) = std::fs::read_to_string(path) {
            return Ok(s.trim().parse()?);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("{} never appeared", path.display()).into())
}

/// Connections the backend accepted so far (this query's own included).
async fn backend_conns(backend: SocketAddr) -> Result<u64, BoxError> {
    let (_, _, _, body) = crate::common::get(backend, "/_conns").await?;
    Ok(std::str::from_utf8(&body)?.trim().parse()?)
}

async fn h2_connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, BoxError> {
    let stream = crate::common::connect(addr).await?;
    let (tx, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

async fn h2_get(
    mut tx: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) -> Result<(http::StatusCode, u64, u64, Bytes), BoxError> {
    use http_body_util::BodyExt;
    tx.ready().await?;
    let req = Request::get(format!("http://{addr}/app/small"))
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let res = tx.send_request(req).await?;
    let head_at = now_ns();
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, head_at, now_ns(), body))
}

/// One cold-start run; returns its figures as JSON.
async fn cold_run(
    n: usize,
    boot_ms: u64,
    backend: SocketAddr,
    dir: &std::path::Path,
    h2_conns: usize,
) -> Result<serde_json::Value, BoxError> {
    let addr_file = dir.join(format!("front-cold-{}.addr", now_ns()));
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "front-cold",
            "--backend",
            &backend.to_string(),
            "--boot-ms",
            &boot_ms.to_string(),
        ])
        .args([
            "--n",
            &n.to_string(),
            "--addr-file",
            addr_file.to_str().expect("utf-8 path"),
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let front = wait_addr_file(&addr_file).await?;
    let _ = std::fs::remove_file(&addr_file);
    // Let the front settle, then take the baseline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = get_json(front, "/_stats").await?;
    let base_rss = base["rss_kib"].as_u64().unwrap_or(0);

    let conns_before = backend_conns(backend).await?;
    let sent_at = now_ns();
    let mut tasks = Vec::with_capacity(n);
    if h2_conns == 0 {
        for _ in 0..n {
            tasks.push(tokio::spawn(async move {
                crate::common::get(front, "/app/small").await
            }));
        }
    } else {
        let mut senders = Vec::with_capacity(h2_conns);
        for _ in 0..h2_conns {
            senders.push(h2_connect(front).await?);
        }
        for i in 0..n {
            let tx = senders[i % h2_conns].clone();
            tasks.push(tokio::spawn(h2_get(tx, front)));
        }
    }
    // Sample the front while the requests wait: the peak of pending and the RSS at that peak.
    let mut peak_pending = 0u64;
    let mut rss_at_peak = base_rss;
    let mut max_rss = base_rss;
    loop {
        let s = get_json(front, "/_stats").await?;
        let pending = s["pending"].as_u64().unwrap_or(0);
        let rss = s["rss_kib"].as_u64().unwrap_or(0);
        max_rss = max_rss.max(rss);
        if s["ready_at_ns"].as_u64().unwrap_or(0) != 0 {
            break;
        }
        if pending >= peak_pending {
            peak_pending = pending;
            rss_at_peak = rss;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut done = Vec::with_capacity(n);
    let mut ok = 0usize;
    let mut other = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        match t.await? {
            Ok((status, _head, end, _)) => {
                if status.is_success() {
                    ok += 1;
                } else {
                    *other.entry(status.as_str().to_owned()).or_default() += 1;
                }
                done.push(end);
            }
            Err(e) => *other.entry(format!("error: {e}")).or_default() += 1,
        }
    }
    let fin = get_json(front, "/_stats").await?;
    let backend_connections = backend_conns(backend).await? - conns_before - 1;
    let _ = child.kill().await;
    let ready_at = fin["ready_at_ns"].as_u64().unwrap_or(0);
    let mut wake: Vec<f64> = done
        .iter()
        .map(|&d| (d as f64 - ready_at as f64) / 1e6)
        .collect();
    wake.sort_by(|a, b| a.total_cmp(b));
    let per_parked = if peak_pending > 0 {
        (rss_at_peak.saturating_sub(base_rss) as f64 * 1024.0) / peak_pending as f64
    } else {
        f64::NAN
    };
    Ok(json!({
        "n": n,
        "boot_ms": boot_ms,
        "starts": fin["starts"],
        "ok": ok,
        "not_ok": other,
        "boot_observed_ms": (ready_at as f64 - sent_at as f64) / 1e6,
        "peak_pending": peak_pending,
        "backend_connections": backend_connections,
        "base_rss_kib": base_rss,
        "rss_at_peak_kib": rss_at_peak,
        "max_rss_kib": max_rss,
        "bytes_per_parked_request": per_parked,
        "wake_p50_ms": percentile(&wake, 50.0),
        "wake_p99_ms": percentile(&wake, 99.0),
        "wake_max_ms": percentile(&wake, 100.0),
        "wake_min_ms": percentile(&wake, 0.0),
    }))
}

pub async fn coldstart(args: Args) -> Result<(), BoxError> {
    let n: usize = args.num("n", 10_000);
    let boot_ms: u64 = args.num("boot-ms", 5000);
    let runs: usize = args.num("runs", 3);
    let out = args.req("out").to_owned();
    let h2_conns: usize = args.num("h2-conns", 100);
    let dir = std::env::temp_dir();
    // The backend runs in a process of its own: each process may hold only so many sockets
    // (`ulimit -n`), and the front opens one connection to it per concurrent request.
    let addr_file = dir.join(format!("cold-backend-{}.addr", now_ns()));
    let mut server = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "backend",
            "--addr-file",
            addr_file.to_str().expect("utf-8 path"),
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let backend = wait_addr_file(&addr_file).await?;
    let _ = std::fs::remove_file(&addr_file);
    let mut results = Vec::new();
    for run in 0..runs {
        let r = cold_run(n, boot_ms, backend, &dir, h2_conns).await?;
        eprintln!("coldstart run {run}: {r}");
        results.push(r);
        // Let the TIME_WAIT sockets and the backend's connections wind down between runs.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = server.kill().await;
    let med = |key: &str| {
        median(
            &results
                .iter()
                .filter_map(|r| r[key].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let summary = json!({
        "n": n,
        "boot_ms": boot_ms,
        "runs": runs,
        "client": if h2_conns > 0 { format!("HTTP/2, {n} streams over {h2_conns} connections") } else { format!("HTTP/1.1, {n} connections") },
        "starts_per_run": results.iter().map(|r| r["starts"].clone()).collect::<Vec<_>>(),
        "ok_per_run": results.iter().map(|r| r["ok"].clone()).collect::<Vec<_>>(),
        "median_wake_p50_ms": med("wake_p50_ms"),
        "median_wake_p99_ms": med("wake_p99_ms"),
        "median_wake_max_ms": med("wake_max_ms"),
        "median_bytes_per_parked_request": med("bytes_per_parked_request"),
        "median_peak_pending": med("peak_pending"),
        "runs_detail": results,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&summary)?)?;
    println!("{summary}");
    Ok(())
}

/// A start that does not end until the process does.
struct Never;

impl Backend for Never {
    fn name(&self) -> &str {
        "never"
    }
    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async {
            std::future::pending::<()>().await;
            unreachable!()
        })
    }
    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async { Ok(Status::Transitioning) })
    }
}

/// The layer's own memory per parked request, with no sockets: N proxied calls spawned as
/// tasks (as hyper would run them), all waiting on one start that never ends. One measurement
/// per process (freed memory would be reused by a second one): the harness runs it several
/// times.
pub async fn parked_mem(args: Args) -> Result<(), BoxError> {
    let n: usize = args.num("n", 10_000);
    let mut per = Vec::new();
    {
        let route = Route::builder("/app", Never)
            .idle_timeout(None)
            .max_pending(n)
            .cold_start_timeout(Duration::from_secs(3600))
            .build()?;
        let layer = VmProxyLayer::new(route);
        let handle = layer.handle();
        let inner = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
        });
        let svc = tower::Layer::layer(&layer, inner);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = rss_kib();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let mut svc = svc.clone();
            // HTTP/1.0, which needs no Host: a header map would allocate, and this measures
            // what the layer adds to a request, not the request itself.
            let req = Request::get(format!("/app/x?{i}"))
                .version(http::Version::HTTP_10)
                .body(Empty::<Bytes>::new())?;
            tasks.push(tokio::spawn(async move {
                let svc = svc.ready().await.expect("infallible");
                let _ = svc.call(req).await;
            }));
        }
        while handle.pending() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let after = rss_kib();
        let bytes = (after.saturating_sub(before) as f64 * 1024.0) / n as f64;
        eprintln!("parked-mem: {n} parked, RSS {before} KiB -> {after} KiB: {bytes:.0} B each");
        per.push(bytes);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
    let summary = json!({ "n": n, "bytes_per_parked_request": per[0] });
    println!("{summary}");
    Ok(())
}
