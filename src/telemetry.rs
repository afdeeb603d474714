//! The metrics the layer records through the [`metrics`] facade: their names, labels and meaning.
//!
//! The library only records; the application installs whichever recorder it likes (Prometheus,
//! StatsD, OpenTelemetry…). With no recorder installed, recording costs next to nothing. The
//! names and labels below are a contract: they change only with a major version.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `vmproxy_requests_total` | counter | `machine`, `code` | responses the layer produced for a route, proxied or answered by the proxy itself (502, 503, 504…), by status code |
//! | `vmproxy_cold_starts_total` | counter | `machine`, `result` | starts, by outcome: `ok`, `failed`, `timeout` (`start_timeout` exceeded) |
//! | `vmproxy_cold_start_seconds` | histogram | `machine`, `phase` | successful starts: `backend` (the platform's start), `readiness` (probing), `total` |
//! | `vmproxy_machine_state` | gauge | `machine`, `state` | 1 for the current state, 0 for the others (`absent`, `creating`, `running`, `stopping`) |
//! | `vmproxy_in_flight` | gauge | `machine` | requests being served (a stream or an upgraded connection counts until it ends) |
//! | `vmproxy_waiting` | gauge | `machine` | requests waiting for a start |
//! | `vmproxy_idle_stop_seconds` | gauge | `machine` | seconds until the idle stop is due; `NaN` when none is scheduled (not running, requests in flight, or no idle timeout) |
//! | `vmproxy_backend_calls_total` | counter | `machine`, `call`, `result` | calls to the platform (see below) |
//!
//! `machine` is the route's machine name ([`RouteBuilder::name`](crate::RouteBuilder::name)),
//! which may differ from the backend's own name.
//!
//! Backend calls: the `gce` backend records each Compute Engine REST request (every attempt,
//! retries included) by its discovery name — `instances.get`, `instances.insert`,
//! `instances.start`, `instances.stop`, `instances.delete`, `instances.resume`,
//! `instances.suspend`, `instances.setLabels`, `instances.aggregatedList`,
//! `zoneOperations.wait` — with `result` `ok` for a 2xx answer, the status class (`4xx`, `5xx`)
//! for another answer, and `error` when there was no answer (a transport error, no access
//! token). A 409 from `instances.insert` is how a machine that exists already is found, so
//! `4xx` is not always a fault. Each fallback step is one `call="fallback"` with `result`
//! `capacity` (a zone, machine type or provisioning model refused for lack of capacity) or
//! `duplicate` (a VM deleted because another replica created the name in another zone
//! first). The `process` backend records
//! `spawn`, `terminate` (SIGTERM) and `kill` (SIGKILL after the grace period), with `ok` or
//! `error`.
//!
//! Gauges are set on every state transition and every change of the counts. A gauge that
//! depends on the clock (`vmproxy_idle_stop_seconds`) is current only as of the last change:
//! call [`refresh`] with each [`Handle::status`](crate::Handle::status) just before rendering a
//! scrape, as [`Admin`](crate::admin::Admin)'s `/metrics` does.
//!
//! With a Prometheus exporter, give `vmproxy_cold_start_seconds` explicit buckets
//! ([`COLD_START_BUCKETS`] suits starts from a fraction of a second to ten minutes), or it is
//! rendered as a summary.
//!
//! # Example
//!
//! Install a Prometheus recorder (crate `metrics-exporter-prometheus`) with the cold-start
//! buckets, and render what the layer recorded:
//!
//! ```
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use vmproxy::telemetry;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let recorder = PrometheusBuilder::new()
//!     .set_buckets_for_metric(
//!         Matcher::Full(telemetry::COLD_START_SECONDS.to_owned()),
//!         telemetry::COLD_START_BUCKETS,
//!     )?
//!     .build_recorder();
//! let prometheus = recorder.handle();
//! // In an application: `metrics::set_global_recorder(recorder)?;` once, before building routes.
//! # drop(recorder);
//! let text = prometheus.render();
//! # let _ = text;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use metrics::{describe_counter, describe_gauge, describe_histogram, Gauge, SharedString, Unit};

use crate::lifecycle::{MachineStatus, StartTimings, State};

/// `vmproxy_requests_total`: responses produced for a route, by `machine` and `code`.
pub const REQUESTS_TOTAL: &str = "vmproxy_requests_total";
/// `vmproxy_cold_starts_total`: starts by `machine` and `result` (`ok`, `failed`, `timeout`).
pub const COLD_STARTS_TOTAL: &str = "vmproxy_cold_starts_total";
/// `vmproxy_cold_start_seconds`: successful starts' durations by `machine` and `phase`
/// (`backend`, `readiness`, `total`).
pub const COLD_START_SECONDS: &str = "vmproxy_cold_start_seconds";
/// `vmproxy_machine_state`: 1 for the `state` a `machine` is in, 0 for the others.
pub const MACHINE_STATE: &str = "vmproxy_machine_state";
/// `vmproxy_in_flight`: requests being served by a `machine`.
pub const IN_FLIGHT: &str = "vmproxy_in_flight";
/// `vmproxy_waiting`: requests waiting for a `machine` to start.
pub const WAITING: &str = "vmproxy_waiting";
/// `vmproxy_idle_stop_seconds`: seconds until a `machine`'s idle stop; `NaN` when none is due.
pub const IDLE_STOP_SECONDS: &str = "vmproxy_idle_stop_seconds";
/// `vmproxy_backend_calls_total`: platform calls by `machine`, `call` and `result`.
pub const BACKEND_CALLS_TOTAL: &str = "vmproxy_backend_calls_total";

/// Histogram buckets for `vmproxy_cold_start_seconds`, in seconds: from 100 ms (a local
/// process) to 10 minutes (a large VM image).
pub const COLD_START_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
];

const STATES: [&str; 4] = ["absent", "creating", "running", "stopping"];

/// Registers the metrics' help texts and units with the installed recorder. The layer does it
/// whenever a route is built; call it again after installing a recorder later than that.
pub fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Responses produced for a route (proxied, or answered by the proxy), by status code."
    );
    describe_counter!(
        COLD_STARTS_TOTAL,
        "Machine starts by result: ok, failed, timeout (start_timeout exceeded), cancelled (by a forced stop)."
    );
    describe_histogram!(
        COLD_START_SECONDS,
        Unit::Seconds,
        "Successful machine starts by phase: backend (the platform), readiness (probing), total."
    );
    describe_gauge!(
        MACHINE_STATE,
        "1 for the machine's current state (absent, creating, running, stopping), 0 for the others."
    );
    describe_gauge!(
        IN_FLIGHT,
        "Requests being served by the machine, streams and upgraded connections included."
    );
    describe_gauge!(WAITING, "Requests waiting for the machine to start.");
    describe_gauge!(
        IDLE_STOP_SECONDS,
        Unit::Seconds,
        "Seconds until the machine's idle stop is due; NaN when none is scheduled."
    );
    describe_counter!(
        BACKEND_CALLS_TOTAL,
        "Calls to the machine's platform (Compute Engine REST methods, process spawn/terminate/kill) by result."
    );
}

/// Sets every gauge of one machine from its status: call it just before rendering a scrape, so
/// that clock-dependent gauges are current.
pub fn refresh(status: &MachineStatus) {
    let name: SharedString = status.name.clone().into();
    state(&name, status.state);
    counts(&name, status.in_flight, status.waiting, status.idle_stop_in);
}

tokio::task_local! {
    /// The route's machine name, set by the lifecycle driver around every backend future it
    /// awaits, so that a backend's calls are labelled with the route's name.
    static MACHINE: Arc<str>;
}

/// Runs `fut` with `machine` as the name its backend calls are recorded under.
pub(crate) fn scope<F: Future>(machine: &Arc<str>, fut: F) -> impl Future<Output = F::Output> {
    MACHINE.scope(machine.clone(), fut)
}

/// `fut` in the current task's machine scope: for a task spawned from it, which would otherwise
/// log and count under the backend's own name.
#[cfg(feature = "gce")]
pub(crate) fn carried<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let machine = MACHINE.try_with(Arc::clone).ok();
    async move {
        match machine {
            Some(machine) => MACHINE.scope(machine, fut).await,
            None => fut.await,
        }
    }
}

/// The name a backend call is recorded under: the route's, else the backend's own.
fn machine_or(fallback: &str) -> SharedString {
    MACHINE
        .try_with(|m| SharedString::from(m.clone()))
        .unwrap_or_else(|_| SharedString::from(fallback.to_owned()))
}

/// The machine's name for a backend's log lines: the route's (as in every other line), else
/// the backend's own when it runs outside a route.
pub(crate) fn machine_name(fallback: &str) -> Arc<str> {
    MACHINE
        .try_with(Arc::clone)
        .unwrap_or_else(|_| Arc::from(fallback))
}

/// One call to a machine's platform.
pub(crate) fn backend_call(fallback_machine: &str, call: &'static str, result: &'static str) {
    metrics::counter!(
        BACKEND_CALLS_TOTAL,
        "machine" => machine_or(fallback_machine),
        "call" => call,
        "result" => result,
    )
    .increment(1);
}

/// One response for a route.
pub(crate) fn response(machine: &Arc<str>, status: StatusCode) {
    // A counter is looked up in the recorder's registry by its name and labels (an allocation,
    // a hash and a lock): once per thread, machine, status and recorder, not per response.
    let recorder = recorder_id();
    let code = status.as_u16();
    let counter = RESPONSE_COUNTERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(found) = cache
            .iter()
            .find(|c| c.code == code && c.recorder == recorder && *c.machine == **machine)
        {
            return found.counter.clone();
        }
        let counter = metrics::counter!(
            REQUESTS_TOTAL,
            "machine" => SharedString::from(machine.clone()),
            "code" => code_label(status),
        );
        if cache.len() >= RESPONSE_COUNTERS_KEPT {
            cache.remove(0);
        }
        cache.push(CachedCounter {
            machine: machine.clone(),
            code,
            recorder,
            counter: counter.clone(),
        });
        counter
    });
    counter.increment(1);
}

/// How many (machine, status) counters each thread keeps at hand.
const RESPONSE_COUNTERS_KEPT: usize = 32;

struct CachedCounter {
    machine: Arc<str>,
    code: u16,
    recorder: usize,
    counter: metrics::Counter,
}

thread_local! {
    static RESPONSE_COUNTERS: std::cell::RefCell<Vec<CachedCounter>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Which recorder is installed (global or thread-local): a handle from another one counts
/// nowhere.
fn recorder_id() -> usize {
    metrics::with_recorder(|r| (r as *const dyn metrics::Recorder).cast::<()>() as usize)
}

fn code_label(status: StatusCode) -> SharedString {
    let s: &'static str = match status.as_u16() {
        101 => "101",
        200 => "200",
        201 => "201",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        500 => "500",
        501 => "501",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return SharedString::from(other.to_string()),
    };
    SharedString::const_str(s)
}

/// How a start ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StartResult {
    Ok,
    Failed,
    Timeout,
    /// Cancelled by a forced stop.
    Cancelled,
}

/// One start's outcome, and its phases when it succeeded.
pub(crate) fn cold_start(machine: &Arc<str>, result: StartResult, timings: Option<StartTimings>) {
    let name = SharedString::from(machine.clone());
    let result = match result {
        StartResult::Ok => "ok",
        StartResult::Failed => "failed",
        StartResult::Timeout => "timeout",
        StartResult::Cancelled => "cancelled",
    };
    metrics::counter!(COLD_STARTS_TOTAL, "machine" => name.clone(), "result" => result)
        .increment(1);
    if let Some(t) = timings {
        for (phase, d) in [
            ("backend", t.backend),
            ("readiness", t.readiness),
            ("total", t.total()),
        ] {
            metrics::histogram!(COLD_START_SECONDS, "machine" => name.clone(), "phase" => phase)
                .record(d.as_secs_f64());
        }
    }
}

/// The state gauge: 1 for `now`, 0 for the other states.
pub(crate) fn state(machine: &SharedString, now: State) {
    for s in STATES {
        let on = if s == now.name() { 1.0 } else { 0.0 };
        metrics::gauge!(MACHINE_STATE, "machine" => machine.clone(), "state" => s).set(on);
    }
}

/// One machine's count gauges, set on every admission and release: registered once per
/// recorder rather than looked up by name and labels each time (a hash and a map look-up per
/// gauge, which a request would pay twice).
pub(crate) struct Counts {
    label: SharedString,
    /// The recorder they were registered with, and the handles.
    cached: Mutex<Option<(usize, [Gauge; 3])>>,
}

impl Counts {
    pub(crate) fn new(label: SharedString) -> Self {
        Counts {
            label,
            cached: Mutex::new(None),
        }
    }

    pub(crate) fn set(&self, in_flight: usize, waiting: usize, idle_stop_in: Option<Duration>) {
        // A recorder installed after the route was built (or a thread-local one in a test) is a
        // different recorder: register with it then.
        let recorder = recorder_id();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let gauges = match &*cached {
            Some((at, gauges)) if *at == recorder => gauges,
            _ => {
                let label = &self.label;
                let gauges = [
                    metrics::gauge!(IN_FLIGHT, "machine" => label.clone()),
                    metrics::gauge!(WAITING, "machine" => label.clone()),
                    metrics::gauge!(IDLE_STOP_SECONDS, "machine" => label.clone()),
                ];
                &cached.insert((recorder, gauges)).1
            }
        };
        gauges[0].set(in_flight as f64);
        gauges[1].set(waiting as f64);
        gauges[2].set(idle_stop_in.map_or(f64::NAN, |d| d.as_secs_f64()));
    }
}

/// The count gauges and the time to the idle stop.
pub(crate) fn counts(
    machine: &SharedString,
    in_flight: usize,
    waiting: usize,
    idle_stop_in: Option<Duration>,
) {
    metrics::gauge!(IN_FLIGHT, "machine" => machine.clone()).set(in_flight as f64);
    metrics::gauge!(WAITING, "machine" => machine.clone()).set(waiting as f64);
    let idle = idle_stop_in.map_or(f64::NAN, |d| d.as_secs_f64());
    metrics::gauge!(IDLE_STOP_SECONDS, "machine" => machine.clone()).set(idle);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn count_gauges_follow_a_recorder_installed_later() {
        let counts = Counts::new(SharedString::const_str("late"));
        counts.set(1, 0, None); // no recorder yet: nothing to see, nothing kept
        let recorder = PrometheusBuilder::new().build_recorder();
        let rendered = recorder.handle();
        metrics::with_local_recorder(&recorder, || counts.set(2, 3, Some(Duration::from_secs(5))));
        let text = rendered.render();
        assert!(
            text.contains("vmproxy_in_flight{machine=\"late\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("vmproxy_waiting{machine=\"late\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("vmproxy_idle_stop_seconds{machine=\"late\"} 5"),
            "{text}"
        );
        metrics::with_local_recorder(&recorder, || counts.set(0, 0, None));
        let text = rendered.render();
        assert!(
            text.contains("vmproxy_in_flight{machine=\"late\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("vmproxy_idle_stop_seconds{machine=\"late\"} NaN"),
            "{text}"
        );
    }
}
