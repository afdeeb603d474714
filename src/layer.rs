//! [`VmProxyLayer`]: the configuration that wraps a service in a [`VmProxy`].
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use vmproxy::{backend::process::ProcessBackend, Route, VmProxyLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = ProcessBackend::new(["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"])?;
//! let layer = VmProxyLayer::new(Route::builder("/files", backend).strip_prefix(true).build()?);
//! let handle = layer.handle(); // pre-warm, watch or stop the machine
//!
//! // `/` is answered by axum; `/files/...` by the machine, started on first use.
//! let app: Router = Router::new().route("/", get(|| async { "front" })).layer(layer);
//! # let _ = (app, handle);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use tower_layer::Layer;

use crate::lifecycle::Handle;
use crate::route::Route;
use crate::service::VmProxy;

/// Sends requests under each route's prefixes to that route's on-demand machine, and every other
/// request to the wrapped service.
///
/// Holds configuration only: cloning it is cheap, and building it needs no runtime.
#[derive(Clone, Debug)]
pub struct VmProxyLayer {
    routes: Arc<[Route]>,
}

impl VmProxyLayer {
    /// A layer with one route.
    pub fn new(route: Route) -> Self {
        VmProxyLayer {
            routes: Arc::new([route]),
        }
    }

    /// A layer with several routes; the first whose prefix matches a request takes it.
    pub fn from_routes(routes: impl IntoIterator<Item = Route>) -> Self {
        VmProxyLayer {
            routes: routes.into_iter().collect(),
        }
    }

    /// Adds a route, matched after the ones already there.
    #[must_use]
    pub fn route(self, route: Route) -> Self {
        VmProxyLayer {
            routes: self.routes.iter().cloned().chain(Some(route)).collect(),
        }
    }

    /// The handle of the first route's machine.
    ///
    /// # Panics
    ///
    /// If the layer has no route (only possible through an empty [`from_routes`](Self::from_routes)).
    pub fn handle(&self) -> Handle {
        self.routes[0].handle()
    }

    /// The routes, in matching order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

impl<S> Layer<S> for VmProxyLayer {
    type Service = VmProxy<S>;

    fn layer(&self, inner: S) -> VmProxy<S> {
        VmProxy::new(inner, self.routes.clone())
    }
}
