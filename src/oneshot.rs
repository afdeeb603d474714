//! A service called once: waits for it to be ready, then calls it (what `tower::util::Oneshot`
//! does, without tower's `util` feature and the five crates it brings).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project::pin_project;
use tower_service::Service;

/// The future of one call of `S` with `Req`.
#[pin_project(project = OneshotProj)]
pub(crate) enum Oneshot<S: Service<Req>, Req> {
    NotReady(Option<(S, Req)>),
    Called(#[pin] S::Future),
}

impl<S: Service<Req>, Req> Oneshot<S, Req> {
    pub(crate) fn new(service: S, req: Req) -> Self {
        Oneshot::NotReady(Some((service, req)))
    }
}

impl<S: Service<Req>, Req> Future for Oneshot<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                OneshotProj::NotReady(waiting) => {
                    let (service, _) = waiting.as_mut().expect("polled after completion");
                    ready!(service.poll_ready(cx))?;
                    let (mut service, req) = waiting.take().expect("checked above");
                    let fut = service.call(req);
                    self.set(Oneshot::Called(fut));
                }
                OneshotProj::Called(fut) => return fut.poll(cx),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Ready only on its second poll_ready, to show the call waits for readiness.
    struct Slow {
        polls: Arc<AtomicUsize>,
    }

    impl Service<u32> for Slow {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: u32) -> Self::Future {
            assert!(
                self.polls.load(Ordering::SeqCst) >= 2,
                "called before ready"
            );
            std::future::ready(Ok(req * 2))
        }
    }

    #[tokio::test]
    async fn calls_once_ready() {
        let polls = Arc::new(AtomicUsize::new(0));
        let got = Oneshot::new(
            Slow {
                polls: polls.clone(),
            },
            21,
        )
        .await;
        assert_eq!(got.unwrap(), 42);
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
