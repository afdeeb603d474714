//! Shared fixtures of the gce_* tests: an emulator, a backend pointed at it, a route, and an
//! axum app with the layer.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use vmproxy::backend::gce::{GceBackend, GceBackendBuilder};
use vmproxy::emulator::{Emulator, EmulatorOptions};
use vmproxy::{Route, State, VmProxyLayer};

pub const ZONE: &str = "us-central1-a";
pub const PORT: u16 = 8080;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub async fn emulator() -> Emulator {
    // Strict like Google's front end: a POST without Content-Length is refused with 411.
    Emulator::start(EmulatorOptions::fast().require_content_length(true))
        .await
        .expect("emulator starts")
}

/// A backend for `name` against `emu`, with test timings.
pub fn backend(emu: &Emulator, name: &str) -> GceBackendBuilder {
    GceBackend::builder(ZONE, name)
        .endpoint(emu.compute_base())
        .metadata_server(emu.url())
        .port(PORT)
        .poll_interval(ms(10))
        .status_interval(Some(ms(100)))
        .retry(6, ms(5), ms(40))
}

pub fn route_with(backend: impl vmproxy::backend::Backend, idle: Option<Duration>) -> Route {
    Route::builder("/vm", backend)
        .health_path("/healthz")
        .idle_timeout(idle)
        .start_backoff(ms(50), ms(100))
        .probe_interval(ms(5), ms(20))
        .cold_start_timeout(Duration::from_secs(20))
        .start_timeout(Duration::from_secs(20))
        .build()
        .expect("route builds")
}

pub fn route(backend: impl vmproxy::backend::Backend) -> Route {
    route_with(backend, None)
}

pub fn app(route: Route) -> Router {
    Router::new()
        .route("/", get(|| async { "front" }))
        .layer(VmProxyLayer::new(route))
}

/// One request through the app: status and body.
pub async fn call(app: &Router, path: &str) -> (StatusCode, String) {
    let req = Request::get(path)
        .header("host", "front.test")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One request through the app, expecting the VM's JSON echo.
pub async fn echo(app: &Router, path: &str) -> Value {
    let (status, body) = call(app, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
}

/// Waits (bounded, as a failure guard, not a timing assertion) until `f` holds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(ms(10)).await;
    }
    panic!("never happened: {what}");
}

/// Waits until the route's state satisfies `f`.
pub async fn state_becomes(route: &Route, what: &str, f: impl Fn(&State) -> bool) {
    let mut rx = route.handle().watch();
    let r = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| f(s))).await;
    assert!(
        r.is_ok(),
        "state never became {what}; it is {:?}",
        route.handle().state()
    );
}
