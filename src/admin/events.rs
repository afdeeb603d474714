//! `GET /events`: server-sent events of the machines' state changes, and a periodic snapshot.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::{view, AdminBody, Inner};
use crate::lifecycle::State;

/// Starts the task that writes the stream; it ends when the client goes away (the body is
/// dropped) or its connection is closed.
pub(super) fn stream(inner: Arc<Inner>) -> AdminBody {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(run(inner, tx));
    AdminBody::events(rx)
}

async fn run(inner: Arc<Inner>, tx: mpsc::Sender<Bytes>) {
    let mut changes = Changes::new(inner.machines.iter().map(|h| h.watch()));
    let mut last: Vec<State> = inner.machines.iter().map(|h| h.state()).collect();
    if tx.send(snapshot(&inner)).await.is_err() {
        return;
    }
    let every = inner.snapshot_every;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            () = tx.closed() => return,
            _ = tick.tick() => snapshot(&inner),
            (i, state) = changes.next() => {
                // The lifecycle wakes watchers after every decision; only a new state is news.
                if last[i] == state {
                    continue;
                }
                last[i] = state;
                let machine = view::machine(&inner.machines[i]);
                event(&json!({ "type": "state", "machine": machine }))
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

fn snapshot(inner: &Inner) -> Bytes {
    let machines: Vec<_> = inner.machines.iter().map(view::machine).collect();
    event(&json!({ "type": "snapshot", "machines": machines }))
}

/// One event: a single `data:` line (JSON has no raw newline) and the blank line that ends it.
fn event(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

type Changed = Pin<Box<dyn Future<Output = (usize, watch::Receiver<State>)> + Send>>;

/// Waits for a change on any of several watch channels; cancel-safe, as the pending waits live
/// here rather than in the caller's `select!`.
struct Changes {
    waits: Vec<Changed>,
}

impl Changes {
    fn new(receivers: impl Iterator<Item = watch::Receiver<State>>) -> Self {
        Changes {
            waits: receivers.enumerate().map(|(i, rx)| wait(i, rx)).collect(),
        }
    }

    /// The index of a machine whose state was published, and that state.
    async fn next(&mut self) -> (usize, State) {
        poll_fn(|cx| {
            for slot in self.waits.iter_mut() {
                if let Poll::Ready((i, mut rx)) = slot.as_mut().poll(cx) {
                    let state = *rx.borrow_and_update();
                    *slot = wait(i, rx);
                    return Poll::Ready((i, state));
                }
            }
            Poll::Pending
        })
        .await
    }
}

fn wait(i: usize, mut rx: watch::Receiver<State>) -> Changed {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            // The lifecycle is gone (it never is while a handle lives): nothing more to say.
            std::future::pending::<()>().await;
        }
        (i, rx)
    })
}
