//! Why a proxied request failed, and the HTTP response each failure becomes.
//!
//! A middleware that returns `Err` makes hyper drop the connection without an answer, so the
//! layer turns every lifecycle or upstream failure into a response with a status and a short
//! text reason. [`Error::status`] gives the mapping.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use vmproxy::Error;
//!
//! let err = Error::cold_start_timeout("app", Duration::from_secs(300));
//! assert_eq!(err.status(), http::StatusCode::GATEWAY_TIMEOUT);
//! assert!(err.to_string().contains("app"));
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, StatusCode};

use crate::BoxError;

/// Every method a route forwards; CONNECT is answered 405 instead.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// A failure to serve a proxied request, carried to the client as a response.
#[derive(Clone, Debug)]
pub struct Error {
    kind: Kind,
    machine: Arc<str>,
}

#[derive(Clone, Debug)]
enum Kind {
    Overloaded {
        max_pending: usize,
        /// The start's expected time left, when past starts tell.
        retry_after: Option<Duration>,
    },
    StartTooSlow {
        expected: Duration,
        wait: Duration,
    },
    StartFailed {
        source: Arc<BoxError>,
        retry_after: Duration,
    },
    ColdStartTimeout {
        waited: Duration,
    },
    Upstream {
        source: Arc<BoxError>,
    },
    BadRequest {
        reason: std::borrow::Cow<'static, str>,
    },
    BadRequestBody {
        reason: String,
    },
    RequestBodyTimeout {
        reason: String,
    },
    MethodNotAllowed {
        method: http::Method,
    },
    UnsupportedTransferCoding,
    ProxyExhausted {
        source: Arc<BoxError>,
    },
    ResponseHeaderTimeout {
        after: Duration,
    },
}

impl Error {
    /// Too many requests wait already; `retry_after` is the start's expected time left, when
    /// known.
    pub(crate) fn overloaded(
        machine: &str,
        max_pending: usize,
        retry_after: Option<Duration>,
    ) -> Self {
        Error {
            kind: Kind::Overloaded {
                max_pending,
                retry_after,
            },
            machine: machine.into(),
        }
    }

    /// Deadline admission: the machine is expected to be ready in `expected`, later than the
    /// request would `wait`.
    pub(crate) fn start_too_slow(machine: &str, expected: Duration, wait: Duration) -> Self {
        Error {
            kind: Kind::StartTooSlow { expected, wait },
            machine: machine.into(),
        }
    }

    pub(crate) fn start_failed(
        machine: &str,
        source: Arc<BoxError>,
        retry_after: Duration,
    ) -> Self {
        Error {
            kind: Kind::StartFailed {
                source,
                retry_after,
            },
            machine: machine.into(),
        }
    }

    /// The error a request gets when the machine did not become ready within `waited`.
    pub fn cold_start_timeout(machine: &str, waited: Duration) -> Self {
        Error {
            kind: Kind::ColdStartTimeout { waited },
            machine: machine.into(),
        }
    }

    pub(crate) fn upstream(machine: &str, source: impl Into<BoxError>) -> Self {
        Error {
            kind: Kind::Upstream {
                source: Arc::new(source.into()),
            },
            machine: machine.into(),
        }
    }

    pub(crate) fn bad_request(
        machine: &str,
        reason: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Error {
            kind: Kind::BadRequest {
                reason: reason.into(),
            },
            machine: machine.into(),
        }
    }

    /// The client's request body failed: malformed (400) or too slow (408).
    pub(crate) fn bad_request_body(machine: &str, reason: String, timed_out: bool) -> Self {
        let kind = if timed_out {
            Kind::RequestBodyTimeout { reason }
        } else {
            Kind::BadRequestBody { reason }
        };
        Error {
            kind,
            machine: machine.into(),
        }
    }

    pub(crate) fn method_not_allowed(machine: &str, method: http::Method) -> Self {
        Error {
            kind: Kind::MethodNotAllowed { method },
            machine: machine.into(),
        }
    }

    pub(crate) fn proxy_exhausted(machine: &str, source: impl Into<BoxError>) -> Self {
        Error {
            kind: Kind::ProxyExhausted {
                source: Arc::new(source.into()),
            },
            machine: machine.into(),
        }
    }

    pub(crate) fn unsupported_transfer_coding(machine: &str) -> Self {
        Error {
            kind: Kind::UnsupportedTransferCoding,
            machine: machine.into(),
        }
    }

    pub(crate) fn response_header_timeout(machine: &str, after: Duration) -> Self {
        Error {
            kind: Kind::ResponseHeaderTimeout { after },
            machine: machine.into(),
        }
    }

    /// The HTTP status this failure is answered with.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::Overloaded { .. }
            | Kind::StartFailed { .. }
            | Kind::StartTooSlow { .. }
            | Kind::ProxyExhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Kind::ColdStartTimeout { .. } | Kind::ResponseHeaderTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Kind::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Kind::BadRequest { .. } | Kind::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            Kind::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Kind::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Kind::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// How long a client should wait before trying again, where that is known: what is left of
    /// the start back-off after a failed start; the start's expected time left (from past
    /// starts) when it is refused during a start; else a second. `Retry-After` carries it in
    /// whole seconds, rounded up, at least 1.
    pub fn retry_after(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Overloaded { retry_after, .. } => {
                Some(retry_after.unwrap_or(Duration::from_secs(1)))
            }
            Kind::ProxyExhausted { .. } => Some(Duration::from_secs(1)),
            Kind::StartFailed { retry_after, .. } => Some(*retry_after),
            Kind::StartTooSlow { expected, .. } => Some(*expected),
            _ => None,
        }
    }

    /// The machine (route) the request was for.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// Whether the machine could not be reached while it was thought to run.
    pub fn is_upstream(&self) -> bool {
        matches!(self.kind, Kind::Upstream { .. })
    }

    /// The response for this failure: status, `Retry-After` where it applies, and the reason as
    /// `text/plain`.
    pub(crate) fn to_response<B>(&self, body: impl FnOnce(String) -> B) -> http::Response<B> {
        let mut res = http::Response::new(body(format!("{self}\n")));
        *res.status_mut() = self.status();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // The text may quote the request (a path): never to be sniffed as HTML.
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(after) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
        match self.kind {
            // RFC 9110 §15.5.6: a 405 lists what is allowed.
            Kind::MethodNotAllowed { .. } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            }
            // The connection's state is unknown after a request the proxy could not read.
            Kind::BadRequestBody { .. }
            | Kind::RequestBodyTimeout { .. }
            | Kind::UnsupportedTransferCoding => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        match &self.kind {
            Kind::Overloaded { max_pending, .. } => write!(
                f,
                "machine {m} is starting and {max_pending} requests are already waiting for it; try again shortly"
            ),
            Kind::StartTooSlow { expected, wait } => write!(
                f,
                "machine {m} is starting and, judging by its past starts, should be ready in about {} s: \
                 later than this route lets a request wait (cold_start_timeout {}), so the request is \
                 refused now rather than at that deadline; try again then",
                retry_after_secs(*expected),
                humantime::format_duration(*wait)
            ),
            Kind::StartFailed { source, .. } => write!(f, "machine {m} failed to start: {source}"),
            Kind::ColdStartTimeout { waited } => write!(
                f,
                "machine {m} did not become ready within {}; it is still starting, try again",
                humantime::format_duration(*waited)
            ),
            Kind::Upstream { source } => write!(f, "machine {m} could not be reached: {source}"),
            Kind::BadRequest { reason } => write!(f, "bad request for machine {m}: {reason}"),
            Kind::BadRequestBody { reason } => write!(f, "bad request for machine {m}: {reason}"),
            Kind::RequestBodyTimeout { reason } => {
                write!(f, "request to machine {m} timed out: {reason}")
            }
            Kind::MethodNotAllowed { method } => write!(
                f,
                "{method} is not proxied to machine {m}: it would open a tunnel past the proxy"
            ),
            Kind::ProxyExhausted { source } => write!(
                f,
                "the proxy cannot open a connection to machine {m} now ({source}); try again shortly"
            ),
            Kind::UnsupportedTransferCoding => write!(
                f,
                "request for machine {m}: only the chunked transfer coding is understood"
            ),
            Kind::ResponseHeaderTimeout { after } => write!(
                f,
                "machine {m} took the request but sent no response head within {}",
                humantime::format_duration(*after)
            ),
        }
    }
}

/// `Retry-After`'s delay-seconds (RFC 9110 §10.2.3): whole seconds, rounded up, and never 0,
/// which would invite the client straight back.
pub(crate) fn retry_after_secs(after: Duration) -> u64 {
    (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1)
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::StartFailed { source, .. }
            | Kind::Upstream { source }
            | Kind::ProxyExhausted { source } => Some(&***source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after(e: &Error) -> String {
        let res = e.to_response(|s| s);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{e}");
        res.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        let ms = Duration::from_millis;
        for (d, secs) in [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (4200, 5)] {
            assert_eq!(retry_after_secs(ms(d)), secs, "{d} ms");
        }
        // During a start: the start's expected time left, or a second when none is known.
        assert_eq!(retry_after(&Error::overloaded("m", 5, Some(ms(2500)))), "3");
        assert_eq!(retry_after(&Error::overloaded("m", 5, Some(ms(0)))), "1");
        assert_eq!(retry_after(&Error::overloaded("m", 5, None)), "1");
        // In the back-off: what is left of it.
        let boom: Arc<BoxError> = Arc::new("boom".into());
        assert_eq!(retry_after(&Error::start_failed("m", boom, ms(7300))), "8");
    }

    #[test]
    fn a_deadline_refusal_is_a_503_that_says_why() {
        let e = Error::start_too_slow(
            "gpu",
            Duration::from_millis(41_200),
            Duration::from_secs(30),
        );
        assert_eq!(retry_after(&e), "42");
        let text = e.to_string();
        assert!(
            text.contains("machine gpu is starting")
                && text.contains("ready in about 42 s")
                && text.contains("cold_start_timeout 30s"),
            "{text}"
        );
    }
}
