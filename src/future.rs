//! [`ResponseFuture`]: the future a [`VmProxy`](crate::VmProxy) returns.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project::pin_project;

use crate::body::{ProxiedBody, ResponseBody};

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
}

#[pin_project(project = KindProj)]
enum Kind<F> {
    Inner(#[pin] F),
    Proxied(ProxiedFuture),
    Ready(Option<Response<ProxiedBody>>),
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(fut: F) -> Self {
        ResponseFuture {
            kind: Kind::Inner(fut),
        }
    }

    pub(crate) fn proxied(fut: ProxiedFuture) -> Self {
        ResponseFuture {
            kind: Kind::Proxied(fut),
        }
    }

    pub(crate) fn ready(res: Response<ProxiedBody>) -> Self {
        ResponseFuture {
            kind: Kind::Ready(Some(res)),
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
        match self.project().kind.project() {
            KindProj::Inner(fut) => {
                let res = ready!(fut.poll(cx))?;
                Poll::Ready(Ok(res.map(ResponseBody::inner)))
            }
            KindProj::Proxied(fut) => {
                let res = ready!(fut.as_mut().poll(cx));
                Poll::Ready(Ok(res.map(ResponseBody::proxied)))
            }
            KindProj::Ready(res) => {
                let res = res.take().expect("ResponseFuture polled after completion");
                Poll::Ready(Ok(res.map(ResponseBody::proxied)))
            }
        }
    }
}
