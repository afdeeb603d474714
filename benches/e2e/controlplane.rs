//! Control-plane calls per cold start on the loopback Compute Engine emulator (feature
//! `emulator`): `--concurrent` first requests through the layer start one VM with the product's
//! default GCE backend settings; the emulator counts every API call it received.
//!
//! The original's calls on the same timings are computed from its code: per first request one
//! `instances.get` (is it running?), then `instances.insert`, then `zoneOperations.get` once a
//! second until the operation is DONE (it gets at 0 s, 1 s, … and stops at the first DONE), then
//! one `instances.get` for the address. It does not coalesce: each concurrent first request runs
//! that sequence (the later inserts fail with `alreadyExists`).

use crate::common::{Args, BoxError};

#[cfg(not(feature = "emulator"))]
pub async fn controlplane(args: Args) -> Result<(), BoxError> {
    let _ = args;
    Err("build with --features emulator".into())
}

#[cfg(feature = "emulator")]
pub async fn controlplane(args: Args) -> Result<(), BoxError> {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use axum::body::Body;
    use axum::Router;
    use http::Request;
    use serde_json::json;
    use tower::ServiceExt;
    use vmproxy::backend::gce::GceBackend;
    use vmproxy::emulator::{Emulator, EmulatorOptions};
    use vmproxy::{Route, VmProxyLayer};

    let concurrent: usize = args.num("concurrent", 100);
    let runs: usize = args.num("runs", 3);
    let mut rows = Vec::new();
    for run in 0..runs {
        // The emulator's default timings: PROVISIONING 2 s, STAGING 1 s, boot 2 s.
        let options = EmulatorOptions::default();
        let op_secs = (options.provisioning + options.staging).as_secs_f64();
        let emu = Emulator::start(options).await?;
        let backend = GceBackend::builder("us-central1-a", format!("bench-{run}"))
            .endpoint(emu.compute_base())
            .metadata_server(emu.url())
            .port(8080)
            .build()?;
        let route = Route::builder("/vm", backend)
            .health_path("/healthz")
            .idle_timeout(None)
            .cold_start_timeout(Duration::from_secs(120))
            .build()?;
        let app = Router::new().layer(VmProxyLayer::new(route));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..concurrent)
            .map(|i| {
                let app = app.clone();
                tokio::spawn(async move {
                    let req = Request::get(format!("/vm/x{i}"))
                        .header("host", "bench")
                        .body(Body::empty())
                        .expect("request");
                    app.oneshot(req).await.map(|r| r.status().as_u16())
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if t.await?? == 200 {
                ok += 1;
            }
        }
        let took = t0.elapsed().as_secs_f64();
        let mut by_method = BTreeMap::<String, usize>::new();
        for c in emu.calls() {
            *by_method.entry(c.method).or_default() += 1;
        }
        let compute_calls: usize = by_method
            .iter()
            .filter(|(m, _)| !m.starts_with("metadata"))
            .map(|(_, n)| n)
            .sum();
        // The original, one first request: get, insert, ops.get at 0..=ceil(T) s, get.
        let orig_ops_get = op_secs.ceil() as usize + 1;
        let orig_one = 1 + 1 + orig_ops_get + 1;
        let row = json!({
            "concurrent_first_requests": concurrent,
            "ok": ok,
            "cold_start_s": took,
            "calls": by_method,
            "compute_calls": compute_calls,
            "original_compute_calls_one_request": orig_one,
            "original_compute_calls_all_requests": orig_one * concurrent,
            "original_breakdown_one_request": {
                "instances.get": 2, "instances.insert": 1, "zoneOperations.get": orig_ops_get
            },
        });
        eprintln!("controlplane run {run}: {row}");
        rows.push(row);
    }
    let out = json!({ "runs": rows });
    std::fs::write(args.req("out"), serde_json::to_string_pretty(&out)?)?;
    println!("{out}");
    Ok(())
}
