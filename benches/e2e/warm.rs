//! The warm path: the shared backend server and the two Rust fronts under test.
//!
//! - `backend`: plain hyper HTTP/1.1; a path containing `big` gets 1 MiB, anything else a
//!   13-byte body. The same server stands behind every front.
//! - `front-vmproxy`: axum with `VmProxyLayer` on `/app`, the machine pre-warmed (Running).
//! - `front-arp`: axum-reverse-proxy's `ReverseProxy` on `/app`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
use vmproxy::{Route, VmProxyLayer};

use crate::common::{listen, serve, text, write_addr_file, Args, BoxError, Handler};

pub const SMALL: &[u8] = b"hello, world\n";
pub const BIG_LEN: usize = 1 << 20;

/// The backend's answers: `big` → 1 MiB, `/_conns` → connections accepted so far, else 13 bytes.
pub fn backend_handler() -> Handler {
    let big = Bytes::from(vec![b'x'; BIG_LEN]);
    Arc::new(move |req| {
        if req.uri().path() == "/_conns" {
            text(
                StatusCode::OK,
                crate::common::ACCEPTED
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
            )
        } else if req.uri().path().contains("big") {
            text(StatusCode::OK, big.clone())
        } else {
            text(StatusCode::OK, Bytes::from_static(SMALL))
        }
    })
}

pub async fn backend(args: Args) -> Result<(), BoxError> {
    let listener = listen(args.num("port", 0))?;
    write_addr_file(args.req("addr-file"), listener.local_addr()?)?;
    serve(listener, backend_handler()).await;
    Ok(())
}

/// A machine that is always running at one address: the warm path with no start.
pub struct Fixed(pub SocketAddr);

impl Backend for Fixed {
    fn name(&self) -> &str {
        "bench-backend"
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

pub async fn front_vmproxy(args: Args) -> Result<(), BoxError> {
    let backend: SocketAddr = args.req("backend").parse()?;
    let route = Route::builder("/app", Fixed(backend))
        .health_path("/app/health")
        .idle_timeout(None)
        .build()?;
    let layer = VmProxyLayer::new(route);
    layer.handle().start().await?;
    let app = Router::new()
        .route("/", get(|| async { "front" }))
        .layer(layer);
    let listener = listen(args.num("port", 0))?;
    write_addr_file(args.req("addr-file"), listener.local_addr()?)?;
    // TCP_NODELAY on client connections, as nginx does by default: without it a streamed body
    // meets Nagle + delayed ACK (40 ms stalls).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

pub async fn front_arp(args: Args) -> Result<(), BoxError> {
    let backend: SocketAddr = args.req("backend").parse()?;
    let proxy =
        axum_reverse_proxy::ReverseProxy::new("/app".to_owned(), format!("http://{backend}"));
    let app: Router = proxy.into();
    let app = app.route("/", get(|| async { "front" }));
    let listener = listen(args.num("port", 0))?;
    write_addr_file(args.req("addr-file"), listener.local_addr()?)?;
    // TCP_NODELAY on client connections, as nginx does by default: without it a streamed body
    // meets Nagle + delayed ACK (40 ms stalls).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
