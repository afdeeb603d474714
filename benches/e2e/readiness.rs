//! Readiness lag: machines whose platform says "running" at once but whose HTTP server answers
//! the health path only after a boot time spread over 1–20 s.
//!
//! One axum front with one `VmProxyLayer` route per machine (`/r0`, `/r1`, …), all started
//! together by one first request each. For each machine: lag = (moment the first proxied
//! response head reached the client) − (moment the machine began to answer 2xx). The same boot
//! times are run through the original's probe schedule (an attempt at once, then waits of
//! 3 s × n for n = 2, 3, … capped at 60 s, as in its `Start` loop) to get its lag.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http::StatusCode;
use serde_json::json;
use tokio::time::Instant;
use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
use vmproxy::{Route, VmProxyLayer};

use crate::common::{listen, median, now_ns, percentile, serve, text, Args, BoxError};

/// Its HTTP server answers 503 until `boot` has passed since `start()`.
struct Slow {
    boot: Duration,
    addr: std::sync::Mutex<Option<SocketAddr>>,
    ready_at_ns: Arc<AtomicU64>,
    first_ok_ns: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
}

impl Backend for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move {
            let listener = listen(0)?;
            let addr = listener.local_addr()?;
            let ready = Instant::now() + self.boot;
            self.ready_at_ns
                .store(now_ns() + self.boot.as_nanos() as u64, Ordering::SeqCst);
            let (first_ok, probes) = (self.first_ok_ns.clone(), self.probes.clone());
            tokio::spawn(serve(
                listener,
                Arc::new(move |req| {
                    if req.uri().path().ends_with("/health") {
                        probes.fetch_add(1, Ordering::SeqCst);
                    }
                    if Instant::now() < ready {
                        return text(StatusCode::SERVICE_UNAVAILABLE, "booting");
                    }
                    let _ =
                        first_ok.compare_exchange(0, now_ns(), Ordering::SeqCst, Ordering::SeqCst);
                    text(StatusCode::OK, "ok")
                }),
            ));
            *self.addr.lock().expect("not poisoned") = Some(addr);
            Ok(Endpoint::new(addr))
        })
    }
    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async move {
            Ok(match *self.addr.lock().expect("not poisoned") {
                Some(a) => Status::Running(Endpoint::new(a)),
                None => Status::Gone,
            })
        })
    }
}

/// The original's first successful probe for a machine healthy `boot_s` after it runs:
/// attempts at 0, 6, 15, 27, 42, 60, 120, … s (waits of 3 s × n for n ≥ 2, capped at 60 s).
/// Returns that moment and the number of attempts up to it.
pub fn original_probe_at(boot_s: f64) -> (f64, u64) {
    let mut t = 0.0;
    let mut count = 1u64;
    while t < boot_s {
        count += 1;
        t += (3.0 * count as f64).min(60.0);
    }
    (t, count)
}

/// Boot times spread over 1–20 s (deterministic, uneven gaps).
pub fn boot_times(k: usize) -> Vec<f64> {
    (0..k)
        .map(|i| {
            let x = if k > 1 {
                i as f64 / (k - 1) as f64
            } else {
                0.5
            };
            // A slight wobble so boots do not all land on round seconds.
            let wobble = if i == 0 || i + 1 == k {
                0.0
            } else {
                0.37 * ((i * 7919) % 11) as f64 / 11.0 - 0.18
            };
            (1.0 + 19.0 * x + wobble).clamp(1.0, 20.0)
        })
        .collect()
}

async fn one_run(
    boots: &[f64],
    probe: Option<(Duration, Duration)>,
) -> Result<Vec<serde_json::Value>, BoxError> {
    let mut routes = Vec::new();
    let mut machines = Vec::new();
    for (i, &b) in boots.iter().enumerate() {
        let m = Arc::new(Slow {
            boot: Duration::from_secs_f64(b),
            addr: std::sync::Mutex::new(None),
            ready_at_ns: Arc::default(),
            first_ok_ns: Arc::default(),
            probes: Arc::default(),
        });
        let mut builder = Route::builder(format!("/r{i}"), m.clone())
            .health_path(format!("/r{i}/health"))
            .idle_timeout(None)
            .cold_start_timeout(Duration::from_secs(120));
        if let Some((initial, max)) = probe {
            builder = builder.probe_interval(initial, max);
        }
        routes.push(builder.build()?);
        machines.push(m);
    }
    let app = Router::new()
        .route("/", get(|| async { "front" }))
        .layer(VmProxyLayer::from_routes(routes));
    let listener = listen(0)?;
    let front = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let mut tasks = Vec::new();
    for i in 0..boots.len() {
        tasks.push(tokio::spawn(async move {
            crate::common::get(front, &format!("/r{i}/x")).await
        }));
    }
    let mut out = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, head_at, _, _) = t.await??;
        let m = &machines[i];
        let ready = m.ready_at_ns.load(Ordering::SeqCst);
        let first_ok = m.first_ok_ns.load(Ordering::SeqCst);
        let b = boots[i];
        out.push(json!({
            "boot_s": b,
            "status": status.as_u16(),
            "lag_ms": (head_at as f64 - ready as f64) / 1e6,
            "lag_after_first_ok_ms": (head_at as f64 - first_ok as f64) / 1e6,
            "probes": m.probes.load(Ordering::SeqCst),
            "original_lag_ms": (original_probe_at(b).0 - b) * 1000.0,
            "original_probes": original_probe_at(b).1,
        }));
    }
    server.abort();
    Ok(out)
}

pub async fn readiness(args: Args) -> Result<(), BoxError> {
    let k: usize = args.num("machines", 20);
    let runs: usize = args.num("runs", 3);
    let boots = boot_times(k);
    let mut all = Vec::new();
    let mut per_run_p50 = Vec::new();
    for run in 0..runs {
        let rows = one_run(&boots, None).await?;
        let mut lags: Vec<f64> = rows.iter().filter_map(|r| r["lag_ms"].as_f64()).collect();
        lags.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "readiness run {run}: p50 lag {:.1} ms, max {:.1} ms",
            percentile(&lags, 50.0),
            percentile(&lags, 100.0)
        );
        per_run_p50.push(percentile(&lags, 50.0));
        all.extend(rows);
    }
    let col = |key: &str| -> Vec<f64> {
        let mut v: Vec<f64> = all.iter().filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let (lag, lag_ok, orig) = (
        col("lag_ms"),
        col("lag_after_first_ok_ms"),
        col("original_lag_ms"),
    );
    let summary = json!({
        "machines": k,
        "runs": runs,
        "boot_times_s": boots,
        "lag_p50_ms": percentile(&lag, 50.0),
        "lag_p90_ms": percentile(&lag, 90.0),
        "lag_max_ms": percentile(&lag, 100.0),
        "median_of_run_p50_ms": median(&per_run_p50),
        "lag_after_first_ok_p50_ms": percentile(&lag_ok, 50.0),
        "lag_after_first_ok_max_ms": percentile(&lag_ok, 100.0),
        "original_lag_p50_ms": percentile(&orig, 50.0),
        "original_lag_p90_ms": percentile(&orig, 90.0),
        "original_lag_max_ms": percentile(&orig, 100.0),
        "non_200": all.iter().filter(|r| r["status"] != 200).count(),
        "rows": all,
    });
    std::fs::write(args.req("out"), serde_json::to_string_pretty(&summary)?)?;
    println!(
        "{}",
        json!({
            "lag_p50_ms": summary["lag_p50_ms"],
            "lag_max_ms": summary["lag_max_ms"],
            "original_lag_p50_ms": summary["original_lag_p50_ms"],
            "original_lag_max_ms": summary["original_lag_max_ms"],
        })
    );
    Ok(())
}
