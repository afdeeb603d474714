//! What a machine's lifecycle shows the outside: the phase of a start in flight, how long past
//! starts took, the last error. Kept by the driver beside the state machine, which decides
//! nothing from it.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::State;

/// How many past cold starts the expected boot time is taken from.
const BOOTS_KEPT: usize = 16;

/// Where a start in flight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPhase {
    /// The platform is creating, starting or resuming the machine.
    Backend,
    /// The platform says it runs; its health path is probed until it answers 2xx.
    Readiness,
}

impl StartPhase {
    /// The phase's name: `backend` or `readiness`.
    pub fn name(&self) -> &'static str {
        match self {
            StartPhase::Backend => "backend",
            StartPhase::Readiness => "readiness",
        }
    }
}

/// How long one cold start's phases took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartTimings {
    /// The platform's start: from the request to "running".
    pub backend: Duration,
    /// Readiness probing, until the health path answered 2xx.
    pub readiness: Duration,
}

impl StartTimings {
    /// Both phases.
    pub fn total(&self) -> Duration {
        self.backend + self.readiness
    }
}

/// A snapshot of one machine, for an operator: see [`Handle::status`](super::Handle::status).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MachineStatus {
    /// The machine's name.
    pub name: String,
    /// Its state now.
    pub state: State,
    /// When it entered that state.
    pub state_since: SystemTime,
    /// During a start: which phase, and since when.
    pub starting: Option<(StartPhase, SystemTime)>,
    /// Requests being served by it (a stream or an upgraded connection counts until it ends).
    pub in_flight: usize,
    /// Requests waiting for it to start.
    pub waiting: usize,
    /// Time left before the idle stop, while it runs with nothing in flight.
    pub idle_stop_in: Option<Duration>,
    /// The last start or stop that failed, and why.
    pub last_error: Option<String>,
    /// The median of recent cold starts, backend and readiness together.
    pub boot_time: Option<Duration>,
    /// The last cold start's phases.
    pub last_start: Option<StartTimings>,
}

#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// The start in flight: its phase and when that phase began; when the start began.
    start: Option<(StartPhase, Instant, Instant)>,
    last_error: Option<String>,
    boots: VecDeque<StartTimings>,
}

impl Observed {
    pub(crate) fn start_began(&mut self, now: Instant) {
        self.start = Some((StartPhase::Backend, now, now));
    }

    pub(crate) fn probing(&mut self, now: Instant) {
        if let Some((_, _, began)) = self.start {
            self.start = Some((StartPhase::Readiness, now, began));
        }
    }

    /// The start ended; returns its phases when it succeeded.
    pub(crate) fn start_ended(&mut self, ok: bool, now: Instant) -> Option<StartTimings> {
        let (phase, phase_began, began) = self.start.take()?;
        if !ok || phase != StartPhase::Readiness {
            return None;
        }
        let timings = StartTimings {
            backend: phase_began.saturating_duration_since(began),
            readiness: now.saturating_duration_since(phase_began),
        };
        if self.boots.len() == BOOTS_KEPT {
            self.boots.pop_front();
        }
        self.boots.push_back(timings);
        Some(timings)
    }

    pub(crate) fn failed(&mut self, error: impl std::fmt::Display) {
        self.last_error = Some(error.to_string());
    }

    pub(crate) fn starting(&self) -> Option<(StartPhase, Instant)> {
        self.start.map(|(phase, at, _)| (phase, at))
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }

    pub(crate) fn last_start(&self) -> Option<StartTimings> {
        self.boots.back().copied()
    }

    /// The median of the kept cold starts.
    pub(crate) fn boot_time(&self) -> Option<Duration> {
        let mut totals: Vec<Duration> = self.boots.iter().map(StartTimings::total).collect();
        if totals.is_empty() {
            return None;
        }
        totals.sort_unstable();
        let mid = totals.len() / 2;
        Some(if totals.len() % 2 == 1 {
            totals[mid]
        } else {
            (totals[mid - 1] + totals[mid]) / 2
        })
    }
}

/// The wall-clock time of a monotonic instant in the past.
pub(crate) fn wall_clock(at: Instant, now: Instant) -> SystemTime {
    SystemTime::now() - now.saturating_duration_since(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_the_median_boot() {
        let t0 = Instant::now();
        let mut o = Observed::default();
        assert_eq!(o.boot_time(), None);
        for (backend, readiness) in [(1000, 200), (3000, 500), (2000, 100)] {
            o.start_began(t0);
            assert_eq!(o.starting().unwrap().0, StartPhase::Backend);
            o.probing(t0 + Duration::from_millis(backend));
            assert_eq!(o.starting().unwrap().0, StartPhase::Readiness);
            let t = o
                .start_ended(true, t0 + Duration::from_millis(backend + readiness))
                .unwrap();
            assert_eq!(t.backend, Duration::from_millis(backend));
            assert_eq!(t.readiness, Duration::from_millis(readiness));
        }
        assert_eq!(o.starting(), None);
        // Totals 1.2 s, 3.5 s, 2.1 s: the median is 2.1 s.
        assert_eq!(o.boot_time(), Some(Duration::from_millis(2100)));
        // A failed start is no boot.
        o.start_began(t0);
        assert_eq!(o.start_ended(false, t0), None);
        assert_eq!(o.boots.len(), 3);
    }
}
