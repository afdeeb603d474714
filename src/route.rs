//! One on-demand machine and the path prefixes it serves: [`Route`] and its builder.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use vmproxy::{backend::process::ProcessBackend, Route};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = ProcessBackend::new(["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"])?;
//! let route = Route::builder("/files", backend)
//!     .strip_prefix(true)
//!     .health_path("/")
//!     .idle_timeout(Some(Duration::from_secs(600)))
//!     .build()?;
//! assert_eq!(route.prefixes(), ["/files"]);
//!
//! // Bad input is refused when the route is built.
//! let backend = ProcessBackend::new(["true"])?;
//! let err = Route::builder("files", backend).build().unwrap_err();
//! assert!(err.to_string().contains("prefix"));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::lifecycle::{Handle, Lifecycle, Limits, Timings};
use crate::path;
use crate::probe::ProbeConfig;
use crate::proxy::Pool;
use crate::waiting::{self, Template};

/// One on-demand machine, the prefixes routed to it, and how its lifecycle is run.
///
/// Cheap to clone: clones share the machine, so a route used by two layers (or two routers)
/// still starts one machine.
#[derive(Clone, Debug)]
pub struct Route {
    // One pointer: every proxied request holds a clone, also while it waits for a start.
    pub(crate) inner: Arc<RouteInner>,
}

#[derive(Debug)]
pub(crate) struct RouteInner {
    pub(crate) prefixes: Box<[String]>,
    pub(crate) strip_prefix: bool,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) pool: Pool,
    pub(crate) trust_forwarded: bool,
    /// Protocols a client may switch to (`Upgrade`), lower-case.
    pub(crate) upgrades: Box<[Box<str>]>,
    /// Add `Server-Timing` to responses that waited for a start.
    pub(crate) server_timing: bool,
    /// Answer browsers with this page instead of making them wait for a start.
    pub(crate) waiting_page: Option<Template>,
}

impl Route {
    /// Starts building a route that sends requests under `prefix` to `backend`.
    pub fn builder(prefix: impl Into<String>, backend: impl Backend) -> RouteBuilder {
        RouteBuilder::new(prefix.into(), Arc::new(backend))
    }

    /// The prefixes this route serves, in canonical form.
    pub fn prefixes(&self) -> &[String] {
        &self.inner.prefixes
    }

    /// A handle on the route's machine: its state, a pre-warm, a stop.
    pub fn handle(&self) -> Handle {
        Handle::new(self.inner.lifecycle.clone())
    }
}

/// How a request that finds its machine not running is admitted: see
/// [`RouteBuilder::admission`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Admission {
    /// Wait for the start, up to `cold_start_timeout`, then 504 (the default).
    #[default]
    Wait,
    /// Refuse at once, with 503 and `Retry-After`, a request that past starts say would not be
    /// served within `cold_start_timeout`; wait otherwise.
    Deadline,
}

impl Admission {
    /// The name used in the binary's file: `wait` or `deadline`.
    pub fn name(&self) -> &'static str {
        match self {
            Admission::Wait => "wait",
            Admission::Deadline => "deadline",
        }
    }
}

impl std::str::FromStr for Admission {
    type Err = ConfigError;

    /// `wait` or `deadline`, as the route key `admission` is written.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "wait" => Ok(Admission::Wait),
            "deadline" => Ok(Admission::Deadline),
            other => Err(ConfigError::new(
                "admission",
                format!("{other:?} is not an admission; write \"wait\" or \"deadline\""),
            )),
        }
    }
}

/// A route's configuration that cannot be used, found by [`RouteBuilder::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The setting that is wrong (`prefix`, `health_path`, `max_pending`…).
    pub fn field(&self) -> &str {
        self.field
    }

    /// Why it is wrong.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Builds a [`Route`]; every setting has a default fit for a VM behind a web front.
#[derive(Clone)]
#[must_use]
pub struct RouteBuilder {
    backend: Arc<dyn Backend>,
    prefixes: Vec<String>,
    name: Option<String>,
    strip_prefix: bool,
    health_path: Option<String>,
    idle_timeout: Option<Duration>,
    cold_start_timeout: Duration,
    admission: Admission,
    start_timeout: Duration,
    max_pending: usize,
    start_backoff: Duration,
    max_start_backoff: Duration,
    min_uptime: Duration,
    probe_initial: Duration,
    probe_max: Duration,
    probe_attempt_timeout: Duration,
    pool_idle_timeout: Duration,
    connect_timeout: Duration,
    response_header_timeout: Option<Duration>,
    trust_forwarded: bool,
    upgrades: Vec<String>,
    server_timing: bool,
    waiting_page: bool,
    waiting_page_template: Option<String>,
}

impl fmt::Debug for RouteBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteBuilder")
            .field("backend", &self.backend.name())
            .field("prefixes", &self.prefixes)
            .finish_non_exhaustive()
    }
}

impl RouteBuilder {
    fn new(prefix: String, backend: Arc<dyn Backend>) -> Self {
        RouteBuilder {
            backend,
            prefixes: vec![prefix],
            name: None,
            strip_prefix: false,
            health_path: None,
            idle_timeout: Some(Duration::from_secs(600)),
            cold_start_timeout: Duration::from_secs(300),
            admission: Admission::Wait,
            start_timeout: Duration::from_secs(600),
            max_pending: 10_000,
            start_backoff: Duration::from_secs(1),
            max_start_backoff: Duration::from_secs(60),
            min_uptime: Duration::from_secs(10),
            probe_initial: Duration::from_millis(25),
            probe_max: Duration::from_millis(150),
            probe_attempt_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            response_header_timeout: None,
            trust_forwarded: false,
            upgrades: vec!["websocket".to_owned()],
            server_timing: true,
            waiting_page: false,
            waiting_page_template: None,
        }
    }

    /// Another prefix served by the same machine.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefixes.push(prefix.into());
        self
    }

    /// The machine's name in logs and error messages (default: the backend's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Forward `/app/x` as `/x` (default: as `/app/x`).
    pub fn strip_prefix(mut self, strip: bool) -> Self {
        self.strip_prefix = strip;
        self
    }

    /// The path probed with `GET` until it answers 2xx (default: the first prefix, or `/` when
    /// the prefix is stripped).
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.health_path = Some(path.into());
        self
    }

    /// Stop the machine after this long with no request in flight; `None` keeps it running
    /// (default: 10 minutes).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long one request waits for a cold start before it gets 504; the start goes on for
    /// the next request (default: 5 minutes).
    pub fn cold_start_timeout(mut self, timeout: Duration) -> Self {
        self.cold_start_timeout = timeout;
        self
    }

    /// How a request that finds the machine absent, starting or stopping is admitted (default:
    /// [`Admission::Wait`]: it waits up to [`cold_start_timeout`](Self::cold_start_timeout),
    /// then gets 504).
    ///
    /// With [`Admission::Deadline`], the route learns how long the machine's cold starts take
    /// (the median of the last 16 that succeeded, phase by phase: the platform's start, then
    /// readiness), and a request that would wait longer than `cold_start_timeout` for the time
    /// still expected (a whole start when absent or stopping, what is left of the start under
    /// way when starting) is answered at once: `503 Service Unavailable`, `Retry-After` with
    /// that time in seconds, and a body that says why. It does not wait for its 504. Before
    /// the first start has succeeded there is nothing to judge by, and requests wait as with
    /// [`Admission::Wait`].
    ///
    /// A refused request still starts the machine (after the stop under way, if any), as a
    /// waiting page does: else, with nobody waiting, no start would ever be learned from or
    /// finished, and every request would be refused. Requests during the back-off after a
    /// failed start get its 503 as usual; a machine that runs serves every request. The
    /// estimate does not count the time a stop under way still takes.
    /// [`Handle::start`] (and the admin API's start) wait as with [`Admission::Wait`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use vmproxy::{backend::process::ProcessBackend, route::Admission, Route};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // An API whose clients give up after 30 s: tell them at once when the GPU box needs longer.
    /// let backend = ProcessBackend::new(["./serve-model", "--port={port}"])?;
    /// let route = Route::builder("/v1", backend)
    ///     .cold_start_timeout(Duration::from_secs(30))
    ///     .admission(Admission::Deadline)
    ///     .build()?;
    /// assert_eq!(route.prefixes(), ["/v1"]);
    /// assert_eq!("deadline".parse::<Admission>()?, Admission::Deadline);
    /// assert!("later".parse::<Admission>().is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// How long a start (backend start plus readiness) may take before it is given up, the
    /// machine stopped, and the waiters answered 503 (default: 10 minutes).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// How many requests may wait for a start; more get 503 at once (default: 10,000).
    pub fn max_pending(mut self, max: usize) -> Self {
        self.max_pending = max;
        self
    }

    /// The pause after a failed start before the next one, doubled after each further failure
    /// up to `max` (default: 1 s, up to 60 s). Requests in the pause get 503 with the reason.
    pub fn start_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.start_backoff = first;
        self.max_start_backoff = max;
        self
    }

    /// A machine lost (found exited, stopped or deleted by a connect error's status check or the
    /// periodic one) within this long of becoming ready counts as a failed start: the
    /// [start back-off](Self::start_backoff) applies, and requests in the pause get 503 with
    /// `Retry-After` and the reason, instead of a crash-looping machine being restarted by every
    /// request. A machine lost after a longer uptime is started again by the next request. The
    /// back-off keeps doubling until a run lasts this long (or ends by a stop from this proxy).
    /// Zero turns the rule off (default: 10 s).
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.min_uptime = uptime;
        self
    }

    /// The readiness probe's first gap and its cap (default: 25 ms growing ×1.5 to 150 ms).
    pub fn probe_interval(mut self, initial: Duration, max: Duration) -> Self {
        self.probe_initial = initial;
        self.probe_max = max;
        self
    }

    /// How long an idle keep-alive connection to the machine is reused; keep it below the
    /// backend's own keep-alive timeout (default: 30 s).
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// How long to wait for a TCP connection to the machine (default: 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the machine may take, once a request is sent whole, to send the response's head;
    /// past it the request is answered 504 and the connection closed (default: no limit, for
    /// machines that think long before answering).
    pub fn response_header_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.response_header_timeout = timeout;
        self
    }

    /// Whether a response that waited for a cold start carries `Server-Timing` (W3C) with
    /// `vmproxy-wait`, `vmproxy-backend` and `vmproxy-readiness` durations, shown by browsers'
    /// developer tools (default: on). A warm response never carries them.
    pub fn server_timing(mut self, on: bool) -> Self {
        self.server_timing = on;
        self
    }

    /// Whether a browser gets a page at once while the machine is not running, instead of
    /// waiting for it (default: off). A `GET` or `HEAD` whose `Accept` prefers `text/html` is
    /// answered 503 with `Retry-After` and a page that says what the machine is doing and
    /// reloads itself until the machine answers; it sets the start going without waiting for
    /// it. Other requests (curl's `*/*`, API clients) wait as usual. See [`crate::waiting`].
    pub fn waiting_page(mut self, on: bool) -> Self {
        self.waiting_page = on;
        self
    }

    /// The waiting page's template, as text (default: [`waiting::DEFAULT_TEMPLATE`]); checked
    /// by [`build`](Self::build). Placeholders are listed in [`crate::waiting`]. Used only with
    /// [`waiting_page`](Self::waiting_page) on.
    pub fn waiting_page_template(mut self, template: impl Into<String>) -> Self {
        self.waiting_page_template = Some(template.into());
        self
    }

    /// The protocols a client may switch to with `Upgrade` (default: `["websocket"]`). A
    /// request asking for another is forwarded as a plain request, its `Upgrade` removed
    /// (RFC 9110 §7.8). `h2c` is refused here: an upgraded HTTP/2 connection would carry
    /// requests that no route ever checked.
    pub fn upgrades<I, S>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.upgrades = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Keep the `X-Forwarded-Proto` and `X-Forwarded-Host` a request arrives with, instead of
    /// setting them from what this proxy saw. Turn it on when the proxy runs behind a front that
    /// sets them and that clients cannot bypass (Cloud Run, App Engine, a load balancer that
    /// terminates TLS); leave it off when clients reach the proxy directly (default: off).
    /// `X-Forwarded-For` is appended to either way.
    pub fn trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.trust_forwarded = trust;
        self
    }

    /// Checks the settings and builds the route. Needs no runtime and does no I/O.
    pub fn build(self) -> Result<Route, ConfigError> {
        let mut prefixes = Vec::with_capacity(self.prefixes.len());
        for p in &self.prefixes {
            let canonical = path::canonical_prefix(p)
                .map_err(|e| ConfigError::new("prefix", format!("{p:?} {e}")))?;
            prefixes.push(canonical);
        }
        let health_path = match self.health_path {
            Some(p) => p,
            None if self.strip_prefix => "/".to_owned(),
            None => prefixes[0].clone(),
        };
        if !health_path.starts_with('/')
            || http::uri::PathAndQuery::try_from(health_path.as_str()).is_err()
        {
            return Err(ConfigError::new(
                "health_path",
                format!("{health_path:?} must be a path starting with '/'"),
            ));
        }
        if self.max_pending == 0 {
            return Err(ConfigError::new("max_pending", "must be at least 1"));
        }
        for (field, d) in [
            ("cold_start_timeout", self.cold_start_timeout),
            ("start_timeout", self.start_timeout),
            ("probe_interval", self.probe_initial),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(field, "must be more than zero"));
            }
        }
        if self.probe_max < self.probe_initial {
            return Err(ConfigError::new(
                "probe_interval",
                "the cap is below the first gap",
            ));
        }
        if self.max_start_backoff < self.start_backoff {
            return Err(ConfigError::new(
                "start_backoff",
                "the cap is below the first pause",
            ));
        }
        if self.response_header_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "response_header_timeout",
                "must be more than zero (or none)",
            ));
        }
        let mut upgrades: Vec<Box<str>> = Vec::with_capacity(self.upgrades.len());
        for p in &self.upgrades {
            let token = !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                return Err(ConfigError::new(
                    "upgrades",
                    format!("{p:?} is not a protocol name such as \"websocket\""),
                ));
            }
            if p.eq_ignore_ascii_case("h2c") {
                return Err(ConfigError::new(
                    "upgrades",
                    "\"h2c\" is never upgraded: the HTTP/2 connection would be a tunnel past every route check",
                ));
            }
            upgrades.push(p.to_ascii_lowercase().into());
        }
        let template = Template::parse(
            self.waiting_page_template
                .as_deref()
                .unwrap_or(waiting::DEFAULT_TEMPLATE),
        )
        .map_err(|e| ConfigError::new("waiting_page_template", e.to_string()))?;
        let idle_timeout = self.idle_timeout.filter(|d| !d.is_zero());
        let name = self.name.unwrap_or_else(|| self.backend.name().to_owned());
        // The name goes into log lines, metric labels and pages: a newline in it would forge
        // a log line.
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(ConfigError::new(
                "name",
                format!("{name:?} is empty or has control characters"),
            ));
        }
        let name: Arc<str> = name.into();
        let lifecycle = Lifecycle::new(
            name,
            self.backend,
            Limits {
                max_pending: self.max_pending,
                idle_timeout,
                start_backoff: self.start_backoff,
                max_start_backoff: self.max_start_backoff,
                min_uptime: self.min_uptime,
            },
            Timings {
                cold_start_timeout: self.cold_start_timeout,
                start_timeout: self.start_timeout,
                admission: self.admission,
            },
            ProbeConfig {
                path: health_path,
                initial: self.probe_initial,
                max: self.probe_max,
                attempt_timeout: self.probe_attempt_timeout,
            },
        );
        Ok(Route {
            inner: Arc::new(RouteInner {
                prefixes: prefixes.into(),
                strip_prefix: self.strip_prefix,
                lifecycle,
                pool: Pool::new(
                    self.pool_idle_timeout,
                    self.connect_timeout,
                    self.response_header_timeout,
                ),
                trust_forwarded: self.trust_forwarded,
                upgrades: upgrades.into(),
                server_timing: self.server_timing,
                waiting_page: self.waiting_page.then_some(template),
            }),
        })
    }
}
