//! Small helpers shared by the subcommands: loopback listeners, a tiny HTTP server and client,
//! clocks, RSS, percentiles and argument parsing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A listener on 127.0.0.1 with a deep accept queue: 10,000 clients connect at once in the
/// cold-start scenario, and the default backlog (1024) would make most of them retry SYNs.
pub fn listen(port: u16) -> std::io::Result<TcpListener> {
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    sock.listen(65_535)
}

/// Writes `addr` to `path` atomically (the harness polls for the file).
pub fn write_addr_file(path: &str, addr: SocketAddr) -> std::io::Result<()> {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, path)
}

/// Wall-clock nanoseconds since the Unix epoch: comparable across the processes of one run.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// The resident set size of this process, in KiB, from /proc/self/status.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `p`-th percentile (0–100) of `sorted`, nearest-rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `--name value` pairs after the subcommand.
pub struct Args(Vec<String>);

impl Args {
    pub fn new(args: Vec<String>) -> Self {
        Args(args)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    pub fn req(&self, name: &str) -> &str {
        self.get(name).unwrap_or_else(|| panic!("missing --{name}"))
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.get(name)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("bad --{name} {v}")))
            .unwrap_or(default)
    }
}

/// Connections accepted by [`serve`] in this process.
pub static ACCEPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves HTTP/1.1 keep-alive on `listener`, answering every request with `handler`, until the
/// task is dropped or aborted.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // EMFILE and the like: back off a little rather than spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let res = handler(&req);
                async move {
                    // Drain what the client sent so the connection can be reused.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res
}

/// Connects to `addr`, retrying refused or reset connects for up to ~5 s.
pub async fn connect(addr: SocketAddr) -> Result<TcpStream, BoxError> {
    let mut tries = 0;
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One GET on a fresh connection. Returns the status, the moment the response head arrived
/// and the moment the body ended (both in Unix ns), and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, u64, u64, Bytes), BoxError> {
    let stream = connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let res = tx.send_request(req).await?;
    let head_at = now_ns();
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, head_at, now_ns(), body))
}

/// GET `path` and parse the body as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, BoxError> {
    let (_, _, _, body) = get(addr, path).await?;
    Ok(serde_json::from_slice(&body)?)
}
