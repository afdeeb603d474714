//! Keep-alive HTTP/1.1 connections to a machine, reused across requests.
//!
//! A small pool of our own rather than hyper-util's legacy client: the proxy must know whether a
//! failed request was sent at all (a connect error, or a pooled connection that closed under
//! us, hands the request back), so that it can be retried on the next start of the machine
//! without having lost its body.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::BoxError;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// The body type sent upstream: whatever the client sent, boxed once.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why a request did not get a response.
pub(crate) enum SendError {
    /// No connection could be made; the request was not sent and is handed back.
    Connect {
        error: io::Error,
        request: Box<Request<UpstreamBody>>,
    },
    /// The request failed after (part of) it was sent.
    Failed(hyper::Error),
    /// The machine took the request but sent no response head within this long.
    NoResponseHead(Duration),
}

struct Conn {
    addr: SocketAddr,
    tx: http1::SendRequest<UpstreamBody>,
    idle_since: Instant,
    /// The task driving the connection: aborted to close a connection whose response is late,
    /// which dropping `tx` would not do while the request is in flight.
    task: tokio::task::AbortHandle,
}

/// A connection in use by a response whose body is still streaming: back in the pool after the
/// body's last frame, so that the pool holds idle connections only. Dropped before then (the
/// client left, the body failed), it closes the connection.
pub(crate) struct Busy {
    conn: Option<Conn>,
    pool: Pool,
}

impl std::fmt::Debug for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Busy")
            .field("addr", &self.conn.as_ref().map(|c| c.addr))
            .finish()
    }
}

impl Busy {
    /// The response has been read whole: the connection may serve another request.
    pub(crate) fn release(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.idle_since = Instant::now();
            self.pool.put(conn);
        }
    }
}

/// How many connections to one machine may be in the middle of being opened.
const MAX_DIALING: usize = 8;

/// Cheap to clone: a response body holds one to give its connection back.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: std::sync::Arc<Shared>,
}

struct Shared {
    /// Idle connections by the thread that made them: a connection is driven by a task on the
    /// runtime it was opened on, and with a runtime per worker thread (`Server::workers`) a
    /// request served by another thread would hand every exchange over between threads.
    idle: Mutex<Vec<(ThreadId, Vec<Conn>)>>,
    /// Connections being dialled at once. When thousands of requests parked on a cold start are
    /// released together, most of them find a pooled connection free by the time a dial slot
    /// is, instead of each opening its own.
    dialing: tokio::sync::Semaphore,
    idle_timeout: Duration,
    connect_timeout: Duration,
    response_header_timeout: Option<Duration>,
    max_idle: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle_timeout", &self.shared.idle_timeout)
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(
        idle_timeout: Duration,
        connect_timeout: Duration,
        response_header_timeout: Option<Duration>,
    ) -> Self {
        Pool {
            shared: std::sync::Arc::new(Shared {
                idle: Mutex::new(Vec::new()),
                dialing: tokio::sync::Semaphore::new(MAX_DIALING),
                idle_timeout,
                connect_timeout,
                response_header_timeout,
                max_idle: 1024,
            }),
        }
    }

    /// Sends `req` to `addr` on a pooled connection, or a new one; the connection comes back
    /// to the pool when the response's body has been read (see [`Busy`]).
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Busy), SendError> {
        loop {
            let (mut conn, reused) = match self.take(addr) {
                Some(conn) => (conn, true),
                None => match self.take_or_dial(addr).await {
                    Ok(found) => found,
                    Err(error) => {
                        return Err(SendError::Connect {
                            error,
                            request: Box::new(req),
                        })
                    }
                },
            };
            let sent = match self.shared.response_header_timeout {
                None => conn.tx.try_send_request(req).await,
                Some(limit) => {
                    // The clock starts once the request is sent whole, as Go's
                    // ResponseHeaderTimeout does: a slow upload is not the machine's delay.
                    let (sent_whole, body_done) = tokio::sync::oneshot::channel();
                    let req = req.map(|body| EndSignal::new(body, sent_whole).boxed_unsync());
                    let late = async {
                        let _ = body_done.await;
                        tokio::time::sleep(limit).await;
                    };
                    tokio::select! {
                        sent = conn.tx.try_send_request(req) => sent,
                        () = late => {
                            conn.task.abort();
                            return Err(SendError::NoResponseHead(limit));
                        }
                    }
                }
            };
            match sent {
                Ok(res) => {
                    let busy = Busy {
                        conn: Some(conn),
                        pool: self.clone(),
                    };
                    return Ok((res, busy));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection the backend closed while idle: the request never left,
                    // so another connection can take it.
                    Some(back) if reused => {
                        debug!(%addr, error = %e.error(), "pooled connection was closed; reconnecting");
                        req = back;
                    }
                    _ => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
    }

    /// Waits for a dial slot, then takes a connection that became free meanwhile or opens one.
    async fn take_or_dial(&self, addr: SocketAddr) -> io::Result<(Conn, bool)> {
        let _slot = self
            .shared
            .dialing
            .acquire()
            .await
            .map_err(|_| io::Error::other("connection pool closed"))?;
        if let Some(conn) = self.take(addr) {
            return Ok((conn, true));
        }
        // Boxed: the connect and handshake futures are large, and would otherwise sit in the
        // state of every request that waits for the machine.
        Ok((Box::pin(self.connect(addr)).await?, false))
    }

    fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let now = Instant::now();
        let here = this_thread();
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let idle = &mut idle.iter_mut().find(|(thread, _)| *thread == here)?.1;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            let stale = c.addr != addr
                || c.tx.is_closed()
                || now.saturating_duration_since(c.idle_since) > self.shared.idle_timeout;
            // Not ready yet (given back the moment its body ended, before hyper's task asked
            // for the next request): kept, and passed over this time.
            if stale {
                idle.swap_remove(i);
            } else if c.tx.is_ready() {
                return Some(idle.swap_remove(i));
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let here = this_thread();
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let at = match idle.iter().position(|(thread, _)| *thread == here) {
            Some(at) => at,
            None => {
                idle.push((here, Vec::new()));
                idle.len() - 1
            }
        };
        let idle = &mut idle[at].1;
        if idle.len() < self.shared.max_idle {
            idle.push(conn);
        }
    }

    /// Drops every pooled connection (the machine went away).
    pub(crate) fn clear(&self) {
        self.shared
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Conn> {
        let stream = tokio::time::timeout(self.shared.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                )
            })??;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(Conn {
            addr,
            tx,
            idle_since: Instant::now(),
            task: task.abort_handle(),
        })
    }
}

/// This thread's id, without `thread::current()`'s reference count traffic on every call.
fn this_thread() -> ThreadId {
    thread_local! {
        static HERE: ThreadId = std::thread::current().id();
    }
    HERE.with(|id| *id)
}

/// A request body that says when it has been sent whole.
#[pin_project::pin_project]
struct EndSignal {
    #[pin]
    body: UpstreamBody,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EndSignal {
    fn new(body: UpstreamBody, done: tokio::sync::oneshot::Sender<()>) -> Self {
        let mut this = EndSignal {
            body,
            done: Some(done),
        };
        // An empty body is never polled.
        if this.body.is_end_stream() {
            this.signal();
        }
        this
    }

    fn signal(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl Body for EndSignal {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut body = this.body;
        let frame = ready!(body.as_mut().poll_frame(cx));
        let ended = match &frame {
            None => true,
            Some(Ok(f)) => f.is_trailers() || body.is_end_stream(),
            Some(Err(_)) => false,
        };
        if ended {
            if let Some(done) = this.done.take() {
                let _ = done.send(());
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
