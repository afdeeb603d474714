//! The machines a [`VmProxyLayer`](crate::VmProxyLayer) starts and stops: the [`Backend`] trait.
//!
//! A backend knows how to bring one machine up, take it down and say what state the platform
//! reports for it. Everything else — readiness probing, coalescing, idle scale-to-zero and
//! proxying — is the layer's job, shared by every backend.
//!
//! Two backends ship with the crate: [`process`] (a local command, the embedded default) and,
//! with the `gce` feature, `gce` (a Compute Engine VM over the REST API).
//!
//! # Example
//!
//! A backend for a machine that is always at one address:
//!
//! ```
//! use std::net::SocketAddr;
//! use vmproxy::backend::{Backend, BackendFuture, Endpoint, Status};
//!
//! struct Fixed(SocketAddr);
//!
//! impl Backend for Fixed {
//!     fn name(&self) -> &str {
//!         "fixed"
//!     }
//!     fn start(&self) -> BackendFuture<'_, Endpoint> {
//!         let addr = self.0;
//!         Box::pin(async move { Ok(Endpoint::new(addr)) })
//!     }
//!     fn stop(&self) -> BackendFuture<'_, ()> {
//!         Box::pin(async { Ok(()) })
//!     }
//!     fn status(&self) -> BackendFuture<'_, Status> {
//!         let addr = self.0;
//!         Box::pin(async move { Ok(Status::Running(Endpoint::new(addr))) })
//!     }
//! }
//! # let _ = Fixed(([127, 0, 0, 1], 8080).into());
//! ```

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use crate::BoxError;

pub mod process;

#[cfg(feature = "gce")]
#[cfg_attr(docsrs, doc(cfg(feature = "gce")))]
pub mod gce;

/// The future a [`Backend`] method returns.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// Where a running machine answers HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    addr: SocketAddr,
}

impl Endpoint {
    /// An endpoint at `addr` (plain HTTP).
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint { addr }
    }

    /// The socket address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.addr)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint::new(addr)
    }
}

/// What the platform says of the machine right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Up, at this endpoint (it may not answer HTTP yet: readiness is probed by the layer).
    Running(Endpoint),
    /// On its way up or down (provisioning, staging, stopping, suspending…).
    Transitioning,
    /// Exists but is not running (stopped, terminated, suspended, exited).
    Stopped,
    /// Does not exist.
    Gone,
}

impl Status {
    /// Whether a machine in this state can serve no request until it is started again.
    pub fn is_down(&self) -> bool {
        matches!(self, Status::Stopped | Status::Gone)
    }
}

/// A kind of machine that can be started and stopped on demand.
///
/// The methods return boxed futures so that a layer can hold any backend as
/// `Arc<dyn Backend>`; they are called once per cold start or stop, never per request.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and error messages (an instance name, a command).
    fn name(&self) -> &str;

    /// Creates, starts or resumes the machine as needed, and returns once the platform says it
    /// is running. Called by one task at a time; never cancelled by a client going away.
    fn start(&self) -> BackendFuture<'_, Endpoint>;

    /// Takes the machine down according to the backend's stop policy.
    fn stop(&self) -> BackendFuture<'_, ()>;

    /// What the platform says of the machine now.
    fn status(&self) -> BackendFuture<'_, Status>;

    /// How often the layer should ask [`status`](Backend::status) while the machine runs or
    /// boots, to notice a machine that went away (a preempted VM, a crashed process).
    /// `None`: only on connect errors.
    fn status_interval(&self) -> Option<Duration> {
        None
    }

    /// Records that this proxy served traffic, for backends shared by several proxy replicas.
    /// The layer calls it at most every `idle_timeout / 4` while requests arrive.
    fn record_activity(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Whether every user of the machine has been idle for `idle_timeout`; the layer stops the
    /// machine only when this says yes. The default trusts the calling proxy alone.
    fn idle_everywhere(&self, idle_timeout: Duration) -> BackendFuture<'_, bool> {
        let _ = idle_timeout;
        Box::pin(async { Ok(true) })
    }

    /// Whether another proxy replica recorded activity on the machine after this one last did.
    /// A proxy that shuts down leaves such a machine running for the others. The default: no.
    fn in_use_elsewhere(&self) -> BackendFuture<'_, bool> {
        Box::pin(async { Ok(false) })
    }

    /// Where the machine runs, or is being brought up, or last ran, in the backend's words,
    /// with what the last start tried and was refused on the way (for the admin API and the
    /// status page; never shown to anonymous clients). The default: nothing to say.
    fn placement(&self) -> Option<String> {
        None
    }
}

impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn start(&self) -> BackendFuture<'_, Endpoint> {
        (**self).start()
    }
    fn stop(&self) -> BackendFuture<'_, ()> {
        (**self).stop()
    }
    fn status(&self) -> BackendFuture<'_, Status> {
        (**self).status()
    }
    fn status_interval(&self) -> Option<Duration> {
        (**self).status_interval()
    }
    fn record_activity(&self) -> BackendFuture<'_, ()> {
        (**self).record_activity()
    }
    fn idle_everywhere(&self, idle_timeout: Duration) -> BackendFuture<'_, bool> {
        (**self).idle_everywhere(idle_timeout)
    }
    fn in_use_elsewhere(&self) -> BackendFuture<'_, bool> {
        (**self).in_use_elsewhere()
    }
    fn placement(&self) -> Option<String> {
        (**self).placement()
    }
}
