//! The operator's view of the machines: [`Admin`], a tower service with a JSON API, Prometheus
//! metrics, live events and an HTML status page.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /` | the status page: each machine's state, counts, time to the idle stop, last error, with start and stop buttons; live from `/events` (inline CSS and JS only) |
//! | `GET /machines` | a JSON array, one object per machine (below) |
//! | `GET /machines/{name}` | one of them |
//! | `POST /machines/{name}/start` | pre-warm: `202` once the start is begun (`200` if it already runs); with `?wait=true`, `200` once it runs, or the start's error status (503, 504) |
//! | `POST /machines/{name}/stop` | stop it (requests in flight finish first): `202` once begun (`200` if nothing runs); with `?wait=true`, `200` once stopped |
//! | `POST /stop` | stop every machine (the original Go package's `/_ah/stop`), `202`, or `200` with `?wait=true` |
//! | `GET /metrics` | the Prometheus text exposition, when a render function was given ([`Admin::metrics`]) |
//! | `GET /events` | server-sent events: `{"type":"snapshot","machines":[…]}` at once and every few seconds, and `{"type":"state","machine":{…}}` on each state change, one `data:` line each |
//!
//! A machine object: `name`, `state` (`absent`, `creating`, `running`, `stopping`), `endpoint`
//! (or null), `in_flight`, `waiting`, `state_since` (RFC 3339), `starting_phase` (`backend`,
//! `readiness` or null), `idle_stop_in_seconds` (or null), `last_error` (or null),
//! `boot_seconds` (the median of the last 16 successful cold starts' totals, or null before the
//! first), `boot_phases` (the medians phase by phase, `{"backend_seconds", "readiness_seconds"}`,
//! or null), `ready_in_seconds` (how long until it should be ready, from the same medians: what
//! is left of a start under way, a whole start while absent or stopping; null while it runs or
//! before the first start), `last_start` (the last cold start's phases, or null).
//!
//! An unknown machine name is a `404` with a JSON `{"error": …}`; a wrong method a `405` with
//! `Allow`; any other path a `404`. `GET` endpoints answer `HEAD` too.
//!
//! **Token.** With [`Admin::token`], every request but the page itself needs
//! `Authorization: Bearer <token>` (else `401` with `WWW-Authenticate: Bearer`); the token is
//! compared in constant time. The page (`GET /`) is static — it holds no machine data — and its
//! script sends the header on every call: give it the token once in the URL's fragment,
//! `http://host:9090/#token=…`. A fragment is never sent to a server, so the token stays out of
//! access logs and `Referer`; the script keeps it in `sessionStorage` and removes it from the
//! address bar. Without the fragment the page asks for it.
//!
//! **Cross-site requests.** A `POST` whose `Origin` names another host than its `Host` is refused
//! (`403`), so a web page cannot stop machines through a browser on the operator's machine.
//! Without a token, a request whose `Host` is a name other than `localhost` is refused too
//! (`403`): a page whose name an attacker's DNS points at 127.0.0.1 (DNS rebinding) would
//! otherwise be of the same origin as the API.
//!
//! # Example
//!
//! The whole API on its own listener, and only `POST /_ah/stop` on the application's router:
//!
//! ```
//! use axum::Router;
//! use vmproxy::{admin::Admin, backend::process::ProcessBackend, Route, VmProxyLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = ProcessBackend::new(["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"])?;
//! let layer = VmProxyLayer::new(Route::builder("/files", backend).build()?);
//!
//! // Serve this on a loopback listener, e.g. with `vmproxy::server::Server`.
//! let admin = Admin::for_layer(&layer).token("s3cret");
//!
//! // `/_ah/stop` is the admin's `/stop` under the base `/_ah`; nothing else of it is routed.
//! let app: Router = Router::new()
//!     .route_service("/_ah/stop", Admin::for_layer(&layer).base("/_ah"))
//!     .layer(layer);
//! # let _ = (admin, app);
//! # Ok(())
//! # }
//! ```
//!
//! With `Router::nest_service("/admin", admin)`, the page is at `/admin/` and the API under it.

mod body;
mod events;
mod future;
mod view;

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tower_service::Service;

pub use body::AdminBody;
pub use future::AdminFuture;

use crate::layer::VmProxyLayer;
use crate::lifecycle::Handle;
use crate::telemetry;

const PAGE: &str = include_str!("page.html");

/// The Prometheus text exposition format's content type.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The admin API and status page for a set of machines; see the [module docs](self).
///
/// Cheap to clone; clones share the configuration.
#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    machines: Vec<Handle>,
    render: Option<Render>,
    token: Option<Arc<[u8]>>,
    base: String,
    snapshot_every: Duration,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field(
                "machines",
                &self
                    .inner
                    .machines
                    .iter()
                    .map(Handle::name)
                    .collect::<Vec<_>>(),
            )
            .field("metrics", &self.inner.render.is_some())
            .field("token", &self.inner.token.as_ref().map(|_| "…"))
            .field("base", &self.inner.base)
            .finish()
    }
}

impl Admin {
    /// The admin of these machines. When two share a name, `/machines/{name}` means the first.
    pub fn new(machines: impl IntoIterator<Item = Handle>) -> Self {
        Admin {
            inner: Arc::new(Inner {
                machines: machines.into_iter().collect(),
                render: None,
                token: None,
                base: String::new(),
                snapshot_every: Duration::from_secs(5),
            }),
        }
    }

    /// The admin of every route of `layer`.
    pub fn for_layer(layer: &VmProxyLayer) -> Self {
        Admin::new(layer.routes().iter().map(|r| r.handle()))
    }

    fn with(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Serve `GET /metrics` with what `render` returns: the Prometheus text exposition of the
    /// application's recorder (e.g. `PrometheusHandle::render` of `metrics-exporter-prometheus`).
    /// Just before calling it, the machines' gauges are set from their status
    /// ([`telemetry::refresh`]). Without it, `/metrics` is a 404.
    #[must_use]
    pub fn metrics(self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.with(|i| i.render = Some(Arc::new(render)))
    }

    /// Require `Authorization: Bearer <token>` on every request but the static page.
    #[must_use]
    pub fn token(self, token: impl Into<String>) -> Self {
        let token: String = token.into();
        self.with(|i| i.token = Some(token.into_bytes().into()))
    }

    /// Serve the endpoints under `base` (e.g. `/_ah`): for a service routed at a full path, as
    /// axum's `route_service` does. Not needed under `nest_service`, which strips its prefix.
    #[must_use]
    pub fn base(self, base: impl Into<String>) -> Self {
        let base: String = base.into();
        let base = format!("/{}", base.trim_matches('/'));
        let base = if base == "/" { String::new() } else { base };
        self.with(|i| i.base = base)
    }

    /// How often `/events` sends a snapshot of every machine, so counts and timers stay current
    /// between state changes (default: 5 s).
    #[must_use]
    pub fn snapshot_interval(self, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(100));
        self.with(|i| i.snapshot_every = every)
    }

    fn answer(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap) -> AdminFuture {
        let inner = &self.inner;
        let Some(path) = strip_base(uri.path(), &inner.base) else {
            return ready(not_found(uri.path()));
        };
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let wait = wants_wait(uri.query());
        // The page holds no data: a browser can load it without a header, and its script then
        // sends the token on every call.
        let page = matches!(segments.as_slice(), [""]);
        if inner.token.is_none() && !addressed_by_number(uri, headers) {
            return ready(error(
                StatusCode::FORBIDDEN,
                "without a token, the admin API answers requests to an IP address or localhost only",
            ));
        }
        if !page {
            if let Some(refused) = self.unauthorized(headers) {
                return ready(refused);
            }
        }
        let head = method == Method::HEAD;
        let get = method == Method::GET || head;
        let post = method == Method::POST;
        if post {
            if let Some(refused) = cross_origin(headers) {
                return ready(refused);
            }
        }
        let res = match segments.as_slice() {
            [""] if get => page_response(),
            ["machines"] if get => {
                let all: Vec<Value> = inner.machines.iter().map(view::machine).collect();
                json_response(StatusCode::OK, &Value::Array(all))
            }
            ["machines", name] if get => match self.find(name) {
                Some(h) => json_response(StatusCode::OK, &view::machine(h)),
                None => unknown(name),
            },
            ["machines", name, "start"] if post => match self.find(name) {
                Some(h) => return start(h.clone(), wait),
                None => unknown(name),
            },
            ["machines", name, "stop"] if post => match self.find(name) {
                Some(h) => return stop(vec![h.clone()], wait, false),
                None => unknown(name),
            },
            ["stop"] if post => return stop(inner.machines.clone(), wait, true),
            ["metrics"] if get => match &inner.render {
                Some(render) => {
                    telemetry::describe();
                    for h in &inner.machines {
                        telemetry::refresh(&h.status());
                    }
                    let mut res = Response::new(AdminBody::full(render()));
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(METRICS_CONTENT_TYPE),
                    );
                    res
                }
                None => error(StatusCode::NOT_FOUND, "no metrics are exported here"),
            },
            ["events"] if get => {
                let body = if head {
                    AdminBody::empty()
                } else {
                    events::stream(self.inner.clone())
                };
                let mut res = Response::new(body);
                let h = res.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                // Proxies that buffer (nginx) would hold the events back.
                h.insert("x-accel-buffering", HeaderValue::from_static("no"));
                res
            }
            [""] | ["machines"] | ["machines", _] | ["metrics"] | ["events"] => {
                method_not_allowed("GET, HEAD")
            }
            ["machines", _, "start" | "stop"] | ["stop"] => method_not_allowed("POST"),
            _ => not_found(uri.path()),
        };
        ready(if head { without_body(res) } else { res })
    }

    fn find(&self, encoded: &str) -> Option<&Handle> {
        let name = percent_decode(encoded)?;
        self.inner.machines.iter().find(|h| h.name() == name)
    }

    /// The refusal of a request without the token, when one is set.
    fn unauthorized(&self, headers: &HeaderMap) -> Option<Response<AdminBody>> {
        let token = self.inner.token.as_ref()?;
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let given = match (values.next(), values.next()) {
            (Some(v), None) => bearer(v.as_bytes()),
            _ => None,
        };
        let Some(given) = given else {
            return Some(unauthorized(
                "Bearer realm=\"vmproxy admin\"",
                "this needs Authorization: Bearer <token>",
            ));
        };
        if same_secret(given, token) {
            None
        } else {
            Some(unauthorized(
                "Bearer realm=\"vmproxy admin\", error=\"invalid_token\"",
                "the token is not the admin token",
            ))
        }
    }
}

impl<B> Service<Request<B>> for Admin {
    type Response = Response<AdminBody>;
    type Error = Infallible;
    type Future = AdminFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> AdminFuture {
        self.answer(req.method(), req.uri(), req.headers())
    }
}

fn ready(res: Response<AdminBody>) -> AdminFuture {
    AdminFuture::ready(res)
}

/// `path` under `base`, as the admin's own path (`/` for the base itself).
fn strip_base<'a>(path: &'a str, base: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(base)?;
    match rest {
        "" => Some("/"),
        r if r.starts_with('/') => Some(r),
        _ => None,
    }
}

fn wants_wait(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "wait" | "wait=true" | "wait=1"))
    })
}

/// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether `given` is the token, compared without stopping at the first wrong byte, so that the
/// time taken does not tell how much of a guess was right. (The length may show; a token's
/// length is no secret worth guarding.)
fn same_secret(given: &[u8], token: &[u8]) -> bool {
    if given.len() != token.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(token)
        .fold(0u8, |acc, (a, b)| acc | std::hint::black_box(a ^ b));
    diff == 0
}

/// Whether the request names this server by an IP address or `localhost`, not by a name a DNS
/// server could point anywhere (DNS rebinding).
fn addressed_by_number(uri: &http::Uri, headers: &HeaderMap) -> bool {
    let authority = match (uri.authority(), headers.get(header::HOST)) {
        (Some(a), _) => a.as_str(),
        (None, Some(host)) => match host.to_str() {
            Ok(host) => host,
            Err(_) => return false,
        },
        (None, None) => return true, // HTTP/1.0 without Host: no name to rebind
    };
    let port_ok = |rest: &str| {
        rest.is_empty()
            || rest
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if let Some(v6) = authority.strip_prefix('[') {
        return v6
            .split_once(']')
            .is_some_and(|(ip, rest)| ip.parse::<std::net::Ipv6Addr>().is_ok() && port_ok(rest));
    }
    let (host, rest) = match authority.find(':') {
        Some(at) => authority.split_at(at),
        None => (authority, ""),
    };
    port_ok(rest)
        && (host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::Ipv4Addr>().is_ok())
}

/// A `POST` from a page of another origin is refused: browsers send `Origin` on it, and a form
/// needs no preflight.
fn cross_origin(headers: &HeaderMap) -> Option<Response<AdminBody>> {
    let origin = headers.get(header::ORIGIN)?;
    let host = headers.get(header::HOST).map(HeaderValue::as_bytes);
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, authority)| authority.as_bytes());
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => None,
        _ => Some(error(
            StatusCode::FORBIDDEN,
            "a request from another origin's page is refused",
        )),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Polls `fut` once: enough for a start or a stop to be decided and begun (the lifecycle runs
/// it in a task of its own), without waiting for it.
async fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    let mut fut = fut;
    poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

fn start(handle: Handle, wait: bool) -> AdminFuture {
    AdminFuture::waiting(Box::pin(async move {
        let started = handle.start();
        let mut started = std::pin::pin!(started);
        let outcome = if wait {
            Some(started.await)
        } else {
            // Not waiting means not holding a place among the waiters either: a stop asked for
            // meanwhile is not undone by this start's waiter. The start itself goes on.
            match poll_once(started.as_mut()).await {
                Poll::Ready(outcome) => Some(outcome),
                Poll::Pending => None,
            }
        };
        match outcome {
            None => json_response(StatusCode::ACCEPTED, &view::machine(&handle)),
            Some(Ok(_)) => json_response(StatusCode::OK, &view::machine(&handle)),
            Some(Err(e)) => {
                let mut res = error(e.status(), &e.to_string());
                if let Some(after) = e.retry_after() {
                    let secs = crate::error::retry_after_secs(after);
                    res.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                res
            }
        }
    }))
}

fn stop(handles: Vec<Handle>, wait: bool, all: bool) -> AdminFuture {
    AdminFuture::waiting(Box::pin(async move {
        let mut begun = false;
        let mut pending: Vec<JoinHandle<()>> = Vec::new();
        for h in &handles {
            let h = h.clone();
            if wait {
                // Concurrently: one slow machine does not hold up the others' stops.
                pending.push(tokio::spawn(async move { h.stop().await }));
            } else {
                let stopping = h.stop();
                begun |= poll_once(std::pin::pin!(stopping)).await.is_pending();
            }
        }
        for task in pending {
            let _ = task.await;
        }
        let status = if begun {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        let body = if all {
            Value::Array(handles.iter().map(view::machine).collect())
        } else {
            view::machine(&handles[0])
        };
        json_response(status, &body)
    }))
}

fn json_response(status: StatusCode, value: &Value) -> Response<AdminBody> {
    let mut body = value.to_string();
    body.push('\n');
    let mut res = Response::new(AdminBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn error(status: StatusCode, reason: &str) -> Response<AdminBody> {
    json_response(status, &json!({ "error": reason }))
}

fn unknown(encoded: &str) -> Response<AdminBody> {
    let name = percent_decode(encoded).unwrap_or_else(|| encoded.to_owned());
    error(
        StatusCode::NOT_FOUND,
        &format!("no machine is named {name:?}"),
    )
}

fn not_found(path: &str) -> Response<AdminBody> {
    error(
        StatusCode::NOT_FOUND,
        &format!("{path} is not an admin endpoint"),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<AdminBody> {
    let mut res = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this endpoint answers {allow} only"),
    );
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

fn unauthorized(challenge: &'static str, reason: &str) -> Response<AdminBody> {
    let mut res = error(StatusCode::UNAUTHORIZED, reason);
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}

fn page_response() -> Response<AdminBody> {
    let mut res = Response::new(AdminBody::full(Bytes::from_static(PAGE.as_bytes())));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Inline script and style only; calls to this origin only; never framed.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn without_body(res: Response<AdminBody>) -> Response<AdminBody> {
    let (parts, _) = res.into_parts();
    Response::from_parts(parts, AdminBody::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn secrets_match_only_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cres", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cret!", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }

    #[test]
    fn bases_and_queries() {
        assert_eq!(strip_base("/stop", ""), Some("/stop"));
        assert_eq!(strip_base("/_ah/stop", "/_ah"), Some("/stop"));
        assert_eq!(strip_base("/_ah", "/_ah"), Some("/"));
        assert_eq!(strip_base("/_ahx/stop", "/_ah"), None);
        assert!(wants_wait(Some("wait=true")));
        assert!(wants_wait(Some("x=1&wait")));
        assert!(!wants_wait(Some("wait=false")));
        assert!(!wants_wait(None));
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("a%2"), None);
    }
}
