//! What a machine's lifecycle shows the outside: the phase of a start in flight, how long past
//! starts took and what they predict, the last error. Kept by the driver beside the state
//! machine, which takes nothing from it but the expected time to ready that deadline admission
//! is decided by.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::boot::{Boots, Progress};
use super::State;

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
    /// The median of recent cold starts' totals (backend and readiness together); `None` before
    /// the first start succeeded.
    pub boot_time: Option<Duration>,
    /// The median of recent cold starts' durations, phase by phase.
    pub boot_phases: Option<StartTimings>,
    /// How long until the machine is expected to be ready, from [`boot_time`](Self::boot_time):
    /// during a start, what is left of it (zero once overdue); while absent or stopping, a whole
    /// start. `None` while it runs, or before the first start succeeded.
    pub ready_in: Option<Duration>,
    /// The last cold start's phases.
    pub last_start: Option<StartTimings>,
    /// Where the backend says the machine runs or was last brought up, and what its last start
    /// was refused ([`Backend::placement`](crate::backend::Backend::placement)).
    pub placement: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// The start in flight: its phase and when that phase began; when the start began.
    start: Option<(StartPhase, Instant, Instant)>,
    last_error: Option<String>,
    boots: Boots,
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
        self.boots.record(timings);
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
        self.boots.last()
    }

    /// The median of the kept cold starts' totals.
    pub(crate) fn boot_time(&self) -> Option<Duration> {
        self.boots.estimate().map(|e| e.total)
    }

    /// The median of the kept cold starts' phases.
    pub(crate) fn boot_phases(&self) -> Option<StartTimings> {
        self.boots.estimate().map(|e| StartTimings {
            backend: e.backend,
            readiness: e.readiness,
        })
    }

    /// How long until a machine in `state` is expected to be ready, from past starts; `None`
    /// while it runs (a status check under way included) or with no past start.
    pub(crate) fn ready_in(&self, state: State, now: Instant) -> Option<Duration> {
        let estimate = self.boots.estimate()?;
        let progress = match (state, self.start) {
            (State::Running(_), _) => return None,
            (State::Creating, Some((StartPhase::Backend, _, began))) => {
                Progress::Backend(now.saturating_duration_since(began))
            }
            (State::Creating, Some((StartPhase::Readiness, since, _))) => {
                Progress::Readiness(now.saturating_duration_since(since))
            }
            // Creating, but its task has not begun yet: the whole start is ahead.
            (State::Creating | State::Absent | State::Stopping, _) => Progress::NotBegun,
        };
        Some(estimate.remaining(progress))
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
        assert_eq!(
            o.boot_phases(),
            Some(StartTimings {
                backend: Duration::from_millis(2000),
                readiness: Duration::from_millis(200)
            })
        );
        // A failed start is no boot.
        o.start_began(t0);
        assert_eq!(o.start_ended(false, t0), None);
        assert_eq!(o.boot_time(), Some(Duration::from_millis(2100)));
        assert_eq!(o.last_start().unwrap().total(), Duration::from_millis(2100));
    }

    #[test]
    fn the_time_to_ready_follows_the_start_in_flight() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut o = Observed::default();
        assert_eq!(o.ready_in(State::Absent, t0), None, "no past start");
        o.start_began(t0);
        o.probing(t0 + ms(4000));
        o.start_ended(true, t0 + ms(5000));
        // Backend 4 s, readiness 1 s.
        assert_eq!(o.ready_in(State::Absent, t0), Some(ms(5000)));
        assert_eq!(o.ready_in(State::Stopping, t0), Some(ms(5000)));
        let ep = crate::backend::Endpoint::new(([127, 0, 0, 1], 1).into());
        assert_eq!(o.ready_in(State::Running(ep), t0), None);
        // Creating, its task not begun yet.
        assert_eq!(o.ready_in(State::Creating, t0), Some(ms(5000)));
        let t1 = t0 + ms(60_000);
        o.start_began(t1);
        assert_eq!(o.ready_in(State::Creating, t1 + ms(1500)), Some(ms(3500)));
        assert_eq!(
            o.ready_in(State::Creating, t1 + ms(4500)),
            Some(ms(1000)),
            "late on the platform: the probing is still ahead"
        );
        o.probing(t1 + ms(4500));
        assert_eq!(o.ready_in(State::Creating, t1 + ms(4800)), Some(ms(700)));
        assert_eq!(o.ready_in(State::Creating, t1 + ms(9000)), Some(ms(0)));
    }
}
