//! What a machine's past cold starts predict about its next one: a bounded history of the
//! successful starts' phase durations, and the median of each.
//!
//! The median, not the mean nor a high percentile. One odd start (an image pulled for the first
//! time, a zone fallback after a stockout) moves a mean far and a median not at all. And an
//! estimate that errs high does harm where one that errs low does not: deadline admission would
//! refuse requests that would have been served in time, and `Retry-After` would keep clients
//! away from a machine already up; an estimate that errs low only falls back to today's
//! behaviour (the request waits, and may meet its 504). Pure: no clock, no I/O.

use std::collections::VecDeque;
use std::time::Duration;

use super::StartTimings;

/// How many past cold starts the estimate is taken from: enough that one odd start does not
/// move the median, few enough that a machine whose boot got slower is learned within a day.
pub(crate) const KEPT: usize = 16;

/// The recent successful cold starts of one machine, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Boots {
    recent: VecDeque<StartTimings>,
    /// Recomputed when a start is recorded, so that reading it costs nothing.
    estimate: Option<Estimate>,
}

/// The expected durations of a start: each phase's median and the median of the totals (which
/// is not the sum of the phases' medians).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Estimate {
    pub(crate) backend: Duration,
    pub(crate) readiness: Duration,
    pub(crate) total: Duration,
}

/// How far a start has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// None is under way (the machine is absent, or stopping first): a whole start is ahead.
    NotBegun,
    /// The platform is starting the machine; the start began this long ago.
    Backend(Duration),
    /// The platform says it runs; readiness has been probed for this long.
    Readiness(Duration),
}

impl Boots {
    /// One more successful start; the oldest is forgotten past [`KEPT`].
    pub(crate) fn record(&mut self, start: StartTimings) {
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(start);
        let phase = |f: fn(&StartTimings) -> Duration| {
            median(self.recent.iter().map(f)).expect("one start was just recorded")
        };
        self.estimate = Some(Estimate {
            backend: phase(|t| t.backend),
            readiness: phase(|t| t.readiness),
            total: phase(StartTimings::total),
        });
    }

    /// What the kept starts predict; `None` before the first one.
    pub(crate) fn estimate(&self) -> Option<Estimate> {
        self.estimate
    }

    /// The last start recorded.
    pub(crate) fn last(&self) -> Option<StartTimings> {
        self.recent.back().copied()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.recent.len()
    }
}

impl Estimate {
    /// The time still expected before the machine is ready, from `at`. Zero once the start is
    /// overdue in its last phase; while the platform is still starting it, at least the
    /// readiness phase, which has not begun.
    pub(crate) fn remaining(&self, at: Progress) -> Duration {
        match at {
            Progress::NotBegun => self.total,
            Progress::Backend(spent) => self.total.saturating_sub(spent).max(self.readiness),
            Progress::Readiness(spent) => self.readiness.saturating_sub(spent),
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` for none.
fn median(values: impl Iterator<Item = Duration>) -> Option<Duration> {
    let mut sorted = [Duration::ZERO; KEPT];
    let mut n = 0;
    for v in values.take(KEPT) {
        sorted[n] = v;
        n += 1;
    }
    let sorted = &mut sorted[..n];
    sorted.sort_unstable();
    let mid = n / 2;
    match n {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn boot(backend: u64, readiness: u64) -> StartTimings {
        StartTimings {
            backend: ms(backend),
            readiness: ms(readiness),
        }
    }

    #[test]
    fn no_estimate_before_the_first_start() {
        let boots = Boots::default();
        assert_eq!(boots.estimate(), None);
        assert_eq!(boots.last(), None);
    }

    #[test]
    fn one_start_is_its_own_estimate() {
        let mut boots = Boots::default();
        boots.record(boot(3000, 500));
        assert_eq!(
            boots.estimate(),
            Some(Estimate {
                backend: ms(3000),
                readiness: ms(500),
                total: ms(3500)
            })
        );
        assert_eq!(boots.last(), Some(boot(3000, 500)));
    }

    #[test]
    fn each_phase_and_the_total_take_their_own_median() {
        let mut boots = Boots::default();
        // Totals 10 s each; the phases' medians are 5 s each, and the total's is 10 s.
        for (b, r) in [(1000, 9000), (9000, 1000), (5000, 5000)] {
            boots.record(boot(b, r));
        }
        let e = boots.estimate().unwrap();
        assert_eq!(
            (e.backend, e.readiness, e.total),
            (ms(5000), ms(5000), ms(10_000))
        );
        // An even count: the mean of the middle two (totals 8, 10, 10, 10 s).
        boots.record(boot(7000, 1000));
        let e = boots.estimate().unwrap();
        assert_eq!(
            (e.backend, e.readiness, e.total),
            (ms(6000), ms(3000), ms(10_000))
        );
        boots.record(boot(1000, 1000));
        boots.record(boot(1000, 1000));
        // Totals 2, 2, 8, 10, 10, 10 s.
        assert_eq!(boots.estimate().unwrap().total, ms(9000));
    }

    #[test]
    fn one_odd_start_does_not_move_it() {
        let mut boots = Boots::default();
        for _ in 0..4 {
            boots.record(boot(2000, 200));
        }
        // A first pull of an image, a fallback to another zone: ten times as long, once.
        boots.record(boot(20_000, 2000));
        assert_eq!(boots.estimate().unwrap().total, ms(2200));
        assert_eq!(boots.last(), Some(boot(20_000, 2000)));
    }

    #[test]
    fn only_the_recent_starts_are_kept() {
        let mut boots = Boots::default();
        for _ in 0..KEPT {
            boots.record(boot(30_000, 1000));
        }
        assert_eq!(boots.estimate().unwrap().total, ms(31_000));
        // The machine got faster: once most kept starts are fast, so is the estimate.
        for _ in 0..KEPT / 2 + 1 {
            boots.record(boot(1000, 100));
        }
        assert_eq!(boots.len(), KEPT);
        assert_eq!(boots.estimate().unwrap().total, ms(1100));
        for _ in 0..KEPT {
            boots.record(boot(1000, 100));
        }
        assert_eq!(boots.len(), KEPT, "bounded");
    }

    #[test]
    fn the_time_left_follows_the_phase() {
        let e = Estimate {
            backend: ms(8000),
            readiness: ms(2000),
            total: ms(10_000),
        };
        assert_eq!(e.remaining(Progress::NotBegun), ms(10_000));
        assert_eq!(e.remaining(Progress::Backend(ms(0))), ms(10_000));
        assert_eq!(e.remaining(Progress::Backend(ms(3000))), ms(7000));
        // The platform is slower than usual: the probing is still ahead.
        assert_eq!(e.remaining(Progress::Backend(ms(9500))), ms(2000));
        assert_eq!(e.remaining(Progress::Backend(ms(60_000))), ms(2000));
        // The platform was quick: only the probing's expected time is left, whatever the total.
        assert_eq!(e.remaining(Progress::Readiness(ms(500))), ms(1500));
        assert_eq!(e.remaining(Progress::Readiness(ms(5000))), ms(0), "overdue");
    }
}
