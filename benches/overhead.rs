//! Criterion micro-benchmarks of `vmproxy`.
//!
//! - `passthrough/{direct,vmproxy}`: a request NOT under the prefix, in-process with no socket:
//!   the inner service called directly, and through `VmProxy`.
//! - `proxied/{direct,vmproxy}`: a request to a warm machine on loopback: a hyper client on one
//!   keep-alive connection straight to the backend, against `VmProxy::call` (no front socket;
//!   its pool keeps one connection to the same backend). The difference is the proxy's work.
//! - `coalesce/{1000,10000}`: N tasks wait on one start of a fake backend; timed from the moment
//!   the start is let go (all N parked) to the moment all N are answered. One start per round is
//!   checked.
//!
//! Run: `cargo bench --bench overhead` (add `-- --quick` for a short pass).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tower::{Layer, Service, ServiceExt};
use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
use vmproxy::{Route, VmProxyLayer};

#[allow(dead_code)]
#[path = "e2e/common.rs"]
mod common;

/// A machine that is always running at one address.
struct Fixed(SocketAddr);

impl Backend for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }
    fn start(&self) -> BackendFuture<'_, Endpoint> {
        let addr = self.0;
        Box::pin(async move { Ok(Endpoint::new(addr)) })
    }
    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> BackendFuture<'_, Status> {
        let addr = self.0;
        Box::pin(async move { Ok(Status::Running(Endpoint::new(addr))) })
    }
}

/// A machine whose start waits for the bench to open a gate, and counts its starts.
struct Gated {
    addr: SocketAddr,
    gate: tokio::sync::Notify,
    starts: AtomicU64,
}

impl Backend for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move {
            self.starts.fetch_add(1, Ordering::SeqCst);
            self.gate.notified().await;
            Ok(Endpoint::new(self.addr))
        })
    }
    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> BackendFuture<'_, Status> {
        let addr = self.addr;
        Box::pin(async move { Ok(Status::Running(Endpoint::new(addr))) })
    }
}

fn small_backend() -> common::Handler {
    Arc::new(|_req| common::text(StatusCode::OK, Bytes::from_static(b"hello, world\n")))
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn passthrough(c: &mut Criterion) {
    let rt = current_thread();
    let inner = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let route = Route::builder("/app", Fixed(([127, 0, 0, 1], 9).into()))
        .idle_timeout(None)
        .build()
        .expect("route");
    let proxy = VmProxyLayer::new(route).layer(inner);

    let mut g = c.benchmark_group("passthrough");
    g.bench_function("direct", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = inner;
            async move {
                let req = Request::get("/other/page?x=1")
                    .body(Empty::new())
                    .expect("request");
                let res = svc
                    .ready()
                    .await
                    .expect("ready")
                    .call(req)
                    .await
                    .expect("call");
                res.into_body().collect().await.expect("body").to_bytes()
            }
        })
    });
    g.bench_function("vmproxy", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = proxy.clone();
            async move {
                let req = Request::get("/other/page?x=1")
                    .body(Empty::new())
                    .expect("request");
                let res = svc
                    .ready()
                    .await
                    .expect("ready")
                    .call(req)
                    .await
                    .expect("call");
                res.into_body().collect().await.expect("body").to_bytes()
            }
        })
    });
    g.finish();
}

fn proxied(c: &mut Criterion) {
    let rt = current_thread();
    let backend = rt.block_on(async {
        let listener = common::listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(common::serve(listener, small_backend()));
        addr
    });
    // A direct keep-alive connection to the backend.
    let mut direct = rt.block_on(async {
        let stream = common::connect(backend).await.expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        tx
    });
    let inner = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"inner"))))
    });
    let route = Route::builder("/app", Fixed(backend))
        .health_path("/app/health")
        .idle_timeout(None)
        .build()
        .expect("route");
    let layer = VmProxyLayer::new(route);
    rt.block_on(layer.handle().start()).expect("pre-warm");
    let proxy = layer.layer(inner);

    let mut g = c.benchmark_group("proxied");
    g.bench_function("direct", |b| {
        b.to_async(&rt).iter(|| {
            let req = Request::get("/app/small")
                .header(header::HOST, "bench")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let fut = direct.send_request(req);
            async move {
                let res = fut.await.expect("response");
                assert_eq!(res.status(), StatusCode::OK);
                res.into_body().collect().await.expect("body").to_bytes()
            }
        })
    });
    g.bench_function("vmproxy", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = proxy.clone();
            async move {
                let req = Request::get("/app/small")
                    .header(header::HOST, "bench")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let res = svc
                    .ready()
                    .await
                    .expect("ready")
                    .call(req)
                    .await
                    .expect("call");
                assert_eq!(res.status(), StatusCode::OK);
                res.into_body().collect().await.expect("body").to_bytes()
            }
        })
    });
    g.finish();
}

fn coalesce(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let health = rt.block_on(async {
        let listener = common::listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(common::serve(listener, small_backend()));
        addr
    });
    let mut g = c.benchmark_group("coalesce");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for n in [1_000usize, 10_000] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let gated = Arc::new(Gated {
                        addr: health,
                        gate: tokio::sync::Notify::new(),
                        starts: AtomicU64::new(0),
                    });
                    let route = Route::builder("/app", gated.clone())
                        .health_path("/health")
                        .idle_timeout(None)
                        .max_pending(n)
                        .build()
                        .expect("route");
                    let handle = route.handle();
                    let waiters: Vec<_> = (0..n)
                        .map(|_| {
                            let h = handle.clone();
                            tokio::spawn(async move { h.start().await.is_ok() })
                        })
                        .collect();
                    while handle.pending() < n {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    let t0 = Instant::now();
                    gated.gate.notify_one();
                    for w in waiters {
                        assert!(w.await.expect("join"), "a waiter failed");
                    }
                    total += t0.elapsed();
                    assert_eq!(
                        gated.starts.load(Ordering::SeqCst),
                        1,
                        "coalescing: more than one start"
                    );
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, passthrough, proxied, coalesce);
criterion_main!(benches);
