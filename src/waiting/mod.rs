//! The waiting page: what a browser is answered at once, instead of waiting, while its machine
//! is not running.
//!
//! With [`RouteBuilder::waiting_page`](crate::RouteBuilder::waiting_page) on, a `GET` or `HEAD`
//! whose `Accept` prefers `text/html` (a browser navigating; not curl's `*/*`, not an API
//! client) that finds the machine not running gets `503 Service Unavailable` with `Retry-After`,
//! `Cache-Control: no-store`, `Vary: Accept` and a small HTML page: the machine's name, what it
//! is doing, how long it has been at it and, from past starts, how long it should still take.
//! `Retry-After` is that time (from the medians of the last cold starts, phase by phase), or
//! what is left of the back-off after a failed start; a second when nothing is known yet.
//! The request sets the machine's start going but does not wait for it: the page reloads itself
//! (`<meta http-equiv="refresh">`, no JavaScript needed) until the machine answers, and then the
//! browser shows the machine's own page. After a failed start the page gives the reason and
//! reloads when the back-off is over. Every other request waits for the start as usual.
//!
//! # Templates
//!
//! The page comes from [`DEFAULT_TEMPLATE`], or from one of your own
//! ([`RouteBuilder::waiting_page_template`](crate::RouteBuilder::waiting_page_template), route
//! key `waiting_page_template` of the binary's file). The syntax is small:
//!
//! - `{{name}}`: the value, HTML-escaped (a machine name or an error text never becomes markup).
//! - `{{#name}}…{{/name}}`: shown only when the value is not empty.
//! - `{{^name}}…{{/name}}`: shown only when it is empty.
//!
//! | placeholder | value |
//! |---|---|
//! | `machine` | the machine's name |
//! | `status` | what it is doing, in words: creating and booting, probing, stopping, a failed start |
//! | `phase` | the same in one word: `starting`, `booting`, `probing`, `stopping`, `checking`, `failed` |
//! | `elapsed_seconds` | whole seconds in that phase (for a start: since it began) |
//! | `expected_seconds` | seconds still to go, from the medians of past starts' phases; empty when none is known |
//! | `progress` | 0–99 from the same estimate; empty when none is known (an indeterminate `<progress>`) |
//! | `refresh_seconds` | when the page reloads: every second while the machine starts or stops (the bar moves, and the browser reaches the machine about a second after it is up); at the end of the back-off after a failed start |
//! | `error` | why the last start failed, during the back-off after it; else empty |
//!
//! A template is checked when the route is built: an unknown placeholder or an unclosed section
//! is an error naming its line. Keep the `<meta http-equiv="refresh"
//! content="{{refresh_seconds}}">`: without it the browser stays on the page. Use inline styles
//! only; anything the page loads from under the route's prefix would wait for the machine.
//!
//! # Example
//!
//! ```
//! use vmproxy::waiting::Template;
//! use vmproxy::{backend::process::ProcessBackend, Route};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let page = r#"<!doctype html>
//! <meta http-equiv="refresh" content="{{refresh_seconds}}">
//! <h1>{{machine}}</h1>
//! <p>{{status}}{{#expected_seconds}}, about {{expected_seconds}} s to go{{/expected_seconds}}</p>
//! {{#error}}<p class="error">{{error}}</p>{{/error}}"#;
//!
//! // Values are escaped; sections follow whether a value is set.
//! let html = Template::parse(page)?.render(&[
//!     ("machine", "<b>gpu</b>"),
//!     ("status", "creating and booting the machine"),
//!     ("refresh_seconds", "1"),
//! ]);
//! assert!(html.contains("<h1>&lt;b&gt;gpu&lt;/b&gt;</h1>"));
//! assert!(!html.contains("to go") && !html.contains("class=\"error\""));
//!
//! let lab = || ProcessBackend::new(["jupyter", "lab", "--port={port}"]);
//! let route = Route::builder("/lab", lab()?)
//!     .waiting_page(true)
//!     .waiting_page_template(page)
//!     .build()?;
//! assert_eq!(route.prefixes(), ["/lab"]);
//!
//! // A template with a typo is refused when the route is built.
//! let err = Route::builder("/lab", lab()?)
//!     .waiting_page(true)
//!     .waiting_page_template("<h1>{{machin}}</h1>")
//!     .build()
//!     .unwrap_err();
//! assert_eq!(err.field(), "waiting_page_template");
//! assert!(err.reason().contains("{{machin}}"));
//! # Ok(())
//! # }
//! ```

mod accept;
mod template;

use std::time::{Duration, SystemTime};

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, VARY};
use http::{HeaderValue, Method, Request, Response, StatusCode};

pub use template::{Template, TemplateError};

use crate::body::ProxiedBody;
use crate::error::retry_after_secs;
use crate::lifecycle::{MachineStatus, StartPhase, State};
use crate::BoxError;

/// The page used unless the route names its own: the machine's name, what it is doing, a
/// progress bar, inline styles only, light and dark.
pub const DEFAULT_TEMPLATE: &str = include_str!("default.html");

/// Every placeholder a template may use (see the [module docs](self)).
pub const PLACEHOLDERS: &[&str] = &[
    "machine",
    "status",
    "phase",
    "elapsed_seconds",
    "expected_seconds",
    "progress",
    "refresh_seconds",
    "error",
];

/// How soon the page reloads while the machine starts or stops: soon enough that a browser
/// reaches the machine about a second after it is up.
const REFRESH: Duration = Duration::from_secs(1);

/// Whether `req` is answered with the page rather than waiting: a `GET` or `HEAD` that prefers
/// HTML. Other methods wait: a form's `POST` must not be answered by a page that reloads as a
/// `GET`.
pub(crate) fn wanted<B>(req: &Request<B>) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && accept::prefers_html(req.headers())
}

/// Why the machine cannot serve the request now, beyond its status.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NotRunning<'a> {
    /// Starting, or stopping or being checked, with a start to follow.
    Yet,
    /// A start failed; starts pause for this long.
    BackingOff(&'a BoxError, Duration),
}

/// The page for `status` as a response; no body for `HEAD`, with the headers a `GET` gets.
pub(crate) fn response(
    template: &Template,
    status: &MachineStatus,
    why: NotRunning<'_>,
    head: bool,
) -> Response<ProxiedBody> {
    let v = Values::new(status, why, SystemTime::now());
    let html = v.render(template, &status.name);
    let mut res = Response::new(if head {
        ProxiedBody::empty()
    } else {
        ProxiedBody::full(html.clone())
    });
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = res.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page is about this moment; a cached copy would keep a browser away from the machine.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The same URL answers a client that does not prefer HTML by waiting.
    h.insert(VARY, HeaderValue::from_static("Accept"));
    h.insert(RETRY_AFTER, HeaderValue::from(v.retry_after));
    if head {
        h.insert(CONTENT_LENGTH, HeaderValue::from(html.len()));
    }
    res
}

/// The placeholders' values.
#[derive(Debug, PartialEq, Eq)]
struct Values {
    phase: &'static str,
    status: String,
    elapsed: u64,
    expected: Option<u64>,
    progress: Option<u64>,
    refresh: u64,
    /// `Retry-After`: when the machine is expected to be up, which may be later than the page's
    /// next reload.
    retry_after: u64,
    error: Option<String>,
}

impl Values {
    fn new(status: &MachineStatus, why: NotRunning<'_>, now: SystemTime) -> Values {
        let elapsed = now
            .duration_since(status.state_since)
            .unwrap_or_default()
            .as_secs();
        let mut v = Values {
            phase: "starting",
            status: "starting the machine".into(),
            elapsed,
            expected: None,
            progress: None,
            refresh: REFRESH.as_secs(),
            retry_after: retry_after_secs(status.ready_in.unwrap_or(REFRESH)),
            error: None,
        };
        match (why, status.state) {
            (NotRunning::BackingOff(error, retry_after), _) => {
                let secs = retry_after_secs(retry_after);
                v.phase = "failed";
                v.status = format!("The machine could not be started; trying again in {secs} s.");
                v.refresh = secs;
                v.retry_after = secs;
                v.error = Some(error.to_string());
            }
            (NotRunning::Yet, State::Creating) => {
                (v.phase, v.status) = match status.starting.map(|(phase, _)| phase) {
                    Some(StartPhase::Backend) => {
                        ("booting", "Creating and booting the machine…".into())
                    }
                    Some(StartPhase::Readiness) => (
                        "probing",
                        "The machine is up; waiting for it to answer its health check…".into(),
                    ),
                    None => ("starting", "Starting the machine…".into()),
                };
                if let Some(left) = status.ready_in {
                    let spent = now.duration_since(status.state_since).unwrap_or_default();
                    // Never "0 s to go" or 100 %: it is not up yet.
                    v.expected = Some(retry_after_secs(left));
                    let whole = (spent + left).as_millis().max(1);
                    v.progress = Some(((spent.as_millis() * 100) / whole).min(99) as u64);
                }
            }
            (NotRunning::Yet, State::Stopping) => {
                v.phase = "stopping";
                v.status = "The machine is stopping; it starts again right after.".into();
            }
            (NotRunning::Yet, State::Running(_)) => {
                // It runs, but a connect error made the proxy ask whether it is still there.
                v.phase = "checking";
                v.status = "Checking that the machine is still running…".into();
            }
            // Changed since the look that found it not running: the next reload will tell.
            (NotRunning::Yet, State::Absent) => {
                v.status = "Starting the machine…".into();
            }
        }
        v
    }

    fn render(&self, template: &Template, machine: &str) -> String {
        let num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
        let (elapsed, expected) = (self.elapsed.to_string(), num(self.expected));
        let (progress, refresh) = (num(self.progress), self.refresh.to_string());
        template.render(&[
            ("machine", machine),
            ("status", &self.status),
            ("phase", self.phase),
            ("elapsed_seconds", &elapsed),
            ("expected_seconds", &expected),
            ("progress", &progress),
            ("refresh_seconds", &refresh),
            ("error", self.error.as_deref().unwrap_or("")),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Endpoint;

    fn status(state: State, since: SystemTime) -> MachineStatus {
        MachineStatus {
            name: "gpu".into(),
            state,
            state_since: since,
            starting: None,
            in_flight: 0,
            waiting: 0,
            idle_stop_in: None,
            last_error: None,
            boot_time: None,
            boot_phases: None,
            ready_in: None,
            last_start: None,
            placement: None,
        }
    }

    #[test]
    fn a_start_with_a_known_boot_time_shows_progress() {
        let now = SystemTime::now();
        let mut s = status(State::Creating, now - Duration::from_millis(2500));
        s.starting = Some((StartPhase::Backend, now));
        s.boot_time = Some(Duration::from_secs(10));
        s.ready_in = Some(Duration::from_millis(7500));
        let v = Values::new(&s, NotRunning::Yet, now);
        assert_eq!(v.phase, "booting");
        assert_eq!((v.elapsed, v.expected, v.progress), (2, Some(8), Some(25)));
        assert_eq!(v.refresh, 1, "the bar moves");
        assert_eq!(v.retry_after, 8, "Retry-After: when it should be up");
        // Overdue: still a second to go, and never 100 %.
        s.ready_in = Some(Duration::ZERO);
        let v = Values::new(&s, NotRunning::Yet, now + Duration::from_secs(30));
        assert_eq!(
            (v.expected, v.progress, v.retry_after),
            (Some(1), Some(99), 1)
        );
        s.starting = Some((StartPhase::Readiness, now));
        assert_eq!(Values::new(&s, NotRunning::Yet, now).phase, "probing");
    }

    #[test]
    fn a_first_start_has_no_estimate() {
        let now = SystemTime::now();
        let v = Values::new(&status(State::Creating, now), NotRunning::Yet, now);
        assert_eq!((v.phase, v.expected, v.progress), ("starting", None, None));
        assert_eq!(
            (v.refresh, v.retry_after),
            (1, 1),
            "as before there was an estimate"
        );
        let html = v.render(&Template::parse(DEFAULT_TEMPLATE).unwrap(), "gpu");
        assert!(html.contains("<progress>"), "indeterminate: {html}");
        assert!(!html.contains("to go"), "{html}");
    }

    #[test]
    fn stopping_and_checking_say_so() {
        let now = SystemTime::now();
        let mut s = status(State::Stopping, now);
        s.ready_in = Some(Duration::from_millis(4200));
        let v = Values::new(&s, NotRunning::Yet, now);
        assert_eq!(v.phase, "stopping");
        assert_eq!(
            (v.refresh, v.retry_after),
            (1, 5),
            "a whole start follows the stop"
        );
        let ep = Endpoint::new(([127, 0, 0, 1], 1).into());
        let v = Values::new(&status(State::Running(ep), now), NotRunning::Yet, now);
        assert_eq!(v.phase, "checking");
    }

    #[test]
    fn a_failed_start_gives_the_reason_and_reloads_after_the_back_off() {
        let now = SystemTime::now();
        let error: BoxError = "quota <exceeded>".into();
        let s = status(State::Absent, now);
        let v = Values::new(
            &s,
            NotRunning::BackingOff(&error, Duration::from_millis(2100)),
            now,
        );
        assert_eq!((v.phase, v.refresh, v.retry_after), ("failed", 3, 3));
        assert_eq!(v.error.as_deref(), Some("quota <exceeded>"));
        let res = response(
            &Template::parse(DEFAULT_TEMPLATE).unwrap(),
            &s,
            NotRunning::BackingOff(&error, Duration::from_millis(10)),
            false,
        );
        assert_eq!(res.headers()[RETRY_AFTER], "1", "never 0");
    }

    #[test]
    fn the_default_template_uses_every_placeholder() {
        for p in PLACEHOLDERS {
            assert!(
                DEFAULT_TEMPLATE.contains(&format!("{{{{{p}}}}}")),
                "{p} unused"
            );
        }
        Template::parse(DEFAULT_TEMPLATE).unwrap();
    }
}
