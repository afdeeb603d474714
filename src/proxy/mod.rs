//! Forwarding one request to a running machine: headers rewritten for the hop, bodies and
//! trailers streamed both ways, `Upgrade` (WebSocket) connections spliced, and a request that met
//! a vanished machine retried once on its next start.

mod headers;
mod max_forwards;
mod pool;

use std::net::SocketAddr;

use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

pub(crate) use pool::Pool;
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
    target: PathAndQuery,
) -> impl std::future::Future<Output = Response<ProxiedBody>> + Send
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async move {
        let (lifecycle, pool) = (&route.lifecycle, &route.pool);
        if let Some(answer) = max_forwards::apply(&mut req) {
            let (mut head, body) = answer.into_parts();
            headers::for_client(&mut head.headers, None);
            return Response::from_parts(head, ProxiedBody::full(body));
        }
        // Park with the request as it arrived: rewriting it first would make every waiter of a cold
        // start hold the rewritten copy's allocations too.
        let arrived = tokio::time::Instant::now();
        let page = route
            .waiting_page
            .as_ref()
            .filter(|_| waiting::wanted(&req));
        let mut lease = match page {
            // A browser does not wait: it is shown the page, and the machine is started for it.
            Some(template) => match lifecycle.wake() {
                Woken::Ready(lease) => lease,
                Woken::NotYet => {
                    return waiting_page(&route, template, NotRunning::Yet, &req);
                }
                Woken::BackingOff { error, retry_after } => {
                    let why = NotRunning::BackingOff(&error, retry_after);
                    return waiting_page(&route, template, why, &req);
                }
            },
            None => match lifecycle.acquire().await {
                Ok(lease) => lease,
                Err(e) => return error_response(&e),
            },
        };
        // A response that waited for a start says how long, and where the time went.
        let timing = (route.server_timing && lease.waited())
            .then(|| headers::server_timing(arrived.elapsed(), lifecycle.last_start()));
        let (mut upstream, upgrade) = for_backend(req, target, &route);
        let mut retried = false;
        loop {
            let ep = lease.endpoint();
            // Boxed, and its result consumed before the next await: this future is what every
            // request parked on a cold start holds, so it must not reserve room for either.
            let unsent = match Box::pin(pool.send(ep.addr(), upstream)).await {
                Ok(res) => {
                    let mut res = respond(res, lease, upgrade, &route.upgrades);
                    if let Some(timing) = timing {
                        res.headers_mut().append(
                            http::header::HeaderName::from_static("server-timing"),
                            timing,
                        );
                    }
                    return res;
                }
                Err(SendError::Failed(error)) => {
                    return error_response(&failure(lifecycle.name(), error));
                }
                Err(SendError::NoResponseHead(after)) => {
                    return error_response(&Error::response_header_timeout(
                        lifecycle.name(),
                        after,
                    ));
                }
                Err(SendError::Connect { error, request }) => {
                    debug!(machine = lifecycle.name(), %ep, %error, "connect error");
                    pool.clear();
                    lifecycle.unreachable(ep);
                    if retried {
                        return error_response(&Error::upstream(lifecycle.name(), error));
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
                Err(e) => return error_response(&e),
            };
        }
    }
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

/// Whether a request for `route` may be forwarded at all: not CONNECT (a tunnel to wherever
/// the client names), with the one `Host` RFC 9112 §3.2 asks for, and a body whose length
/// cannot be read two ways.
pub(crate) fn admissible<B>(route: &Route, req: &Request<B>) -> Result<(), Error> {
    let machine = route.lifecycle.name();
    if req.method() == http::Method::CONNECT {
        return Err(Error::method_not_allowed(machine, http::Method::CONNECT));
    }
    headers::check_host(req.headers(), req.version())
        .map_err(|e| Error::bad_request(machine, e))?;
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
) -> (
    Request<UpstreamBody>,
    Option<(http::HeaderValue, OnUpgrade)>,
)
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let upgrade = headers::allowed_upgrade(req.headers(), &route.upgrades)
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let client = client_addr(req.extensions());
    let tls = req.extensions().get::<Tls>().is_some();
    let (mut parts, body) = req.into_parts();
    let arrival = headers::Arrival {
        client,
        tls,
        version: parts.version,
        authority: parts.uri.authority().map(|a| a.as_str()),
        trust_forwarded: route.trust_forwarded,
    };
    headers::for_backend(
        &mut parts.headers,
        &arrival,
        upgrade.as_ref().map(|(p, _)| p.clone()),
    );
    parts.uri = target.into();
    parts.version = Version::HTTP_11;
    let body = body.map_err(|e| BoxError::from(ClientBodyError(e.into())));
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
                timed_out |= e.is::<tower_http::timeout::TimeoutError>();
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
    lease: Lease,
    upgrade: Option<(http::HeaderValue, OnUpgrade)>,
    allowed: &[Box<str>],
) -> Response<ProxiedBody> {
    let (mut parts, body) = res.into_parts();
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
            tokio::spawn(splice(client_side, backend_side, lease));
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
    Response::from_parts(parts, ProxiedBody::upstream(body, lease))
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

/// The client's address, from our own extension or axum's `ConnectInfo`.
fn client_addr(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<ClientAddr>().map(|c| c.0).or_else(|| {
        ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
    })
}
