//! [`VmProxy`]: the service that routes each request to its machine or to the inner service.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::future::ResponseFuture;
use crate::path::{self, Match};
use crate::proxy;
use crate::route::Route;
use crate::{BoxError, Error};

/// Routes requests under a route's prefixes to its on-demand machine and passes every other
/// request to the inner service unchanged. Built by [`VmProxyLayer`](crate::VmProxyLayer).
///
/// Failures to reach a machine are answered as responses (502, 503, 504 with a reason), so the
/// service's error type is the inner service's own.
#[derive(Clone, Debug)]
pub struct VmProxy<S> {
    inner: S,
    routes: Arc<[Route]>,
}

impl<S> VmProxy<S> {
    pub(crate) fn new(inner: S, routes: Arc<[Route]>) -> Self {
        VmProxy { inner, routes }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the proxy, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for VmProxy<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Proxied requests need nothing of the inner service, but a caller that was told "ready"
        // may send either kind: the inner service's readiness is the contract to keep.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        for route in self.routes.iter() {
            match path::match_route(&route.inner.prefixes, route.inner.strip_prefix, req.uri()) {
                Match::No => continue,
                Match::Proxy(target) => {
                    let machine = route.inner.lifecycle.name_arc().clone();
                    if let Err(e) = proxy::admissible(route, &req) {
                        return ResponseFuture::ready(proxy::error_response(&e), machine);
                    }
                    let fut = proxy::forward(route.clone(), req, target);
                    return ResponseFuture::proxied(Box::pin(fut), machine);
                }
                Match::Bad(reason) => {
                    let e = Error::bad_request(route.inner.lifecycle.name(), reason);
                    let machine = route.inner.lifecycle.name_arc().clone();
                    return ResponseFuture::ready(proxy::error_response(&e), machine);
                }
            }
        }
        ResponseFuture::inner(self.inner.call(req))
    }
}
