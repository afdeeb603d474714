//! A Compute Engine VM as a backend, over the Compute v1 REST API.
//!
//! [`GceBackend`] creates, starts, resumes, stops, suspends or deletes one instance, following
//! what the platform says of it:
//!
//! | instance | `start()` |
//! |---|---|
//! | not found | `instances.insert` with a `requestId` and the activity label; a 409 `alreadyExists` means it exists (another replica created it): adopt it |
//! | `PROVISIONING`, `STAGING`, `STOPPING`, `SUSPENDING` | wait, then look again |
//! | `TERMINATED` / `STOPPED` | `instances.start` |
//! | `SUSPENDED` | `instances.resume` |
//! | `RUNNING` | its address: the external NAT IP or the internal IP ([`Address`]) |
//!
//! A start inserts first (no VM is the common case: 3 calls, insert, wait and get), and looks
//! first once it has seen the VM exist. With several [`zones`](GceBackendBuilder::zones), one
//! `instances.aggregatedList` finds the VM in any of them. A capacity error
//! (`ZONE_RESOURCE_POOL_EXHAUSTED…`) on insert, start or resume deletes what the attempt left
//! and tries the next zone, then [machine type](GceBackendBuilder::machine_types), then
//! standard provisioning ([`spot_fallback`](GceBackendBuilder::spot_fallback)); the option that
//! served is tried first next time. Replicas that insert in two zones at once keep the older VM
//! (creation time, then zone name): each lists again after its insert and deletes its own if it
//! is not that one.
//!
//! Operations are awaited with `zoneOperations.wait` in a loop, bounded (a stop by
//! [`stop_timeout`](GceBackendBuilder::stop_timeout), a start by the route's `start_timeout`);
//! a DONE operation with an `error` becomes a [`GceError`] (no capacity, quota, …) that the
//! layer answers with 503 and the reason. 429, 5xx and 403 `rateLimitExceeded` are retried with exponential back-off and
//! jitter; quota and invalid-request errors fail at once. The idle stop follows the
//! [`StopPolicy`] (delete, as the original did, by default).
//!
//! Authentication is Application Default Credentials through `google-cloud-auth`: the metadata
//! server on Cloud Run, App Engine and GCE (`GCE_METADATA_HOST` moves it),
//! `GOOGLE_APPLICATION_CREDENTIALS` or gcloud's ADC file elsewhere. The token is sent to the
//! Compute API only: never logged, never to the VM.
//!
//! Many proxy replicas can share one VM: each replica that serves traffic refreshes the
//! `vmproxy-active=<unix seconds>` label (compare-and-set on `labelFingerprint`), and the VM is
//! stopped only when that label is older than the idle timeout.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use vmproxy::backend::gce::{Address, GceBackend, StopPolicy};
//! use vmproxy::Route;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = GceBackend::builder("europe-west1-b", "heavy-worker")
//!     .project("my-project")
//!     .machine_type("e2-standard-4")
//!     .port(8080)
//!     .address(Address::Internal)
//!     .stop_policy(StopPolicy::Stop)
//!     .startup_script("#!/bin/bash\ndocker run -d -p 8080:8080 ghcr.io/me/worker")
//!     .build()?;
//! let route = Route::builder("/work", backend)
//!     .health_path("/healthz")
//!     .idle_timeout(Some(Duration::from_secs(900)))
//!     .build()?;
//! # let _ = route;
//!
//! // Bad specs are refused when the backend is built.
//! let err = GceBackend::builder("europe-west1-b", "Heavy_Worker").build().unwrap_err();
//! assert_eq!(err.field(), "instance");
//! # Ok(())
//! # }
//! ```

mod api;
mod config;
mod error;
mod spec;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use config::GceConfig;
pub use error::{GceError, GceErrorKind};
pub use google_cloud_auth::credentials::Credentials;
pub use spec::{Accelerator, ProvisioningModel, TerminationAction};

use crate::backend::{Backend, BackendFuture, Endpoint, Status};
use crate::route::ConfigError;
use api::{Api, ApiConfig, AuthSource, Instance, Operation, Retry};
use spec::{Attempt, InstanceSpec, ACTIVE_LABEL};

/// How an idle VM is taken down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopPolicy {
    /// `instances.delete`: nothing is billed while idle; the next start creates it afresh
    /// (the default, as in the original).
    #[default]
    Delete,
    /// `instances.stop`: the boot disk is kept (and billed); the next start is faster.
    Stop,
    /// `instances.suspend`: memory is kept too; the next start resumes it.
    Suspend,
}

/// Which of the VM's addresses the proxy connects to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Address {
    /// The ephemeral external IP (`accessConfigs[0].natIP`; the default).
    #[default]
    External,
    /// The internal IP (`networkIP`): for a proxy in the same VPC, or Cloud Run with VPC egress.
    Internal,
}

/// A Compute Engine VM started on demand. Build it with [`GceBackend::builder`].
#[derive(Debug)]
pub struct GceBackend {
    spec: InstanceSpec,
    insert_body: Value,
    api: Arc<Api>,
    /// Held by an `instances.insert` from the moment it is sent until its answer: a stop waits
    /// for it (see [`GceBackend::insert`]).
    inserting: Arc<tokio::sync::Mutex<()>>,
    address: Address,
    stop_policy: StopPolicy,
    status_interval: Option<Duration>,
    stop_timeout: Duration,
    /// The `vmproxy-active` value this replica last wrote (unix seconds; 0: none).
    last_written: AtomicU64,
    /// The zone the VM is in (or was last created in).
    zone_now: Mutex<String>,
    /// The attempt (zone, machine type, provisioning) that last served: tried first next time.
    serving: Mutex<Option<Attempt>>,
    /// Whether the VM is believed to exist (then a start looks first; else it inserts first).
    exists_hint: AtomicBool,
    /// The instance as last seen by a start, for the first activity record (its fingerprint
    /// saves a `get`).
    seen: Mutex<Option<Instance>>,
    /// Where the VM is or is being brought up, and what the last start was refused.
    placement: Mutex<Placement>,
}

/// What [`Backend::placement`] tells of the last start.
#[derive(Debug, Default)]
struct Placement {
    /// Zone, machine type and provisioning model of the VM (tried or serving).
    at: Option<String>,
    /// The options refused by the last start, each with its reason.
    refused: Vec<String>,
}

/// Default of [`GceBackendBuilder::stop_timeout`].
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// A backstop for the waits of a start: the route's `start_timeout` normally ends it first.
const START_BACKSTOP: Duration = Duration::from_secs(3600);
/// A label our insert wrote less than this ago is not rewritten by the first activity record.
const FRESH_LABEL: u64 = 60;

/// Builds a [`GceBackend`]; every setting but the zone and instance name has a default.
#[derive(Debug)]
#[must_use]
pub struct GceBackendBuilder {
    spec: InstanceSpec,
    project: Option<String>,
    endpoint: String,
    metadata_server: Option<String>,
    credentials: Option<Credentials>,
    address: Address,
    stop_policy: StopPolicy,
    status_interval: Option<Duration>,
    poll_interval: Duration,
    retry: Retry,
    external_ip: Option<bool>,
    scopes_set: bool,
    spot: Option<bool>,
    provisioning: Option<ProvisioningModel>,
    stop_timeout: Duration,
}

impl GceBackend {
    /// Starts building a backend for instance `instance` in `zone`.
    pub fn builder(zone: impl Into<String>, instance: impl Into<String>) -> GceBackendBuilder {
        GceBackendBuilder {
            spec: InstanceSpec::new(zone.into(), instance.into()),
            project: None,
            endpoint: api::DEFAULT_ENDPOINT.to_owned(),
            metadata_server: None,
            credentials: None,
            address: Address::External,
            stop_policy: StopPolicy::Delete,
            status_interval: Some(Duration::from_secs(30)),
            poll_interval: Duration::from_secs(2),
            retry: Retry::default(),
            external_ip: None,
            scopes_set: false,
            spot: None,
            provisioning: None,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.spec.name
    }

    /// The first zone.
    pub fn zone(&self) -> &str {
        &self.spec.zone
    }

    /// The zones tried, in order.
    pub fn zones(&self) -> &[String] {
        &self.spec.zones
    }

    /// The zone the VM is in now, or was last created or looked for in.
    pub fn current_zone(&self) -> String {
        lock(&self.zone_now).clone()
    }

    /// The body sent with `instances.insert` for the first attempt (for inspection and tests).
    pub fn insert_body(&self) -> &Value {
        &self.insert_body
    }

    /// The insert bodies of every attempt a start may make, in order (zones first, then
    /// machine types, then standard provisioning if `spot_fallback`).
    pub fn attempt_bodies(&self) -> Vec<Value> {
        self.spec
            .attempts()
            .iter()
            .map(|a| self.spec.insert_body_for(a))
            .collect()
    }
}

impl GceBackendBuilder {
    /// The project (default: the metadata server's project-id, else `GOOGLE_CLOUD_PROJECT`).
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.project = Some(project.into());
        self
    }

    /// Machine type, e.g. `e2-standard-4` (default `e2-small`).
    pub fn machine_type(mut self, machine_type: impl Into<String>) -> Self {
        self.spec.machine_type = machine_type.into();
        self
    }

    /// Boot image: a public family short name (`debian-12`, `ubuntu-2404-lts-amd64`,
    /// `cos-stable`), `family/NAME` or `NAME` in the project, `projects/P/global/images/...`, or
    /// a full URL (default `projects/debian-cloud/global/images/family/debian-12`).
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.spec.image = image.into();
        self
    }

    /// Boot disk size in GB, at least 10 (default: the image's).
    pub fn disk_size_gb(mut self, gb: u64) -> Self {
        self.spec.disk_size_gb = Some(gb);
        self
    }

    /// Boot disk type: `pd-balanced`, `pd-ssd`, … (default: Compute Engine's).
    pub fn disk_type(mut self, disk_type: impl Into<String>) -> Self {
        self.spec.disk_type = Some(disk_type.into());
        self
    }

    /// VPC network name or partial URL (default `default`).
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.spec.network = network.into();
        self
    }

    /// Subnetwork name (in the zone's region) or partial URL.
    pub fn subnetwork(mut self, subnetwork: impl Into<String>) -> Self {
        self.spec.subnetwork = Some(subnetwork.into());
        self
    }

    /// Whether the VM gets an ephemeral external IP (default true; needed for
    /// [`Address::External`]).
    pub fn external_ip(mut self, on: bool) -> Self {
        self.external_ip = Some(on);
        self
    }

    /// Network tags, replacing the default `http-server`.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// One more label (`managed-by=vmproxy` is always set).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.labels.insert(key.into(), value.into());
        self
    }

    /// One more metadata item.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.metadata.insert(key.into(), value.into());
        self
    }

    /// The `startup-script` metadata item: what the VM runs at boot.
    pub fn startup_script(self, script: impl Into<String>) -> Self {
        self.metadata("startup-script", script)
    }

    /// The `startup-script-url` metadata item (a `gs://` URL).
    pub fn startup_script_url(self, url: impl Into<String>) -> Self {
        self.metadata("startup-script-url", url)
    }

    /// The VM's service account: an email, or `default` (default: none).
    pub fn service_account(mut self, email: impl Into<String>) -> Self {
        self.spec.service_account = Some(email.into());
        self
    }

    /// The service account's scopes, as URLs or short names (`cloud-platform`).
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec.scopes = scopes.into_iter().map(Into::into).collect();
        self.scopes_set = true;
        self
    }

    /// Spot provisioning (default true, as the original defaulted to preemptible); `false`
    /// for a standard VM. Same as [`provisioning_model`](Self::provisioning_model) with
    /// `Spot` or `Standard`; giving both inconsistently is a configuration error.
    pub fn spot(mut self, spot: bool) -> Self {
        self.spot = Some(spot);
        self
    }

    /// How the VM is provisioned: [`ProvisioningModel::Spot`] (default), `Standard` or
    /// `FlexStart` (which needs [`max_run_duration`](Self::max_run_duration)).
    pub fn provisioning_model(mut self, model: ProvisioningModel) -> Self {
        self.provisioning = Some(model);
        self
    }

    /// After every zone and machine type refused Spot capacity, try standard provisioning
    /// (default false).
    pub fn spot_fallback(mut self, on: bool) -> Self {
        self.spec.spot_fallback = on;
        self
    }

    /// The longest the VM may run (`scheduling.maxRunDuration`); required for Flex-start,
    /// where the VM is deleted at the end.
    pub fn max_run_duration(mut self, d: Duration) -> Self {
        self.spec.max_run_duration = Some(d);
        self
    }

    /// Zones to create the VM in, in order of preference, instead of the builder's one zone.
    /// On a capacity error (`ZONE_RESOURCE_POOL_EXHAUSTED…`) the next one is tried.
    pub fn zones<I, S>(mut self, zones: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec.zones = zones.into_iter().map(Into::into).collect();
        self
    }

    /// Machine types to try, in order, instead of the one [`machine_type`](Self::machine_type):
    /// the second fallback axis, after the zones.
    pub fn machine_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec.machine_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Attaches `count` accelerators of `kind` (`nvidia-l4`, `nvidia-tesla-t4`…) as
    /// `guestAccelerators`; the VM then uses `onHostMaintenance = TERMINATE`.
    pub fn accelerator(mut self, kind: impl Into<String>, count: u32) -> Self {
        self.spec.accelerators.push(Accelerator {
            kind: kind.into(),
            count,
        });
        self
    }

    /// The longest an idle stop waits for Compute Engine (default 5 minutes); after it, the
    /// stop fails (logged with the operation still pending) and the VM is kept.
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = d;
        self
    }

    /// What a reclaimed Spot VM becomes (default [`TerminationAction::Stop`]).
    pub fn termination_action(mut self, action: TerminationAction) -> Self {
        self.spec.termination_action = action;
        self.spec.termination_action_set = true;
        self
    }

    /// The port the VM serves HTTP on (default 80). Also written to the VM's metadata as
    /// `vmproxy-port`, for its startup script.
    pub fn port(mut self, port: u16) -> Self {
        self.spec.port = port;
        self
    }

    /// Which address to proxy to (default [`Address::External`]).
    pub fn address(mut self, address: Address) -> Self {
        self.address = address;
        self
    }

    /// How an idle VM is taken down (default [`StopPolicy::Delete`]).
    pub fn stop_policy(mut self, policy: StopPolicy) -> Self {
        self.stop_policy = policy;
        self
    }

    /// The Compute API base URL, e.g. an emulator's `http://127.0.0.1:8085/compute/v1/`
    /// (default `https://compute.googleapis.com/compute/v1/`).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = url.into();
        self
    }

    /// Take tokens and the project-id from the metadata server at this base URL
    /// (`http://127.0.0.1:8085`) instead of Application Default Credentials. The
    /// `GCE_METADATA_HOST` environment variable, when set, still wins for tokens.
    pub fn metadata_server(mut self, url: impl Into<String>) -> Self {
        self.metadata_server = Some(url.into());
        self
    }

    /// Use these credentials instead of Application Default Credentials.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// How often the layer checks the VM's status while it runs or boots (default 30 s);
    /// `None`: only on connect errors.
    pub fn status_interval(mut self, every: Option<Duration>) -> Self {
        self.status_interval = every;
        self
    }

    /// How often a VM in transition is looked at again, and the least time between two
    /// `zoneOperations.wait` calls that return early (default 2 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// Retries of transiently failing API calls: at most `attempts` tries, back-off from
    /// `initial` doubling up to `max`, with jitter (default 6, 500 ms, 30 s).
    pub fn retry(mut self, attempts: u32, initial: Duration, max: Duration) -> Self {
        self.retry = Retry {
            attempts: attempts.max(1),
            initial,
            max: max.max(initial),
        };
        self
    }

    /// Checks the spec and builds the backend. Does no I/O and needs no runtime: credentials
    /// and the project are resolved on the first API call.
    pub fn build(self) -> Result<GceBackend, ConfigError> {
        let mut spec = self.spec;
        spec.external_ip = self.external_ip.unwrap_or(true);
        spec.provisioning = match (self.spot, self.provisioning) {
            (None, None) => ProvisioningModel::Spot,
            (Some(true), None) => ProvisioningModel::Spot,
            (Some(false), None) => ProvisioningModel::Standard,
            (None, Some(m)) => m,
            (Some(true), Some(ProvisioningModel::Spot))
            | (Some(false), Some(ProvisioningModel::Standard)) => {
                self.provisioning.expect("matched")
            }
            (Some(spot), Some(m)) => {
                return Err(ConfigError::new(
                    "provisioning_model",
                    format!("spot = {spot} contradicts provisioning_model = {m:?}; give only provisioning_model"),
                ))
            }
        };
        if self.stop_timeout.is_zero() {
            return Err(ConfigError::new("stop_timeout", "must be more than zero"));
        }
        if self.address == Address::External && !spec.external_ip {
            return Err(ConfigError::new(
                "address",
                "address = external needs an external IP (external_ip = true), or use address = internal",
            ));
        }
        if self.scopes_set && spec.scopes.is_empty() && spec.service_account.is_some() {
            return Err(ConfigError::new("scopes", "must not be empty"));
        }
        let spec = spec.validate()?;
        if let Some(p) = &self.project {
            if p.trim().is_empty() || p.contains('/') {
                return Err(ConfigError::new(
                    "project",
                    format!("{p:?} is not a project id"),
                ));
            }
        }
        let endpoint = check_url("endpoint", &self.endpoint)?;
        let metadata = match &self.metadata_server {
            Some(m) => Some(check_url("metadata_server", m)?),
            None => None,
        };
        if self.poll_interval.is_zero() {
            return Err(ConfigError::new("poll_interval", "must be more than zero"));
        }
        if self.status_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "status_interval",
                "must be more than zero (or None)",
            ));
        }
        let auth = match (self.credentials, metadata.clone()) {
            (Some(c), _) => AuthSource::Credentials(c),
            (None, Some(m)) => AuthSource::Metadata(m),
            (None, None) => AuthSource::Adc,
        };
        let api = Api::new(ApiConfig {
            base: endpoint,
            instance: spec.name.clone(),
            project: self.project,
            metadata_base: metadata,
            auth,
            retry: self.retry,
            poll: self.poll_interval,
        })
        .map_err(|e| ConfigError::new("endpoint", format!("cannot build an HTTP client: {e}")))?;
        let insert_body = spec.insert_body();
        let zone_now = Mutex::new(spec.zone.clone());
        Ok(GceBackend {
            spec,
            insert_body,
            api: Arc::new(api),
            inserting: Arc::default(),
            address: self.address,
            stop_policy: self.stop_policy,
            status_interval: self.status_interval,
            stop_timeout: self.stop_timeout,
            last_written: AtomicU64::new(0),
            zone_now,
            serving: Mutex::new(None),
            exists_hint: AtomicBool::new(false),
            seen: Mutex::new(None),
            placement: Mutex::default(),
        })
    }
}

/// Whether `name` is a valid Compute Engine instance name:
/// `[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?`.
pub fn is_valid_name(name: &str) -> bool {
    spec::is_rfc1035_name(name)
}

fn check_url(field: &'static str, url: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ConfigError::new(field, format!("{url:?}: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(url.to_owned()),
        _ => Err(ConfigError::new(
            field,
            format!("{url:?} must be an http:// or https:// URL"),
        )),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl GceBackend {
    fn endpoint_of(&self, inst: &Instance) -> Result<Endpoint, GceError> {
        let nic = inst.network_interfaces.first();
        let ip = match self.address {
            Address::Internal => nic.and_then(|n| n.network_ip.clone()),
            Address::External => nic
                .and_then(|n| n.access_configs.first())
                .and_then(|a| a.nat_ip.clone()),
        };
        let Some(ip) = ip else {
            let which = match self.address {
                Address::Internal => "an internal IP (networkIP)",
                Address::External => {
                    "an external IP (natIP); use address = internal or give it an access config"
                }
            };
            return Err(GceError::new(
                GceErrorKind::Other,
                "instances.get",
                "noAddress",
                format!("RUNNING but without {which}"),
            )
            .at(&self.spec.name, &self.spec.zone));
        };
        let ip: IpAddr = ip.parse().map_err(|_| {
            GceError::new(
                GceErrorKind::Other,
                "instances.get",
                "badAddress",
                format!("unparsable address {ip:?}"),
            )
            .at(&self.spec.name, &self.spec.zone)
        })?;
        Ok(Endpoint::new(SocketAddr::new(ip, self.spec.port)))
    }

    async fn pause(&self) {
        tokio::time::sleep(self.api.poll).await;
    }

    fn zone_now(&self) -> String {
        lock(&self.zone_now).clone()
    }

    fn set_zone(&self, zone: &str) {
        let mut z = lock(&self.zone_now);
        if *z != zone {
            z.clear();
            z.push_str(zone);
        }
    }

    /// Runs `call` and waits (until `deadline`) for its operation.
    async fn run_op(
        &self,
        zone: &str,
        call: &'static str,
        deadline: Instant,
    ) -> Result<(), GceError> {
        let op = self.api.action(zone, call).await?;
        self.api.wait(zone, call, op, deadline).await.map(drop)
    }

    /// Runs `call` (start, resume) and waits for its operation. A busy instance
    /// (`resourceNotReady`) is not an error: the caller looks at it again.
    async fn act(&self, zone: &str, call: &'static str, deadline: Instant) -> Result<(), GceError> {
        match self.run_op(zone, call, deadline).await {
            Err(e) if matches!(e.kind(), GceErrorKind::NotReady | GceErrorKind::NotFound) => {
                debug!(instance = %self.spec.name, call, error = %e, "not now; looking again");
                self.pause().await;
                Ok(())
            }
            other => other,
        }
    }

    /// Brings the instance in `zone` to RUNNING: looks at it (unless `known` is a fresh copy),
    /// starts or resumes it, waits through transitions.
    async fn drive(
        &self,
        zone: &str,
        mut known: Option<Instance>,
        deadline: Instant,
    ) -> Result<Drive, GceError> {
        let mut last_status = String::new();
        loop {
            let inst = match known.take() {
                Some(inst) => inst,
                None => match self.api.get(zone).await? {
                    Some(inst) => inst,
                    None => return Ok(Drive::Gone),
                },
            };
            if inst.status != last_status {
                // The platform's progress, so a slow start says where it is.
                info!(instance = %self.spec.name, zone, status = %inst.status, "instance status");
                last_status.clone_from(&inst.status);
            }
            let call = match inst.status.as_str() {
                "RUNNING" => return Ok(Drive::Running(inst)),
                "TERMINATED" | "STOPPED" => "instances.start",
                "SUSPENDED" => "instances.resume",
                // PROVISIONING, STAGING, REPAIRING, STOPPING, SUSPENDING, and newer states.
                _ => {
                    if Instant::now() >= deadline {
                        return Err(self.timeout("start", zone, &inst.status));
                    }
                    self.pause().await;
                    continue;
                }
            };
            info!(instance = %self.spec.name, zone, call, "starting the instance");
            match self.act(zone, call, deadline).await {
                Ok(()) => {}
                Err(e) if e.kind() == GceErrorKind::NoCapacity => return Ok(Drive::NoCapacity(e)),
                Err(e) => return Err(e),
            }
        }
    }

    fn timeout(&self, what: &'static str, zone: &str, status: &str) -> GceError {
        warn!(instance = %self.spec.name, zone, status, what, "gave up: the instance did not settle in time");
        GceError::new(
            GceErrorKind::Unavailable,
            what,
            "operationTimeout",
            format!("the instance was still {status} at the deadline"),
        )
        .at(&self.spec.name, zone)
    }

    /// The next attempt: the one that served last, else the first of the list not yet
    /// refused during this start.
    fn next_attempt(&self, refused: &[(Attempt, GceError)]) -> Option<Attempt> {
        let tried = |a: &Attempt| refused.iter().any(|(r, _)| r == a);
        if let Some(a) = *lock(&self.serving) {
            if !tried(&a) {
                return Some(a);
            }
        }
        self.spec.attempts().into_iter().find(|a| !tried(a))
    }

    /// The attempt describing where a VM found in `zone` lives (for the refusal list).
    fn attempt_in(&self, zone: &str) -> Attempt {
        let served = lock(&self.serving).unwrap_or(Attempt {
            zone: 0,
            machine_type: 0,
            model: self.spec.provisioning,
        });
        Attempt {
            zone: self.spec.zones.iter().position(|z| z == zone).unwrap_or(0),
            ..served
        }
    }

    fn describe(&self, a: &Attempt) -> String {
        format!(
            "{}/{}/{}",
            self.spec.zones[a.zone],
            self.spec.machine_types[a.machine_type],
            a.model.api_name()
        )
    }

    fn placed_at(&self, a: &Attempt) {
        lock(&self.placement).at = Some(self.describe(a));
    }

    fn placement_refused(&self, a: &Attempt, e: &GceError) {
        let reason = match e.reason() {
            "" => "no capacity",
            reason => reason,
        };
        let refused = format!("{}: {reason}", self.describe(a));
        lock(&self.placement).refused.push(refused);
    }

    /// Every option refused: one error naming each attempt and its reason.
    fn exhausted(&self, refused: &[(Attempt, GceError)]) -> GceError {
        let tried: Vec<String> = refused
            .iter()
            .map(|(a, e)| format!("{}: {}", self.describe(a), e.reason()))
            .collect();
        let (reason, zone) = refused
            .last()
            .map(|(a, e)| (e.reason().to_owned(), self.spec.zones[a.zone].clone()))
            .unwrap_or_default();
        GceError::new(
            GceErrorKind::NoCapacity,
            "start",
            reason,
            format!(
                "no capacity for any option ({} tried: {})",
                tried.len(),
                tried.join("; ")
            ),
        )
        .at(&self.spec.name, &zone)
    }

    /// Deletes what a refused attempt left in `zone` (a 404 means nothing was left).
    async fn clean_up(&self, zone: &str) {
        let deadline = Instant::now() + self.stop_timeout;
        loop {
            match self.run_op(zone, "instances.delete", deadline).await {
                Ok(()) => {
                    info!(instance = %self.spec.name, zone, "deleted what the refused attempt left");
                    return;
                }
                Err(e) if e.kind() == GceErrorKind::NotFound => return,
                // Still settling after the refused operation: try again shortly.
                Err(e) if e.kind() == GceErrorKind::NotReady && Instant::now() < deadline => {
                    self.pause().await
                }
                Err(e) => {
                    warn!(instance = %self.spec.name, zone, error = %e, "could not delete what the refused attempt left");
                    return;
                }
            }
        }
    }

    /// The instance of this name in the listed zones, one `aggregatedList` call. Several (two
    /// replicas created it in two zones at once): the winner is the oldest (creation time,
    /// then zone name); the others are left to their creators, which delete them.
    async fn find(&self) -> Result<Option<Instance>, GceError> {
        let mut found: Vec<Instance> = self
            .api
            .find_everywhere()
            .await?
            .into_iter()
            .filter(|i| self.spec.zones.contains(&i.zone))
            .collect();
        found.sort_by_key(winner_order);
        Ok(found.into_iter().next())
    }

    async fn start_vm(&self) -> Result<Endpoint, GceError> {
        lock(&self.placement).refused.clear();
        let deadline = Instant::now() + START_BACKSTOP;
        let several = self.spec.zones.len() > 1;
        let mut refused: Vec<(Attempt, GceError)> = Vec::new();
        // A VM to bring up, and in which zone: from the list, or the zone it is believed in.
        let mut target: Option<(String, Option<Instance>)> = if several {
            self.find().await?.map(|i| (i.zone.clone(), Some(i)))
        } else if self.exists_hint.load(Ordering::SeqCst) {
            Some((self.zone_now(), None))
        } else {
            None
        };
        loop {
            if let Some((zone, known)) = target.take() {
                self.set_zone(&zone);
                self.placed_at(&self.attempt_in(&zone));
                match self.drive(&zone, known, deadline).await? {
                    Drive::Running(inst) => return self.serve(&zone, inst),
                    Drive::Gone => self.exists_hint.store(false, Ordering::SeqCst),
                    Drive::NoCapacity(e) => {
                        let at = self.attempt_in(&zone);
                        warn!(instance = %self.spec.name, zone, error = %e, "no capacity to start the instance here");
                        self.placement_refused(&at, &e);
                        refused.push((at, e));
                        if self.next_attempt(&refused).is_none() {
                            // Nothing else to try: keep the stopped VM (and its disk) for later.
                            return Err(self.exhausted(&refused));
                        }
                        crate::telemetry::backend_call(&self.spec.name, "fallback", "capacity");
                        self.clean_up(&zone).await;
                        self.exists_hint.store(false, Ordering::SeqCst);
                    }
                }
            }
            let Some(at) = self.next_attempt(&refused) else {
                return Err(self.exhausted(&refused));
            };
            let zone = self.spec.zones[at.zone].clone();
            self.set_zone(&zone);
            self.placed_at(&at);
            info!(instance = %self.spec.name, attempt = %self.describe(&at), "creating the instance");
            let mut body = self.spec.insert_body_for(&at);
            let now = unix_now() as u64;
            // The activity label travels with the insert: no setLabels for a new VM.
            body["labels"][ACTIVE_LABEL] = Value::String(now.to_string());
            // Ours from now on, even if the insert's operation never ends.
            let before = self.last_written.swap(now, Ordering::SeqCst);
            let outcome = match self.insert(&zone, body).await {
                Ok(op) => self
                    .api
                    .wait(&zone, "instances.insert", op, deadline)
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    *lock(&self.serving) = Some(at);
                    self.exists_hint.store(true, Ordering::SeqCst);
                    if !several {
                        target = Some((zone, None));
                        continue;
                    }
                    // Another replica may have created it in another zone meanwhile.
                    match self.find().await? {
                        Some(w) if w.zone != zone => {
                            warn!(instance = %self.spec.name, ours = %zone, theirs = %w.zone,
                                "created in two zones at once; the older one stays, deleting ours");
                            crate::telemetry::backend_call(
                                &self.spec.name,
                                "fallback",
                                "duplicate",
                            );
                            self.clean_up(&zone).await;
                            target = Some((w.zone.clone(), Some(w)));
                        }
                        Some(ours) => target = Some((zone, Some(ours))),
                        None => target = Some((zone, None)),
                    }
                }
                Err(e) if e.kind() == GceErrorKind::AlreadyExists => {
                    // Our label did not go in.
                    self.last_written.store(before, Ordering::SeqCst);
                    info!(instance = %self.spec.name, zone, "it exists already (another replica, or from before); using it");
                    self.exists_hint.store(true, Ordering::SeqCst);
                    target = Some((zone, None));
                }
                Err(e) if e.kind() == GceErrorKind::NoCapacity => {
                    warn!(instance = %self.spec.name, attempt = %self.describe(&at), error = %e, "no capacity; trying the next option");
                    self.placement_refused(&at, &e);
                    crate::telemetry::backend_call(&self.spec.name, "fallback", "capacity");
                    refused.push((at, e));
                    self.clean_up(&zone).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `instances.insert`, in a task of its own. Once sent, an insert may create the VM whether
    /// or not its answer is read: a start dropped while it is in flight (a forced stop,
    /// `start_timeout`) must not drop it with the start, or the cleanup that follows could look
    /// for the VM before Compute Engine has made it, find none, and leave it running. The stop
    /// that cleans up waits for it first (see [`GceBackend::stop_vm`]).
    async fn insert(&self, zone: &str, body: Value) -> Result<Operation, GceError> {
        let held = self.inserting.clone().lock_owned().await;
        let api = self.api.clone();
        let zone = zone.to_owned();
        let call = tokio::spawn(crate::telemetry::carried(async move {
            let answer = api.insert(&zone, &body).await;
            drop(held);
            answer
        }));
        call.await.unwrap_or_else(|e| {
            let e = GceError::new(GceErrorKind::Other, "instances.insert", "", e.to_string());
            Err(e.at(&self.spec.name, &self.zone_now()))
        })
    }

    /// The VM runs in `zone`: remember it and answer its address.
    fn serve(&self, zone: &str, inst: Instance) -> Result<Endpoint, GceError> {
        let ep = self.endpoint_of(&inst)?;
        self.exists_hint.store(true, Ordering::SeqCst);
        self.set_zone(zone);
        let served = *lock(&self.serving);
        if served.is_none_or(|a| self.spec.zones[a.zone] != zone) {
            let here = self.attempt_in(zone);
            *lock(&self.serving) = Some(here);
        }
        if let Some(serving) = *lock(&self.serving) {
            self.placed_at(&serving);
        }
        *lock(&self.seen) = Some(inst);
        Ok(ep)
    }

    async fn stop_vm(&self) -> Result<(), GceError> {
        let deadline = Instant::now() + self.stop_timeout;
        // An insert whose start was dropped may still create the VM: let it answer first. If it
        // does not within the stop's time, the stop fails: a VM not found now may exist later.
        if tokio::time::timeout_at(deadline, self.inserting.lock())
            .await
            .is_err()
        {
            let zone = self.zone_now();
            return Err(self.timeout("stop", &zone, "being created (instances.insert unanswered)"));
        }
        let zone = self.zone_now();
        let zone = zone.as_str();
        loop {
            let Some(inst) = self.api.get(zone).await? else {
                self.exists_hint.store(false, Ordering::SeqCst);
                return Ok(());
            };
            let status = inst.status.as_str();
            let call = match (self.stop_policy, status) {
                (StopPolicy::Delete, _) => "instances.delete",
                (StopPolicy::Stop, "TERMINATED" | "STOPPED") => return Ok(()),
                (StopPolicy::Stop, "RUNNING" | "SUSPENDED" | "PROVISIONING" | "STAGING") => {
                    "instances.stop"
                }
                (StopPolicy::Suspend, "SUSPENDED" | "TERMINATED" | "STOPPED") => return Ok(()),
                (StopPolicy::Suspend, "RUNNING") => "instances.suspend",
                _ => {
                    if Instant::now() >= deadline {
                        return Err(self.timeout("stop", zone, status));
                    }
                    self.pause().await;
                    continue;
                }
            };
            info!(instance = %self.spec.name, zone, status, call, "taking the instance down");
            match self.run_op(zone, call, deadline).await {
                Ok(()) => {
                    if self.stop_policy == StopPolicy::Delete {
                        self.exists_hint.store(false, Ordering::SeqCst);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == GceErrorKind::NotFound => {
                    self.exists_hint.store(false, Ordering::SeqCst);
                    return Ok(());
                }
                Err(e) if e.kind() == GceErrorKind::NotReady && Instant::now() < deadline => {
                    self.pause().await
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn status_now(&self) -> Result<Status, GceError> {
        let Some(inst) = self.api.get(&self.zone_now()).await? else {
            return Ok(Status::Gone);
        };
        Ok(match inst.status.as_str() {
            "RUNNING" => Status::Running(self.endpoint_of(&inst)?),
            "TERMINATED" | "STOPPED" | "SUSPENDED" => Status::Stopped,
            _ => Status::Transitioning,
        })
    }

    /// Sets `vmproxy-active=<now>`, compare-and-set on the label fingerprint. The first record
    /// after a start uses the instance the start saw (no `get`), and writes nothing when the
    /// label is the one this replica's insert just wrote. A VM found running is always
    /// labelled: other replicas tell from it that this one uses the VM.
    async fn record(&self) -> Result<(), GceError> {
        let zone = self.zone_now();
        let mut known = lock(&self.seen).take();
        if let Some(inst) = &known {
            let ours = self.last_written.load(Ordering::SeqCst);
            let label = inst
                .labels
                .get(ACTIVE_LABEL)
                .and_then(|v| v.parse::<u64>().ok());
            if label == Some(ours) && (unix_now() as u64).saturating_sub(ours) < FRESH_LABEL {
                debug!(instance = %self.spec.name, "activity label fresh from our insert; not rewritten");
                return Ok(());
            }
        }
        let mut last = None;
        for _ in 0..5 {
            let inst = match known.take() {
                Some(inst) => inst,
                None => match self.api.get(&zone).await? {
                    Some(inst) => inst,
                    None => return Ok(()),
                },
            };
            let mut labels: BTreeMap<String, String> = inst.labels;
            let now = unix_now() as u64;
            labels.insert(ACTIVE_LABEL.to_owned(), now.to_string());
            let fingerprint = inst.label_fingerprint.unwrap_or_default();
            let result = match self.api.set_labels(&zone, &labels, &fingerprint).await {
                Ok(op) => self
                    .api
                    .wait(
                        &zone,
                        "instances.setLabels",
                        op,
                        Instant::now() + self.stop_timeout,
                    )
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    self.last_written.store(now, Ordering::SeqCst);
                    return Ok(());
                }
                Err(e) if e.kind() == GceErrorKind::NotFound => return Ok(()),
                Err(e) if e.kind() == GceErrorKind::ConditionNotMet => {
                    debug!(instance = %self.spec.name, "labels changed under us; reading them again");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("the loop ran"))
    }

    /// The `vmproxy-active` label's value, if the instance exists and has one.
    async fn active_label(&self) -> Result<Option<u64>, GceError> {
        Ok(self
            .api
            .get(&self.zone_now())
            .await?
            .and_then(|inst| inst.labels.get(ACTIVE_LABEL).and_then(|v| v.parse().ok())))
    }

    async fn idle_check(&self, idle_timeout: Duration) -> Result<bool, GceError> {
        let Some(inst) = self.api.get(&self.zone_now()).await? else {
            return Ok(true);
        };
        let Some(at) = inst
            .labels
            .get(ACTIVE_LABEL)
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return Ok(true);
        };
        let age = unix_now() - at as f64;
        debug!(instance = %self.spec.name, age_s = age, "last activity recorded on the instance");
        Ok(age >= idle_timeout.as_secs_f64())
    }
}

/// What bringing an existing instance up came to.
enum Drive {
    Running(Instance),
    /// It does not exist (any more).
    Gone,
    /// `instances.start`/`resume` was refused for lack of capacity.
    NoCapacity(GceError),
}

/// The order deciding which of several same-named VMs stays: the oldest by creation time
/// (RFC 3339 in UTC offset, compared as an instant), then the smaller zone name.
fn winner_order(i: &Instance) -> (i128, String) {
    (
        rfc3339_millis(&i.creation_timestamp).unwrap_or(i128::MAX),
        i.zone.clone(),
    )
}

/// Milliseconds since the epoch of an RFC 3339 time with any offset
/// (`2024-05-01T10:00:00.123-07:00`), which Compute Engine uses.
fn rfc3339_millis(s: &str) -> Option<i128> {
    let s = s.trim();
    let (main, offset_min): (&str, i128) = if let Some(m) = s.strip_suffix('Z') {
        (m, 0)
    } else {
        let cut = s.len().checked_sub(6)?;
        let (m, off) = s.split_at(cut);
        let sign = match off.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let h: i128 = off.get(1..3)?.parse().ok()?;
        let mi: i128 = off.get(4..6)?.parse().ok()?;
        (m, sign * (h * 60 + mi))
    };
    let t = humantime::parse_rfc3339_weak(main).ok()?;
    let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i128;
    Some(ms - offset_min * 60_000)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend for GceBackend {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move { Ok(self.start_vm().await?) })
    }

    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move { Ok(self.stop_vm().await?) })
    }

    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async move { Ok(self.status_now().await?) })
    }

    fn status_interval(&self) -> Option<Duration> {
        self.status_interval
    }

    fn record_activity(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move { Ok(self.record().await?) })
    }

    fn idle_everywhere(&self, idle_timeout: Duration) -> BackendFuture<'_, bool> {
        Box::pin(async move { Ok(self.idle_check(idle_timeout).await?) })
    }

    fn placement(&self) -> Option<String> {
        let p = lock(&self.placement);
        let at = p.at.as_deref()?;
        Some(match p.refused.as_slice() {
            [] => at.to_owned(),
            refused => format!("{at} (refused: {})", refused.join("; ")),
        })
    }

    fn in_use_elsewhere(&self) -> BackendFuture<'_, bool> {
        Box::pin(async move {
            let ours = self.last_written.load(Ordering::SeqCst);
            // Written after our last write: another replica served since.
            Ok(self.active_label().await?.is_some_and(|at| at > ours))
        })
    }
}
