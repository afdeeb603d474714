//! A loopback Compute Engine and metadata server, for tests and demos (feature `emulator`).
//!
//! [`Emulator::start`] serves the Compute v1 subset vmproxy uses at `/compute/v1/` (instances
//! list and aggregatedList with `filter`, `maxResults` and `pageToken`, insert, get, delete,
//! start, stop, suspend, resume, setLabels; zoneOperations list, get and wait) and the metadata server's token, service-account and project-id endpoints at
//! `/computeMetadata/v1/`, on one loopback port. It speaks the real wire format: operations, error bodies (`alreadyExists`,
//! `notFound`, `resourceNotReady`, `conditionNotMet`, `rateLimitExceeded`, `invalid`),
//! fingerprints, `requestId` idempotency. Tokens are issued only with `Metadata-Flavor: Google`,
//! and the Compute API accepts only tokens it issued.
//!
//! Each instance gets its own loopback addresses (`networkIP` and `natIP`: 127.0.0.2,
//! 127.0.0.3, …; a re-created instance comes back at new ones, a restarted one keeps its
//! `networkIP` and gets a new `natIP`, as on Compute Engine) and, a boot delay after it is
//! RUNNING, a real HTTP server there on its port (the `vmproxy-port` metadata item, else
//! [`EmulatorOptions::default_port`]) that answers the health path and echoes every other
//! request (method, path, headers, body size) as JSON.
//!
//! Faults can be injected ([`Emulator::fail_next`], [`Emulator::fail_next_operation`],
//! [`Emulator::set_wait_returns_early`], [`Emulator::preempt`],
//! [`Emulator::set_never_healthy`], [`Emulator::set_stockout`],
//! [`Emulator::set_spot_stockout`], [`Emulator::hang_next_operation`],
//! [`Emulator::delay_next`], [`Emulator::hold_next`]) and the calls received inspected ([`Emulator::calls`]). A request
//! without `Authorization` gets Google's 401 (`required`, `CREDENTIALS_MISSING`); the instances
//! can be looked at without a token at `GET /emulator/instances`.
//! Dropping the [`Emulator`] stops its server and every instance's server.
//!
//! From the command line: `vmproxy emulate --listen 127.0.0.1:8085` (see [`run_cli`]).
//!
//! # Example
//!
//! ```
//! use vmproxy::backend::gce::GceBackend;
//! use vmproxy::emulator::{Emulator, EmulatorOptions};
//! use vmproxy::{Route, State};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let emulator = Emulator::start(EmulatorOptions::fast()).await?;
//! let backend = GceBackend::builder("us-central1-a", "demo")
//!     .endpoint(emulator.compute_base())
//!     .metadata_server(emulator.url())
//!     .port(8080)
//!     .poll_interval(std::time::Duration::from_millis(20))
//!     .build()?;
//! let route = Route::builder("/demo", backend).health_path("/healthz").build()?;
//! let endpoint = route.handle().start().await?; // insert → RUNNING → probe
//! assert_eq!(route.handle().state(), State::Running(endpoint));
//! assert_eq!(emulator.count("instances.insert"), 1);
//! # Ok(())
//! # }
//! ```

mod compute;
mod list;
mod metadata;
mod state;
mod vm;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::Router;
use http::{HeaderMap, Method, Request, Uri};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::BoxError;
use state::World;
use vm::AbortOnDrop;

/// How the emulator behaves: its address, project and timings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EmulatorOptions {
    /// Where the API and metadata server listen (default `127.0.0.1:0`: any free port).
    pub listen: SocketAddr,
    /// The project the metadata server reports (default `vmproxy-emulator`). Any project is
    /// accepted in API paths.
    pub project: String,
    /// Time in PROVISIONING after an insert, start or resume.
    pub provisioning: Duration,
    /// Time in STAGING before RUNNING.
    pub staging: Duration,
    /// Time in STOPPING before TERMINATED (stop) or gone (delete).
    pub stopping: Duration,
    /// Time in SUSPENDING before SUSPENDED.
    pub suspending: Duration,
    /// Time between RUNNING and the instance's HTTP server answering.
    pub boot_delay: Duration,
    /// The path the instance servers answer as health check (default `/healthz`).
    pub health_path: String,
    /// The instance port when its metadata has no `vmproxy-port` item (default 8080).
    pub default_port: u16,
    /// How long `zoneOperations.wait` waits at most (default 2 minutes, as the real one).
    pub wait_deadline: Duration,
    /// `expires_in` of issued tokens (default 3599 s).
    pub token_lifetime: Duration,
    /// Answer a POST that has neither `Content-Length` nor `Transfer-Encoding` with 411, as
    /// Google's front end does ("POST requests require a Content-length header"). Off by
    /// default, so that bare HTTP clients can try the emulator.
    pub require_content_length: bool,
    /// How long a preempted Spot VM stays STOPPING (its soft-off period) before it is
    /// TERMINATED (default 30 s, as on Compute Engine).
    pub preemption_soft_off: Duration,
}

impl Default for EmulatorOptions {
    /// Timings in the spirit of the real thing, shortened (a start takes ~5 s).
    fn default() -> Self {
        EmulatorOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            project: "vmproxy-emulator".to_owned(),
            provisioning: Duration::from_secs(2),
            staging: Duration::from_secs(1),
            stopping: Duration::from_secs(2),
            suspending: Duration::from_secs(1),
            boot_delay: Duration::from_secs(2),
            health_path: "/healthz".to_owned(),
            default_port: 8080,
            wait_deadline: Duration::from_secs(120),
            token_lifetime: Duration::from_secs(3599),
            require_content_length: false,
            preemption_soft_off: Duration::from_secs(30),
        }
    }
}

impl EmulatorOptions {
    /// Every transition and the boot in 20 ms: for tests.
    pub fn fast() -> Self {
        let t = Duration::from_millis(20);
        EmulatorOptions {
            provisioning: t,
            staging: t,
            stopping: t,
            suspending: t,
            boot_delay: t,
            preemption_soft_off: t,
            wait_deadline: Duration::from_secs(5),
            ..EmulatorOptions::default()
        }
    }

    /// Listen on `addr`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The project the metadata server reports.
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.project = project.into();
        self
    }

    /// PROVISIONING, STAGING, STOPPING and SUSPENDING durations.
    pub fn timings(
        mut self,
        provisioning: Duration,
        staging: Duration,
        stopping: Duration,
        suspending: Duration,
    ) -> Self {
        self.provisioning = provisioning;
        self.staging = staging;
        self.stopping = stopping;
        self.suspending = suspending;
        self
    }

    /// Time between RUNNING and the instance's HTTP server answering.
    pub fn boot_delay(mut self, delay: Duration) -> Self {
        self.boot_delay = delay;
        self
    }

    /// The instance servers' health path.
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.health_path = path.into();
        self
    }

    /// The instance port when the metadata does not say.
    pub fn default_port(mut self, port: u16) -> Self {
        self.default_port = port;
        self
    }

    /// Whether a POST without `Content-Length` gets Google's 411 (see
    /// [`EmulatorOptions::require_content_length`]).
    pub fn require_content_length(mut self, on: bool) -> Self {
        self.require_content_length = on;
        self
    }

    /// A preempted VM's soft-off period (STOPPING before TERMINATED).
    pub fn preemption_soft_off(mut self, d: Duration) -> Self {
        self.preemption_soft_off = d;
        self
    }

    /// The longest `zoneOperations.wait`.
    pub fn wait_deadline(mut self, deadline: Duration) -> Self {
        self.wait_deadline = deadline;
        self
    }
}

/// One call the emulator received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The API method: `instances.insert`, `zoneOperations.wait`, `metadata.token`, … or
    /// `unknown`.
    pub method: String,
    /// The HTTP method.
    pub http_method: String,
    /// Path and query.
    pub path: String,
    /// The status answered.
    pub status: u16,
}

/// An emulated instance, as tests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Project.
    pub project: String,
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Numeric id (a new one for a re-created instance).
    pub id: u64,
    /// `PROVISIONING`, `RUNNING`, `TERMINATED`, …
    pub status: String,
    /// Internal address.
    pub network_ip: IpAddr,
    /// External address, if it has an access config (reported by the API only while running).
    pub nat_ip: Option<IpAddr>,
    /// The port its HTTP server listens on.
    pub port: u16,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The labels' fingerprint.
    pub label_fingerprint: String,
}

/// A running emulator; dropping it stops every server it started.
#[derive(Debug)]
pub struct Emulator {
    world: Arc<World>,
    addr: SocketAddr,
    _server: AbortOnDrop,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.world.shutdown();
    }
}

async fn dispatch(
    State(world): State<Arc<World>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    if path == "/emulator/instances" && method == Method::GET {
        // Unauthenticated, read-only, apart from the Compute API (which answers a request
        // without a token 401 as Google does): what runs, for a person at a terminal.
        return world.listing();
    }
    if path == "/" || path == "/computeMetadata" || path.starts_with("/computeMetadata/") {
        metadata::handle(&world, &method, &uri, &headers)
    } else {
        compute::handle(world, method, uri, headers, body).await
    }
}

impl Emulator {
    /// Binds the listen address and starts serving.
    pub async fn start(options: EmulatorOptions) -> Result<Emulator, BoxError> {
        let listener = tokio::net::TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let world = World::new(options);
        let router = Router::new().fallback(dispatch).with_state(world.clone());
        let handler = move |req: Request<Incoming>| {
            let router = router.clone();
            async move {
                match router.oneshot(req).await {
                    Ok(res) => res,
                    Err(never) => match never {},
                }
            }
        };
        let server = AbortOnDrop(tokio::spawn(vm::serve(listener, handler)));
        Ok(Emulator {
            world,
            addr,
            _server: server,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (also the metadata server's base URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Compute API base URL: `http://127.0.0.1:PORT/compute/v1/`.
    pub fn compute_base(&self) -> String {
        format!("http://{}/compute/v1/", self.addr)
    }

    /// The value for `GCE_METADATA_HOST`: `127.0.0.1:PORT`.
    pub fn metadata_host(&self) -> String {
        self.addr.to_string()
    }

    /// The project the metadata server reports.
    pub fn project(&self) -> &str {
        &self.world.opts.project
    }

    /// The next `count` calls of `method` (`instances.insert`, `zoneOperations.wait`, …) fail
    /// with HTTP `status` and this reason (`rateLimitExceeded`, `quotaExceeded`, `backendError`…).
    pub fn fail_next(&self, method: &str, count: usize, status: u16, reason: &str) {
        self.world.lock().faults.push(state::Fault {
            method: method.to_owned(),
            remaining: count,
            status,
            reason: reason.to_owned(),
        });
    }

    /// Like [`set_stockout`](Self::set_stockout) for Spot inserts only: standard ones still
    /// find room in `zone`.
    pub fn set_spot_stockout(&self, zone: &str, on: bool) {
        let mut st = self.world.lock();
        if on {
            st.spot_stockouts.insert(zone.to_owned());
        } else {
            st.spot_stockouts.remove(zone);
        }
    }

    /// The next `count` calls of `method` are answered `delay` late, with the answer as it was
    /// when the call arrived (a stale read: e.g. two replicas that both list before either
    /// inserts).
    pub fn delay_next(&self, method: &str, count: usize, delay: Duration) {
        self.world
            .lock()
            .delays
            .push((method.to_owned(), count, delay));
    }

    /// The next `count` calls of `method` take effect `delay` after they arrive, and are
    /// answered then: a call still in flight (e.g. an `instances.insert` Compute Engine has not
    /// acted on yet, so that a `get` meanwhile finds no instance).
    pub fn hold_next(&self, method: &str, count: usize, delay: Duration) {
        self.world
            .lock()
            .holds
            .push((method.to_owned(), count, delay));
    }

    /// The next operation started by `method` (`instances.insert`, `instances.start`,
    /// `instances.resume`) finishes DONE with this error code (`ZONE_RESOURCE_POOL_EXHAUSTED`,
    /// `QUOTA_EXCEEDED`, …), and the instance goes back to where it was (gone, TERMINATED,
    /// SUSPENDED).
    pub fn fail_next_operation(&self, method: &str, code: &str) {
        self.world
            .lock()
            .op_faults
            .push((method.to_owned(), code.to_owned()));
    }

    /// Makes `zone` run out of capacity (or have it again): from now on, insert, start and
    /// resume there end with the operation error `ZONE_RESOURCE_POOL_EXHAUSTED` (HTTP 503 in
    /// `httpErrorStatusCode`), as Compute Engine reports a stockout. With `leave_instance`, a
    /// refused insert leaves the instance behind, TERMINATED (what a caller must clean up);
    /// without it, the instance is gone.
    pub fn set_stockout(&self, zone: &str, on: bool, leave_instance: bool) {
        let mut st = self.world.lock();
        if on {
            st.stockouts.insert(zone.to_owned(), leave_instance);
        } else {
            st.stockouts.remove(zone);
        }
    }

    /// The next operation started by `method` (`instances.insert`, `instances.delete`,
    /// `instances.stop`, `instances.start`, …) never finishes: it stays RUNNING and the
    /// instance stays as it was (an insert's instance stays PROVISIONING).
    pub fn hang_next_operation(&self, method: &str) {
        self.world.lock().hangs.push(method.to_owned());
    }

    /// Every instance, as [`InstanceInfo`]s (also served without a token, as JSON, at
    /// `GET /emulator/instances`).
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let st = self.world.lock();
        let mut out: Vec<InstanceInfo> = st.instances.values().map(|i| i.info()).collect();
        out.sort_by(|a, b| (&a.zone, &a.name).cmp(&(&b.zone, &b.name)));
        out
    }

    /// While on, `zoneOperations.wait` answers at once, DONE or not.
    pub fn set_wait_returns_early(&self, on: bool) {
        self.world.lock().wait_early = on;
        self.world.bump();
    }

    /// While on, instance servers answer 503 on the health path.
    pub fn set_never_healthy(&self, on: bool) {
        self.world.never_healthy.store(on, Ordering::SeqCst);
    }

    /// Preempts a running (or booting) instance of the metadata project now: STOPPING for the
    /// soft-off period ([`EmulatorOptions::preemption_soft_off`]), then TERMINATED (or
    /// deleted, if its termination action is DELETE), its servers gone. False if there was
    /// nothing to preempt.
    pub fn preempt(&self, zone: &str, name: &str) -> bool {
        let key = (
            self.world.opts.project.clone(),
            zone.to_owned(),
            name.to_owned(),
        );
        compute::preempt(&self.world, &key)
    }

    /// Creates an instance directly in `status` (`RUNNING`, `TERMINATED` or `SUSPENDED`) in the
    /// metadata project, serving on `port` when running.
    pub fn add_instance(
        &self,
        zone: &str,
        name: &str,
        status: &str,
        port: u16,
    ) -> Result<InstanceInfo, BoxError> {
        let status: &'static str = match status {
            "RUNNING" => "RUNNING",
            "TERMINATED" => "TERMINATED",
            "SUSPENDED" => "SUSPENDED",
            other => return Err(format!("cannot seed an instance in status {other}").into()),
        };
        let key = (
            self.world.opts.project.clone(),
            zone.to_owned(),
            name.to_owned(),
        );
        if self.world.lock().instances.contains_key(&key) {
            return Err(format!("instance {name} already exists").into());
        }
        compute::seed(&self.world, key, status, port)?;
        self.instance(zone, name)
            .ok_or_else(|| "seeded instance vanished".into())
    }

    /// An instance (of any project) by zone and name.
    pub fn instance(&self, zone: &str, name: &str) -> Option<InstanceInfo> {
        let st = self.world.lock();
        st.instances
            .values()
            .find(|i| i.key.1 == zone && i.key.2 == name)
            .map(|i| i.info())
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.world.lock().calls.clone()
    }

    /// How many calls of `method` were received (whatever their answer).
    pub fn count(&self, method: &str) -> usize {
        self.world
            .lock()
            .calls
            .iter()
            .filter(|c| c.method == method)
            .count()
    }

    /// Forgets the calls received so far.
    pub fn clear_calls(&self) {
        self.world.lock().calls.clear();
    }

    /// How many access tokens the metadata server issued.
    pub fn tokens_issued(&self) -> usize {
        self.world.lock().tokens.len()
    }
}

const HELP: &str = "\
vmproxy emulate: a loopback Compute Engine + metadata server

USAGE:
    vmproxy emulate [OPTIONS]

OPTIONS:
    --listen ADDR          where to listen (default 127.0.0.1:8085)
    --project NAME         project-id the metadata server reports (default vmproxy-emulator)
    --provisioning DUR     time in PROVISIONING (default 2s)
    --staging DUR          time in STAGING (default 1s)
    --stopping DUR         time in STOPPING (default 2s)
    --suspending DUR       time in SUSPENDING (default 1s)
    --boot-delay DUR       RUNNING → the instance's HTTP server answers (default 2s)
    --health-path PATH     the instances' health path (default /healthz)
    --port PORT            instance port when its metadata has no vmproxy-port (default 8080)
    --wait-deadline DUR    longest zoneOperations.wait (default 2m)
    --never-healthy        instances answer 503 on the health path
    --require-content-length
                           a POST without Content-Length gets 411, as from Google
    --soft-off DUR         a preempted Spot VM's STOPPING period (default 30s)
    --stockout ZONE        ZONE has no capacity: insert/start/resume fail with
                           ZONE_RESOURCE_POOL_EXHAUSTED (repeatable)
    -h, --help             this help

The Compute API is served at http://ADDR/compute/v1/ and the metadata server at
http://ADDR/computeMetadata/v1/. The Compute API wants a token from the metadata server, as
Google's does; to look at the instances without one: curl http://ADDR/emulator/instances
Point the proxy at it with

    [route.gce]
    endpoint = \"http://127.0.0.1:8085/compute/v1/\"

and GCE_METADATA_HOST=127.0.0.1:8085. Instances listen on 127.0.0.2, 127.0.0.3, … (Linux
routes all of 127.0.0.0/8 to the loopback interface).
";

/// `vmproxy emulate ARGS…`: runs the emulator until Ctrl-C or SIGTERM.
pub async fn run_cli(args: &[String]) -> Result<(), BoxError> {
    let mut opts = EmulatorOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 8085)),
        ..EmulatorOptions::default()
    };
    let mut never_healthy = false;
    let mut stockouts = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, BoxError> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) => Ok(v),
                None => Err(format!("{name} needs a value (see --help)").into()),
            }
        };
        let dur = |name: &str, v: String| -> Result<Duration, BoxError> {
            humantime::parse_duration(&v).map_err(|e| format!("{name} {v:?}: {e}").into())
        };
        match flag {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--listen" => {
                opts.listen = value(flag)?.parse().map_err(|e| format!("--listen: {e}"))?
            }
            "--project" => opts.project = value(flag)?,
            "--provisioning" => opts.provisioning = dur(flag, value(flag)?)?,
            "--staging" => opts.staging = dur(flag, value(flag)?)?,
            "--stopping" => opts.stopping = dur(flag, value(flag)?)?,
            "--suspending" => opts.suspending = dur(flag, value(flag)?)?,
            "--boot-delay" => opts.boot_delay = dur(flag, value(flag)?)?,
            "--wait-deadline" => opts.wait_deadline = dur(flag, value(flag)?)?,
            "--health-path" => opts.health_path = value(flag)?,
            "--port" => {
                opts.default_port = value(flag)?.parse().map_err(|e| format!("--port: {e}"))?
            }
            "--never-healthy" => never_healthy = true,
            "--soft-off" => opts.preemption_soft_off = dur(flag, value(flag)?)?,
            "--stockout" => stockouts.push(value(flag)?),
            "--require-content-length" => opts.require_content_length = true,
            other => return Err(format!("unknown option {other:?} (see --help)").into()),
        }
    }
    if !opts.listen.ip().is_loopback() {
        tracing::warn!(listen = %opts.listen, "the emulator accepts any token it issued: keep it on loopback");
    }
    let emulator = Emulator::start(opts).await?;
    emulator.set_never_healthy(never_healthy);
    for zone in &stockouts {
        emulator.set_stockout(zone, true, false);
    }
    println!("Compute Engine emulator on {}", emulator.url());
    println!("  Compute API:      {}", emulator.compute_base());
    println!(
        "  metadata server:  GCE_METADATA_HOST={}",
        emulator.metadata_host()
    );
    println!("  project:          {}", emulator.project());
    println!(
        "  instances:        {}/emulator/instances (no token needed)",
        emulator.url()
    );
    wait_for_shutdown().await?;
    drop(emulator);
    Ok(())
}

async fn wait_for_shutdown() -> Result<(), BoxError> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
