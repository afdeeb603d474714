//! The stack of examples/stack.rs — trace, compression, the proxy, a concurrency limit and a
//! handler timeout — built by the example's own `stack` function: a cold start longer than the
//! timeout is served, 64 MiB stream through both ways uncut and uncompressed, a WebSocket passes,
//! and the front keeps answering while cold-start waiters outnumber its concurrency limit.

mod common;

#[allow(dead_code)]
#[path = "../examples/stack.rs"]
mod example;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use bytes::Bytes;
use common::{count_body, eventually, send, upload_to_sink, FakeBackend};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use vmproxy::VmProxyLayer;

const MIB: u64 = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_millis(300);

/// Serves the example's stack for `backend` at `/app`; the front has `/` (example's) and
/// `/slow` (slower than the handler timeout). Stops when the returned sender is dropped.
async fn serve(backend: FakeBackend, concurrency: usize) -> (SocketAddr, oneshot::Sender<()>) {
    let route = common::route(backend).build().unwrap();
    let front = example::front().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(TIMEOUT * 10).await;
            "too late"
        }),
    );
    let limits = example::Limits {
        handler_timeout: TIMEOUT,
        front_concurrency: concurrency,
    };
    let service = example::stack(VmProxyLayer::new(route), front, limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        vmproxy::server::Server::new().serve(listener, service, async {
            let _ = stopped.await;
        }),
    );
    (addr, stop)
}

/// GET `path`, accepting gzip.
fn get_gzip(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "front.test")
        .header("accept-encoding", "gzip")
        .body(Empty::new())
        .unwrap()
}

/// GET `path` (not asking for compression): status and body text.
async fn status_and_text(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let req = Request::get(path)
        .header("host", "front.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_cold_start_longer_than_the_handler_timeout_is_served() {
    let backend = FakeBackend::new(TIMEOUT * 4);
    let (addr, _stop) = serve(backend.clone(), 64).await;

    // The timeout is there, for the front's own handlers.
    let (status, _) = status_and_text(addr, "/slow").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the handler timeout applies"
    );

    let (status, body) = status_and_text(addr, "/app/cold").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("/app/cold"), "the machine's echo: {body}");
    assert_eq!(backend.starts(), 1);
}

#[tokio::test]
async fn sixty_four_mib_stream_through_both_ways_uncut() {
    let backend = FakeBackend::new(Duration::ZERO);
    let (addr, _stop) = serve(backend, 64).await;

    // The front's own whole bodies are compressed: the layer is live.
    let res = send(addr, get_gzip("/")).await.unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..2], b"\x1f\x8b", "a gzip stream");

    // So are the machine's whole bodies (its JSON echo has a Content-Length).
    let res = send(addr, get_gzip("/app/whole")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-encoding"], "gzip");

    // Download: a stream of unknown length, passed as sent (not re-encoded, not cut).
    let res = send(addr, get_gzip("/app/big?mib=64")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers().get("content-encoding").is_none(),
        "a streamed body is not compressed: {:?}",
        res.headers()
    );
    let n = count_body(res, Some(b'x')).await;
    assert_eq!(n, 64 * MIB);

    // Upload: 64 MiB sent over several handler timeouts; the machine answers once it has read
    // it all, so the response head comes long after TIMEOUT.
    let (status, body) = upload_to_sink(addr, 64, TIMEOUT / 2).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, (64 * MIB).to_string());
}

#[tokio::test]
async fn a_websocket_passes_through() {
    let backend = FakeBackend::new(TIMEOUT * 2);
    let (addr, _stop) = serve(backend, 64).await;

    // Cold: the upgrade waits for the machine, past the handler timeout, and the client asks for
    // gzip, which a 101 must not get.
    let mut req = format!("ws://{addr}/app/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let (mut ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(
        res.headers().get("content-encoding").is_none(),
        "{:?}",
        res.headers()
    );
    for text in ["hello", "through the stack"] {
        ws.send(Message::text(text)).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn the_front_answers_while_cold_start_waiters_outnumber_its_limit() {
    const LIMIT: usize = 2;
    let backend = FakeBackend::new(Duration::from_secs(3));
    let (addr, _stop) = serve(backend.clone(), LIMIT).await;

    let waiters: Vec<_> = (0..LIMIT * 2)
        .map(|i| tokio::spawn(async move { status_and_text(addr, &format!("/app/w{i}")).await }))
        .collect();
    eventually(Duration::from_secs(2), || backend.starts() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // let every waiter arrive

    let (status, body) = status_and_text(addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.is_empty());
    assert!(
        backend.addr().is_none(),
        "the front answered while the machine was still booting"
    );
    for w in waiters {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}
