//! Typed Compute Engine errors: what went wrong, for which instance, and the API's reason.

use std::fmt;

/// The broad kind of a [`GceError`], for deciding what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GceErrorKind {
    /// The zone has no capacity for this machine (`ZONE_RESOURCE_POOL_EXHAUSTED…`): try later
    /// or another zone.
    NoCapacity,
    /// A quota is exhausted (403 `quotaExceeded`, operation error `QUOTA_EXCEEDED`).
    Quota,
    /// Too many API calls (403 `rateLimitExceeded`, 429), still so after every retry.
    RateLimited,
    /// The instance (or operation) does not exist (404 `notFound`).
    NotFound,
    /// The instance already exists (409 `alreadyExists`).
    AlreadyExists,
    /// The instance is busy with another change (400 `resourceNotReady`).
    NotReady,
    /// A fingerprint was stale (412 `conditionNotMet`).
    ConditionNotMet,
    /// The request was refused as invalid (400 `invalid` and the like).
    Invalid,
    /// Authentication or permission trouble (401, 403 `forbidden`), or no credentials.
    Auth,
    /// The API could not be reached or kept failing (transport errors, 5xx after retries).
    Unavailable,
    /// Anything else.
    Other,
}

impl GceErrorKind {
    fn describe(self) -> &'static str {
        match self {
            GceErrorKind::NoCapacity => "no capacity in the zone",
            GceErrorKind::Quota => "quota exceeded",
            GceErrorKind::RateLimited => "API rate limit exceeded",
            GceErrorKind::NotFound => "not found",
            GceErrorKind::AlreadyExists => "already exists",
            GceErrorKind::NotReady => "resource not ready",
            GceErrorKind::ConditionNotMet => "condition not met",
            GceErrorKind::Invalid => "invalid request",
            GceErrorKind::Auth => "not authorized",
            GceErrorKind::Unavailable => "Compute Engine API unavailable",
            GceErrorKind::Other => "Compute Engine error",
        }
    }

    /// Whether retrying the same call later may succeed without any change on our side.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            GceErrorKind::RateLimited | GceErrorKind::Unavailable | GceErrorKind::NotReady
        )
    }
}

/// An error from the Compute Engine backend.
///
/// Its `Display` names the kind, the instance and zone, the API's reason (`alreadyExists`,
/// `ZONE_RESOURCE_POOL_EXHAUSTED`…) and message, so that the 503 a failed start turns into
/// says why. It never contains an access token.
#[derive(Clone, Debug)]
pub struct GceError {
    kind: GceErrorKind,
    instance: String,
    zone: String,
    call: &'static str,
    status: Option<u16>,
    reason: String,
    message: String,
}

impl GceError {
    pub(crate) fn new(
        kind: GceErrorKind,
        call: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        GceError {
            kind,
            instance: String::new(),
            zone: String::new(),
            call,
            status: None,
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub(crate) fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub(crate) fn at(mut self, instance: &str, zone: &str) -> Self {
        self.instance = instance.to_owned();
        self.zone = zone.to_owned();
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> GceErrorKind {
        self.kind
    }

    /// The instance the call was about.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The instance's zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The API method (`instances.insert`, `zoneOperations.wait`…).
    pub fn call(&self) -> &str {
        self.call
    }

    /// The HTTP status the API answered, if the failure was an HTTP error.
    pub fn http_status(&self) -> Option<u16> {
        self.status
    }

    /// The API's reason or operation error code (`rateLimitExceeded`, `QUOTA_EXCEEDED`…).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The API's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Maps an HTTP error answer of the Compute API.
    pub(crate) fn from_http(call: &'static str, status: u16, body: &[u8]) -> Self {
        let (reason, message) = parse_error_body(body);
        let kind = match (status, reason.as_str()) {
            (_, "rateLimitExceeded" | "userRateLimitExceeded" | "RATE_LIMIT_EXCEEDED")
            | (429, _) => GceErrorKind::RateLimited,
            (_, "quotaExceeded" | "QUOTA_EXCEEDED") => GceErrorKind::Quota,
            (_, "ZONE_RESOURCE_POOL_EXHAUSTED" | "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS") => {
                GceErrorKind::NoCapacity
            }
            (404, _) | (_, "notFound") => GceErrorKind::NotFound,
            (409, _) | (_, "alreadyExists") => GceErrorKind::AlreadyExists,
            (412, _) | (_, "conditionNotMet") => GceErrorKind::ConditionNotMet,
            (_, "resourceNotReady") => GceErrorKind::NotReady,
            (401, _) | (403, _) => GceErrorKind::Auth,
            (400, _) => GceErrorKind::Invalid,
            (500..=599, _) => GceErrorKind::Unavailable,
            _ => GceErrorKind::Other,
        };
        GceError::new(kind, call, reason, message).with_status(status)
    }

    /// Maps the first error of a DONE operation.
    pub(crate) fn from_operation(
        call: &'static str,
        code: &str,
        message: &str,
        http_status: Option<u16>,
    ) -> Self {
        let kind = match code {
            c if c.starts_with("ZONE_RESOURCE_POOL_EXHAUSTED") => GceErrorKind::NoCapacity,
            "QUOTA_EXCEEDED" => GceErrorKind::Quota,
            "RESOURCE_NOT_FOUND" => GceErrorKind::NotFound,
            "RESOURCE_ALREADY_EXISTS" => GceErrorKind::AlreadyExists,
            "RATE_LIMIT_EXCEEDED" => GceErrorKind::RateLimited,
            c if c.starts_with("INVALID") || c.starts_with("BAD_REQUEST") => GceErrorKind::Invalid,
            _ => match http_status {
                Some(404) => GceErrorKind::NotFound,
                Some(409) => GceErrorKind::AlreadyExists,
                _ => GceErrorKind::Other,
            },
        };
        let mut e = GceError::new(kind, call, code, message);
        e.status = http_status;
        e
    }
}

/// `{"error":{"code":..,"message":..,"errors":[{"reason":..}]}}` → (reason, message).
fn parse_error_body(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let err = &v["error"];
    let reason = err["errors"][0]["reason"]
        .as_str()
        .or_else(|| err["status"].as_str())
        .unwrap_or("")
        .to_owned();
    let message = err["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            text.chars().take(200).collect()
        });
    (reason, message)
}

impl fmt::Display for GceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        if !self.instance.is_empty() {
            write!(f, " for instance {} in zone {}", self.instance, self.zone)?;
        }
        write!(f, " ({}", self.call)?;
        if let Some(s) = self.status {
            write!(f, ", HTTP {s}")?;
        }
        if !self.reason.is_empty() {
            write!(f, ", {}", self.reason)?;
        }
        f.write_str(")")?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for GceError {}
