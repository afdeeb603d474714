//! [`AdminFuture`]: the future an [`Admin`](super::Admin) returns.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use super::AdminBody;

/// A response that needs waiting for: a start or stop asked for with `?wait=true`, or one that
/// is begun before it is answered.
pub(crate) type Waiting = Pin<Box<dyn Future<Output = Response<AdminBody>> + Send>>;

/// The response future of [`Admin`](super::Admin): most answers are ready at once; only the
/// start and stop endpoints wait (boxed, as they await a machine).
#[must_use = "futures do nothing unless polled"]
pub struct AdminFuture {
    kind: Kind,
}

enum Kind {
    Ready(Option<Response<AdminBody>>),
    Waiting(Waiting),
}

impl AdminFuture {
    pub(crate) fn ready(res: Response<AdminBody>) -> Self {
        AdminFuture {
            kind: Kind::Ready(Some(res)),
        }
    }

    pub(crate) fn waiting(fut: Waiting) -> Self {
        AdminFuture {
            kind: Kind::Waiting(fut),
        }
    }
}

impl std::fmt::Debug for AdminFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Ready(_) => "ready",
            Kind::Waiting(_) => "waiting",
        };
        f.debug_struct("AdminFuture").field("kind", &kind).finish()
    }
}

impl Future for AdminFuture {
    type Output = Result<Response<AdminBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = match &mut self.get_mut().kind {
            Kind::Ready(res) => res.take().expect("AdminFuture polled after completion"),
            Kind::Waiting(fut) => std::task::ready!(fut.as_mut().poll(cx)),
        };
        // Every answer is for the token's holder, refusals included: no browser cache keeps
        // one (RFC 9111 §3.5 covers shared caches only).
        res.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        Poll::Ready(Ok(res))
    }
}
