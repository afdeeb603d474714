//! The front cannot be held or exhausted: a slow or silent client, an idle keep-alive
//! connection, a stalled request body and a flood of connections all meet a limit, while the
//! binary goes on serving everyone else. Raw sockets throughout.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Runs the binary with `limits` as its top-level keys and one route that is never used.
fn proxy(limits: &str) -> binary::Proxy {
    binary::Proxy::start(
        &format!(
            "listen = \"127.0.0.1:0\"\n{limits}\n\n[[route]]\npath = \"/app\"\n\n[route.process]\n\
             command = [\"python3\", \"-m\", \"http.server\", \"{{port}}\", \"--bind\", \"127.0.0.1\"]\n"
        ),
        &[],
    )
}

/// Reads until the server closes, or panics after `limit` (a safety net, not a timing check).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let r = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(r.is_ok(), "the connection was held open: {text:?}");
    text
}

/// One complete response on a keep-alive connection (the fallback's 404 has a length).
async fn one_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("no response")
            .unwrap();
        assert!(n > 0, "closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
    }
}

#[tokio::test]
async fn a_slowloris_head_gets_408_and_is_closed() {
    let p = proxy("header_read_timeout = \"500ms\"");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /nothing HTTP/1.1\r\nHost: front.test\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // One header byte every 100 ms, for up to 10 s: never a complete head.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"X").await.is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(8), rd.read_to_end(&mut out)).await;
    trickle.abort();
    let text = String::from_utf8_lossy(&out);
    assert!(r.is_ok(), "a trickled head held the connection: {text:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    // RFC 9110 §6.6.1: a server with a clock sends Date in every 4xx.
    let date = text
        .lines()
        .find_map(|l| l.strip_prefix("date: "))
        .unwrap_or_else(|| panic!("no Date: {text:?}"));
    httpdate::parse_http_date(date).expect("an IMF-fixdate");
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let p = proxy("header_read_timeout = \"400ms\"\nkeepalive_timeout = \"300ms\"");
    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let text = read_until_closed(&mut silent, Duration::from_secs(8)).await;
    assert!(text.is_empty(), "{text:?}");

    // A keep-alive connection after its response.
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    idle.write_all(b"GET /nothing HTTP/1.1\r\nHost: front.test\r\n\r\n")
        .await
        .unwrap();
    let first = one_response(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 404"), "{first}");
    let rest = read_until_closed(&mut idle, Duration::from_secs(8)).await;
    assert!(rest.is_empty(), "an idle close sends nothing: {rest:?}");
}

#[tokio::test]
async fn past_max_connections_new_ones_wait_while_the_others_are_served() {
    let p = proxy("max_connections = 2\nkeepalive_timeout = \"60s\"");
    let request = b"GET /nothing HTTP/1.1\r\nHost: front.test\r\n\r\n";
    let mut a = TcpStream::connect(p.addr).await.unwrap();
    let mut b = TcpStream::connect(p.addr).await.unwrap();
    for s in [&mut a, &mut b] {
        s.write_all(request).await.unwrap();
        assert!(one_response(s).await.starts_with("HTTP/1.1 404"));
    }
    // The third is accepted by the kernel but not served while two are open...
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a third connection was served past max_connections = 2"
    );
    // ...while the ones already in are served as usual.
    b.write_all(request).await.unwrap();
    assert!(one_response(&mut b).await.starts_with("HTTP/1.1 404"));
    // One closes: the third is served.
    drop(a);
    assert!(one_response(&mut c).await.starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn connect_and_a_missing_host_are_answered_not_dropped() {
    let p = proxy("");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"CONNECT internal.test:22 HTTP/1.1\r\nHost: internal.test:22\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let text = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.to_ascii_lowercase().contains("\r\nallow: "), "{text}");

    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

/// The library's server in-process, with the layer and the fake machine behind it.
async fn served(server: vmproxy::server::Server) -> (SocketAddr, FakeBackend) {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone()).build().unwrap();
    route.handle().start().await.unwrap();
    let app = front_app(vmproxy::VmProxyLayer::new(route));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, app, std::future::pending()));
    (addr, backend)
}

#[tokio::test]
async fn a_stalled_request_body_is_a_408_and_the_machine_stays_usable() {
    let server = vmproxy::server::Server::new().request_body_timeout(Duration::from_millis(300));
    let (addr, _backend) = served(server).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // 100 bytes announced, 10 sent, then nothing.
    s.write_all(
        b"POST /app/sink HTTP/1.1\r\nHost: front.test\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let text = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let (status, _, body) = get_text(addr, "/app/after").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_upgraded_connection_outlives_the_keepalive_timeout() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let server = vmproxy::server::Server::new()
        .keepalive_timeout(Duration::from_millis(200))
        .header_read_timeout(Duration::from_millis(200));
    let (addr, _backend) = served(server).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/app/ws"))
        .await
        .unwrap();
    let quiet_until = Instant::now() + Duration::from_millis(800);
    tokio::time::sleep_until(quiet_until).await;
    ws.send(Message::text("still there")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no echo")
        .expect("closed")
        .unwrap();
    assert_eq!(echoed, Message::text("still there"));
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_off_and_frees_the_machine() {
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend.clone()).build().unwrap();
    let handle = route.handle();
    handle.start().await.unwrap();
    let app = front_app(vmproxy::VmProxyLayer::new(route));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = vmproxy::server::Server::new().send_timeout(Duration::from_millis(300));
    tokio::spawn(server.serve(listener, app, std::future::pending()));

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /app/big?mib=64 HTTP/1.1\r\nHost: front.test\r\n\r\n")
        .await
        .unwrap();
    // A slow read: nothing is read while the socket buffers fill and stay full, until the
    // response is given up and the machine no longer counts it.
    eventually(Duration::from_secs(10), || handle.in_flight() == 1).await;
    eventually(Duration::from_secs(10), || handle.in_flight() == 0).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(read_all.is_ok(), "the connection was still open");
    assert!(
        got < 64 << 20,
        "the whole response waited for the reader ({got} bytes)"
    );
}

#[tokio::test]
async fn running_out_of_descriptors_never_kills_a_healthy_machine() {
    // Few descriptors and a connection cap above them: the proxy itself runs out, not the machine.
    let config = "listen = \"127.0.0.1:0\"\nmax_connections = 1000\n\n[[route]]\npath = \"/app\"\n\
                  strip_prefix = true\nhealth_path = \"/\"\n\n[route.process]\n\
                  command = [\"sh\", \"-c\", \"echo $$ > \\\"$PIDFILE\\\"; exec python3 -m http.server {port} --bind 127.0.0.1\"]\n";
    let pidfile = std::env::temp_dir().join(format!("vmproxy-test-fds-{}.pid", std::process::id()));
    let p = binary::Proxy::start_with_open_files(
        config,
        &[("PIDFILE", pidfile.to_str().unwrap())],
        Some(48),
    );
    let (status, _, body) = get_text(p.addr, "/app/").await;
    assert_eq!(status, 200, "{body}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&pidfile);

    // 80 clients at once, each wanting a connection to the machine.
    let mut clients = Vec::new();
    for _ in 0..80 {
        if let Ok(mut s) = TcpStream::connect(p.addr).await {
            let _ = s
                .write_all(b"GET /app/ HTTP/1.1\r\nHost: front.test\r\n\r\n")
                .await;
            clients.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(clients);
    assert!(
        alive(pid),
        "the machine was killed when the proxy ran out of descriptors:\n{}",
        p.log()
    );
    // And it still serves, without a new start.
    let mut served = false;
    for _ in 0..50 {
        let (status, _, _) = get_text(p.addr, "/app/").await;
        if status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "{}", p.log());
    assert!(alive(pid));
    assert_eq!(p.log().matches("process started").count(), 1, "{}", p.log());
}

#[tokio::test]
async fn upgraded_connections_count_against_max_connections() {
    let server = vmproxy::server::Server::new().max_connections(2);
    let (addr, _backend) = served(server).await;
    let (ws1, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/app/ws"))
        .await
        .unwrap();
    let (_ws2, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/app/ws"))
        .await
        .unwrap();
    // Two upgraded connections hold both slots: a third connection is not served...
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /nothing HTTP/1.1\r\nHost: front.test\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a third connection was served past max_connections = 2"
    );
    // ...until one of them closes.
    drop(ws1);
    assert!(one_response(&mut c).await.starts_with("HTTP/1.1 404"));
}

/// A request that waits for `100 Continue` and is answered without its body being asked for:
/// hyper closes the connection after the answer, and the answer says so (RFC 9110 §10.1.1), so
/// the client neither sends the body nor reuses the connection. A request whose body is
/// drained keeps its connection.
#[tokio::test]
async fn an_early_answer_to_expect_100_continue_says_the_connection_closes() {
    let p = proxy("");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /nothing HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let text = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "closed without saying so: {text}"
    );

    // Without Expect, hyper reads the small body past the answer and keeps the connection;
    // with Expect and no body, hyper ignores it and keeps the connection. So do the answers.
    for request in [
        &b"POST /nothing HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"GET /nothing HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let first = one_response(&mut s).await;
        assert!(first.starts_with("HTTP/1.1 404"), "{first}");
        assert!(
            !first.to_ascii_lowercase().contains("connection: close"),
            "{first}"
        );
        s.write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let second = one_response(&mut s).await;
        assert!(second.contains("no route for /again"), "{second}");
    }
}

/// What one connection can make the front hold with a request head it never finishes is
/// bounded (64 KiB; hyper's default was ~400 KB, ~4 GB at the default connection cap): a head
/// past it is a 431 and the connection is closed.
#[tokio::test]
async fn a_request_head_past_64_kib_is_a_431() {
    let p = proxy("");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut head = b"GET /nothing HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'A', 70 * 1024));
    // Never finished: the front answers once its buffer is full, not at the end of the head.
    let _ = s.write_all(&head).await;
    let text = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "{}",
        &text[..text.len().min(200)]
    );
    // A large but reasonable head (48 KiB of cookies) is still served.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut head = b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\nCookie: c=".to_vec();
    head.extend(std::iter::repeat_n(b'A', 48 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    s.write_all(&head).await.unwrap();
    let text = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(
        text.starts_with("HTTP/1.1 404"),
        "{}",
        &text[..text.len().min(200)]
    );
}
