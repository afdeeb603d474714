//! Forwarding one request to a running machine: headers rewritten for the hop, bodies and
//! trailers streamed both ways, `Upgrade` (WebSocket) connections spliced, and a request that met
//! a vanished machine retried once on its next start.

mod headers;
mod max_forwards;
mod pool;

use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;

use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

pub(crate) use pool::{Busy, Pool};
use pool::{SendError, UpstreamBody};

use crate::body::ProxiedBody;
use crate::lifecycle::{Lease, Woken};
use crate::route::Route;
use crate::waiting::{self, NotRunning, Template};
use crate::{BoxError, ClientAddr, Error, Tls};

/// Sends `req` to the route's machine, starting it if needed, and answers with the machine's
/// response or a failure as a response.
// Not an `async fn`: rustc stores an async fn's arguments twice in its state (rust-lang/rust
// #62958), and this state is what every request parked on a cold start holds.
#[allow(clippy::manual_async_fn)]
pub(crate) fn forward<B>(
    route: Route,
    mut req: Request<B>,
    mut target: PathAndQuery,
) -> impl std::future::Future<Output = Response<ProxiedBody>> + Send
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async move {
        let mut waited = false;
        let res = 'answered: {
            let (lifecycle, pool) = (&route.inner.lifecycle, &route.inner.pool);
            if let Some(answer) = max_forwards::apply(&mut req) {
                let (mut head, body) = answer.into_parts();
                headers::for_client(&mut head.headers, None);
                break 'answered Response::from_parts(head, ProxiedBody::full(body));
            }
            // Park with the request as it arrived: rewriting it first would make every waiter of a cold
            // start hold the rewritten copy's allocations too.
            let arrived = tokio::time::Instant::now();
            let page = route
                .inner
                .waiting_page
                .as_ref()
                .filter(|_| waiting::wanted(&req));
            let mut lease = match page {
                // A browser does not wait: it is shown the page, and the machine is started for it.
                Some(template) => match lifecycle.wake() {
                    Woken::Ready(lease) => lease,
                    Woken::NotYet => {
                        break 'answered waiting_page(&route, template, NotRunning::Yet, &req);
                    }
                    Woken::BackingOff { error, retry_after } => {
                        let why = NotRunning::BackingOff(&error, retry_after);
                        break 'answered waiting_page(&route, template, why, &req);
                    }
                },
                None => {
                    // About to wait for a start: let go of the connection's read buffer.
                    let parking = || detach(&mut req, &mut target);
                    match (OnPending {
                        fut: lifecycle.acquire(),
                        first: Some(parking),
                    })
                    .await
                    {
                        Ok(lease) => lease,
                        Err(e) => break 'answered error_response(&e),
                    }
                }
            };
            waited = lease.waited();
            // A response that waited for a start says how long, and where the time went.
            let timing = (route.inner.server_timing && lease.waited())
                .then(|| headers::server_timing(arrived.elapsed(), lifecycle.last_start()));
            let (mut upstream, upgrade) = for_backend(req, target, &route, lease.endpoint().addr());
            let mut retried = false;
            loop {
                let ep = lease.endpoint();
                // Boxed, and its result consumed before the next await: this future is what every
                // request parked on a cold start holds, so it must not reserve room for either.
                let unsent = match Box::pin(pool.send(ep.addr(), upstream)).await {
                    Ok((res, busy)) => {
                        let mut res = respond(res, busy, lease, upgrade, &route.inner.upgrades);
                        if let Some(timing) = timing {
                            res.headers_mut().append(
                                http::header::HeaderName::from_static("server-timing"),
                                timing,
                            );
                        }
                        break 'answered res;
                    }
                    Err(SendError::Failed(error)) => {
                        break 'answered error_response(&failure(lifecycle.name(), error));
                    }
                    Err(SendError::NoResponseHead(after)) => {
                        break 'answered error_response(&Error::response_header_timeout(
                            lifecycle.name(),
                            after,
                        ));
                    }
                    Err(SendError::Connect { error, .. }) if local_exhaustion(&error) => {
                        // The proxy, not the machine, is out of something: the machine is not
                        // to blame, and must not be taken for gone.
                        warn!(machine = lifecycle.name(), %ep, %error, "cannot open a connection to the machine: the proxy is out of resources");
                        break 'answered error_response(&Error::proxy_exhausted(
                            lifecycle.name(),
                            error,
                        ));
                    }
                    Err(SendError::Connect { error, request }) => {
                        debug!(machine = lifecycle.name(), %ep, %error, "connect error");
                        pool.clear();
                        lifecycle.unreachable(ep);
                        if retried {
                            break 'answered error_response(&Error::upstream(
                                lifecycle.name(),
                                error,
                            ));
                        }
                        request
                    }
                };
                drop(lease);
                // Nothing of it was sent: wait for the status check (and a new start, if the machine
                // is gone) and try once more.
                retried = true;
                upstream = *unsent;
                lease = match lifecycle.acquire().await {
                    Ok(lease) => lease,
                    Err(e) => break 'answered error_response(&e),
                };
            }
        };
        let mut res = res;
        res.extensions_mut().insert(crate::MachineResponse {
            machine: route.inner.lifecycle.name_arc().clone(),
            waited_for_start: waited,
        });
        res
    }
}

/// `fut`, running `first` the first time it is not ready. A future of its own rather than a
/// poll in the `async` block: that took the parked state ~430 B (rustc kept room for both).
#[pin_project::pin_project]
struct OnPending<F, G> {
    #[pin]
    fut: F,
    first: Option<G>,
}

impl<F: Future, G: FnOnce()> Future for OnPending<F, G> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = this.fut.poll(cx);
        if polled.is_pending() {
            if let Some(first) = this.first.take() {
                first();
            }
        }
        polled
    }
}

/// Gives `req` and `target` storage of their own. hyper parses a request's target and header
/// values as slices of the connection's read buffer; while a request waits for a start they
/// would keep that buffer from being reused, and hyper, reading on to see whether the client
/// hangs up, would allocate a second one: 8 KiB more per waiting connection, for copies of a
/// few hundred bytes.
///
/// Only a head of at most [`DETACH_MAX`] bytes is copied: the copy saves one 8 KiB buffer, and a
/// large head (hyper takes heads of up to ~400 KB) copied would cost more than it frees — a
/// client could double what each of its parked connections holds.
fn detach<B>(req: &mut Request<B>, target: &mut PathAndQuery) {
    let uri = req.uri().to_string();
    let values: usize = req.headers().values().map(|v| v.len()).sum();
    let total = uri.len() + target.as_str().len() + values;
    if total > DETACH_MAX {
        return;
    }
    // One allocation for every byte kept, sliced (slices of `Bytes` share it).
    let mut buf = bytes::BytesMut::with_capacity(total);
    buf.extend_from_slice(uri.as_bytes());
    buf.extend_from_slice(target.as_str().as_bytes());
    for value in req.headers().values() {
        buf.extend_from_slice(value.as_bytes());
    }
    let mut buf = buf.freeze();
    let mut take = |len: usize| buf.split_to(len);
    if let Ok(copy) = http::Uri::from_maybe_shared(take(uri.len())) {
        *req.uri_mut() = copy;
    }
    if let Ok(copy) = PathAndQuery::from_maybe_shared(take(target.as_str().len())) {
        *target = copy;
    }
    for value in req.headers_mut().values_mut() {
        let copy = take(value.len());
        if let Ok(mut copy) = http::HeaderValue::from_maybe_shared(copy) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
}

/// The largest request head (target and header values) [`detach`] copies.
const DETACH_MAX: usize = 4096;

/// A connect error that says the proxy's own process or host ran out of something (descriptors,
/// buffers, memory, local ports) rather than that the machine is unreachable.
fn local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE
            || code == nix::libc::ENFILE
            || code == nix::libc::ENOBUFS
            || code == nix::libc::ENOMEM
            || code == nix::libc::EADDRNOTAVAIL
    )
}

/// Whether a request for `route` may be forwarded at all: not CONNECT (a tunnel to wherever
/// the client names), with the one `Host` RFC 9112 §3.2 asks for, and a body whose length
/// cannot be read two ways.
pub(crate) fn admissible<B: Body>(route: &Route, req: &Request<B>) -> Result<(), Error> {
    let machine = route.inner.lifecycle.name();
    if req.method() == http::Method::CONNECT {
        return Err(Error::method_not_allowed(machine, http::Method::CONNECT));
    }
    // Content in a GET, HEAD or TRACE has no defined meaning (RFC 9110 §9.3.1, §9.3.2,
    // §9.3.8), and many servers do not read it: left on a pooled connection, it would be taken
    // for the next client's request, a request past every route check.
    let bodiless = matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::TRACE
    );
    if bodiless && !req.body().is_end_stream() {
        return Err(Error::bad_request_body(
            machine,
            format!("content in a {} request is not forwarded", req.method()),
            false,
        ));
    }
    if let Some(authority) = req.uri().authority() {
        // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error; forwarded as Host it would
        // say one thing to the backend and another to a person.
        if authority.as_str().contains('@') {
            return Err(Error::bad_request(
                machine,
                "the request target has userinfo (user@host)",
            ));
        }
    }
    headers::check_host(req.headers(), req.version())
        .map_err(|e| Error::bad_request(machine, e))?;
    // RFC 9113 §8.3.1, RFC 9110 §7.2: an HTTP/2 request names its authority in `:authority` or
    // `Host`. Without either, the machine would get its own address as Host.
    if req.version() == Version::HTTP_2
        && req.uri().authority().is_none()
        && !req.headers().contains_key(http::header::HOST)
    {
        return Err(Error::bad_request(
            machine,
            "an HTTP/2 request needs :authority or Host",
        ));
    }
    headers::check_framing(req.headers()).map_err(|e| match e {
        headers::Framing::Ambiguous => Error::bad_request_body(
            machine,
            "both Transfer-Encoding and Content-Length: the body's length is ambiguous".into(),
            false,
        ),
        headers::Framing::UnknownCoding => Error::unsupported_transfer_coding(machine),
    })
}

/// The request as the machine gets it, and the client's side of an upgrade it asks for and
/// the route allows.
fn for_backend<B>(
    mut req: Request<B>,
    target: PathAndQuery,
    route: &Route,
    endpoint: std::net::SocketAddr,
) -> (
    Request<UpstreamBody>,
    Option<(http::HeaderValue, OnUpgrade)>,
)
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored.
    let upgrade = (req.version() == Version::HTTP_11)
        .then(|| headers::allowed_upgrade(req.headers(), &route.inner.upgrades))
        .flatten()
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let client = client_addr(req.extensions());
    let tls = req.extensions().get::<Tls>().is_some();
    let (mut parts, body) = req.into_parts();
    let arrival = headers::Arrival {
        client,
        tls,
        version: parts.version,
        authority: parts.uri.authority().map(|a| a.as_str()),
        trust_forwarded: route.inner.trust_forwarded,
    };
    headers::for_backend(
        &mut parts.headers,
        &arrival,
        upgrade.as_ref().map(|(p, _)| p.clone()),
    );
    parts.uri = target.into();
    parts.version = Version::HTTP_11;
    if !parts.headers.contains_key(http::header::HOST) {
        // HTTP/1.0 without Host, or HTTP/2 without :authority: an HTTP/1.1 request needs one
        // (RFC 9112 §3.2); the machine's own address is the truthful one.
        if let Ok(host) = http::HeaderValue::from_str(&endpoint.to_string()) {
            parts.headers.insert(http::header::HOST, host);
        }
    }
    let body_semantics = matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    );
    if !body_semantics && !body.is_end_stream() && upgrade.is_none() {
        // A DELETE or OPTIONS with content: a server that ignores it leaves it unread, so this
        // connection to the machine is used once and closed, never pooled.
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let body = body
        .map_frame(|mut frame| {
            if let Some(trailers) = frame.trailers_mut() {
                headers::scrub_trailers(trailers);
            }
            frame
        })
        .map_err(|e| BoxError::from(ClientBodyError(e.into())));
    let upstream = Request::from_parts(parts, body.boxed_unsync());
    (upstream, upgrade)
}

/// An error of the client's request body (a malformed chunk, a timeout), told apart from the
/// machine's failures: the client's fault is a 4xx, not a 502.
#[derive(Debug)]
struct ClientBodyError(BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body could not be read: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// What a request that failed after it was (partly) sent is answered with.
fn failure(machine: &str, error: hyper::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = cause {
        if let Some(body) = e.downcast_ref::<ClientBodyError>() {
            // Under other layers (axum's body) the timeout may be wrapped: look down the chain.
            let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(&*body.0);
            let mut timed_out = false;
            while let Some(e) = inner {
                timed_out |= e.is::<crate::server::BodyTimeout>();
                inner = e.source();
            }
            return Error::bad_request_body(machine, body.to_string(), timed_out);
        }
        cause = e.source();
    }
    Error::upstream(machine, error)
}

fn respond(
    res: Response<hyper::body::Incoming>,
    busy: pool::Busy,
    lease: Lease,
    upgrade: Option<(http::HeaderValue, OnUpgrade)>,
    allowed: &[Box<str>],
) -> Response<ProxiedBody> {
    let (mut parts, body) = res.into_parts();
    // This hop's version, not the machine's (RFC 9110 §6.2): the server speaks to the client.
    parts.version = Version::default();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some((protocol, client_side)) = upgrade {
            let protocol = parts
                .headers
                .get(http::header::UPGRADE)
                .cloned()
                .unwrap_or(protocol);
            let chosen = protocol.to_str().unwrap_or("");
            if !headers::upgrade_allowed(chosen, allowed) {
                let e = format!("it switched to {chosen:?}, which the route does not allow");
                return error_response(&Error::upstream(lease.lifecycle().name(), e));
            }
            let backend_side = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
            let lifecycle = lease.lifecycle().clone();
            lifecycle.spawn_at_home(splice(client_side, backend_side, lease));
            headers::for_client(&mut parts.headers, Some(protocol));
            return Response::from_parts(parts, ProxiedBody::empty());
        }
    }
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Not asked for (or not allowed): the client would take the next bytes as HTTP.
        let e = "it answered 101 Switching Protocols to a request that did not ask to switch";
        return error_response(&Error::upstream(lease.lifecycle().name(), e));
    }
    headers::for_client(&mut parts.headers, None);
    Response::from_parts(parts, ProxiedBody::upstream(body, busy, lease))
}

/// Copies bytes both ways until either side closes; the lease keeps the machine counted busy
/// for as long as the upgraded connection lives.
async fn splice(client: OnUpgrade, backend: OnUpgrade, lease: Lease) {
    let name = lease.lifecycle().name().to_owned();
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            debug!(machine = %name, error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        Ok((up, down)) => debug!(machine = %name, up, down, "upgraded connection closed"),
        Err(e) => debug!(machine = %name, error = %e, "upgraded connection ended with an error"),
    }
    drop(lease);
}

pub(crate) fn error_response(e: &Error) -> Response<ProxiedBody> {
    e.to_response(ProxiedBody::full)
}

/// The client's address, from our own extension or (feature `axum`) axum's `ConnectInfo`.
fn client_addr(ext: &http::Extensions) -> Option<SocketAddr> {
    let ours = ext.get::<ClientAddr>().map(|c| c.0);
    #[cfg(feature = "axum")]
    let ours = ours.or_else(|| {
        ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
    });
    ours
}

/// The waiting page for `req`, which found the route's machine not running.
fn waiting_page<B>(
    route: &Route,
    template: &Template,
    why: NotRunning<'_>,
    req: &Request<B>,
) -> Response<ProxiedBody> {
    let status = route.handle().status();
    debug!(machine = %status.name, state = status.state.name(), "waiting page");
    let head = req.method() == http::Method::HEAD;
    waiting::response(template, &status, why, head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a header value's bytes are: a copy moves them.
    fn at(req: &Request<()>, name: &str) -> *const u8 {
        req.headers()[name].as_bytes().as_ptr()
    }

    #[test]
    fn detach_copies_a_usual_head_and_leaves_a_huge_one_alone() {
        let shared = bytes::Bytes::from_static(b"/app/x?q=1");
        let mut target = PathAndQuery::from_maybe_shared(shared).unwrap();
        let mut req = Request::builder()
            .uri("/app/x?q=1")
            .header("x-one", "1")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(())
            .unwrap();
        req.headers_mut()
            .get_mut("x-one")
            .unwrap()
            .set_sensitive(true);
        let before = at(&req, "x-one");
        detach(&mut req, &mut target);
        assert_ne!(at(&req, "x-one"), before, "copied");
        assert!(req.headers()["x-one"].is_sensitive());
        let multi: Vec<_> = req.headers().get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert_eq!(target.as_str(), "/app/x?q=1");
        assert_eq!(req.uri(), "/app/x?q=1");

        let big = "x".repeat(DETACH_MAX);
        let mut req = Request::builder()
            .uri("/app/x")
            .header("x-big", big.as_str())
            .body(())
            .unwrap();
        let before = at(&req, "x-big");
        detach(&mut req, &mut target);
        assert_eq!(
            at(&req, "x-big"),
            before,
            "a head over DETACH_MAX is not copied"
        );
    }
}
