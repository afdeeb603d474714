//! A Compute Engine VM behind an axum app: `/vm/...` starts the VM on demand, everything else
//! is served by the app.
//!
//! Fully local, against the built-in emulator (no cloud account, nothing leaves 127.0.0.0/8):
//!
//! ```sh
//! cargo run --example gce --features emulator -- --emulator          # one request, then exit
//! cargo run --example gce --features emulator -- --emulator --serve  # keep serving on :3000
//! ```
//!
//! Against a real project (see docs/gce.md for the IAM roles and the firewall rule):
//!
//! ```sh
//! cargo run --example gce -- --project my-project --zone europe-west1-b --instance vmproxy-demo
//! curl localhost:3000/vm/
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use vmproxy::backend::gce::{GceBackend, GceBackendBuilder};
use vmproxy::{BoxError, Route, VmProxyLayer};

/// A startup script for the real VM: a tiny HTTP server on the port vmproxy proxies to.
const STARTUP: &str = r#"#!/bin/bash
PORT=$(curl -s -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/vmproxy-port)
mkdir -p /srv && cd /srv && echo ok > healthz && echo "hello from $(hostname)" > index.html
exec python3 -m http.server "${PORT:-80}"
"#;

struct Args {
    emulator: bool,
    serve: bool,
    listen: SocketAddr,
    project: Option<String>,
    zone: String,
    instance: String,
    port: u16,
}

fn args() -> Result<Args, BoxError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut a = Args {
        emulator: false,
        serve: false,
        listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
        project: env("GOOGLE_CLOUD_PROJECT"),
        zone: env("GCE_ZONE").unwrap_or_else(|| "us-central1-a".into()),
        instance: env("GCE_INSTANCE").unwrap_or_else(|| "vmproxy-demo".into()),
        port: 80,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--emulator" => a.emulator = true,
            "--serve" => a.serve = true,
            "--listen" => a.listen = value()?.parse()?,
            "--project" => a.project = Some(value()?),
            "--zone" => a.zone = value()?,
            "--instance" => a.instance = value()?,
            "--port" => a.port = value()?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(a)
}

fn builder(a: &Args) -> GceBackendBuilder {
    let mut b = GceBackend::builder(a.zone.clone(), a.instance.clone())
        .port(a.port)
        .startup_script(STARTUP)
        .label("app", "vmproxy-example");
    if let Some(p) = &a.project {
        b = b.project(p.clone());
    }
    b
}

fn app(route: Route) -> Router {
    Router::new()
        .route("/", get(|| async { "always on; try /vm/\n" }))
        .layer(VmProxyLayer::new(route))
}

async fn serve(app: Router, listen: SocketAddr) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("serving on http://{listen}  (try: curl http://{listen}/vm/)");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Logs go to stderr (stdout carries the example's own output), in colour only on a
    // terminal: `2> gce.log` gets plain text, not escape codes.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut a = args()?;
    if a.emulator {
        return local(&mut a).await;
    }
    let backend = builder(&a).build()?;
    let route = Route::builder("/vm", backend)
        .strip_prefix(true)
        .health_path("/healthz")
        .idle_timeout(Some(Duration::from_secs(600)))
        .build()?;
    let handle = route.handle();
    serve(app(route), a.listen).await?;
    println!("taking the VM down");
    handle.stop().await;
    Ok(())
}

#[cfg(feature = "emulator")]
async fn local(a: &mut Args) -> Result<(), BoxError> {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use vmproxy::emulator::{Emulator, EmulatorOptions};

    let emu =
        Emulator::start(EmulatorOptions::default().boot_delay(Duration::from_millis(500))).await?;
    println!(
        "emulator at {} (project {})",
        emu.compute_base(),
        emu.project()
    );
    a.port = 8080;
    a.project = None; // from the emulator's metadata server
    let backend = builder(a)
        .endpoint(emu.compute_base())
        .metadata_server(emu.url())
        .poll_interval(Duration::from_millis(200))
        .build()?;
    let route = Route::builder("/vm", backend)
        .strip_prefix(true)
        .health_path("/healthz")
        .idle_timeout(Some(Duration::from_secs(60)))
        .build()?;
    let handle = route.handle();
    let app = app(route);
    if a.serve {
        serve(app, a.listen).await?;
    } else {
        let started = std::time::Instant::now();
        let req = http::Request::get("/vm/hello")
            .header("host", "example.test")
            .body(axum::body::Body::empty())?;
        let res = app.oneshot(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "GET /vm/hello → {status} after {:?} (cold start)",
            started.elapsed()
        );
        println!("{}", String::from_utf8_lossy(&body));
        println!(
            "calls: {:?}",
            emu.calls()
                .iter()
                .map(|c| c.method.as_str())
                .collect::<Vec<_>>()
        );
    }
    handle.stop().await;
    println!(
        "VM after stop: {:?}",
        emu.instance(&a.zone, &a.instance).map(|i| i.status)
    );
    Ok(())
}

#[cfg(not(feature = "emulator"))]
async fn local(_: &mut Args) -> Result<(), BoxError> {
    Err("--emulator needs the `emulator` feature: cargo run --example gce --features emulator -- --emulator".into())
}
