//! A Compute Engine VM as a backend, over the Compute v1 REST API.
//!
//! [`GceBackend`] creates, starts, resumes, stops, suspends or deletes one instance, following
//! what the platform says of it:
//!
//! | instance | `start()` |
//! |---|---|
//! | not found | `instances.insert` with a `requestId`; a 409 `alreadyExists` means another proxy replica is creating it: adopt it |
//! | `PROVISIONING`, `STAGING`, `STOPPING`, `SUSPENDING` | wait, then look again |
//! | `TERMINATED` / `STOPPED` | `instances.start` |
//! | `SUSPENDED` | `instances.resume` |
//! | `RUNNING` | its address: the external NAT IP or the internal IP ([`Address`]) |
//!
//! Operations are awaited with `zoneOperations.wait` in a loop; a DONE operation with an
//! `error` becomes a [`GceError`] (no capacity, quota, …) that the layer answers with 503 and
//! the reason. 429, 5xx and 403 `rateLimitExceeded` are retried with exponential back-off and
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use config::GceConfig;
pub use error::{GceError, GceErrorKind};
pub use google_cloud_auth::credentials::Credentials;
pub use spec::TerminationAction;

use crate::backend::{Backend, BackendFuture, Endpoint, Status};
use crate::route::ConfigError;
use api::{Api, ApiConfig, AuthSource, Instance, Retry};
use spec::{InstanceSpec, ACTIVE_LABEL};

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
    api: Api,
    address: Address,
    stop_policy: StopPolicy,
    status_interval: Option<Duration>,
    max_stop_wait: Duration,
    /// The `vmproxy-active` value this replica last wrote (unix seconds; 0: none).
    last_written: AtomicU64,
}

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
        }
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.spec.name
    }

    /// The zone.
    pub fn zone(&self) -> &str {
        &self.spec.zone
    }

    /// The body sent with `instances.insert` (for inspection and tests).
    pub fn insert_body(&self) -> &Value {
        &self.insert_body
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
    /// for a standard VM.
    pub fn spot(mut self, spot: bool) -> Self {
        self.spec.spot = spot;
        self
    }

    /// What a reclaimed Spot VM becomes (default [`TerminationAction::Stop`]).
    pub fn termination_action(mut self, action: TerminationAction) -> Self {
        self.spec.termination_action = action;
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
            zone: spec.zone.clone(),
            instance: spec.name.clone(),
            project: self.project,
            metadata_base: metadata,
            auth,
            retry: self.retry,
            poll: self.poll_interval,
        })
        .map_err(|e| ConfigError::new("endpoint", format!("cannot build an HTTP client: {e}")))?;
        let insert_body = spec.insert_body();
        Ok(GceBackend {
            spec,
            insert_body,
            api,
            address: self.address,
            stop_policy: self.stop_policy,
            status_interval: self.status_interval,
            max_stop_wait: Duration::from_secs(600),
            last_written: AtomicU64::new(0),
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

    /// Runs `call` (start, resume, stop, …) and waits for its operation. A busy instance
    /// (`resourceNotReady`) is not an error: the caller looks at it again.
    async fn act(&self, call: &'static str) -> Result<(), GceError> {
        let result = match self.api.action(call).await {
            Ok(op) => self.api.wait(call, op).await.map(drop),
            Err(e) => Err(e),
        };
        match result {
            Err(e) if matches!(e.kind(), GceErrorKind::NotReady | GceErrorKind::NotFound) => {
                debug!(instance = %self.spec.name, call, error = %e, "not now; looking again");
                self.pause().await;
                Ok(())
            }
            other => other,
        }
    }

    async fn start_vm(&self) -> Result<Endpoint, GceError> {
        let mut last_status = String::new();
        loop {
            let Some(inst) = self.api.get().await? else {
                info!(instance = %self.spec.name, zone = %self.spec.zone, "creating the instance");
                let mut body = self.insert_body.clone();
                let now = unix_now() as u64;
                body["labels"][ACTIVE_LABEL] = Value::String(now.to_string());
                self.last_written.store(now, Ordering::SeqCst);
                let outcome = match self.api.insert(&body).await {
                    Ok(op) => self.api.wait("instances.insert", op).await.map(drop),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => {}
                    Err(e) if e.kind() == GceErrorKind::AlreadyExists => {
                        info!(instance = %self.spec.name, "being created elsewhere (another replica?); adopting it");
                    }
                    Err(e) => return Err(e),
                }
                continue;
            };
            if inst.status != last_status {
                // The platform's progress, so a slow start says where it is.
                info!(instance = %self.spec.name, zone = %self.spec.zone, status = %inst.status, "instance status");
                last_status.clone_from(&inst.status);
            }
            match inst.status.as_str() {
                "RUNNING" => {
                    let ep = self.endpoint_of(&inst)?;
                    // Tell other replicas it is in use from now on, so none of them takes it
                    // down before this one has served its first requests.
                    if let Err(e) = self.record(Some(inst)).await {
                        warn!(instance = %self.spec.name, error = %e, "could not record activity");
                    }
                    return Ok(ep);
                }
                "TERMINATED" | "STOPPED" => {
                    info!(instance = %self.spec.name, "starting the stopped instance");
                    self.act("instances.start").await?;
                }
                "SUSPENDED" => {
                    info!(instance = %self.spec.name, "resuming the suspended instance");
                    self.act("instances.resume").await?;
                }
                // PROVISIONING, STAGING, REPAIRING, STOPPING, SUSPENDING, and newer states.
                _ => self.pause().await,
            }
        }
    }

    async fn stop_vm(&self) -> Result<(), GceError> {
        let deadline = Instant::now() + self.max_stop_wait;
        loop {
            let Some(inst) = self.api.get().await? else {
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
                        return Err(GceError::new(
                            GceErrorKind::Other,
                            "stop",
                            status.to_owned(),
                            "the instance did not settle in time",
                        )
                        .at(&self.spec.name, &self.spec.zone));
                    }
                    self.pause().await;
                    continue;
                }
            };
            info!(instance = %self.spec.name, status, call, "taking the instance down");
            let result = match self.api.action(call).await {
                Ok(op) => self.api.wait(call, op).await.map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == GceErrorKind::NotFound => return Ok(()),
                Err(e) if e.kind() == GceErrorKind::NotReady && Instant::now() < deadline => {
                    self.pause().await
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn status_now(&self) -> Result<Status, GceError> {
        let Some(inst) = self.api.get().await? else {
            return Ok(Status::Gone);
        };
        Ok(match inst.status.as_str() {
            "RUNNING" => Status::Running(self.endpoint_of(&inst)?),
            "TERMINATED" | "STOPPED" | "SUSPENDED" => Status::Stopped,
            _ => Status::Transitioning,
        })
    }

    /// Sets `vmproxy-active=<now>`, compare-and-set on the label fingerprint; `known` is a
    /// fresh copy of the instance to start from, if the caller has one.
    async fn record(&self, mut known: Option<Instance>) -> Result<(), GceError> {
        let mut last = None;
        for _ in 0..5 {
            let inst = match known.take() {
                Some(inst) => inst,
                None => match self.api.get().await? {
                    Some(inst) => inst,
                    None => return Ok(()),
                },
            };
            let mut labels: BTreeMap<String, String> = inst.labels;
            let now = unix_now() as u64;
            labels.insert(ACTIVE_LABEL.to_owned(), now.to_string());
            let fingerprint = inst.label_fingerprint.unwrap_or_default();
            let result = match self.api.set_labels(&labels, &fingerprint).await {
                Ok(op) => self.api.wait("instances.setLabels", op).await.map(drop),
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
            .get()
            .await?
            .and_then(|inst| inst.labels.get(ACTIVE_LABEL).and_then(|v| v.parse().ok())))
    }

    async fn idle_check(&self, idle_timeout: Duration) -> Result<bool, GceError> {
        let Some(inst) = self.api.get().await? else {
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
        Box::pin(async move { Ok(self.record(None).await?) })
    }

    fn idle_everywhere(&self, idle_timeout: Duration) -> BackendFuture<'_, bool> {
        Box::pin(async move { Ok(self.idle_check(idle_timeout).await?) })
    }

    fn in_use_elsewhere(&self) -> BackendFuture<'_, bool> {
        Box::pin(async move {
            let ours = self.last_written.load(Ordering::SeqCst);
            // Written after our last write: another replica served since.
            Ok(self.active_label().await?.is_some_and(|at| at > ours))
        })
    }
}
