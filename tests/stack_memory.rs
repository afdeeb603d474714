//! The 64 MiB bodies of tests/stack.rs, through the example's whole stack (trace, compression,
//! the proxy, the concurrency limit and the timeout), without being held in memory. Alone in its
//! binary: RSS is per process, and other tests running beside it would count.

mod common;

#[allow(dead_code)]
#[path = "../examples/stack.rs"]
mod example;

use std::time::Duration;

use bytes::Bytes;
use common::{count_body, rss_kib, send, upload_to_sink, FakeBackend};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use vmproxy::VmProxyLayer;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_through_the_stack_without_being_held() {
    let route = common::route(FakeBackend::new(Duration::ZERO))
        .build()
        .unwrap();
    route.handle().start().await.unwrap();
    let service = example::stack(
        VmProxyLayer::new(route),
        example::front(),
        example::Limits::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(vmproxy::server::Server::new().serve(
        listener,
        service,
        std::future::pending::<()>(),
    ));
    let get = |path: &str| {
        Request::get(path)
            .header("host", "front.test")
            .header("accept-encoding", "gzip")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // Warm up allocator pools with a small transfer first.
    let res = send(addr, get("/app/big?mib=1")).await.unwrap();
    res.into_body().collect().await.unwrap();
    let before = rss_kib();

    let (status, body) = upload_to_sink(addr, 64, Duration::ZERO).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, (64 * MIB).to_string());

    let res = send(addr, get("/app/big?mib=64")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(count_body(res, None).await, 64 * MIB);
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    // Client, stack and backend share this process: a layer that buffered either body would add
    // at least 64 MiB.
    assert!(
        grown_mib < 32,
        "memory grew by {grown_mib} MiB while streaming 2 × 64 MiB"
    );
    eprintln!("RSS grew by {grown_mib} MiB");
}
