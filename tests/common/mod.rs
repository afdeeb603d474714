//! Shared test fixtures: a fake backend with an in-process HTTP server, a front that wraps an
//! axum app in the layer, and a one-connection-per-request client.
#![allow(dead_code, unreachable_pub)]

pub mod binary;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
use vmproxy::{Route, RouteBuilder, VmProxyLayer};

pub type BoxError = vmproxy::BoxError;

/// What the fake machine does on start.
#[derive(Default)]
pub struct Knobs {
    pub boot: Duration,
    /// Starts that fail, counted down.
    pub fail_starts: AtomicUsize,
    /// Answer 503 on the health path while true.
    pub unhealthy: AtomicBool,
    /// How long `stop` takes.
    pub stop_delay: Duration,
    /// `record_activity` calls received.
    pub activity_reports: AtomicUsize,
    /// What `in_use_elsewhere` answers.
    pub shared: AtomicBool,
}

type Server = (SocketAddr, JoinHandle<()>);

/// A fake machine: `start` sleeps `boot`, then serves the test app on 127.0.0.1:0.
#[derive(Clone, Default)]
pub struct FakeBackend {
    pub starts: Arc<AtomicUsize>,
    pub stops: Arc<AtomicUsize>,
    pub knobs: Arc<Knobs>,
    server: Arc<Mutex<Option<Server>>>,
}

impl FakeBackend {
    pub fn new(boot: Duration) -> Self {
        Self::with(Knobs {
            boot,
            ..Knobs::default()
        })
    }

    pub fn with(knobs: Knobs) -> Self {
        FakeBackend {
            knobs: Arc::new(knobs),
            ..FakeBackend::default()
        }
    }

    pub fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    pub fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }

    /// Kills the server as if the machine vanished (no stop call).
    pub fn vanish(&self) {
        if let Some((_, task)) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.lock().unwrap().as_ref().map(|(a, _)| *a)
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &str {
        "fake"
    }

    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move {
            self.starts.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.knobs.boot).await;
            let failing = self
                .knobs
                .fail_starts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err("zone us-test1-a has no capacity (injected)".into());
            }
            if let Some((addr, _)) = &*self.server.lock().unwrap() {
                return Ok(Endpoint::new(*addr));
            }
            let (addr, task) = serve(backend_app(self.knobs.clone())).await;
            *self.server.lock().unwrap() = Some((addr, task));
            Ok(Endpoint::new(addr))
        })
    }

    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.knobs.stop_delay).await;
            self.stops.fetch_add(1, Ordering::SeqCst);
            self.vanish();
            Ok(())
        })
    }

    fn in_use_elsewhere(&self) -> BackendFuture<'_, bool> {
        let shared = self.knobs.shared.load(Ordering::SeqCst);
        Box::pin(async move { Ok(shared) })
    }

    fn record_activity(&self) -> BackendFuture<'_, ()> {
        self.knobs.activity_reports.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async move {
            Ok(match self.addr() {
                Some(a) => Status::Running(Endpoint::new(a)),
                None => Status::Gone,
            })
        })
    }
}

/// Serves `app` on 127.0.0.1:0 with client addresses; the task ends when aborted.
pub async fn serve(app: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (addr, task)
}

/// The machine's app: health, echo, streams, trailers, a sink, a WebSocket echo.
pub fn backend_app(knobs: Arc<Knobs>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let knobs = knobs.clone();
                async move {
                    if knobs.unhealthy.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, "booting")
                    } else {
                        (StatusCode::OK, "ok")
                    }
                }
            }),
        )
        .route("/app/stream", get(stream))
        .route("/app/big", get(big))
        .route("/app/sink", any(sink))
        .route("/app/trailers", any(trailers))
        .route("/app/ws", get(ws))
        .route("/app/switch", any(switch_anyway))
        .route("/app/slow-head", any(slow_head))
        .fallback(echo)
}

/// Answers with what arrived: method, path and query, headers (as a JSON object of arrays).
async fn echo(req: Request) -> impl IntoResponse {
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let entry = headers
            .entry(name.as_str().to_owned())
            .or_insert_with(|| serde_json::Value::Array(vec![]));
        entry
            .as_array_mut()
            .unwrap()
            .push(String::from_utf8_lossy(value.as_bytes()).into());
    }
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": headers,
    });
    axum::Json(body)
}

#[derive(serde::Deserialize)]
struct StreamParams {
    chunks: u64,
    every_ms: u64,
}

/// `chunks` chunks, one every `every_ms`.
async fn stream(Query(p): Query<StreamParams>) -> Response {
    let s = futures_util::stream::unfold(0u64, move |i| async move {
        if i == p.chunks {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(p.every_ms)).await;
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i}\n")))),
            i + 1,
        ))
    });
    Response::new(Body::new(StreamBody::new(s)))
}

#[derive(serde::Deserialize)]
struct BigParams {
    mib: u64,
}

/// `mib` MiB generated on the fly.
async fn big(Query(p): Query<BigParams>) -> Response {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let n = p.mib * 16;
    let s = futures_util::stream::unfold(0u64, move |i| {
        let chunk = chunk.clone();
        async move { (i < n).then(|| (Ok::<_, Infallible>(Frame::data(chunk)), i + 1)) }
    });
    Response::new(Body::new(StreamBody::new(s)))
}

/// Reads the whole body as a stream and answers with its length.
async fn sink(req: Request) -> String {
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
        }
    }
    n.to_string()
}

/// Echoes the request body's trailers back as response trailers, with one of its own.
async fn trailers(req: Request) -> Response {
    let collected = req.into_body().collect().await.unwrap();
    let mut out = collected.trailers().cloned().unwrap_or_default();
    out.insert("x-backend-trailer", "yes".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"body"))),
        Ok(Frame::trailers(out.clone())),
    ];
    // HTTP/1.1 sends only the trailer fields announced in `Trailer` (RFC 9110 §6.6.2).
    let announced = out
        .keys()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let mut res = Response::new(Body::new(StreamBody::new(futures_util::stream::iter(
        frames,
    ))));
    res.headers_mut()
        .insert("trailer", announced.parse().unwrap());
    res
}

/// A backend that switches protocols whatever it is asked, as an h2c-capable server would when
/// asked for h2c: the proxy must never hand the client such a connection unasked.
async fn switch_anyway() -> Response {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "h2c")
        .body(Body::empty())
        .unwrap()
}

/// Takes the request, then sends the response head only after `ms` milliseconds.
async fn slow_head(Query(p): Query<SlowParams>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(p.ms)).await;
    "late"
}

#[derive(serde::Deserialize)]
struct SlowParams {
    ms: u64,
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if let Message::Text(t) = msg {
                if socket.send(Message::Text(t)).await.is_err() {
                    break;
                }
            }
        }
    })
}

/// The front: `/` and everything else answered by axum; the route's prefixes by the layer.
pub fn front_app(layer: VmProxyLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "front" }))
        .fallback(|req: Request| async move {
            (StatusCode::NOT_FOUND, format!("front 404 {}", req.uri()))
        })
        .layer(layer)
}

/// A route for the fake backend with test-friendly timings.
pub fn route(backend: FakeBackend) -> RouteBuilder {
    Route::builder("/app", backend)
        .health_path("/healthz")
        .probe_interval(Duration::from_millis(5), Duration::from_millis(20))
}

/// Serves the front for `route`; returns its address.
pub async fn front(route: Route) -> SocketAddr {
    let (addr, _task) = serve(front_app(VmProxyLayer::new(route))).await;
    addr
}

/// Sends one request on a fresh connection and returns the response (body not read).
pub async fn send<B>(
    addr: SocketAddr,
    req: http::Request<B>,
) -> Result<http::Response<hyper::body::Incoming>, BoxError>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(tx.send_request(req).await?)
}

/// GET `path`; returns status, headers and body text.
pub async fn get_text(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    let req = http::Request::get(path)
        .header("host", "front.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// The values of field `name` in the machine's JSON echo.
pub fn header<'a>(echo: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    echo["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// Waits until `f` is true, polling; panics after `limit` (a safety net, not a timing check).
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until nothing listens at `addr` any more (connections refused); panics after 5 s.
pub async fn until_refused(addr: SocketAddr) {
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} still accepts connections");
}

/// Whether `pid` is a live process (a zombie awaiting its reaper counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// `promtool check metrics` on `text`; `None` (and a message) when promtool is missing outside
/// CI, where `.ci/run` installs it.
pub fn promtool_check(text: &str) -> Option<(bool, String)> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!(
                "SKIPPED the promtool check: promtool is not installed ({e}); .ci/run installs it"
            );
            return None;
        }
        Err(e) => panic!("promtool is required under CI=true: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), said))
}

/// This process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// POSTs `mib` MiB of `y` to the machine's `/app/sink`, in 64 KiB chunks made as they are sent,
/// resting `pause` before every 8 MiB; returns the status and what the sink counted.
pub async fn upload_to_sink(addr: SocketAddr, mib: u64, pause: Duration) -> (StatusCode, String) {
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    let up = futures_util::StreamExt::then(futures_util::stream::iter(0..mib * 16), move |i| {
        let chunk = chunk.clone();
        async move {
            if i % 128 == 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Ok::<_, Infallible>(Frame::data(chunk))
        }
    });
    let req = http::Request::post("/app/sink")
        .header("host", "front.test")
        .body(StreamBody::new(up))
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads `res`'s body frame by frame, never whole; returns its length. With `byte`, every byte
/// must be that one.
pub async fn count_body(res: http::Response<hyper::body::Incoming>, byte: Option<u8>) -> u64 {
    let mut body = res.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            if let Some(b) = byte {
                assert!(d.iter().all(|&x| x == b), "a byte other than {b:?}");
            }
            n += d.len() as u64;
        }
    }
    n
}
