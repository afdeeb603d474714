//! The response body of a [`VmProxy`](crate::VmProxy): the inner service's, the machine's
//! (holding the request's in-flight count until its last frame), or a short error text.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project::pin_project;

use crate::lifecycle::Lease;
use crate::proxy::Busy;
use crate::BoxError;

/// The body of every response a [`VmProxy`](crate::VmProxy) returns.
#[pin_project]
#[derive(Debug)]
pub struct ResponseBody<B> {
    #[pin]
    kind: Kind<B>,
}

#[pin_project(project = KindProj)]
#[derive(Debug)]
enum Kind<B> {
    Inner(#[pin] B),
    Proxied(#[pin] ProxiedBody),
}

/// A body that came from the machine, or the text of a failure to reach it.
#[pin_project]
#[derive(Debug)]
pub(crate) struct ProxiedBody {
    #[pin]
    kind: ProxiedKind,
}

#[pin_project(project = ProxiedProj)]
#[derive(Debug)]
enum ProxiedKind {
    Upstream {
        #[pin]
        body: Incoming,
        /// The connection the body comes over: back to the pool after the last frame.
        conn: Busy,
        /// Dropped after the last frame: the request stops counting as in flight.
        lease: Option<Lease>,
    },
    Full(Option<Bytes>),
}

impl ProxiedBody {
    pub(crate) fn upstream(body: Incoming, mut conn: Busy, lease: Lease) -> Self {
        // An empty body (HEAD, 204, 304, `Content-Length: 0`) is never polled.
        if body.is_end_stream() {
            conn.release();
        }
        ProxiedBody {
            kind: ProxiedKind::Upstream {
                body,
                conn,
                lease: Some(lease),
            },
        }
    }

    pub(crate) fn full(text: impl Into<Bytes>) -> Self {
        let bytes = text.into();
        ProxiedBody {
            kind: ProxiedKind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    pub(crate) fn empty() -> Self {
        ProxiedBody {
            kind: ProxiedKind::Full(None),
        }
    }
}

impl Body for ProxiedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ProxiedProj::Upstream {
                mut body,
                conn,
                lease,
            } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                match &frame {
                    Some(Ok(_)) if !body.is_end_stream() => {}
                    Some(Ok(_)) | None => {
                        conn.release();
                        lease.take();
                    }
                    // The connection goes with the failed body: it is in no state to reuse.
                    Some(Err(_)) => {
                        lease.take();
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            ProxiedProj::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ProxiedKind::Upstream { body, .. } => body.is_end_stream(),
            ProxiedKind::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ProxiedKind::Upstream { body, .. } => body.size_hint(),
            ProxiedKind::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner(body),
        }
    }

    pub(crate) fn proxied(body: ProxiedBody) -> Self {
        ResponseBody {
            kind: Kind::Proxied(body),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner(b) => b.poll_frame(cx).map(|f| f.map(|f| f.map_err(Into::into))),
            KindProj::Proxied(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner(b) => b.is_end_stream(),
            Kind::Proxied(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner(b) => b.size_hint(),
            Kind::Proxied(b) => b.size_hint(),
        }
    }
}
