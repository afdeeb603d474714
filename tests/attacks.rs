//! A hostile client against the layer, over raw sockets so that no client library tidies the
//! attack away: tunnels through `Upgrade`, a forged scheme, missing or doubled `Host`, CONNECT,
//! forged forwarding headers, a malformed chunked body, a machine that never answers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn warm_front_with(
    build: impl FnOnce(vmproxy::RouteBuilder) -> vmproxy::RouteBuilder,
) -> (SocketAddr, FakeBackend) {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = build(route(backend.clone())).build().unwrap();
    route.handle().start().await.unwrap();
    (front(route).await, backend)
}

async fn warm_front() -> (SocketAddr, FakeBackend) {
    warm_front_with(|b| b).await
}

/// Writes `request` as is and reads until the server closes (every request here says
/// `Connection: close`, or is one the server must close on).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    // A bound so that a server that holds the connection fails the test instead of hanging it.
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server held the connection: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn status(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The JSON echo of the machine, from a raw response.
fn echo(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    // A chunked body: the JSON is on the line after the size.
    let json = body.lines().find(|l| l.starts_with('{')).unwrap_or(body);
    serde_json::from_str(json).unwrap_or_else(|e| panic!("no echo ({e}): {response}"))
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_a_tunnel() {
    let (addr, _b) = warm_front().await;
    // Asked of an ordinary endpoint: forwarded as a plain request, every trace of the upgrade gone.
    let res = exchange(
        addr,
        b"GET /app/h HTTP/1.1\r\nHost: front.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    let echo = echo(&res);
    for gone in ["upgrade", "http2-settings"] {
        assert!(
            header(&echo, gone).is_empty(),
            "{gone} reached the machine: {echo}"
        );
    }
    for v in header(&echo, "connection") {
        assert!(!v.to_ascii_lowercase().contains("upgrade"), "{echo}");
    }
    // Asked of a machine that switches whatever it is asked (an h2c-capable server): the client
    // never gets the switched connection.
    let res = exchange(
        addr,
        b"GET /app/switch HTTP/1.1\r\nHost: front.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_ne!(status(&res), 101, "the client got a tunnel: {res}");
    assert_eq!(status(&res), 502, "{res}");
}

#[tokio::test]
async fn only_listed_protocols_are_upgraded() {
    // WebSocket is listed by default: it still works (tests/lifecycle.rs carries messages).
    let (addr, _b) = warm_front().await;
    let ws = b"GET /app/h HTTP/1.1\r\nHost: front.test\r\nConnection: Upgrade, close\r\n\
               Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let res = exchange(addr, ws).await;
    let echo_default = echo(&res);
    assert_eq!(header(&echo_default, "upgrade"), ["websocket"], "{res}");

    // A route that lists none: the same request arrives as a plain one.
    let (addr, _b) = warm_front_with(|b| b.upgrades(Vec::<String>::new())).await;
    let res = exchange(addr, ws).await;
    let echo_none = echo(&res);
    assert!(header(&echo_none, "upgrade").is_empty(), "{res}");

    // h2c cannot be listed.
    let err = route(FakeBackend::new(Duration::ZERO))
        .upgrades(["websocket", "h2c"])
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "upgrades", "{err}");
}

#[tokio::test]
async fn the_scheme_comes_from_the_connection_not_the_request() {
    let (addr, _b) = warm_front().await;
    let res = exchange(
        addr,
        b"GET https://front.test/app/h HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    let echo = echo(&res);
    assert_eq!(header(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    let forwarded = header(&echo, "forwarded").join(",");
    assert!(forwarded.ends_with("proto=http"), "{forwarded}");
}

#[tokio::test]
async fn host_is_exactly_one_and_the_absolute_target_names_it() {
    let (addr, backend) = warm_front().await;
    let served_before = backend.starts();
    for (what, request) in [
        (
            "no Host",
            &b"GET /app/h HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            "two Hosts",
            b"GET /app/h HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        ),
        (
            "a Host that is no host",
            b"GET /app/h HTTP/1.1\r\nHost: user@evil.test\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let res = exchange(addr, request).await;
        assert_eq!(status(&res), 400, "{what}: {res}");
        assert!(
            !res.contains("\"method\""),
            "{what} reached the machine: {res}"
        );
    }
    assert_eq!(backend.starts(), served_before);

    // RFC 9112 §3.2.2: the absolute-form target's authority replaces Host.
    let res = exchange(
        addr,
        b"GET http://target.test:8080/app/h HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(header(&echo(&res), "host"), ["target.test:8080"], "{res}");

    // Connection cannot take Host away.
    let res = exchange(
        addr,
        b"GET /app/h HTTP/1.1\r\nHost: front.test\r\nConnection: Host, close\r\n\r\n",
    )
    .await;
    assert_eq!(header(&echo(&res), "host"), ["front.test"], "{res}");
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = vmproxy::Route::builder("/", backend.clone())
        .health_path("/healthz")
        .build()
        .unwrap();
    let addr = front(route).await;
    let res = exchange(
        addr,
        b"CONNECT internal.test:22 HTTP/1.1\r\nHost: internal.test:22\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 405, "{res}");
    assert!(res.to_ascii_lowercase().contains("\r\nallow: "), "{res}");
    assert_eq!(backend.starts(), 0, "CONNECT woke the machine");
}

const FORGED: &[u8] = b"Forwarded: for=198.51.100.7;proto=https\r\nX_Forwarded_For: 6.6.6.6\r\n\
    X-Forwarded_Host: evil.test\r\nX_Real_IP: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
    True-Client-IP: 6.6.6.6\r\nX-Original-URL: /admin\r\nX-Forwarded-Ssl: on\r\n\
    X-Forwarded-For: 198.51.100.7\r\nX-Cluster-Client-IP: 6.6.6.6\r\nX-Host: evil.test\r\n\
    X-Forwarded-Client-Cert: By=spiffe://evil\r\n";

async fn echo_of_forged(addr: SocketAddr) -> serde_json::Value {
    let mut request =
        b"GET /app/h HTTP/1.1\r\nHost: front.test:8443\r\nConnection: close\r\n".to_vec();
    request.extend_from_slice(FORGED);
    request.extend_from_slice(b"\r\n");
    echo(&exchange(addr, &request).await)
}

#[tokio::test]
async fn what_a_client_forges_of_the_forwarding_fields_never_arrives() {
    let (addr, _b) = warm_front().await;
    let echo = echo_of_forged(addr).await;
    // RFC 7239 §8.1: only the proxy's own element, first and alone.
    assert_eq!(
        header(&echo, "forwarded"),
        ["for=127.0.0.1;host=\"front.test:8443\";proto=http"],
        "{echo}"
    );
    for forged in [
        "x_forwarded_for",
        "x-forwarded_host",
        "x_real_ip",
        "x-real-ip",
        "true-client-ip",
        "x-original-url",
        "x-forwarded-ssl",
        "x-cluster-client-ip",
        "x-host",
        "x-forwarded-client-cert",
    ] {
        assert!(
            header(&echo, forged).is_empty(),
            "{forged} reached the machine: {echo}"
        );
    }
    // X-Forwarded-For holds the client's address alone: many backends read its first entry.
    assert_eq!(header(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");

    // Behind a trusted front, what it wrote is kept and the proxy's element appended; the
    // underscore spellings still go.
    let (addr, _b) = warm_front_with(|b| b.trust_forwarded_headers(true)).await;
    let echo = echo_of_forged(addr).await;
    assert_eq!(
        header(&echo, "forwarded"),
        ["for=198.51.100.7;proto=https, for=127.0.0.1;host=\"front.test:8443\";proto=http"],
        "{echo}"
    );
    assert_eq!(header(&echo, "x-real-ip"), ["6.6.6.6"], "{echo}");
    assert!(header(&echo, "x_real_ip").is_empty(), "{echo}");
    assert_eq!(
        header(&echo, "x-forwarded-for"),
        ["198.51.100.7, 127.0.0.1"],
        "appended to behind a trusted front: {echo}"
    );
}

#[tokio::test]
async fn forwarding_fields_in_trailers_are_dropped() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let (addr, _b) = warm_front().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"x"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post("/app/trailers")
        .header("host", "front.test")
        .header("te", "trailers")
        .header("trailer", "x-forwarded-for, x-checksum")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let got = res.into_body().collect().await.unwrap();
    let got = got.trailers().cloned().expect("trailers");
    assert_eq!(got["x-checksum"], "abc", "{got:?}");
    assert!(got.get("x-forwarded-for").is_none(), "{got:?}");
}

#[tokio::test]
async fn content_in_a_get_cannot_poison_the_next_request() {
    let (addr, _b) = warm_front().await;
    // A GET whose "body" is a whole request: a backend that does not read GET bodies would take
    // it for the next request on its pooled connection, another client's.
    let res = exchange(
        addr,
        b"GET /app/h HTTP/1.1\r\nHost: front.test\r\nContent-Length: 44\r\n\r\n\
          GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 400, "{res}");
    assert!(!res.contains("\"method\""), "{res}");
    for method in ["HEAD", "TRACE"] {
        let res = exchange(
            addr,
            format!("{method} /app/h HTTP/1.1\r\nHost: front.test\r\nContent-Length: 3\r\n\r\nabc")
                .as_bytes(),
        )
        .await;
        assert_eq!(status(&res), 400, "{method}: {res}");
    }
    // A DELETE with content is forwarded, on a connection that is not reused.
    let res = exchange(
        addr,
        b"DELETE /app/h HTTP/1.1\r\nHost: front.test\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(header(&echo(&res), "connection"), ["close"], "{res}");
}

#[tokio::test]
async fn userinfo_in_the_target_is_refused() {
    let (addr, _b) = warm_front().await;
    let res = exchange(
        addr,
        b"GET http://user:pw@evil.test/app/h HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 400, "{res}");
    assert!(!res.contains("\"method\""), "{res}");
}

#[tokio::test]
async fn http_1_0_gets_a_host_and_no_upgrade() {
    let (addr, _b) = warm_front().await;
    let res = exchange(addr, b"GET /app/h HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&res), 200, "{res}");
    let hosts = header(&echo(&res), "host").join(",");
    assert!(
        hosts.starts_with("127.0.0.1:"),
        "the machine's address as Host: {res}"
    );
    // RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored.
    let res = exchange(
        addr,
        b"GET /app/h HTTP/1.0\r\nHost: front.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert!(header(&echo(&res), "upgrade").is_empty(), "{res}");
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400() {
    let (addr, _b) = warm_front().await;
    let res = exchange(
        addr,
        b"POST /app/sink HTTP/1.1\r\nHost: front.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\nzz\r\nbad\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 400, "{res}");
    // The machine's connection was closed, not reused half-written: the next request is fine.
    let (status, _, body) = get_text(addr, "/app/after").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_machine_that_sends_no_response_head_in_time_is_a_504() {
    let (addr, _b) =
        warm_front_with(|b| b.response_header_timeout(Some(Duration::from_millis(200)))).await;
    let res = exchange(
        addr,
        b"GET /app/slow-head?ms=5000 HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 504, "{res}");
    assert!(res.contains("no response head"), "{res}");
    // Within the limit: served.
    let (status, _, body) = get_text(addr, "/app/slow-head?ms=10").await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "late"));
}

#[tokio::test]
async fn an_http2_scheme_says_nothing_about_the_connection() {
    use http_body_util::BodyExt;
    let (addr, _b) = warm_front().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Cleartext HTTP/2 (prior knowledge) claiming `:scheme https`.
    let req = http::Request::get("https://front.test/app/h")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(header(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(header(&echo, "host"), ["front.test"], "{echo}");
    let forwarded = header(&echo, "forwarded").join(",");
    assert!(forwarded.ends_with("proto=http"), "{forwarded}");

    // No :authority and no Host (RFC 9113 §8.3.1): refused, not given the machine's address.
    let req = http::Request::get("/app/h")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // A Host instead of :authority is enough.
    let req = http::Request::get("/app/h")
        .header("host", "front.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_body_framed_two_ways_smuggles_nothing() {
    let (addr, backend) = warm_front().await;
    // RFC 9112 §6.3: with Transfer-Encoding and Content-Length together, the chunked framing wins,
    // Content-Length is dropped before forwarding, and the connection is closed after the
    // response: what follows the chunked body is read by no one.
    let res = exchange(
        addr,
        b"POST /app/sink HTTP/1.1\r\nHost: front.test\r\nContent-Length: 43\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.matches("HTTP/1.1 ").count(), 1, "{res}");
    assert_eq!(status(&res), 200, "{res}");
    assert!(
        res.ends_with("\r\n\r\n0"),
        "the machine read the chunked body (empty): {res}"
    );
    assert!(res.contains("connection: close"), "{res}");
    // A transfer coding the proxy cannot pass on decoded: 501 (RFC 9112 §6.1).
    let res = exchange(
        addr,
        b"POST /app/sink HTTP/1.1\r\nHost: front.test\r\nTransfer-Encoding: gzip, chunked\r\n\
          Connection: close\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 501, "{res}");
    assert_eq!(backend.starts(), 1);
}
