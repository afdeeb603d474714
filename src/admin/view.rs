//! One machine as the admin API shows it (`GET /machines`, the events' payloads).

use serde_json::{json, Value};

use crate::lifecycle::{Handle, StartTimings, State};

/// `name`, `state`, `endpoint`, `in_flight`, `waiting`, `state_since` (RFC 3339, UTC),
/// `starting_phase`, `idle_stop_in_seconds`, `last_error`, `boot_seconds`, `boot_phases`,
/// `ready_in_seconds`, `last_start`, `placement`.
pub(super) fn machine(handle: &Handle) -> Value {
    let s = handle.status();
    let endpoint = match s.state {
        State::Running(ep) => Value::String(ep.to_string()),
        _ => Value::Null,
    };
    json!({
        "name": s.name,
        "state": s.state.name(),
        "endpoint": endpoint,
        "in_flight": s.in_flight,
        "waiting": s.waiting,
        "state_since": humantime::format_rfc3339_millis(s.state_since).to_string(),
        "starting_phase": s.starting.map(|(phase, _)| phase.name()),
        "idle_stop_in_seconds": s.idle_stop_in.map(|d| seconds(d.as_secs_f64())),
        "last_error": s.last_error,
        "boot_seconds": s.boot_time.map(|d| seconds(d.as_secs_f64())),
        "boot_phases": s.boot_phases.map(phases),
        "ready_in_seconds": s.ready_in.map(|d| seconds(d.as_secs_f64())),
        "last_start": s.last_start.map(phases),
        "placement": s.placement,
    })
}

fn phases(t: StartTimings) -> Value {
    json!({
        "backend_seconds": seconds(t.backend.as_secs_f64()),
        "readiness_seconds": seconds(t.readiness.as_secs_f64()),
    })
}

/// Milliseconds are precise enough, and shorter to read.
fn seconds(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}
