//! Serving a service on a TCP listener with the limits an exposed front needs: a cap on
//! connections, a header-read timeout, an idle keep-alive timeout and a request-body timeout.
//!
//! `axum::serve` and a bare hyper connection set no timer: a client may open connections and
//! send nothing, or one header byte a minute, for ever, until the process runs out of file
//! descriptors. [`Server`] closes such connections:
//!
//! - A new connection has `header_read_timeout` to send its first request head; a request head
//!   that has begun must be complete within `header_read_timeout` of its first byte. Past it the
//!   client gets `408 Request Timeout` (HTTP/1.1) and the connection is closed.
//! - A keep-alive connection with no request in flight is closed after `keepalive_timeout`.
//! - A request body that sends no byte for `request_body_timeout` fails: the proxy answers 408
//!   when nothing of the response was sent yet, and the machine's connection is closed, not
//!   reused.
//! - A client that reads nothing of its response for `send_timeout` is disconnected.
//! - At most `max_connections` connections are served at once; more wait in the listen backlog
//!   (one per worker accepted but unserved) until one closes, while the others are served as
//!   usual.
//! - An upgraded connection (WebSocket) is the application's from then on: none of these
//!   timers apply to it.
//!
//! Every request carries the client's address as a [`ClientAddr`] extension.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use vmproxy::server::Server;
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! let app = Router::new().route("/", get(|| async { "hello" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! Server::new()
//!     .header_read_timeout(Duration::from_secs(10))
//!     .max_connections(10_000)
//!     .serve(listener, app, async { let _ = tokio::signal::ctrl_c().await; })
//!     .await
//! # }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
#[cfg(feature = "http2")]
use hyper_util::rt::{TokioExecutor, TokioTimer};
#[cfg(feature = "http2")]
use hyper_util::server::conn::auto;
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tower_service::Service;
use tracing::{debug, info, warn};

use crate::oneshot::Oneshot;
use crate::{BoxError, ClientAddr};

/// The request body a service served by [`Server`] receives: the connection's body, failing
/// with [`BodyTimeout`] after `request_body_timeout` without a byte. Unlike tower-http's
/// `TimeoutBody` it passes on `is_end_stream` and `size_hint`, which the proxy reads to tell a
/// request without content from one with.
#[pin_project]
#[derive(Debug)]
pub struct RequestBody {
    #[pin]
    body: Incoming,
    timeout: Duration,
    /// Armed while a frame is awaited; made on the first wait, so a request whose body is never
    /// read costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame is being awaited: the clock runs. Not while the reader is away, which is the
    /// machine's back-pressure, not the client's silence.
    waiting: bool,
    /// With `Expect: 100-continue`: set once the body is asked for (hyper then sends the 100).
    asked: Option<Arc<AtomicBool>>,
}

/// A request body sent nothing for the server's `request_body_timeout`.
#[derive(Debug)]
pub struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body sent nothing for {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyTimeout {}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(asked) = this.asked.take() {
            asked.store(true, Ordering::Release);
        }
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            *this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = Instant::now() + *this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !*this.waiting {
            *this.waiting = true;
            sleep.as_mut().reset(deadline);
        }
        let timeout = *this.timeout;
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves a service with connection limits and timeouts; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct Server {
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
    request_body_timeout: Duration,
    send_timeout: Duration,
    max_connections: Option<usize>,
    listen_backlog: u32,
    workers: usize,
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

/// The defaults, also those of the binary's configuration file.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// Descriptors kept back from the connection cap: the listener, logs, the machines' processes.
const RESERVED_FDS: u64 = 64;

impl Server {
    /// A server with the defaults: 30 s to send a request head, 60 s idle keep-alive, 60 s
    /// between request-body bytes, 60 s for a stalled response write, and a connection cap
    /// derived from the open-file limit.
    pub fn new() -> Self {
        Server {
            header_read_timeout: HEADER_READ_TIMEOUT,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
            request_body_timeout: REQUEST_BODY_TIMEOUT,
            send_timeout: SEND_TIMEOUT,
            max_connections: None,
            listen_backlog: LISTEN_BACKLOG,
            workers: 1,
        }
    }

    /// How long a client has to send a complete request head: from the moment the connection
    /// opens, or from the first byte of a later request on it (default: 30 s).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// How long a connection with no request in flight stays open (default: 60 s).
    pub fn keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.keepalive_timeout = timeout;
        self
    }

    /// How long a request body may go without sending a byte (default: 60 s).
    pub fn request_body_timeout(mut self, timeout: Duration) -> Self {
        self.request_body_timeout = timeout;
        self
    }

    /// How long a response may wait for the client to read any of it before the connection is
    /// closed: a client that stops reading (a slow-read attack) cannot hold it (default: 60 s).
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// How many connections are served at once; more wait in the listen backlog (default:
    /// half the open-file limit left after a small reserve, since every proxied request may
    /// need a connection to its machine too; see [`default_max_connections`]).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = Some(max);
        self
    }

    /// The listen backlog of the sockets [`bind`](Self::bind) makes: how many connections the
    /// kernel holds for us before we accept them (default: 4096, capped by the system's
    /// `net.core.somaxconn`). A cold-start storm is when it matters: with a short backlog the
    /// kernel drops the excess SYNs and those clients wait for their retransmission (1 s, 3 s,
    /// …) before they get in.
    pub fn listen_backlog(mut self, backlog: u32) -> Self {
        self.listen_backlog = backlog;
        self
    }

    /// How many threads accept and serve connections, each with a single-threaded runtime of
    /// its own and (from [`bind`](Self::bind)) a listening socket of its own, as nginx's
    /// workers do (default: 1, the caller's runtime). A request, its connection to the machine
    /// and the client's connection then stay on one thread, with no hand-off between threads.
    /// The machines' lifecycles stay shared, on the runtime they were made on, which must
    /// outlive the server.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Binds `addr` for [`serve`](Self::serve): one socket per worker, sharing the address
    /// with `SO_REUSEPORT` so the kernel spreads new connections over them, each listening
    /// with [`listen_backlog`](Self::listen_backlog) (capped by the system's maximum).
    pub fn bind(&self, addr: SocketAddr) -> io::Result<Listeners> {
        let backlog = effective_backlog(self.listen_backlog);
        let count = if cfg!(unix) { self.workers } else { 1 };
        #[cfg(unix)]
        if count > 1 && addr.port() != 0 {
            // SO_REUSEPORT would also let these sockets join another process's group on the
            // port (a second vmproxy, an old one still running): the kernel would split the
            // connections between the two, silently. A socket without it cannot bind a port
            // someone listens on, so one bound and dropped first says whether it is free.
            let probe = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            probe.set_reuse_address(true)?;
            probe.bind(&addr.into())?;
        }
        let mut sockets = Vec::with_capacity(count);
        let mut addr = addr;
        for _ in 0..count {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            #[cfg(unix)]
            {
                socket.set_reuse_address(true)?;
                if count > 1 {
                    socket.set_reuse_port(true)?;
                }
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
            let socket = std::net::TcpListener::from(socket);
            // Port 0: the other sockets take the port the first was given.
            addr = socket.local_addr()?;
            sockets.push(socket);
        }
        Ok(Listeners {
            sockets,
            backlog: Some(backlog),
        })
    }

    /// Serves `service` on `listener` until `shutdown` completes, then stops accepting and
    /// waits for the connections' requests in flight to end. Dropping the returned future
    /// closes every connection at once.
    ///
    /// `listener` is a [`Listeners`] from [`bind`](Self::bind), or a listener of your own (a
    /// tokio or standard `TcpListener`), which the workers then share.
    pub async fn serve<L, S, B, F>(self, listener: L, service: S, shutdown: F) -> io::Result<()>
    where
        L: IntoListeners,
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        F: Future<Output = ()>,
    {
        let listeners = listener.into_listeners()?;
        let max = self.max_connections.unwrap_or_else(default_max_connections);
        info!(
            addr = %listeners.local_addr()?,
            workers = self.workers,
            listen_backlog = listeners.backlog.map(u64::from),
            max_connections = max,
            header_read_timeout = ?self.header_read_timeout,
            keepalive_timeout = ?self.keepalive_timeout,
            request_body_timeout = ?self.request_body_timeout,
            send_timeout = ?self.send_timeout,
            "serving"
        );
        let shared = Arc::new(Shared {
            slots: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            limits: Arc::new(self),
        });
        let (phase, watch_phase) = tokio::sync::watch::channel(Phase::Serving);
        // Dropped with this future: the workers then close every connection at once.
        let phase = AbortOnDrop(phase);
        tokio::pin!(shutdown);
        let workers = shared.limits.workers;
        if workers == 1 && listeners.sockets.len() == 1 {
            let listener =
                TcpListener::from_std(listeners.sockets.into_iter().next().expect("one"))?;
            let serving = accept_loop(listener, service, shared, watch_phase);
            tokio::pin!(serving);
            tokio::select! {
                () = &mut shutdown => {}
                () = &mut serving => return Ok(()),
            }
            phase.0.send_replace(Phase::Draining);
            serving.await;
            return Ok(());
        }
        let (ended, mut worker_ended) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..workers {
            let socket = listeners.sockets[i % listeners.sockets.len()].try_clone()?;
            let (service, shared, watch_phase, ended) = (
                service.clone(),
                shared.clone(),
                watch_phase.clone(),
                ended.clone(),
            );
            std::thread::Builder::new()
                .name(format!("vmproxy-worker-{i}"))
                .spawn(move || {
                    let served = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .and_then(|runtime| {
                            runtime.block_on(async {
                                let listener = TcpListener::from_std(socket)?;
                                accept_loop(listener, service, shared, watch_phase).await;
                                Ok(())
                            })
                        });
                    let _ = ended.send(served);
                })?;
        }
        drop((listeners, ended));
        let mut running = workers;
        let mut draining = false;
        while running > 0 {
            tokio::select! {
                () = &mut shutdown, if !draining => {
                    draining = true;
                    phase.0.send_replace(Phase::Draining);
                }
                served = worker_ended.recv() => match served {
                    Some(Ok(())) => running -= 1,
                    Some(Err(e)) => return Err(e),
                    // A worker thread panicked.
                    None => return Err(io::Error::other("a worker thread ended abruptly")),
                },
            }
        }
        Ok(())
    }
}

/// The listening sockets a [`Server`] accepts on; see [`Server::bind`].
#[derive(Debug)]
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    /// The backlog they were made with, when [`Server::bind`] made them.
    backlog: Option<u32>,
}

impl Listeners {
    /// The address the sockets are bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sockets[0].local_addr()
    }
}

/// What [`Server::serve`] accepts on: [`Listeners`] from [`Server::bind`], or a tokio or
/// standard `TcpListener` of your own.
pub trait IntoListeners {
    /// Converts into the sockets to accept on.
    fn into_listeners(self) -> io::Result<Listeners>;
}

impl IntoListeners for Listeners {
    fn into_listeners(self) -> io::Result<Listeners> {
        Ok(self)
    }
}

impl IntoListeners for TcpListener {
    fn into_listeners(self) -> io::Result<Listeners> {
        self.into_std()?.into_listeners()
    }
}

impl IntoListeners for std::net::TcpListener {
    fn into_listeners(self) -> io::Result<Listeners> {
        self.set_nonblocking(true)?;
        Ok(Listeners {
            sockets: vec![self],
            backlog: None,
        })
    }
}

/// What every worker shares.
struct Shared {
    slots: Arc<tokio::sync::Semaphore>,
    limits: Arc<Server>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Stop accepting; let the requests in flight end.
    Draining,
    /// Close every connection now.
    Abort,
}

struct AbortOnDrop(tokio::sync::watch::Sender<Phase>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(Phase::Abort);
    }
}

/// Accepts and serves connections on `listener` until told to drain (then waits for the
/// requests in flight) or to abort.
async fn accept_loop<S, B>(
    listener: TcpListener,
    service: S,
    shared: Arc<Shared>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
) where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut connections = tokio::task::JoinSet::new();
    let drain = Arc::new(Drain::default());
    let protocols = Arc::new(Protocols {
        http1: {
            let mut http1 = hyper::server::conn::http1::Builder::new();
            // hyper's default (~400 KB) is what a client could make each connection hold with
            // a request head it never finishes; heads past this are a 431.
            http1.max_buf_size(MAX_BUF);
            http1
        },
        #[cfg(feature = "http2")]
        auto: {
            let mut auto = auto::Builder::new(TokioExecutor::new());
            auto.http1().max_buf_size(MAX_BUF);
            // Flow-control windows bound what a client can send that nobody reads yet (the
            // body of a request waiting for a start): hyper's default is 1 MB per connection.
            auto.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW);
            auto
        },
    });
    let limits = &shared.limits;
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            () = reached(&mut phase, Phase::Draining) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory: the connections we have still need
                    // serving. Pause, or this loop spins on the same error.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Accepted first, then a slot: a worker waiting for a slot before accepting would hold
        // it while the connections arrive on another worker's socket. Past the cap, each
        // worker holds at most this one connection, unserved, until a slot frees.
        let slot = tokio::select! {
            () = reached(&mut phase, Phase::Draining) => break,
            slot = shared.slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let _ = stream.set_nodelay(true);
        // The slot goes with the socket: an upgraded connection (a WebSocket) that outlives
        // hyper's handling of it still counts against the cap.
        let conn = Connection::new(stream, limits.clone(), slot);
        let tracked = Tracked {
            inner: service.clone(),
            conn: conn.state.clone(),
            slots: shared.slots.clone(),
            peer,
            body_timeout: limits.request_body_timeout,
        };
        connections.spawn(serve_connection(
            conn,
            tracked,
            protocols.clone(),
            drain.clone(),
        ));
    }
    drop(listener);
    drain.start();
    let drained = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = drained => {}
        () = reached(&mut phase, Phase::Abort) => {}
    }
}

/// The most an HTTP/1 connection buffers of what it reads, a request head included (nginx's
/// default for a head is 32 KiB).
const MAX_BUF: usize = 64 * 1024;
/// HTTP/2 streams at once on one connection (nginx: 128), and the flow-control windows (RFC
/// 9113's initial window is 64 KiB).
#[cfg(feature = "http2")]
const MAX_STREAMS: u32 = 128;
#[cfg(feature = "http2")]
const H2_STREAM_WINDOW: u32 = 64 * 1024;
#[cfg(feature = "http2")]
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;

/// A worker's connection builders.
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    /// Either protocol, told apart by the first bytes.
    #[cfg(feature = "http2")]
    auto: auto::Builder<TokioExecutor>,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
#[cfg(feature = "http2")]
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one connection until it ends, or shuts it down gracefully once told to drain.
///
/// A connection whose first bytes are no HTTP/2 preface goes straight to hyper's HTTP/1 server:
/// the auto-detecting one replays the bytes it read to tell, and its HTTP/1 side then grows its
/// 8 KiB read buffer to 16 KiB for the rest of the head, for as long as the connection lives.
#[allow(clippy::manual_async_fn)]
fn serve_connection<S, B>(
    conn: Connection,
    service: Tracked<S>,
    protocols: Arc<Protocols>,
    drain: Arc<Drain>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Not an `async fn`: rustc would keep room for its arguments twice in the state every
    // connection's task holds (rust-lang/rust#62958).
    async move {
        let peer = service.peer;
        #[cfg(feature = "http2")]
        // Boxed: the peek and its timer are needed once, not for the connection's life.
        if Box::pin(conn.may_be_http2()).await {
            // Boxed: its state is large, and would otherwise be reserved in every connection's
            // task, HTTP/1 ones included.
            let mut serving = Box::pin(
                protocols
                    .auto
                    .serve_connection_with_upgrades(TokioIo::new(conn), service),
            );
            until_drained(serving.as_mut(), &drain, peer, |s| s.graceful_shutdown()).await;
            return;
        }
        let serving = protocols
            .http1
            .serve_connection(TokioIo::new(conn), service)
            .with_upgrades();
        tokio::pin!(serving);
        until_drained(serving, &drain, peer, |s| s.graceful_shutdown()).await;
    }
}

/// Serves a connection to its end, shutting it down gracefully (hyper's `graceful_shutdown`,
/// which each protocol's connection has) once the accept loop drains.
async fn until_drained<F, E>(
    mut serving: Pin<&mut F>,
    drain: &Drain,
    peer: SocketAddr,
    graceful_shutdown: impl FnOnce(Pin<&mut F>),
) where
    F: std::future::Future<Output = Result<(), E>> + ?Sized,
    E: std::fmt::Display,
{
    let served = tokio::select! {
        served = serving.as_mut() => served,
        () = drain.wait() => {
            graceful_shutdown(serving.as_mut());
            serving.await
        }
    };
    if let Err(e) = served {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Tells one accept loop's connections to finish their requests and close.
///
/// Not the server's phase channel itself: waiting on a `watch` (a `Notify`) takes its lock on
/// every poll, and `select!` polls the wait each time the connection's task runs, so every
/// request of every worker took the one lock of the server (~2 % of the warm path's CPU,
/// perf). Here a connection registers once, and a poll is an atomic load.
#[derive(Default)]
struct Drain {
    draining: AtomicBool,
    waiting: Mutex<DrainWaiters>,
}

#[derive(Default)]
struct DrainWaiters {
    next: u64,
    wakers: std::collections::HashMap<u64, std::task::Waker>,
}

impl Drain {
    fn start(&self) {
        self.draining.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut self.lock().wakers);
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DrainWaiters> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self) -> DrainWait<'_> {
        DrainWait {
            drain: self,
            registered: None,
        }
    }
}

/// [`Drain::wait`]'s future.
struct DrainWait<'a> {
    drain: &'a Drain,
    registered: Option<(u64, std::task::Waker)>,
}

impl std::future::Future for DrainWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Some((_, waker)) = &self.registered {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        let waker = cx.waker().clone();
        {
            let mut waiting = self.drain.lock();
            let key = match &self.registered {
                Some((key, _)) => *key,
                None => {
                    waiting.next += 1;
                    waiting.next
                }
            };
            waiting.wakers.insert(key, waker.clone());
            self.registered = Some((key, waker));
        }
        // `start` may have run between the load and the registration.
        if self.drain.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for DrainWait<'_> {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            self.drain.lock().wakers.remove(&key);
        }
    }
}

/// Waits until the phase is `phase` or a later one.
async fn reached(watch: &mut tokio::sync::watch::Receiver<Phase>, phase: Phase) {
    // A closed channel: the server future is gone, as good as told to abort.
    let _ = watch.wait_for(|now| *now >= phase).await;
}

/// `backlog`, capped by the kernel's own limit, which it would apply silently.
fn effective_backlog(backlog: u32) -> u32 {
    match somaxconn() {
        Some(max) => backlog.min(max),
        None => backlog,
    }
}

fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The connection cap when none is set: half of what the open-file limit leaves after a small
/// reserve, since each proxied request may hold a connection to its machine as well. Raises the
/// soft limit to the hard one first, as Go's runtime does.
pub fn default_max_connections() -> usize {
    let limit = raise_open_file_limit();
    let cap = (limit.saturating_sub(RESERVED_FDS) / 2).max(1);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

#[cfg(unix)]
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> u64 {
    1024
}

/// What the connection's timers need to know of its requests.
#[derive(Debug)]
struct ConnState {
    /// Requests whose response has not ended.
    in_flight: AtomicUsize,
    /// Switched protocols: the bytes are the application's, no timer applies.
    upgraded: AtomicBool,
    /// Bumped each time the last request in flight ends.
    idle_epoch: AtomicU64,
    idle_since: Mutex<Instant>,
    /// The reader parked while a request was in flight: woken when the last one ends, so that
    /// the idle timer starts even if no byte arrives to wake it.
    parked_reader: Mutex<Option<std::task::Waker>>,
}

impl ConnState {
    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.idle_epoch.fetch_add(1, Ordering::AcqRel);
            let parked = self
                .parked_reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(waker) = parked {
                waker.wake();
            }
        }
    }
}

/// A TCP connection whose reads enforce the header-read and keep-alive timeouts: hyper parks
/// in `poll_read` whenever it waits for the next request, so that is where the timer runs.
struct Connection {
    io: TcpStream,
    /// Boxed: an upgrade hands the connection on, and only an `Unpin` one can be.
    timer: Pin<Box<Sleep>>,
    state: Arc<ConnState>,
    limits: Arc<Server>,
    /// The idle period the bookkeeping below belongs to (0: the connection's first).
    epoch: u64,
    /// When the current request head began to arrive.
    head_started: Option<Instant>,
    /// The client spoke HTTP/2 (its preface begins with `PRI`).
    h2: Option<bool>,
    expired: bool,
    /// The last write could not go out: the client is not reading. Made on the first stall.
    write_timer: Option<Pin<Box<Sleep>>>,
    write_stalled: bool,
    /// One of `max_connections`, given back when the socket closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    fn new(io: TcpStream, limits: Arc<Server>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        let now = Instant::now();
        Connection {
            io,
            timer: Box::pin(tokio::time::sleep_until(now + limits.header_read_timeout)),
            state: Arc::new(ConnState {
                in_flight: AtomicUsize::new(0),
                upgraded: AtomicBool::new(false),
                idle_epoch: AtomicU64::new(0),
                idle_since: Mutex::new(now),
                parked_reader: Mutex::new(None),
            }),
            limits,
            epoch: 0,
            head_started: None,
            h2: None,
            expired: false,
            write_timer: None,
            write_stalled: false,
            _slot: slot,
        }
    }
}

impl Connection {
    /// Whether the first bytes are (or begin) the HTTP/2 preface: read without consuming them,
    /// within the time the client has for its first request head. A client that sends
    /// nothing in time, or leaves, is HTTP/1's to answer (408) or close.
    #[cfg(feature = "http2")]
    async fn may_be_http2(&self) -> bool {
        let mut first = [0u8; H2_PREFACE.len()];
        match tokio::time::timeout_at(self.timer.deadline(), self.io.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => H2_PREFACE.starts_with(&first[..n]),
            _ => false,
        }
    }

    /// When the connection, idle now, is closed, and whether a request head has begun then.
    fn deadline(&mut self) -> (Instant, Option<Instant>) {
        let epoch = self.state.idle_epoch.load(Ordering::Acquire);
        if self.epoch != epoch {
            self.epoch = epoch;
            self.head_started = None;
        }
        // HTTP/2 frames between requests (pings, window updates) are no request head: only
        // requests keep an HTTP/2 connection open.
        let head = self.head_started.filter(|_| self.h2 != Some(true));
        let since = *self
            .state
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let deadline = match (self.epoch, head) {
            // The first request: its head is due within the timeout of the connection opening.
            (0, _) => since + self.limits.header_read_timeout,
            (_, Some(started)) => started + self.limits.header_read_timeout,
            (_, None) => since + self.limits.keepalive_timeout,
        };
        (deadline, head)
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if let Poll::Ready(read) = Pin::new(&mut this.io).poll_read(cx, buf) {
            let got = &buf.filled()[before..];
            if !got.is_empty() {
                if this.h2.is_none() {
                    this.h2 = Some(got.starts_with(b"PRI"));
                }
                let epoch = this.state.idle_epoch.load(Ordering::Acquire);
                if this.epoch != epoch {
                    this.epoch = epoch;
                    this.head_started = None;
                }
                if this.head_started.is_none() && this.state.in_flight.load(Ordering::Acquire) == 0
                {
                    this.head_started = Some(Instant::now());
                }
            }
            return Poll::Ready(read);
        }
        // Nothing to read: the timers apply only between requests.
        if this.state.upgraded.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if this.state.in_flight.load(Ordering::Acquire) > 0 {
            *this
                .state
                .parked_reader
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            // The last request may have ended between the load and the registration.
            if this.state.in_flight.load(Ordering::Acquire) > 0 {
                return Poll::Pending;
            }
        }
        // The request's end may move the deadline after the timer was set: recompute until
        // the deadline that fired is still the one that applies.
        let head = loop {
            let (deadline, head) = this.deadline();
            if this.timer.deadline() != deadline {
                this.timer.as_mut().reset(deadline);
            }
            ready!(this.timer.as_mut().poll(cx));
            if this.deadline().0 <= Instant::now() {
                break head;
            }
        };
        this.expired = true;
        if head.is_some() {
            // Best effort: the connection is between responses, so nothing else is writing.
            let _ = Pin::new(&mut this.io).poll_write(cx, &request_timeout_response());
            debug!("request head not received in time: 408");
        } else {
            debug!(h2 = this.h2, "idle connection closed");
        }
        let _ = Pin::new(&mut this.io).poll_shutdown(cx);
        Poll::Ready(Ok(()))
    }
}

/// Written by hand: hyper has no request to answer. With a `Date`, which RFC 9110 §6.6.1 asks
/// of every 4xx from a server with a clock.
fn request_timeout_response() -> Vec<u8> {
    format!(
        "HTTP/1.1 408 Request Timeout\r\ndate: {}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    )
    .into_bytes()
}

impl Connection {
    /// A client that reads nothing of its response for `send_timeout` is gone or attacking
    /// (a slow read): the write fails and the connection is closed.
    fn write_progress(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if written.is_ready() || self.state.upgraded.load(Ordering::Acquire) {
            self.write_stalled = false;
            return written;
        }
        let deadline = Instant::now() + self.limits.send_timeout;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.write_stalled {
            self.write_stalled = true;
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        debug!("the client read nothing for send_timeout: closing");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing of its response for send_timeout",
        )))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.write_progress(cx, written)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.write_progress(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The service as one connection sees it: counts its requests for the timers, times the
/// request body, and tells the service who the client is.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    conn: Arc<ConnState>,
    /// The server's connection slots: an HTTP/2 stream beyond a connection's first takes one.
    slots: Arc<tokio::sync::Semaphore>,
    peer: SocketAddr,
    body_timeout: Duration,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = TrackedFuture<Oneshot<S, Request<RequestBody>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let timeout = self.body_timeout;
        // hyper ignores Expect on a request without a body: nothing to tell then.
        let asked = (expects_continue(&req) && !req.body().is_end_stream()).then(Arc::default);
        let mut req = req.map(|body| RequestBody {
            body,
            timeout,
            sleep: None,
            waiting: false,
            asked: asked.clone(),
        });
        req.extensions_mut().insert(ClientAddr(self.peer));
        let others = self.conn.in_flight.fetch_add(1, Ordering::AcqRel);
        // Each request in flight may hold a connection to its machine: a descriptor, as a
        // client connection is. HTTP/1 has one request at a time per connection, which its
        // slot covers; HTTP/2 streams beyond the first take slots of their own, or many streams
        // on a few connections would hold past `max_connections` (and the open-file limit).
        let extra = if others == 0 {
            None
        } else {
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    self.conn.request_ended();
                    debug!(peer = %self.peer, "stream refused: every slot is taken");
                    return TrackedFuture::Refused;
                }
            }
        };
        TrackedFuture::Serving {
            fut: Oneshot::new(self.inner.clone(), req),
            guard: Some(InFlight {
                conn: self.conn.clone(),
                _slot: extra,
            }),
            asked,
        }
    }
}

/// An HTTP/1.1 request that waits for `100 Continue` before it sends its body.
fn expects_continue<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Counts one request in flight on its connection until dropped.
struct InFlight {
    conn: Arc<ConnState>,
    /// An HTTP/2 stream's own slot, given back with it.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.request_ended();
    }
}

/// The response future of [`Tracked`].
#[pin_project(project = TrackedProj)]
enum TrackedFuture<F> {
    Serving {
        #[pin]
        fut: F,
        guard: Option<InFlight>,
        /// The request waits for `100 Continue`: see [`RequestBody`]'s `asked`.
        asked: Option<Arc<AtomicBool>>,
    },
    /// An HTTP/2 stream with no slot left for it: reset with REFUSED_STREAM.
    Refused,
}

/// Why a stream is refused for want of a slot: HTTP/2's REFUSED_STREAM (RFC 9113 §8.7), which
/// tells the client that nothing of it was processed, so it may retry.
fn refusal() -> BoxError {
    #[cfg(feature = "http2")]
    return Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM));
    // Only HTTP/2 has a connection's second request in flight.
    #[cfg(not(feature = "http2"))]
    return "every connection slot is taken".into();
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (fut, guard, asked) = match self.project() {
            TrackedProj::Serving { fut, guard, asked } => (fut, guard, asked),
            TrackedProj::Refused => return Poll::Ready(Err(refusal())),
        };
        let mut res = ready!(fut.poll(cx)).map_err(Into::into)?;
        let interim = res.status().is_informational();
        if asked
            .take()
            .is_some_and(|asked| !asked.load(Ordering::Acquire))
            && !interim
        {
            // Answered before its body was asked for: hyper sends no 100 and closes the
            // connection after this response. RFC 9110 §10.1.1 asks that the client be told.
            res.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            guard
                .as_ref()
                .expect("polled after completion")
                .conn
                .upgraded
                .store(true, Ordering::Release);
        }
        let guard = guard.take();
        Poll::Ready(Ok(res.map(|body| TrackedBody { body, guard })))
    }
}

/// A response body that keeps its request counted in flight until it ends.
#[pin_project]
struct TrackedBody<B> {
    #[pin]
    body: B,
    guard: Option<InFlight>,
}

impl<B> Body for TrackedBody<B>
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
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            this.guard.take();
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
