//! Scale-to-zero backends for any tower or axum service.
//!
//! [`VmProxyLayer`] wraps a service. Requests under a [`Route`]'s path prefixes go to an
//! on-demand machine — a local process, or a Compute Engine VM — that the first request starts
//! and that is stopped again after an idle period; every other request goes to the wrapped
//! service untouched. Concurrent first requests share one start.
//!
//! # Example
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use vmproxy::{backend::process::ProcessBackend, Route, VmProxyLayer};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     let backend = ProcessBackend::new(["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"])?;
//!     let route = Route::builder("/files", backend).strip_prefix(true).build()?;
//!     let app = Router::new()
//!         .route("/", get(|| async { "always on" }))
//!         .layer(VmProxyLayer::new(route));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//!     Ok(())
//! }
//! ```
//!
//! What happens on each request, the state machine's rules and the error statuses are described
//! in the crate's README.
//!
//! For operators: every machine records metrics through the [`metrics`] facade (names and labels
//! in [`telemetry`]; the application installs the exporter), and [`admin::Admin`] is a service
//! with a JSON API, the Prometheus exposition, live events and a status page, to mount in a
//! router or serve on a listener of its own.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unsafe_code)]
#![warn(unreachable_pub, clippy::await_holding_lock, clippy::if_let_mutex)]

pub mod admin;
pub mod backend;
mod body;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;
mod error;
mod future;
mod layer;
pub mod lifecycle;
mod oneshot;
mod path;
mod probe;
mod proxy;
pub mod route;
pub mod server;
mod service;
pub mod telemetry;
pub mod waiting;

#[cfg(feature = "emulator")]
#[cfg_attr(docsrs, doc(cfg(feature = "emulator")))]
pub mod emulator;

pub use body::ResponseBody;
pub use error::Error;
pub use future::ResponseFuture;
pub use layer::VmProxyLayer;
pub use lifecycle::{Handle, MachineStatus, StartPhase, StartTimings, State};
pub use route::{Admission, ConfigError, Route, RouteBuilder};
pub use service::VmProxy;

// The README's Rust examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The error type at the crate's edges.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's address, for `X-Forwarded-For`. [`server::Server`] inserts it; insert it as a
/// request extension when serving with plain hyper. With the `axum` feature, axum's
/// `ConnectInfo<SocketAddr>` (from `into_make_service_with_connect_info::<SocketAddr>()`) is
/// read as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// Marks a request that arrived over TLS. Whoever terminates TLS inserts it as a request
/// extension. `X-Forwarded-Proto` and `Forwarded: proto=` say `https` only then, never because
/// of the request's own scheme (an absolute-form target or HTTP/2's `:scheme`), which the client
/// writes; with `trust_forwarded_headers`, a trusted front's `X-Forwarded-Proto` is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tls;

/// A response extension on every response the layer produced for a route: which machine, and
/// whether the request waited for it to start. Access logs read it (the binary's does).
#[derive(Clone, Debug)]
pub struct MachineResponse {
    pub(crate) machine: std::sync::Arc<str>,
    pub(crate) waited_for_start: bool,
}

impl MachineResponse {
    /// The machine's name.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// Whether the request waited for a start rather than finding the machine running.
    pub fn waited_for_start(&self) -> bool {
        self.waited_for_start
    }
}
