//! The emulated VMs' own HTTP servers: one loopback address per NIC, an echo service on the
//! instance's port, and the accept loop shared with the API server.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};

/// Aborts a task when dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Next loopback address to hand out: 127.0.0.2, 127.0.0.3, … (shared by every emulator in
/// the process, so that two emulators never hand out the same one).
static NEXT_IP: AtomicU32 = AtomicU32::new(2);

/// Binds (without listening, so connections are refused until boot) `ip:port`.
pub(crate) fn bind(ip: IpAddr, port: u16) -> io::Result<TcpSocket> {
    let socket = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, port))?;
    Ok(socket)
}

/// A fresh loopback address whose `port` is free, with the socket that holds it.
pub(crate) fn allocate(port: u16) -> io::Result<(IpAddr, TcpSocket)> {
    let mut last = None;
    for _ in 0..4096 {
        let n = NEXT_IP.fetch_add(1, Ordering::Relaxed) % 0x00ff_ffff;
        let [_, a, b, c] = n.to_be_bytes();
        if c == 0 || c == 255 {
            continue;
        }
        let ip = IpAddr::V4(Ipv4Addr::new(127, a, b, c));
        match bind(ip, port) {
            Ok(s) => return Ok((ip, s)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free loopback address")))
}

/// Serves HTTP/1.1 connections from `listener` with `handler` until the task is aborted;
/// aborting it also ends every connection it accepted.
pub(crate) async fn serve<F, Fut, B>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// What an instance's echo server needs to know.
#[derive(Debug)]
pub(crate) struct VmInfo {
    pub(crate) name: String,
    pub(crate) health_path: String,
    pub(crate) never_healthy: Arc<AtomicBool>,
}

/// Starts the instance's HTTP servers on `sockets` after `boot_delay`.
pub(crate) fn boot(
    sockets: Vec<TcpSocket>,
    boot_delay: Duration,
    info: Arc<VmInfo>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        tokio::time::sleep(boot_delay).await;
        let mut servers = JoinSet::new();
        for socket in sockets {
            match socket.listen(1024) {
                Ok(listener) => {
                    let info = info.clone();
                    servers.spawn(serve(listener, move |req| echo(req, info.clone())));
                }
                Err(e) => {
                    tracing::warn!(instance = %info.name, error = %e, "emulated VM cannot listen")
                }
            }
        }
        while servers.join_next().await.is_some() {}
    }))
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(v.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

/// Answers the health path, and echoes everything else: method, path, headers, body size.
async fn echo(req: Request<Incoming>, info: Arc<VmInfo>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body_bytes = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    if parts.uri.path() == info.health_path {
        if info.never_healthy.load(Ordering::SeqCst) {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "unhealthy", "instance": info.name }),
            );
        }
        return json_response(
            StatusCode::OK,
            &json!({ "status": "ok", "instance": info.name }),
        );
    }
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(s)) => {
                s.push_str(", ");
                s.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "instance": info.name,
            "method": parts.method.as_str(),
            "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            "headers": headers,
            "body_bytes": body_bytes,
        }),
    )
}
