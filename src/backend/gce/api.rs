//! A small Compute Engine v1 REST client: the instance and zone-operation calls vmproxy needs,
//! authenticated with google-cloud-auth, retried with exponential back-off and jitter.

use std::collections::BTreeMap;
use std::time::Duration;

use google_cloud_auth::credentials::{self, CacheableResource, Credentials};
use http::{Extensions, HeaderMap, Method};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::error::{GceError, GceErrorKind};

/// The public Compute Engine API.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://compute.googleapis.com/compute/v1/";
const METADATA_ROOT: &str = "http://metadata.google.internal";
/// The OAuth scope asked for when the credentials accept scopes.
const API_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Where access tokens come from.
#[derive(Clone, Debug)]
pub(crate) enum AuthSource {
    /// Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file,
    /// else the metadata server, which `GCE_METADATA_HOST` can move).
    Adc,
    /// The metadata server at this base URL (`http://127.0.0.1:8085`).
    Metadata(String),
    /// Credentials built by the caller.
    Credentials(Credentials),
}

/// Retry policy for API calls that fail transiently (429, 5xx, 403 `rateLimitExceeded`,
/// transport errors).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retry {
    pub(crate) attempts: u32,
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// The parts of an Instance vmproxy reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Instance {
    pub(crate) name: String,
    pub(crate) status: String,
    pub(crate) network_interfaces: Vec<NetworkInterface>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) label_fingerprint: Option<String>,
    /// The zone's URL (from get and aggregatedList; the bare name after `find_everywhere`).
    pub(crate) zone: String,
    /// RFC 3339, set by Compute Engine at insert.
    pub(crate) creation_timestamp: String,
    /// Numeric id (a uint64 as a string).
    pub(crate) id: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct NetworkInterface {
    #[serde(rename = "networkIP")]
    pub(crate) network_ip: Option<String>,
    pub(crate) access_configs: Vec<AccessConfig>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct AccessConfig {
    #[serde(rename = "natIP")]
    pub(crate) nat_ip: Option<String>,
}

/// The parts of an Operation vmproxy reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Operation {
    pub(crate) name: String,
    pub(crate) status: String,
    pub(crate) operation_type: String,
    pub(crate) error: Option<OperationError>,
    pub(crate) http_error_status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct OperationError {
    pub(crate) errors: Vec<OperationErrorItem>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct OperationErrorItem {
    pub(crate) code: String,
    pub(crate) message: String,
}

pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    instance: String,
    project_cfg: Option<String>,
    metadata_base: Option<String>,
    auth: AuthSource,
    creds: OnceCell<Credentials>,
    project: OnceCell<String>,
    pub(crate) retry: Retry,
    pub(crate) poll: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .field("instance", &self.instance)
            .field("project", &self.project_cfg)
            .finish_non_exhaustive()
    }
}

fn metadata_base_from_env() -> String {
    match std::env::var("GCE_METADATA_HOST") {
        Ok(host) if !host.is_empty() => format!("http://{host}"),
        _ => METADATA_ROOT.to_owned(),
    }
}

pub(crate) struct ApiConfig {
    pub(crate) base: String,
    pub(crate) instance: String,
    pub(crate) project: Option<String>,
    pub(crate) metadata_base: Option<String>,
    pub(crate) auth: AuthSource,
    pub(crate) retry: Retry,
    pub(crate) poll: Duration,
}

impl Api {
    pub(crate) fn new(cfg: ApiConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // No decompression, even if another crate turns reqwest's codecs on.
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .connect_timeout(Duration::from_secs(10))
            // zoneOperations.wait long-polls for up to 2 minutes.
            .timeout(Duration::from_secs(150))
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("vmproxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut base = cfg.base;
        if !base.ends_with('/') {
            base.push('/');
        }
        let metadata_base = cfg.metadata_base.or(match &cfg.auth {
            AuthSource::Metadata(url) => Some(url.clone()),
            _ => None,
        });
        Ok(Api {
            http,
            base,
            instance: cfg.instance,
            project_cfg: cfg.project,
            metadata_base: metadata_base.map(|m| m.trim_end_matches('/').to_owned()),
            auth: cfg.auth,
            creds: OnceCell::new(),
            project: OnceCell::new(),
            retry: cfg.retry,
            poll: cfg.poll,
        })
    }

    fn err(&self, zone: &str, e: GceError) -> GceError {
        e.at(&self.instance, zone)
    }

    /// The project: from the config, else the metadata server, else `GOOGLE_CLOUD_PROJECT`.
    pub(crate) async fn project(&self) -> Result<&str, GceError> {
        let p = self
            .project
            .get_or_try_init(|| async {
                if let Some(p) = &self.project_cfg {
                    return Ok(p.clone());
                }
                let md = self.metadata_base.clone().unwrap_or_else(metadata_base_from_env);
                let url = format!("{md}/computeMetadata/v1/project/project-id");
                let res = self
                    .http
                    .get(&url)
                    .header("Metadata-Flavor", "Google")
                    .timeout(Duration::from_secs(3))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        if let Ok(text) = r.text().await {
                            let text = text.trim();
                            if !text.is_empty() {
                                debug!(project = text, "project from the metadata server");
                                return Ok(text.to_owned());
                            }
                        }
                    }
                    Ok(r) => debug!(status = %r.status(), "metadata server gave no project-id"),
                    Err(e) => debug!(error = %e, "no metadata server for the project-id"),
                }
                match std::env::var("GOOGLE_CLOUD_PROJECT") {
                    Ok(p) if !p.is_empty() => Ok(p),
                    _ => Err(self.err("", GceError::new(
                        GceErrorKind::Invalid,
                        "project",
                        "noProject",
                        "no project: set `project` in the config, run on Google Cloud, or set GOOGLE_CLOUD_PROJECT",
                    ))),
                }
            })
            .await?;
        Ok(p.as_str())
    }

    async fn credentials(&self) -> Result<&Credentials, GceError> {
        self.creds
            .get_or_try_init(|| async {
                let built = match &self.auth {
                    AuthSource::Credentials(c) => return Ok(c.clone()),
                    AuthSource::Adc => credentials::Builder::default()
                        .with_scopes([API_SCOPE])
                        .build(),
                    AuthSource::Metadata(url) => credentials::mds::Builder::default()
                        .with_endpoint(url.trim_end_matches('/'))
                        .with_scopes([API_SCOPE])
                        .build(),
                };
                built.map_err(|e| {
                    self.err(
                        "",
                        GceError::new(
                            GceErrorKind::Auth,
                            "credentials",
                            "noCredentials",
                            e.to_string(),
                        ),
                    )
                })
            })
            .await
    }

    async fn auth_headers(&self) -> Result<HeaderMap, GceError> {
        let creds = self.credentials().await?;
        match creds.headers(Extensions::new()).await {
            Ok(CacheableResource::New { data, .. }) => Ok(data),
            Ok(CacheableResource::NotModified) => Err(GceError::new(
                GceErrorKind::Auth,
                "credentials",
                "notModified",
                "credentials returned no headers",
            )),
            Err(e) => {
                let kind = if e.is_transient() {
                    GceErrorKind::Unavailable
                } else {
                    GceErrorKind::Auth
                };
                Err(GceError::new(kind, "credentials", "token", e.to_string()))
            }
        }
    }

    /// `projects/{p}/zones/{z}/` + `rest`.
    async fn zonal(&self, zone: &str, rest: &str) -> Result<String, GceError> {
        let project = self.project().await?;
        Ok(format!(
            "{}projects/{}/zones/{}/{}",
            self.base, project, zone, rest
        ))
    }

    /// One API call with retries; returns the JSON answer.
    async fn call(
        &self,
        zone: &str,
        call: &'static str,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Value, GceError> {
        let mut delay = self.retry.initial;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.once(call, method.clone(), url, body).await {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.kind().is_transient()
                        && e.kind() != GceErrorKind::NotReady
                        && attempt < self.retry.attempts =>
                {
                    let pause = delay.mul_f64(0.5 + fastrand::f64() * 0.5);
                    warn!(call, attempt, error = %e, retry_in = ?pause, "Compute Engine call failed; retrying");
                    tokio::time::sleep(pause).await;
                    delay = (delay * 2).min(self.retry.max);
                }
                Err(e) => return Err(self.err(zone, e)),
            }
        }
    }

    async fn once(
        &self,
        call: &'static str,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Value, GceError> {
        let headers = match self.auth_headers().await {
            Ok(h) => h,
            Err(e) => {
                self.record(call, "error");
                return Err(e);
            }
        };
        debug!(call, %method, url, "Compute Engine call");
        let method_has_body = method == Method::POST;
        let mut req = self.http.request(method, url).headers(headers);
        match body {
            Some(b) => req = req.json(b),
            // Google's front end answers a POST without Content-Length with 411, and hyper
            // sends none for an empty body: say it (wait, start, stop, suspend, resume).
            None if method_has_body => {
                req = req.header(http::header::CONTENT_LENGTH, "0");
            }
            None => {}
        }
        let transport = |e: reqwest::Error| {
            GceError::new(
                GceErrorKind::Unavailable,
                call,
                "transport",
                format!("{url}: {}", error_chain(&e)),
            )
        };
        let res = match req.send().await {
            Ok(res) => res,
            Err(e) => {
                self.record(call, "error");
                return Err(transport(e));
            }
        };
        let status = res.status();
        self.record(
            call,
            match status.as_u16() {
                200..=299 => "ok",
                400..=499 => "4xx",
                500..=599 => "5xx",
                300..=399 => "3xx",
                _ => "1xx",
            },
        );
        let bytes = res.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(GceError::from_http(call, status.as_u16(), &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| GceError::new(GceErrorKind::Other, call, "badJson", format!("{url}: {e}")))
    }

    /// Counts one REST request (`vmproxy_backend_calls_total`).
    fn record(&self, call: &'static str, result: &'static str) {
        crate::telemetry::backend_call(&self.instance, call, result);
    }

    fn request_id() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    fn parse<T: for<'de> Deserialize<'de>>(call: &'static str, v: Value) -> Result<T, GceError> {
        serde_json::from_value(v)
            .map_err(|e| GceError::new(GceErrorKind::Other, call, "badJson", e.to_string()))
    }

    /// `instances.get`; `None` when it does not exist.
    pub(crate) async fn get(&self, zone: &str) -> Result<Option<Instance>, GceError> {
        let url = self
            .zonal(zone, &format!("instances/{}", self.instance))
            .await?;
        match self
            .call(zone, "instances.get", Method::GET, &url, None)
            .await
        {
            Ok(v) => Ok(Some(
                Self::parse("instances.get", v).map_err(|e| self.err(zone, e))?,
            )),
            Err(e) if e.kind() == GceErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `instances.aggregatedList` filtered on the instance name: every instance of that name
    /// in the project, whatever its zone (pages followed).
    pub(crate) async fn find_everywhere(&self) -> Result<Vec<Instance>, GceError> {
        let project = self.project().await?;
        // AIP-160 form; the name is RFC 1035, so it needs no escaping inside the quotes.
        let filter = format!("name%20%3D%20%22{}%22", self.instance);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..50 {
            let mut url = format!(
                "{}projects/{project}/aggregated/instances?filter={filter}",
                self.base
            );
            if let Some(t) = &token {
                url.push_str("&pageToken=");
                url.push_str(&percent_encode(t));
            }
            let v = self
                .call("", "instances.aggregatedList", Method::GET, &url, None)
                .await?;
            let page: AggregatedList = Self::parse("instances.aggregatedList", v)?;
            for (scope, list) in page.items {
                for mut inst in list.instances {
                    if inst.name != self.instance {
                        continue;
                    }
                    if inst.zone.is_empty() {
                        inst.zone = scope.clone();
                    }
                    inst.zone = last_segment(&inst.zone).to_owned();
                    out.push(inst);
                }
            }
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
        Err(GceError::new(
            GceErrorKind::Other,
            "instances.aggregatedList",
            "tooManyPages",
            "more than 50 pages for one instance name",
        ))
    }

    /// `instances.insert` with a fresh `requestId` (kept across retries of this call).
    pub(crate) async fn insert(&self, zone: &str, body: &Value) -> Result<Operation, GceError> {
        let url = self
            .zonal(zone, &format!("instances?requestId={}", Self::request_id()))
            .await?;
        let v = self
            .call(zone, "instances.insert", Method::POST, &url, Some(body))
            .await?;
        Self::parse("instances.insert", v).map_err(|e| self.err(zone, e))
    }

    /// `instances.{start,stop,suspend,resume,delete}`.
    pub(crate) async fn action(
        &self,
        zone: &str,
        call: &'static str,
    ) -> Result<Operation, GceError> {
        let rid = Self::request_id();
        let name = &self.instance;
        let (method, rest) = match call {
            "instances.delete" => (Method::DELETE, format!("instances/{name}?requestId={rid}")),
            "instances.stop" => (
                Method::POST,
                format!("instances/{name}/stop?requestId={rid}&discardLocalSsd=false"),
            ),
            "instances.suspend" => (
                Method::POST,
                format!("instances/{name}/suspend?requestId={rid}&discardLocalSsd=false"),
            ),
            "instances.start" => (
                Method::POST,
                format!("instances/{name}/start?requestId={rid}"),
            ),
            "instances.resume" => (
                Method::POST,
                format!("instances/{name}/resume?requestId={rid}"),
            ),
            other => unreachable!("unknown action {other}"),
        };
        let url = self.zonal(zone, &rest).await?;
        let v = self.call(zone, call, method, &url, None).await?;
        Self::parse(call, v).map_err(|e| self.err(zone, e))
    }

    /// `instances.setLabels` with the fingerprint of the labels it replaces.
    pub(crate) async fn set_labels(
        &self,
        zone: &str,
        labels: &BTreeMap<String, String>,
        fingerprint: &str,
    ) -> Result<Operation, GceError> {
        let url = self
            .zonal(
                zone,
                &format!(
                    "instances/{}/setLabels?requestId={}",
                    self.instance,
                    Self::request_id()
                ),
            )
            .await?;
        let body = json!({ "labels": labels, "labelFingerprint": fingerprint });
        let v = self
            .call(zone, "instances.setLabels", Method::POST, &url, Some(&body))
            .await?;
        Self::parse("instances.setLabels", v).map_err(|e| self.err(zone, e))
    }

    /// Waits for `op` with `zoneOperations.wait` until it is DONE (the call may return early)
    /// or `deadline` passes, then turns an operation error into a typed error for `call`.
    /// An operation still pending at the deadline is an `operationTimeout` error (and logged);
    /// one abandoned because the caller gave up (a dropped future) is logged too.
    pub(crate) async fn wait(
        &self,
        zone: &str,
        call: &'static str,
        mut op: Operation,
        deadline: Instant,
    ) -> Result<Operation, GceError> {
        let mut pending = Pending {
            instance: &self.instance,
            zone,
            call,
            operation: op.name.clone(),
            status: op.status.clone(),
            armed: true,
        };
        loop {
            pending.status.clone_from(&op.status);
            if op.status == "DONE" {
                pending.armed = false;
                if let Some(first) = op.error.as_ref().and_then(|e| e.errors.first()) {
                    return Err(self.err(
                        zone,
                        GceError::from_operation(
                            call,
                            &first.code,
                            &first.message,
                            op.http_error_status_code,
                        ),
                    ));
                }
                return Ok(op);
            }
            if op.name.is_empty() {
                pending.armed = false;
                return Err(self.err(
                    zone,
                    GceError::new(
                        GceErrorKind::Other,
                        call,
                        "badOperation",
                        "operation without a name",
                    ),
                ));
            }
            if Instant::now() >= deadline {
                pending.armed = false;
                warn!(instance = %self.instance, zone, call, operation = %op.name, status = %op.status,
                    "gave up waiting for the operation: still pending at the deadline");
                return Err(self.err(
                    zone,
                    GceError::new(
                        GceErrorKind::Unavailable,
                        call,
                        "operationTimeout",
                        format!("operation {} still {} at the deadline", op.name, op.status),
                    ),
                ));
            }
            let started = Instant::now();
            let url = self
                .zonal(zone, &format!("operations/{}/wait", op.name))
                .await?;
            let waited = tokio::time::timeout_at(
                deadline,
                self.call(zone, "zoneOperations.wait", Method::POST, &url, None),
            )
            .await;
            let Ok(v) = waited else {
                // The deadline passed during the long poll: the loop reports it.
                continue;
            };
            op = Self::parse("zoneOperations.wait", v?).map_err(|e| self.err(zone, e))?;
            if op.status != "DONE" {
                // It returned early: do not spin.
                let elapsed = started.elapsed();
                if elapsed < self.poll {
                    tokio::time::sleep_until((started + self.poll).min(deadline)).await;
                }
            }
        }
    }
}

/// Logs an operation a caller stopped waiting for (its future dropped, e.g. by the route's
/// `start_timeout`), so that what the platform was still doing is on record.
struct Pending<'a> {
    instance: &'a str,
    zone: &'a str,
    call: &'static str,
    operation: String,
    status: String,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            warn!(instance = %self.instance, zone = %self.zone, call = self.call,
                operation = %self.operation, status = %self.status,
                "stopped waiting for the operation: still pending");
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct AggregatedList {
    items: BTreeMap<String, ScopedList>,
    next_page_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ScopedList {
    instances: Vec<Instance>,
}

/// `https://…/zones/us-central1-a` or `zones/us-central1-a` → `us-central1-a`.
pub(crate) fn last_segment(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
