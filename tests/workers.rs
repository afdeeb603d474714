//! `Server::workers` and `Server::bind`: a runtime and a listening socket per worker thread,
//! the listen backlog, and the same shutdown as with one worker. Raw sockets throughout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vmproxy::server::Server;

/// The thread that served the request, and a slow route.
fn app() -> Router {
    Router::new()
        .route(
            "/thread",
            get(|| async { std::thread::current().name().unwrap_or("?").to_owned() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow"
            }),
        )
}

/// Sends one request on a new connection and returns the whole response (the server closes).
async fn get_closed(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("no response")
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_address_and_drain_on_shutdown() {
    let server = Server::new().workers(2);
    let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listeners.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listeners, app(), async {
        let _ = stopped.await;
    }));

    // The kernel spreads connections over the two sockets by their ports: over 32
    // connections, both workers serve some (all on one: a chance of 2^-31).
    let mut threads = BTreeSet::new();
    for _ in 0..32 {
        let res = get_closed(addr, "/thread").await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        threads.insert(res.rsplit("\r\n\r\n").next().unwrap().to_owned());
    }
    assert_eq!(
        threads,
        BTreeSet::from(["vmproxy-worker-0".to_owned(), "vmproxy-worker-1".to_owned()]),
        "served by the workers' own threads"
    );

    // A request in flight when shutdown begins is answered; then nothing listens.
    let slow = tokio::spawn(get_closed(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let res = slow.await.unwrap();
    assert!(
        res.starts_with("HTTP/1.1 200") && res.ends_with("slow"),
        "{res}"
    );
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the server did not end after draining")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_closes_the_workers_connections() {
    let server = Server::new().workers(2);
    let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listeners.local_addr().unwrap();
    let serving = tokio::spawn(server.serve(listeners, app(), std::future::pending()));
    // An idle keep-alive connection, after one request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /thread HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    serving.abort();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a worker kept its connection after the server was dropped"
    );
}

/// The backlog given is the kernel's accept queue: with nothing accepted (the one connection
/// slot is taken), the kernel completes the handshakes of about `backlog` clients and ignores
/// the rest, which then fail to connect.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_backlog_is_the_kernels_accept_queue() {
    async fn connected_of(backlog: u32, clients: usize) -> usize {
        let server = Server::new().max_connections(1).listen_backlog(backlog);
        let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listeners.local_addr().unwrap();
        let serving = tokio::spawn(server.serve(listeners, app(), std::future::pending()));
        // Takes the only slot: from now on nothing is accepted.
        let held = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut tries = tokio::task::JoinSet::new();
        for _ in 0..clients {
            tries.spawn(async move {
                tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(addr)).await
            });
        }
        let mut connected = 0;
        let mut kept = Vec::new();
        while let Some(r) = tries.join_next().await {
            if let Ok(Ok(s)) = r.unwrap() {
                connected += 1;
                kept.push(s);
            }
        }
        serving.abort();
        drop((held, kept));
        connected
    }
    // Linux queues backlog + 1 connections; the worker holds one more, accepted, unserved.
    let small = connected_of(4, 20).await;
    assert!(
        (4..=7).contains(&small),
        "{small} of 20 connected with a backlog of 4"
    );
    let large = connected_of(64, 20).await;
    assert_eq!(large, 20, "with a backlog of 64 every client gets in");
}

/// Up to `max_connections`, every connection is served, whichever worker's socket it lands
/// on: a worker must not sit on a free slot while another worker's connection waits for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_under_the_cap_is_served_whatever_its_worker() {
    let server = Server::new().workers(2).max_connections(2);
    let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listeners.local_addr().unwrap();
    let serving = tokio::spawn(server.serve(listeners, app(), std::future::pending()));
    // Two connections land on the same worker half of the time: ten rounds.
    for round in 0..10 {
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /thread HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("round {round}: a connection under the cap waited"))
                .unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            open.push(s);
        }
        drop(open);
        // The slots come back once the server sees the connections close.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serving.abort();
}

/// Draining closes a keep-alive connection between requests at once: it does not wait for the
/// connection's keep-alive timeout (a minute by default), nor leave it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_when_the_server_drains() {
    for workers in [1, 2] {
        let server = Server::new().workers(workers);
        let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listeners.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(listeners, app(), async {
            let _ = stopped.await;
        }));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /thread HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "workers = {workers}");
        stop.send(()).unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("workers = {workers}: the idle connection stayed open"));
        assert_eq!(
            closed.unwrap(),
            0,
            "workers = {workers}: closed without another response"
        );
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .unwrap_or_else(|_| panic!("workers = {workers}: the server did not end"))
            .unwrap()
            .unwrap();
    }
}

/// The workers' sockets share the port with SO_REUSEPORT, which would also let a second server
/// (another vmproxy, an old one still running) join them and take half the connections,
/// silently. A port another server listens on is refused as in use, whatever its workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_port_in_use_is_refused() {
    let first = Server::new().workers(2);
    let held = first.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = held.local_addr().unwrap();
    for workers in [1, 2, 4] {
        let second = Server::new().workers(workers).bind(addr);
        let err = second
            .err()
            .unwrap_or_else(|| panic!("{workers} workers joined {addr}"));
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    }
    drop(held);
    let again = Server::new().workers(2).bind(addr);
    assert!(again.is_ok(), "free again: {:?}", again.err());
}

/// HTTP/2 streams past the first on a connection take connection slots of their own: each may
/// hold a connection to a machine (a descriptor), and a few connections with many streams would
/// otherwise hold past `max_connections` and the open-file limit. One past the cap is reset
/// with REFUSED_STREAM (RFC 9113 §8.7: nothing of it was processed, the client may retry); the
/// slots come back when the streams end.
#[cfg(feature = "http2")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_cap_are_refused_and_their_slots_come_back() {
    let server = Server::new().max_connections(3);
    let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listeners.local_addr().unwrap();
    tokio::spawn(server.serve(listeners, app(), std::future::pending()));
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let slow = || {
        http::Request::get("http://x/slow")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // The connection's slot and two more: three streams at once; the fourth finds none.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut tx = tx.clone();
        let req = slow();
        calls.spawn(async move {
            match tx.send_request(req).await {
                Ok(res) => Ok(res.status().as_u16()),
                Err(e) => {
                    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                    let mut reason = None;
                    while let Some(c) = cause {
                        if let Some(h2) = c.downcast_ref::<h2::Error>() {
                            reason = h2.reason();
                        }
                        cause = c.source();
                    }
                    Err(reason)
                }
            }
        });
    }
    let mut served = 0;
    let mut refused = Vec::new();
    while let Some(done) = calls.join_next().await {
        match done.unwrap() {
            Ok(status) => {
                assert_eq!(status, 200);
                served += 1;
            }
            Err(reason) => refused.push(reason),
        }
    }
    assert_eq!(served, 3);
    assert_eq!(refused, [Some(h2::Reason::REFUSED_STREAM)]);
    // Ended streams gave their slots back.
    let mut tx = tx.clone();
    let res = tx.send_request(slow()).await.unwrap();
    assert_eq!(res.status(), 200);
}

/// What an HTTP/2 client can send that nobody reads yet (the body of a request waiting for a
/// start) is bounded by the flow-control window the server announces: 64 KiB a stream, not
/// hyper's default 1 MB (300 connections made a front hold 330 MB).
#[cfg(feature = "http2")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_http2_body_is_held_to_the_window() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// 16 KiB frames for ever, counting what the client's connection took of them.
    struct Endless(Arc<AtomicUsize>);
    impl http_body::Body for Endless {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            self.0.fetch_add(16 * 1024, Ordering::SeqCst);
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
                vec![b'x'; 16 * 1024],
            )))))
        }
    }

    // A handler that holds the request without reading its body, as a parked request does.
    let app = Router::new().route(
        "/parked",
        axum::routing::post(|_body: axum::body::Body| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late"
        }),
    );
    let server = Server::new();
    let listeners = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listeners.local_addr().unwrap();
    tokio::spawn(server.serve(listeners, app, std::future::pending()));
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let taken = Arc::new(AtomicUsize::new(0));
    let req = http::Request::post("http://x/parked")
        .body(Endless(taken.clone()))
        .unwrap();
    let call = tokio::spawn(async move { tx.send_request(req).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = taken.load(Ordering::SeqCst);
    call.abort();
    assert!(
        sent <= 160 * 1024,
        "the client could push {sent} bytes nobody read"
    );
    assert!(sent >= 16 * 1024, "nothing was sent: {sent}");
}
