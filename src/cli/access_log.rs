//! The binary's access log: one INFO event per request, target `vmproxy::access`, written when
//! the response head is ready.
//!
//! Not tower-http's `TraceLayer`: its span per request is entered and left on every poll of the
//! response future and of every body frame, and its fields are formatted when the span opens
//! and again with the event. On 2 cores that cost the warm path ~14 % of its requests/s (the
//! measure is in BENCHMARKS.md); one event with every field costs about half as much.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, Uri};
use tracing::{info, Level};

/// Logs every request the inner service answers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AccessLogLayer;

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct AccessLog<S> {
    inner: S,
}

/// What the line needs from the request: taken only when the line will be written.
struct Seen {
    method: Method,
    uri: Uri,
    id: Option<HeaderValue>,
    at: Instant,
}

impl<S, B, ResBody> tower::Service<Request<B>> for AccessLog<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // `RUST_LOG=vmproxy::access=off` makes this a relaxed load and a branch.
        let seen = tracing::enabled!(target: "vmproxy::access", Level::INFO).then(|| Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            id: req.headers().get("x-request-id").cloned(),
            at: Instant::now(),
        });
        AccessLogFuture {
            inner: self.inner.call(req),
            seen,
        }
    }
}

/// The inner service's response future, and the line to write when it is ready.
#[pin_project::pin_project]
pub(crate) struct AccessLogFuture<F> {
    #[pin]
    inner: F,
    seen: Option<Seen>,
}

impl<F, ResBody, E> std::future::Future for AccessLogFuture<F>
where
    F: std::future::Future<Output = Result<Response<ResBody>, E>>,
    E: std::fmt::Display,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some(seen) = this.seen.take() {
            let latency = Millis(seen.at.elapsed());
            let id = seen.id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
            match &out {
                Ok(res) => {
                    let served = res.extensions().get::<vmproxy::MachineResponse>();
                    info!(
                        target: "vmproxy::access",
                        method = %seen.method,
                        path = %seen.uri.path(),
                        id,
                        status = res.status().as_u16(),
                        latency_ms = %latency,
                        machine = served.map(|s| tracing::field::display(s.machine())),
                        waited_for_start = served.map(|s| s.waited_for_start()),
                        "served"
                    );
                }
                Err(e) => info!(
                    target: "vmproxy::access",
                    method = %seen.method,
                    path = %seen.uri.path(),
                    id,
                    latency_ms = %latency,
                    error = %e,
                    "failed"
                ),
            }
        }
        Poll::Ready(out)
    }
}

/// A duration in milliseconds with microsecond precision (`12.345`), written with integer
/// arithmetic: cheaper per access-log line than formatting an `f64`'s shortest form.
pub(crate) struct Millis(pub(crate) Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = self.0.as_micros();
        write!(f, "{}.{:03}", us / 1000, us % 1000)
    }
}
