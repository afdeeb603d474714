//! Quickstart: an always-on axum front, and `/app` served by an on-demand machine.
//!
//! ```text
//! cargo run --example quickstart                    # or: -- --listen 127.0.0.1:PORT
//! curl http://127.0.0.1:3000/          # answered by the front itself
//! curl http://127.0.0.1:3000/app/      # first time: starts the machine (~2 s), then answers
//! curl http://127.0.0.1:3000/app/hi    # warm: answered at once by the same process
//! # wait 15 s with no request: the machine is stopped (see the log); the next /app request starts it again
//! curl http://127.0.0.1:3000/admin/metrics    # Prometheus metrics; /admin/ is the live status page
//! ```
//!
//! A browser that opens http://127.0.0.1:3000/app/ while the machine is down gets a waiting page
//! at once, which turns into the machine's own page when it is up.
//!
//! The "machine" is this same program run with `--backend PORT`: a tiny HTTP server that takes
//! two seconds to boot, like a slow VM, and needs nothing outside this repository.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use vmproxy::admin::Admin;
use vmproxy::backend::process::ProcessBackend;
use vmproxy::{telemetry, Route, VmProxyLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--backend") {
        let port: u16 = args.get(2).ok_or("--backend needs a port")?.parse()?;
        return backend(port).await;
    }

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let me = std::env::current_exe()?;
    let machine = ProcessBackend::new([
        me.to_string_lossy().into_owned(),
        "--backend".into(),
        "{port}".into(),
    ])?
    .name("quickstart-backend")
    .stop_grace(Duration::from_secs(2));
    // Metrics go to a Prometheus recorder; the admin service renders them.
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(telemetry::COLD_START_SECONDS.to_owned()),
            telemetry::COLD_START_BUCKETS,
        )?
        .build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    telemetry::describe();

    let route = Route::builder("/app", machine)
        .strip_prefix(true)
        .health_path("/healthz")
        .idle_timeout(Some(Duration::from_secs(15)))
        .cold_start_timeout(Duration::from_secs(30))
        .waiting_page(true) // browsers see a page that turns into the machine's once it runs
        .build()?;
    let handle = route.handle();
    let layer = VmProxyLayer::new(route);
    // The status page, JSON API and metrics, mounted in the app itself (the binary serves them
    // on a listener of their own instead).
    let admin = Admin::for_layer(&layer).metrics(move || prometheus.render());

    let app = Router::new()
        .route(
            "/",
            get(|| async { "front: always on. Try /app/ — it starts a machine on demand.\n" }),
        )
        .nest_service("/admin", admin)
        .layer(layer);

    // `--listen ADDR`, else QUICKSTART_ADDR, else 127.0.0.1:3000.
    let addr: SocketAddr = match args.iter().position(|a| a == "--listen") {
        Some(i) => args
            .get(i + 1)
            .ok_or("--listen needs an address")?
            .parse()?,
        None => std::env::var("QUICKSTART_ADDR")
            .unwrap_or_else(|_| "127.0.0.1:3000".into())
            .parse()?,
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "quickstart: cannot listen on {addr}: {e}\n\
                 choose another address: cargo run --example quickstart -- --listen 127.0.0.1:PORT \
                 (or QUICKSTART_ADDR=127.0.0.1:PORT)"
            );
            std::process::exit(2);
        }
    };
    let shown = listener.local_addr()?;
    tracing::info!(
        "listening on http://{}  (try: curl http://{}/app/)",
        shown,
        shown
    );
    // Timeouts and a connection cap, which axum::serve does not set: safe to expose.
    vmproxy::server::Server::new()
        .serve(listener, app, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Leave nothing running behind us.
    handle.stop().await;
    Ok(())
}

/// The on-demand machine: boots slowly, then answers.
async fn backend(port: u16) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tokio::time::sleep(Duration::from_secs(2)).await; // "booting"
    let booted = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let pid = std::process::id();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .fallback(move |req: Request| async move {
            format!(
                "backend pid {pid} (booted at unix time {booted}) got {} {}\n",
                req.method(),
                req.uri()
            )
        });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
