//! A 64 MiB request and response stream through the proxy without being held in memory.
//! Alone in its binary: RSS is per process, and other tests running beside it would count.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Empty;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_stream_through_without_being_held() {
    const MIB: u64 = 1024 * 1024;
    let backend = FakeBackend::new(Duration::ZERO);
    let route = route(backend).build().unwrap();
    route.handle().start().await.unwrap();
    let addr = front(route).await;
    // Warm up allocator pools with a small transfer first.
    let _ = get_text(addr, "/app/big?mib=1").await;
    let before = rss_kib();

    // Request: 64 MiB produced chunk by chunk; the backend counts it as it streams.
    let (_, body) = upload_to_sink(addr, 64, Duration::ZERO).await;
    assert_eq!(body, (64 * MIB).to_string());

    // Response: 64 MiB, read chunk by chunk.
    let req = Request::get("/app/big?mib=64")
        .header("host", "h")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(count_body(res, None).await, 64 * MIB);
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    // Client, proxy and backend share this process: a proxy that buffered either body would add
    // at least 64 MiB.
    assert!(
        grown_mib < 32,
        "memory grew by {grown_mib} MiB while streaming 2 × 64 MiB"
    );
}
