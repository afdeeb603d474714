//! What crosses the proxy: headers (RFC 9110 §7.6), trailers, large streamed bodies, and which
//! paths are routed at all.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn warm_front() -> (SocketAddr, FakeBackend) {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone()).build().unwrap();
    route.handle().start().await.unwrap();
    (front(route).await, backend)
}

async fn echo_of(addr: SocketAddr, req: Request<Empty<Bytes>>) -> serde_json::Value {
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_the_backend() {
    let (addr, _b) = warm_front().await;
    let req = Request::get("/app/h")
        .header("host", "client.example")
        .header("connection", "keep-alive, x-secret-one")
        .header("connection", "X-Secret-Two")
        .header("x-secret-one", "1")
        .header("x-secret-two", "2")
        .header("x-kept", "3")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "gzip")
        .header("upgrade", "h2c")
        .body(Empty::new())
        .unwrap();
    let echo = echo_of(addr, req).await;
    for name in [
        "x-secret-one",
        "x-secret-two",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            header(&echo, name).is_empty(),
            "{name} reached the backend: {echo}"
        );
    }
    // The backend's own connection handling may add `connection`, but none of the client's tokens.
    for v in header(&echo, "connection") {
        assert!(!v.to_ascii_lowercase().contains("secret"), "{echo}");
    }
    assert_eq!(header(&echo, "x-kept"), ["3"]);
}

#[tokio::test]
async fn forwarding_headers_are_set_and_host_is_kept() {
    let (addr, _b) = warm_front().await;
    let req = Request::get("/app/f?q=1")
        .header("host", "client.example:8443")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-for", "198.51.100.2")
        .body(Empty::new())
        .unwrap();
    let echo = echo_of(addr, req).await;
    assert_eq!(echo["uri"], "/app/f?q=1");
    assert_eq!(header(&echo, "host"), ["client.example:8443"]);
    // Not behind a trusted front: what the client wrote of it is dropped.
    assert_eq!(header(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header(&echo, "x-forwarded-host"), ["client.example:8443"]);
    assert_eq!(header(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(header(&echo, "via"), ["1.1 vmproxy"]);
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_removed_and_via_added() {
    let (addr, _b) = warm_front().await;
    let req = Request::get("/app/r")
        .header("host", "h")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.headers()["via"], "1.1 vmproxy");
    assert!(res.headers().get("keep-alive").is_none());
}

#[tokio::test]
async fn trailers_pass_both_ways() {
    let (addr, _b) = warm_front().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-checksum", "abc".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("/app/trailers")
        .header("host", "h")
        .header("te", "trailers")
        .header("trailer", "x-client-checksum")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let collected = res.into_body().collect().await.unwrap();
    let got = collected
        .trailers()
        .cloned()
        .expect("response trailers were dropped");
    assert_eq!(got["x-backend-trailer"], "yes");
    assert_eq!(
        got["x-client-checksum"], "abc",
        "request trailers did not reach the backend"
    );
    assert_eq!(collected.to_bytes(), "body");
}

#[tokio::test]
async fn other_paths_reach_the_inner_service() {
    let (addr, backend) = warm_front().await;
    assert_eq!(get_text(addr, "/").await.2, "front");
    let (status, _, body) = get_text(addr, "/apple").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::NOT_FOUND, "front 404 /apple")
    );
    let (status, _, body) = get_text(addr, "/other/app").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Served by the machine: the exact prefix and below it.
    for p in ["/app", "/app/", "/app/x/y"] {
        let (status, _, body) = get_text(addr, p).await;
        assert_eq!(status, StatusCode::OK, "{p}: {body}");
        assert!(
            body.contains("\"method\""),
            "{p} did not reach the machine: {body}"
        );
    }
    assert_eq!(backend.starts(), 1);
}

/// Sends a raw request line, so no client library normalizes the path first.
async fn raw(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

#[tokio::test]
async fn dot_segments_and_encoded_slashes_neither_escape_nor_skip_the_prefix() {
    let (addr, _b) = warm_front().await;
    // Escape attempts: never reach the machine with a path outside /app.
    for target in [
        "/app/../admin",
        "/app/%2e%2e/admin",
        "/app/.%2E/admin",
        "/app/x/../../admin",
    ] {
        let (status, text) = raw(addr, target).await;
        assert_eq!(status, 404, "{target}: {text}");
        assert!(
            text.contains("front 404"),
            "{target} must go to the front, not the machine: {text}"
        );
    }
    // Encoded separators, stray '%' (a second decoding would find `%2e%2e`), dot segments
    // with parameters (`..` to Java servers) near the prefix: refused.
    for target in [
        "/app/x%2F..%2F..%2Fadmin",
        "/app%2Fx",
        "/x%2f..%2fapp/y",
        "/app/a%5Cb",
        "/app/%%32%65%%32%65/admin/x",
        "/app/x%2%66..%2%66..",
        "/app/%zz",
        "/app/..;/admin",
    ] {
        let (status, text) = raw(addr, target).await;
        assert_eq!(status, 400, "{target}: {text}");
        assert!(text.contains("bad request for machine"), "{target}: {text}");
    }
    // Skip attempts: still the machine's, forwarded normalized.
    for (target, seen) in [
        ("/admin/../app/x", "/app/x"),
        ("/x/%2e%2e/app/y", "/app/y"),
        ("/%61pp/z", "/app/z"),
        ("/./app/./w", "/app/w"),
    ] {
        let (status, text) = raw(addr, target).await;
        assert_eq!(status, 200, "{target}: {text}");
        assert!(
            text.contains(&format!("\"uri\":\"{seen}\"")),
            "{target} should be forwarded as {seen}: {text}"
        );
    }
}

#[tokio::test]
async fn strip_prefix_forwards_below_the_prefix() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = vmproxy::Route::builder("/svc", backend.clone())
        .strip_prefix(true)
        .health_path("/healthz")
        .build()
        .unwrap();
    let addr = front(route).await;
    let (status, _, body) = get_text(addr, "/svc/a/b?c=d").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"uri\":\"/a/b?c=d\""), "{body}");
    let (_, _, body) = get_text(addr, "/svc").await;
    assert!(body.contains("\"uri\":\"/\""), "{body}");
}

#[tokio::test]
async fn works_under_service_builder_with_any_body_and_inner_service() {
    use http_body_util::Full;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone()).build().unwrap();
    let inner = service_fn(|req: Request<Full<Bytes>>| async move {
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(format!(
            "inner {}",
            req.uri()
        )))))
    });
    let svc = ServiceBuilder::new()
        .layer(vmproxy::VmProxyLayer::new(route))
        .service(inner);

    let res = svc
        .clone()
        .oneshot(
            Request::get("/elsewhere")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "inner /elsewhere"
    );

    let mut req = Request::post("/app/sink")
        .header("host", "h")
        .body(Full::new(Bytes::from_static(b"12345")))
        .unwrap();
    req.extensions_mut()
        .insert(vmproxy::ClientAddr(([192, 0, 2, 1], 1234).into()));
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "5");

    let mut req = Request::get("/app/who")
        .header("host", "h")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut()
        .insert(vmproxy::ClientAddr(([192, 0, 2, 1], 1234).into()));
    let res = svc.oneshot(req).await.unwrap();
    let echo: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"][0], "192.0.2.1");
    assert_eq!(backend.starts(), 1);
}

#[tokio::test]
async fn max_forwards_zero_is_answered_here_without_waking_the_machine() {
    let backend = FakeBackend::new(Duration::ZERO);
    let addr = front(route(backend.clone()).build().unwrap()).await;
    let req = Request::options("/app/x")
        .header("host", "h")
        .header("max-forwards", "0")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // RFC 9110 §9.3.7: the answer to OPTIONS says what may be asked.
    assert_eq!(
        res.headers()["allow"],
        "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"
    );
    assert_eq!(
        backend.starts(),
        0,
        "OPTIONS with Max-Forwards: 0 must not start the machine"
    );

    // Above zero: decremented and forwarded.
    let req = Request::options("/app/x")
        .header("host", "h")
        .header("max-forwards", "5")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let echo: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["method"], "OPTIONS");
    assert_eq!(header(&echo, "max-forwards"), ["4"]);
}

/// A machine at a fixed address whose server counts the connections it accepts.
struct Counted {
    addr: SocketAddr,
}

impl vmproxy::backend::Backend for Counted {
    fn name(&self) -> &str {
        "counted"
    }
    fn start(&self) -> vmproxy::backend::BackendFuture<'_, vmproxy::backend::Endpoint> {
        Box::pin(async move { Ok(vmproxy::backend::Endpoint::new(self.addr)) })
    }
    fn stop(&self) -> vmproxy::backend::BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> vmproxy::backend::BackendFuture<'_, vmproxy::backend::Status> {
        Box::pin(async move {
            Ok(vmproxy::backend::Status::Running(
                vmproxy::backend::Endpoint::new(self.addr),
            ))
        })
    }
}

/// A connection to the machine goes back to the pool when its response has been read, whatever
/// the response's body: none (HEAD, 204, `Content-Length: 0`), short, chunked, or large. One
/// client sending these one after the other needs one connection to the machine.
#[tokio::test]
async fn one_connection_to_the_machine_serves_bodies_of_every_kind_in_turn() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let res = http::Response::builder();
                        let res = match req.uri().path() {
                            "/app/none" => res
                                .status(204)
                                .body(http_body_util::Full::new(Bytes::new())),
                            "/app/zero" => res.body(http_body_util::Full::new(Bytes::new())),
                            "/app/big" => res
                                .body(http_body_util::Full::new(Bytes::from(vec![b'x'; 1 << 20]))),
                            _ => res.body(http_body_util::Full::new(Bytes::from_static(b"hello"))),
                        };
                        Ok::<_, std::convert::Infallible>(res.unwrap())
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let route = vmproxy::Route::builder("/app", Counted { addr })
        .build()
        .unwrap();
    route.handle().start().await.unwrap();
    let front = front(route).await;

    let stream = tokio::net::TcpStream::connect(front).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // The readiness probe has its own connections: count from here.
    let probes = accepted.load(Ordering::SeqCst);
    let requests = [
        ("GET", "/app/short", 5),
        ("HEAD", "/app/short", 0),
        ("GET", "/app/none", 0),
        ("GET", "/app/zero", 0),
        ("GET", "/app/big", 1 << 20),
        ("GET", "/app/short", 5),
    ];
    for _ in 0..3 {
        for (method, path, len) in requests {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "front.test")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = tx.send_request(req).await.unwrap();
            assert!(
                res.status().is_success(),
                "{method} {path}: {}",
                res.status()
            );
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), len, "{method} {path}");
            // The pool takes the connection back as the last frame goes out; the next request
            // may come before the machine's connection has said it is ready for another.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst) - probes,
        1,
        "every response should have left its connection to the machine reusable"
    );
}

/// A request that waits for a start is given storage of its own while it waits (its head no
/// longer points into the connection's read buffer): it must reach the machine byte for byte
/// as the same request sent to a running machine does.
#[tokio::test]
async fn a_request_that_waited_for_a_start_arrives_as_one_that_did_not() {
    let backend = FakeBackend::new(Duration::from_millis(300));
    let route = route(backend.clone()).build().unwrap();
    let addr = front(route).await;
    let raw = b"GET /app/echo%20x?q=1&r=%C3%A9 HTTP/1.1\r\n\
        Host: front.test\r\n\
        X-Multi: one\r\n\
        X-Multi: two\r\n\
        X-Obs: caf\xc3\xa9\r\n\
        Authorization: Bearer t\r\n\
        Connection: close\r\n\r\n";
    let echo = |raw: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        serde_json::from_str::<serde_json::Value>(body).unwrap()
    };
    let cold = echo(raw).await;
    assert_eq!(backend.starts(), 1);
    let warm = echo(raw).await;
    assert_eq!(backend.starts(), 1);
    assert_eq!(cold, warm);
    assert_eq!(cold["uri"], "/app/echo%20x?q=1&r=%C3%A9");
    assert_eq!(
        cold["headers"]["x-multi"],
        serde_json::json!(["one", "two"])
    );
    assert_eq!(cold["headers"]["x-obs"], serde_json::json!(["café"]));
}
