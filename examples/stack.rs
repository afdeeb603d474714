//! `VmProxyLayer` in a tower-http stack: access traces, compression, a handler timeout and a
//! concurrency limit, in the order that keeps cold starts, long bodies and WebSockets working.
//!
//! ```text
//! cargo run --example stack
//! curl -i http://127.0.0.1:3000/                         # the front, gzip if asked for
//! curl -i http://127.0.0.1:3000/app/                     # starts the machine (~2 s), then answers
//! curl -s http://127.0.0.1:3000/app/big?mib=64 | wc -c   # 64 MiB streamed through, not cut
//! ```
//!
//! `STACK_ADDR=127.0.0.1:PORT` serves on another address. The machine is this same program run
//! with `--backend PORT` (a process backend): it boots in 2 s, longer than the front's 1 s
//! handler timeout, and the first request is served all the same.
//!
//! # The order, outermost first
//!
//! ```text
//! TraceLayer            every request, proxied or not, with its status and latency
//! CompressionLayer      only whole bodies (exact size known), never a 101 — see `WholeBodies`
//! VmProxyLayer          /app/... to the machine; everything else goes further in
//! ConcurrencyLimitLayer the front's own handlers
//! TimeoutLayer          the front's own handlers
//! Router                the always-on front
//! ```
//!
//! - **Timeout inside the proxy.** tower-http's `TimeoutLayer` times the response future: until
//!   the response head. For a proxied request that includes the whole cold start (minutes for a
//!   VM), and for an upload the whole request body when the machine answers after reading it.
//!   Outside the proxy a 1 s timeout answers such requests with its own status and drops them
//!   (it does not even compile there as is: it needs a `Default` body, so the response body has
//!   to be mapped first). The proxy has timeouts of its own for the machine
//!   (`cold_start_timeout`, `response_header_timeout` on the route); the front's handlers get
//!   this one.
//! - **Concurrency limit inside the proxy.** `ConcurrencyLimit` holds its permit until the
//!   response head too: outside the proxy, requests waiting for a cold start would take every
//!   permit and the always-on front would stop answering. The proxy admits its own waiters
//!   (`max_pending` on the route).
//! - **Compression outside, but only for whole bodies.** tower-http's `CompressionLayer` skips a
//!   response that already has a `Content-Encoding` or a `Content-Range`, but it does not look at
//!   the status: a predicate that lets a `101 Switching Protocols` through gets it labelled
//!   `Content-Encoding: gzip` (hyper sends no body after a 101, so only the label is wrong, but
//!   the connection belongs to another protocol from then on). A stream of unknown length it
//!   would re-encode on the front as it passes (flushing whenever the stream waits), dropping
//!   `Content-Length` and `Accept-Ranges`, and spending the front's CPU on downloads that are
//!   often compressed already. `WholeBodies` lets it compress only a body whose exact size is
//!   known (an axum `String`, a file the machine sends with `Content-Length`) and never a 1xx.
//! - **Trace outermost**, so a line is logged for every request, including those the proxy
//!   answers itself (503 while a start failed, 504 after `cold_start_timeout`).

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::StreamBody;
use tower::limit::ConcurrencyLimitLayer;
use tower::ServiceBuilder;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::compression::predicate::{DefaultPredicate, Predicate};
use tower_http::compression::{Compression, CompressionLayer};
use tower_http::timeout::{Timeout, TimeoutLayer};
use tower_http::trace::{Trace, TraceLayer};
use vmproxy::backend::process::ProcessBackend;
use vmproxy::{Route, VmProxy, VmProxyLayer};

/// The knobs of the stack.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long one of the front's own handlers may take to answer.
    pub handler_timeout: Duration,
    /// How many of the front's own requests run at once.
    pub front_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handler_timeout: Duration::from_secs(1),
            front_concurrency: 64,
        }
    }
}

/// The whole stack, as one service.
pub type Stack = Trace<
    Compression<VmProxy<tower::limit::ConcurrencyLimit<Timeout<Router>>>, WholeBodies>,
    SharedClassifier<ServerErrorsAsFailures>,
>;

/// Wraps `front` (the always-on app) and `proxy` (the on-demand machines) in the stack, in the
/// order explained at the top of this file.
pub fn stack(proxy: VmProxyLayer, front: Router, limits: Limits) -> Stack {
    ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(CompressionLayer::new().compress_when(WholeBodies::default()))
        .layer(proxy)
        // Below this line: the front's own handlers only.
        .layer(ConcurrencyLimitLayer::new(limits.front_concurrency))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.handler_timeout,
        ))
        .service(front)
}

/// The compression predicate: tower-http's default (not tiny, not images, not gRPC, not
/// `text/event-stream`), and only for a body whose exact size is known, never for a 1xx.
#[derive(Clone, Default)]
pub struct WholeBodies(DefaultPredicate);

impl Predicate for WholeBodies {
    fn should_compress<B>(&self, response: &http::Response<B>) -> bool
    where
        B: HttpBody,
    {
        // A 101's connection belongs to another protocol after the head; a body of unknown
        // size is a stream, passed on as the machine sends it.
        !response.status().is_informational()
            && (response.body().size_hint().exact().is_some()
                || response
                    .headers()
                    .contains_key(http::header::CONTENT_LENGTH))
            && self.0.should_compress(response)
    }
}

/// The front: what is always on.
pub fn front() -> Router {
    Router::new().route(
        "/",
        get(|| async {
            "front: always on, and compressed when asked (Accept-Encoding: gzip). Try /app/.\n"
                .repeat(4)
        }),
    )
}

#[tokio::main]
async fn main() -> Result<(), vmproxy::BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--backend") {
        let port: u16 = args.get(2).ok_or("--backend needs a port")?.parse()?;
        return backend(port).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=debug".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let me = std::env::current_exe()?;
    let machine = ProcessBackend::new([
        me.to_string_lossy().into_owned(),
        "--backend".into(),
        "{port}".into(),
    ])?
    .name("stack-backend")
    .stop_grace(Duration::from_secs(2));
    let route = Route::builder("/app", machine)
        .strip_prefix(true)
        .health_path("/healthz")
        .idle_timeout(Some(Duration::from_secs(30)))
        .cold_start_timeout(Duration::from_secs(30))
        .build()?;
    let handle = route.handle();
    let service = stack(VmProxyLayer::new(route), front(), Limits::default());

    let addr = std::env::var("STACK_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        format!(
            "cannot listen on {addr}: {e}; set STACK_ADDR=127.0.0.1:PORT to use another address"
        )
    })?;
    let shown = listener.local_addr()?;
    tracing::info!("listening on http://{shown}  (try: curl -i http://{shown}/app/)");
    vmproxy::server::Server::new()
        .serve(listener, service, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    handle.stop().await;
    Ok(())
}

/// The on-demand machine: boots for 2 s (longer than the front's handler timeout), then
/// answers; `/big?mib=N` streams N MiB with no `Content-Length`.
async fn backend(port: u16) -> Result<(), vmproxy::BoxError> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let booted = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/big", get(big))
        .fallback(move |req: Request| async move {
            format!("machine booted at unix time {booted} got {}\n", req.uri())
        });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn big(req: Request) -> Response<Body> {
    let mib: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("mib="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let n = mib * 16;
    let s = futures_util::stream::unfold(0u64, move |i| {
        let chunk = chunk.clone();
        async move { (i < n).then(|| (Ok::<_, Infallible>(Frame::data(chunk)), i + 1)) }
    });
    Response::new(Body::new(StreamBody::new(s)))
}
