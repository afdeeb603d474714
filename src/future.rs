//! [`ResponseFuture`]: the future a [`VmProxy`](crate::VmProxy) returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project::pin_project;

use crate::body::{ProxiedBody, ResponseBody};
use crate::telemetry;

/// The proxied leg awaits a lifecycle and a pooled connection; an `async` block cannot be named
/// on stable Rust, so that leg (and only that one) is boxed. The inner service's future is
/// polled in place.
pub(crate) type ProxiedFuture = Pin<Box<dyn Future<Output = Response<ProxiedBody>> + Send>>;

/// The response future of [`VmProxy`](crate::VmProxy): the inner service's future, or the
/// proxied request.
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    kind: Kind<F>,
    /// The route's machine, whose responses are counted (`vmproxy_requests_total`); none for the
    /// inner service's.
    machine: Option<Arc<str>>,
}

#[pin_project(project = KindProj)]
enum Kind<F> {
    Inner(#[pin] F),
    Proxied(ProxiedFuture),
    /// Boxed: an answer made at once (a refusal) is rare, and unboxed it would set the size of
    /// every request's future, the parked ones included.
    Ready(Option<Box<Response<ProxiedBody>>>),
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(fut: F) -> Self {
        ResponseFuture {
            kind: Kind::Inner(fut),
            machine: None,
        }
    }

    pub(crate) fn proxied(fut: ProxiedFuture, machine: Arc<str>) -> Self {
        ResponseFuture {
            kind: Kind::Proxied(fut),
            machine: Some(machine),
        }
    }

    pub(crate) fn ready(res: Response<ProxiedBody>, machine: Arc<str>) -> Self {
        ResponseFuture {
            kind: Kind::Ready(Some(Box::new(res))),
            machine: Some(machine),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Inner(_) => "inner",
            Kind::Proxied(_) => "proxied",
            Kind::Ready(_) => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match this.kind.project() {
            KindProj::Inner(fut) => {
                let res = ready!(fut.poll(cx))?;
                return Poll::Ready(Ok(res.map(ResponseBody::inner)));
            }
            KindProj::Proxied(fut) => ready!(fut.as_mut().poll(cx)),
            KindProj::Ready(res) => *res.take().expect("ResponseFuture polled after completion"),
        };
        if let Some(machine) = this.machine {
            telemetry::response(machine, res.status());
        }
        Poll::Ready(Ok(res.map(ResponseBody::proxied)))
    }
}
