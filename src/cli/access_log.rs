//! The binary's front layer: every request gets an `x-request-id` (the client's, or a new one),
//! its credentials are marked sensitive, and its response carries the id back and is logged as
//! one INFO event (target `vmproxy::access`) when its head is ready.
//!
//! One layer, not tower-http's four (`SetSensitiveRequestHeaders`, `SetRequestId`, `TraceLayer`,
//! `PropagateRequestId`): each of those wraps the request's future and is cloned per request,
//! and the trace span is entered and left on every poll of the future and of every body frame.
//! On 2 cores, with the machine a local nginx, the four cost the warm path about a fifth of its
//! requests/s (BENCHMARKS.md has the measures).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use tracing::{info, Level};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Fields never to be written to a log, marked so that a `Debug` print of the request hides
/// them.
const SENSITIVE: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
];

/// Gives each request an id and logs its response.
#[derive(Clone, Debug)]
pub(crate) struct AccessLogLayer {
    ids: RequestIds,
}

impl AccessLogLayer {
    pub(crate) fn new() -> Self {
        AccessLogLayer {
            ids: RequestIds::new(),
        }
    }
}

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            ids: self.ids.clone(),
        }
    }
}

/// See [the module](self).
#[derive(Clone, Debug)]
pub(crate) struct AccessLog<S> {
    inner: S,
    ids: RequestIds,
}

/// What the line needs from the request: taken only when the line will be written.
struct Seen {
    method: Method,
    uri: Uri,
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let headers = req.headers_mut();
        for name in SENSITIVE {
            if let header::Entry::Occupied(mut values) = headers.entry(name) {
                values.iter_mut().for_each(|v| v.set_sensitive(true));
            }
        }
        let mut ids = headers.get_all(&X_REQUEST_ID).iter();
        let given = match (ids.next(), ids.next()) {
            (Some(id), None) if usable_id(id) => Some(id.clone()),
            _ => None,
        };
        let id = match given {
            Some(id) => id,
            None => {
                // `insert`: one field, the one logged, whatever the client sent.
                let id = self.ids.next();
                headers.insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        keep_past_connection(headers);
        // `RUST_LOG=vmproxy::access=off` makes this a relaxed load and a branch.
        let seen = tracing::enabled!(target: "vmproxy::access", Level::INFO).then(|| Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            at: Instant::now(),
        });
        AccessLogFuture {
            inner: self.inner.call(req),
            id: Some(id),
            seen,
        }
    }
}

/// A client's id is kept if it is a plain token (what logs and the machine can take as is):
/// 1 to 128 visible ASCII characters, and one field only.
fn usable_id(id: &HeaderValue) -> bool {
    (1..=128).contains(&id.len()) && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
}

/// A `Connection` field naming `x-request-id` would make the proxy drop the id on the way to
/// the machine, whose logs would then not match this one's: the token is taken out.
fn keep_past_connection(headers: &mut http::HeaderMap) {
    let named = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("x-request-id"))
        })
    });
    if !named {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("x-request-id"))
        .map(str::to_owned)
        .collect();
    headers.remove(header::CONNECTION);
    if let Ok(value) = HeaderValue::from_str(&kept.join(", ")) {
        if !value.is_empty() {
            headers.insert(header::CONNECTION, value);
        }
    }
}

/// The inner service's response future; the id to return and the line to write when it is
/// ready.
#[pin_project::pin_project]
pub(crate) struct AccessLogFuture<F> {
    #[pin]
    inner: F,
    id: Option<HeaderValue>,
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
        let mut out = std::task::ready!(this.inner.poll(cx));
        let id = this
            .id
            .take()
            .unwrap_or_else(|| HeaderValue::from_static(""));
        if let Some(seen) = this.seen.take() {
            let latency = Millis(seen.at.elapsed());
            let id = id.to_str().unwrap_or("");
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
        if let Ok(res) = &mut out {
            // The machine's own id, if it set one, is kept.
            if !res.headers().contains_key(&X_REQUEST_ID) {
                res.headers_mut().insert(X_REQUEST_ID, id);
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

/// Request ids shaped like UUIDs, without a system call each: tower-http's `MakeRequestUuid`
/// asks the kernel for randomness on every request (a `getrandom` per request, 17 % of the
/// proxy's system-call time under load). A random per-process key, a counter, and a bijective
/// mix of the two (122 bits that differ for every request, bar a vanishing chance).
#[derive(Clone, Debug)]
struct RequestIds {
    key: u64,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's RandomState is seeded from the OS once per process.
        let key = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        RequestIds {
            key,
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (hi, lo) = (
            mix(self.key ^ n),
            mix(n.wrapping_add(self.key.rotate_left(32))),
        );
        // The version and variant bits of a v4 UUID, so tools that parse ids accept it.
        let hi = (hi & !0xf000) | 0x4000;
        let lo = (lo & !(0b11 << 62)) | (0b10 << 62);
        // Hex digits into a buffer of its own: no formatting machinery, one allocation.
        let mut id = [b'-'; 36];
        let mut put = |range: std::ops::Range<usize>, v: u64| {
            let mut v = v;
            for i in range.rev() {
                id[i] = b"0123456789abcdef"[(v & 0xf) as usize];
                v >>= 4;
            }
        };
        put(0..8, hi >> 32);
        put(9..13, (hi >> 16) & 0xffff);
        put(14..18, hi & 0xffff);
        put(19..23, lo >> 48);
        put(24..36, lo & 0xffff_ffff_ffff);
        HeaderValue::from_bytes(&id).expect("hex digits and dashes")
    }
}

/// splitmix64's finaliser: a bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_are_written_with_microseconds() {
        let ms = |d| Millis(d).to_string();
        assert_eq!(ms(Duration::from_micros(12_345)), "12.345");
        assert_eq!(ms(Duration::from_nanos(999)), "0.000");
        assert_eq!(ms(Duration::from_secs(2)), "2000.000");
    }

    #[test]
    fn request_ids_are_distinct_v4_shaped_uuids() {
        let ids = RequestIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next().to_str().unwrap().to_owned();
            let groups: Vec<&str> = id.split('-').collect();
            let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
            assert!(groups[2].starts_with('4'), "version 4: {id}");
            assert!("89ab".contains(&groups[3][..1]), "RFC 4122 variant: {id}");
            assert!(seen.insert(id));
        }
        // Another process (another key) makes other ids.
        let other = RequestIds::new();
        assert!(!seen.contains(other.next().to_str().unwrap()));
    }

    #[test]
    fn credentials_are_marked_sensitive_and_the_id_goes_both_ways() {
        use tower::{Layer, Service};
        let app = tower::service_fn(|req: Request<()>| {
            let sensitive: Vec<bool> = SENSITIVE
                .iter()
                .flat_map(|n| {
                    req.headers()
                        .get_all(n)
                        .iter()
                        .map(HeaderValue::is_sensitive)
                })
                .collect();
            let id = req.headers()[&X_REQUEST_ID].clone();
            std::future::ready(Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .header("x-seen", format!("{sensitive:?} {}", id.to_str().unwrap()))
                    .body(())
                    .unwrap(),
            ))
        });
        let mut svc = AccessLogLayer::new().layer(app);
        let req = Request::builder()
            .header("authorization", "Bearer secret")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-request-id", "chosen")
            .body(())
            .unwrap();
        let res = futures_lite_block_on(svc.call(req)).unwrap();
        assert_eq!(res.headers()["x-seen"], "[true, true, true] chosen");
        assert_eq!(res.headers()["x-request-id"], "chosen");
        let res = futures_lite_block_on(svc.call(Request::new(()))).unwrap();
        let made = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(made.len(), 36);
        assert!(res.headers()["x-seen"].to_str().unwrap().ends_with(&made));
        // An id that is no plain token is replaced, not logged empty and passed on.
        let two = Request::builder()
            .header("x-request-id", "one")
            .header("x-request-id", "two")
            .body(())
            .unwrap();
        let res = futures_lite_block_on(svc.call(two)).unwrap();
        let made = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(made.len(), 36, "two ids: neither is taken");
        assert!(
            res.headers()["x-seen"].to_str().unwrap().ends_with(&made),
            "and one goes on"
        );
        for odd in [&b"caf\xc3\xa9"[..], b"a b", b""] {
            let req = Request::builder()
                .header("x-request-id", HeaderValue::from_bytes(odd).unwrap())
                .body(())
                .unwrap();
            let res = futures_lite_block_on(svc.call(req)).unwrap();
            assert_eq!(res.headers()["x-request-id"].len(), 36, "{odd:?}");
        }
    }

    #[test]
    fn connection_cannot_take_the_id_from_the_machine() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Request-Id, close"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-request-id"));
        keep_past_connection(&mut h);
        assert_eq!(h.get_all(header::CONNECTION).iter().count(), 1);
        assert_eq!(h[header::CONNECTION], "close");
        let mut h = http::HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-request-id"));
        keep_past_connection(&mut h);
        assert!(h.get(header::CONNECTION).is_none());
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-other"),
        );
        keep_past_connection(&mut h);
        assert_eq!(h[header::CONNECTION], "keep-alive, x-other", "untouched");
    }

    /// The futures here are ready at once.
    fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("not ready at once"),
        }
    }
}
