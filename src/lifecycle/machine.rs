//! The lifecycle's decisions as a pure state machine: no I/O, no clock of its own.
//!
//! Every method takes the current time and returns what the driver must do next, so the
//! rules of DESIGN.md are tested here without sockets, tasks or sleeps.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Endpoint;
use crate::BoxError;

/// The phase of one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not running; the next request starts it.
    Absent,
    /// A start (create, start or resume, then readiness probe) is in flight.
    Creating,
    /// Up and answering at this endpoint.
    Running(Endpoint),
    /// Being taken down; requests that arrive now wait and start it again.
    Stopping,
}

impl State {
    /// The phase's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            State::Absent => "absent",
            State::Creating => "creating",
            State::Running(_) => "running",
            State::Stopping => "stopping",
        }
    }
}

/// Limits that shape the decisions.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) max_pending: usize,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) start_backoff: Duration,
    pub(crate) max_start_backoff: Duration,
    /// A machine lost within this long of becoming ready counts as a failed start (a crash
    /// loop); zero turns the rule off.
    pub(crate) min_uptime: Duration,
}

/// I/O the driver must perform after a decision.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Action {
    None,
    /// Spawn the start task.
    Start,
    /// Call the backend's stop now.
    Stop,
}

/// The answer to a request that wants the machine.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Running: the request is counted in flight; send it here.
    Ready(Endpoint),
    /// Not running yet: the request is counted pending and waits with this ticket.
    Wait { ticket: Ticket, action: Action },
    /// Refused at once.
    Reject(Reject),
}

/// The answer to a request that will not wait for the machine (a browser shown the waiting
/// page instead).
#[derive(Debug)]
pub(crate) enum Wake {
    /// Running: the request is counted in flight, as with [`Admit::Ready`].
    Ready(Endpoint),
    /// Not running. The start is under way, or set going by this call (`Action::Start`), or will
    /// follow the stop or status check under way.
    NotYet(Action),
    /// In the pause after a failed start: no start now.
    BackingOff {
        error: Arc<BoxError>,
        retry_after: Duration,
    },
}

/// Why a request was refused without waiting.
#[derive(Debug)]
pub(crate) enum Reject {
    Overloaded {
        max_pending: usize,
    },
    BackingOff {
        error: Arc<BoxError>,
        retry_after: Duration,
    },
    /// Deadline admission: the machine is expected to be ready later than the request would
    /// wait. Its start is set going (or wanted after the stop under way) by this refusal, as by
    /// a waiting page, so that a later request finds the machine up.
    TooSlow {
        deadline: Deadline,
        action: Action,
    },
}

/// What deadline admission weighs: how long a request would wait for a start, and how long the
/// start is expected to take still (from past starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    pub(crate) wait: Duration,
    pub(crate) expected: Duration,
}

impl Deadline {
    /// Whether the request would meet its deadline, as far as past starts tell.
    pub(crate) fn met(&self) -> bool {
        self.expected <= self.wait
    }
}

/// What a waiter holds: the failure count when it began to wait, so it learns of a failed start
/// that happened after it arrived and of no earlier one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    failures: u64,
}

/// A waiter's look at the state after a change.
#[derive(Debug)]
pub(crate) enum Claim {
    Ready(Endpoint),
    Failed {
        error: Arc<BoxError>,
        retry_after: Duration,
    },
    Wait,
}

/// When the idle loop should act next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Idle {
    /// The idle deadline passed with nothing in flight: stop is due (after asking the backend).
    Due,
    /// Look again at this moment.
    At(Instant),
    /// Nothing to watch: not running, or scale-to-zero disabled.
    Never,
}

/// The state of one machine and the counts the rules need.
#[derive(Debug)]
pub(crate) struct Machine {
    state: State,
    since: Instant,
    limits: Limits,
    /// Requests sent to the machine whose response (body or upgraded connection) has not ended.
    in_flight: usize,
    /// Requests waiting for the machine to run.
    pending: usize,
    last_active: Instant,
    /// Failed starts so far; waiters compare it with their ticket.
    failures: u64,
    /// Failed starts since the machine last ran healthily (for `min_uptime`, or until we stopped
    /// it): the exponent of the back-off.
    consecutive_failures: u32,
    last_failure: Option<Arc<BoxError>>,
    backoff_until: Option<Instant>,
    /// `stop()` was asked while a start was in flight.
    stop_after_start: bool,
    /// A forced stop was asked while a start was in flight: its driver abandons the start. Only
    /// set while Creating and cleared when a start begins, so a cancel asked before the driver
    /// looks is not lost and never reaches a later start (there is one start per Creating).
    cancel_start: bool,
    /// Stopping: the backend's stop was issued (it waits for in-flight requests first).
    stop_issued: bool,
    /// Running, but a connect error made us ask the backend whether the machine is still there.
    suspect: bool,
    /// The endpoint while stopping, to fall back to if the stop fails.
    stopping_endpoint: Option<Endpoint>,
    /// Increments every time the machine becomes Running.
    generation: u64,
    /// When the machine last became ready (a failed stop that keeps it does not move this).
    ready_at: Instant,
    /// When this proxy last told the backend it served traffic.
    last_recorded: Option<Instant>,
    /// A request that does not wait (a waiting page) asked for the machine during a stop or a
    /// status check: start it once that is over, as for a waiter, though none may be left.
    wanted: bool,
    /// What a failed start left could not be removed (the backend's stop failed): it may still
    /// run, and bill, though the machine is recorded absent. Cleared by the next start that
    /// succeeds (which finds it again) or stop that does.
    leftover: bool,
}

impl Machine {
    pub(crate) fn new(limits: Limits, now: Instant) -> Self {
        Machine {
            state: State::Absent,
            since: now,
            limits,
            in_flight: 0,
            pending: 0,
            last_active: now,
            failures: 0,
            consecutive_failures: 0,
            last_failure: None,
            backoff_until: None,
            stop_after_start: false,
            cancel_start: false,
            stop_issued: false,
            suspect: false,
            stopping_endpoint: None,
            generation: 0,
            ready_at: now,
            last_recorded: None,
            wanted: false,
            leftover: false,
        }
    }

    /// Whether to tell the backend that this proxy serves traffic: at most every
    /// `idle_timeout / 4`, so that replicas sharing the machine see it in use.
    pub(crate) fn activity_report_due(&mut self, now: Instant) -> bool {
        let Some(timeout) = self.limits.idle_timeout else {
            return false;
        };
        if !matches!(self.state, State::Running(_)) {
            return false;
        }
        match self.last_recorded {
            Some(at) if now.saturating_duration_since(at) < timeout / 4 => false,
            _ => {
                self.last_recorded = Some(now);
                true
            }
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// How long the current phase has lasted.
    pub(crate) fn phase_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Failed starts so far.
    pub(crate) fn failures(&self) -> u64 {
        self.failures
    }

    /// The last failed start's error, and how long starts still back off from `now`.
    pub(crate) fn last_failure(&self, now: Instant) -> Option<(Arc<BoxError>, Duration)> {
        let error = self.last_failure.clone()?;
        let left = self
            .backoff_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        Some((error, left))
    }

    fn set(&mut self, state: State, now: Instant) {
        if matches!(state, State::Creating | State::Running(_)) {
            // Whatever wanted the machine has it now (or has its start under way).
            self.wanted = false;
        }
        if state == State::Creating {
            self.cancel_start = false;
        }
        self.state = state;
        self.since = now;
    }

    /// A request wants the machine. With a `deadline` (deadline admission, and a past start to
    /// judge by), a request that would not meet it is refused at once instead of waiting for its
    /// 504; the start goes on, or is begun, all the same.
    pub(crate) fn admit(&mut self, now: Instant, deadline: Option<Deadline>) -> Admit {
        if let State::Running(ep) = self.state {
            if !self.suspect {
                self.in_flight += 1;
                self.last_active = now;
                return Admit::Ready(ep);
            }
        }
        let starting = matches!(
            self.state,
            State::Absent | State::Creating | State::Stopping
        );
        if let Some(deadline) = deadline.filter(|d| starting && !d.met()) {
            // Started as for a page: a refused request must not leave the machine down, or
            // deadline admission would refuse every request forever.
            return Admit::Reject(match self.wake(now) {
                Wake::NotYet(action) => Reject::TooSlow { deadline, action },
                Wake::BackingOff { error, retry_after } => {
                    Reject::BackingOff { error, retry_after }
                }
                Wake::Ready(_) => unreachable!("not running"),
            });
        }
        if self.pending >= self.limits.max_pending {
            return Admit::Reject(Reject::Overloaded {
                max_pending: self.limits.max_pending,
            });
        }
        let mut action = Action::None;
        if self.state == State::Absent {
            if let (Some(until), Some(error)) = (self.backoff_until, &self.last_failure) {
                if until > now {
                    return Admit::Reject(Reject::BackingOff {
                        error: error.clone(),
                        retry_after: until - now,
                    });
                }
            }
            self.set(State::Creating, now);
            action = Action::Start;
        }
        self.pending += 1;
        Admit::Wait {
            ticket: Ticket {
                failures: self.failures,
            },
            action,
        }
    }

    /// A request wants the machine but will not wait for it: served if it runs, else the start
    /// is set going (or wanted after the stop or status check under way) with nobody counted
    /// pending, so neither `max_pending` nor an idle stop is held up by it.
    pub(crate) fn wake(&mut self, now: Instant) -> Wake {
        match self.state {
            State::Running(ep) if !self.suspect => {
                self.in_flight += 1;
                self.last_active = now;
                Wake::Ready(ep)
            }
            State::Running(_) | State::Stopping => {
                self.wanted = true;
                Wake::NotYet(Action::None)
            }
            State::Creating => Wake::NotYet(Action::None),
            State::Absent => {
                if let (Some(until), Some(error)) = (self.backoff_until, &self.last_failure) {
                    if until > now {
                        return Wake::BackingOff {
                            error: error.clone(),
                            retry_after: until - now,
                        };
                    }
                }
                self.set(State::Creating, now);
                Wake::NotYet(Action::Start)
            }
        }
    }

    /// A waiter looks at the state after being woken.
    pub(crate) fn claim(&mut self, ticket: Ticket, now: Instant) -> Claim {
        if self.failures > ticket.failures {
            self.pending -= 1;
            let error = self
                .last_failure
                .clone()
                .expect("a failure count implies an error");
            let retry_after = self
                .backoff_until
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
            return Claim::Failed { error, retry_after };
        }
        match self.state {
            State::Running(ep) if !self.suspect => {
                self.pending -= 1;
                self.in_flight += 1;
                self.last_active = now;
                Claim::Ready(ep)
            }
            _ => Claim::Wait,
        }
    }

    /// A waiter gave up (deadline passed, or its client went away).
    pub(crate) fn abandon(&mut self) {
        self.pending -= 1;
    }

    /// The start task finished: the machine runs and answered its readiness probe.
    pub(crate) fn start_succeeded(&mut self, ep: Endpoint, now: Instant) -> Action {
        debug_assert_eq!(self.state, State::Creating);
        debug_assert!(
            !self.cancel_start,
            "a cancelled start is cleaned up, not served"
        );
        self.set(State::Running(ep), now);
        self.generation += 1;
        self.last_active = now;
        self.ready_at = now;
        self.leftover = false;
        // The failure count is kept until the run proves healthy (see `gone` and `begin_stop`):
        // a machine that dies right after every start backs off exponentially.
        self.backoff_until = None;
        self.suspect = false;
        if std::mem::take(&mut self.stop_after_start) {
            return self.begin_stop(now);
        }
        Action::None
    }

    /// The start task failed, or was cancelled by a forced stop, and whatever it started was
    /// cleaned up: every waiter gets the error. A failure makes starts back off; a cancelled
    /// start failed at nothing, so the next request may start the machine at once.
    pub(crate) fn start_failed(&mut self, error: Arc<BoxError>, now: Instant) {
        debug_assert_eq!(self.state, State::Creating);
        self.set(State::Absent, now);
        self.stop_after_start = false;
        if std::mem::take(&mut self.cancel_start) {
            // Nothing left to start for: the forced stop answers every wish as it answers the
            // waiters, with the error.
            self.wanted = false;
            self.failures += 1;
            self.last_failure = Some(error);
            self.backoff_until = None;
        } else {
            self.fail(error, now);
        }
    }

    /// Whether a forced stop cancelled the start in flight. The start's driver asks under the
    /// lock, so a start that became ready just as it was cancelled is taken down all the same.
    pub(crate) fn start_cancelled(&self) -> bool {
        self.state == State::Creating && self.cancel_start
    }

    /// A failed start (or a machine lost right after it): every waiter gets the error, and
    /// starts back off, 1, 2, 4… times `start_backoff` up to `max_start_backoff`.
    fn fail(&mut self, error: Arc<BoxError>, now: Instant) {
        // A wish to start is answered by the back-off, as a waiter is by the error.
        self.wanted = false;
        self.failures += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_failure = Some(error);
        let exp = self.consecutive_failures.saturating_sub(1).min(16);
        let backoff = self
            .limits
            .start_backoff
            .saturating_mul(1 << exp)
            .min(self.limits.max_start_backoff);
        self.backoff_until = Some(now + backoff);
    }

    /// A request's response (or upgraded connection) ended.
    pub(crate) fn release(&mut self, now: Instant) -> Action {
        self.in_flight -= 1;
        self.last_active = now;
        if self.state == State::Stopping && !self.stop_issued && self.in_flight == 0 {
            self.stop_issued = true;
            return Action::Stop;
        }
        Action::None
    }

    /// When the idle stop is due, as things stand: running, scale-to-zero on, nothing in flight
    /// or waiting.
    pub(crate) fn idle_stop_at(&self) -> Option<Instant> {
        match (self.state, self.limits.idle_timeout) {
            (State::Running(_), Some(timeout))
                if self.in_flight == 0 && self.pending == 0 && !self.suspect =>
            {
                Some(self.last_active + timeout)
            }
            _ => None,
        }
    }

    /// When the idle loop should act.
    pub(crate) fn idle(&self, now: Instant) -> Idle {
        let (State::Running(_), Some(timeout)) = (self.state, self.limits.idle_timeout) else {
            return Idle::Never;
        };
        let deadline = self.last_active + timeout;
        if self.in_flight == 0 && self.pending == 0 && !self.suspect && now >= deadline {
            Idle::Due
        } else if now >= deadline {
            // Busy now; a release moves last_active, so look again a full period later.
            Idle::At(now + timeout)
        } else {
            Idle::At(deadline)
        }
    }

    /// Another replica is still using the machine: count that as activity here.
    pub(crate) fn touch(&mut self, now: Instant) {
        self.last_active = now;
    }

    /// Take the machine down: now if nothing is in flight, else when the last request ends.
    /// During a start, the stop happens once the start is done.
    pub(crate) fn begin_stop(&mut self, now: Instant) -> Action {
        match self.state {
            State::Running(ep) => {
                // Taken down by us, not lost: the run did not fail.
                self.consecutive_failures = 0;
                self.set(State::Stopping, now);
                self.suspect = false;
                self.stopping_endpoint = Some(ep);
                self.stop_issued = self.in_flight == 0;
                if self.stop_issued {
                    Action::Stop
                } else {
                    Action::None
                }
            }
            State::Creating => {
                self.stop_after_start = true;
                Action::None
            }
            State::Absent | State::Stopping => Action::None,
        }
    }

    /// Take the machine down now, without waiting for requests in flight. A start in flight is
    /// cancelled rather than waited for (its readiness may never come): its driver sees
    /// [`start_cancelled`](Machine::start_cancelled), cleans up what it started and reports
    /// [`start_failed`](Machine::start_failed).
    pub(crate) fn force_stop(&mut self, now: Instant) -> Action {
        match self.state {
            State::Running(_) => {
                // Nothing in flight: begin_stop has issued the stop itself.
                if self.begin_stop(now) == Action::Stop {
                    return Action::Stop;
                }
            }
            State::Creating => {
                self.cancel_start = true;
                return Action::None;
            }
            State::Absent | State::Stopping => {}
        }
        if self.state == State::Stopping && !self.stop_issued {
            self.stop_issued = true;
            return Action::Stop;
        }
        Action::None
    }

    /// The backend's stop after a failed start failed: whatever the start made may still run.
    pub(crate) fn cleanup_failed(&mut self) {
        self.leftover = true;
    }

    /// Whether a failed start left something the backend could not remove (see
    /// [`cleanup_failed`](Self::cleanup_failed)).
    pub(crate) fn leftover(&self) -> bool {
        self.leftover
    }

    /// The backend's stop returned. Requests that arrived meanwhile start the machine again.
    pub(crate) fn stop_done(&mut self, now: Instant) -> Action {
        debug_assert_eq!(self.state, State::Stopping);
        self.stop_issued = false;
        self.leftover = false;
        self.stopping_endpoint = None;
        self.set(State::Absent, now);
        self.restart_if_wanted(now)
    }

    /// The backend's stop failed: the machine is presumably still up, so keep using it and
    /// try again after another idle period.
    pub(crate) fn stop_failed(&mut self, now: Instant) -> Action {
        self.stop_issued = false;
        match self.stopping_endpoint.take() {
            Some(ep) => {
                self.set(State::Running(ep), now);
                self.last_active = now;
                Action::None
            }
            None => {
                self.set(State::Absent, now);
                self.restart_if_wanted(now)
            }
        }
    }

    /// A connect error at `ep`: returns true for the first report, whose caller asks the backend
    /// for the machine's status while every other request waits for the answer.
    pub(crate) fn suspect(&mut self, ep: Endpoint) -> bool {
        if self.state == State::Running(ep) && !self.suspect {
            self.suspect = true;
            true
        } else {
            false
        }
    }

    /// The status check after [`suspect`](Machine::suspect) or a periodic one found the machine
    /// still running at `ep`.
    pub(crate) fn alive(&mut self, ep: Endpoint) {
        if self.state == State::Running(ep) {
            self.suspect = false;
            self.wanted = false;
        }
    }

    /// The machine at `ep` is gone (preempted, deleted, exited): forget it; the next request, or a
    /// waiting one, starts it again.
    ///
    /// Unless it was lost within `min_uptime` of becoming ready: then it counts as a failed start
    /// (a crash loop), so waiters get the error and starts back off instead of one restart per
    /// request.
    pub(crate) fn gone(&mut self, ep: Endpoint, now: Instant) -> Action {
        if self.state != State::Running(ep) {
            return Action::None;
        }
        self.suspect = false;
        self.set(State::Absent, now);
        let uptime = now.saturating_duration_since(self.ready_at);
        if uptime < self.limits.min_uptime {
            let error = format!("it went down {} after becoming ready", short(uptime));
            self.fail(Arc::new(error.into()), now);
            return Action::None;
        }
        self.consecutive_failures = 0;
        self.restart_if_wanted(now)
    }

    fn restart_if_wanted(&mut self, now: Instant) -> Action {
        if self.pending > 0 || self.wanted {
            self.set(State::Creating, now);
            Action::Start
        } else {
            Action::None
        }
    }
}

/// A short duration for a message: "350 ms", "2.5 s".
fn short(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn activity_reports_are_throttled() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        assert!(!m.activity_report_due(t), "nothing to report while absent");
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        assert!(m.activity_report_due(t));
        assert!(!m.activity_report_due(t + Duration::from_secs(14)));
        assert!(m.activity_report_due(t + Duration::from_secs(15)));
    }

    #[test]
    fn a_failed_cleanup_is_remembered_until_a_start_succeeds() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        m.start_failed(err("no capacity"), t);
        assert!(!m.leftover(), "the cleanup succeeded");
        let later = t + Duration::from_secs(10);
        let _ = wait(m.admit(later, None));
        m.start_failed(err("never ready"), later);
        m.cleanup_failed();
        assert!(m.leftover());
        assert_eq!(m.state(), State::Absent);
        let again = later + Duration::from_secs(60);
        let _ = wait(m.admit(again, None));
        assert!(m.leftover(), "still there while the next start runs");
        let _ = m.start_succeeded(ep(1), again);
        assert!(!m.leftover(), "the start found the machine again");
    }

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_pending: 3,
            idle_timeout: Some(Duration::from_secs(60)),
            start_backoff: Duration::from_secs(1),
            max_start_backoff: Duration::from_secs(8),
            min_uptime: Duration::from_secs(10),
        }
    }

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(([127, 0, 0, 1], port).into())
    }

    fn err(msg: &str) -> Arc<BoxError> {
        Arc::new(msg.into())
    }

    fn wait(admit: Admit) -> (Ticket, Action) {
        match admit {
            Admit::Wait { ticket, action } => (ticket, action),
            other => panic!("expected Wait, got {other:?}"),
        }
    }

    #[test]
    fn first_request_starts_and_later_ones_coalesce() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (a, act) = wait(m.admit(t, None));
        assert_eq!(act, Action::Start);
        let (b, act) = wait(m.admit(t, None));
        assert_eq!(
            act,
            Action::None,
            "a second request must not start the machine again"
        );
        assert_eq!(m.state(), State::Creating);
        assert!(matches!(m.claim(a, t), Claim::Wait));
        assert_eq!(m.start_succeeded(ep(1), t), Action::None);
        assert!(matches!(m.claim(a, t), Claim::Ready(e) if e == ep(1)));
        assert!(matches!(m.claim(b, t), Claim::Ready(e) if e == ep(1)));
        assert_eq!((m.pending(), m.in_flight()), (0, 2));
        assert!(matches!(m.admit(t, None), Admit::Ready(_)));
        assert_eq!(m.in_flight(), 3);
    }

    #[test]
    fn pending_is_bounded() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        for _ in 0..3 {
            let _ = wait(m.admit(t, None));
        }
        assert!(matches!(
            m.admit(t, None),
            Admit::Reject(Reject::Overloaded { max_pending: 3 })
        ));
        m.abandon();
        let _ = wait(m.admit(t, None));
    }

    #[test]
    fn failed_start_fails_every_waiter_then_backs_off_exponentially() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (a, _) = wait(m.admit(t, None));
        let (b, _) = wait(m.admit(t, None));
        m.start_failed(err("boom"), t);
        assert_eq!(m.state(), State::Absent);
        for ticket in [a, b] {
            match m.claim(ticket, t) {
                Claim::Failed { error, retry_after } => {
                    assert_eq!(error.to_string(), "boom");
                    assert_eq!(retry_after, Duration::from_secs(1));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(m.pending(), 0);
        // During the back-off: refused at once with the reason.
        match m.admit(t + Duration::from_millis(500), None) {
            Admit::Reject(Reject::BackingOff { error, retry_after }) => {
                assert_eq!(error.to_string(), "boom");
                assert_eq!(retry_after, Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
        // After it: a new start.
        let t2 = t + Duration::from_secs(1);
        let (c, act) = wait(m.admit(t2, None));
        assert_eq!(act, Action::Start);
        m.start_failed(err("boom again"), t2);
        assert!(
            matches!(m.claim(c, t2), Claim::Failed { retry_after, .. } if retry_after == Duration::from_secs(2))
        );
        // A success resets the back-off.
        let t3 = t2 + Duration::from_secs(2);
        let (d, act) = wait(m.admit(t3, None));
        assert_eq!(act, Action::Start);
        let _ = m.start_succeeded(ep(2), t3);
        assert!(matches!(m.claim(d, t3), Claim::Ready(_)));
    }

    #[test]
    fn backoff_is_capped() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let mut now = t;
        for _ in 0..10 {
            let (_, act) = wait(m.admit(now, None));
            assert_eq!(act, Action::Start);
            m.start_failed(err("x"), now);
            m.abandon();
            now += Duration::from_secs(8);
        }
        match m.admit(now - Duration::from_secs(8), None) {
            Admit::Reject(Reject::BackingOff { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(8))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_waiter_does_not_see_failures_from_before_it_arrived() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        m.start_failed(err("old"), t);
        m.abandon();
        let later = t + Duration::from_secs(5);
        let (a, act) = wait(m.admit(later, None));
        assert_eq!(act, Action::Start);
        assert!(matches!(m.claim(a, later), Claim::Wait));
    }

    #[test]
    fn idle_stop_only_with_nothing_in_flight() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (a, _) = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        assert!(matches!(m.claim(a, t), Claim::Ready(_)));
        let later = t + Duration::from_secs(61);
        assert_eq!(
            m.idle(later),
            Idle::At(later + Duration::from_secs(60)),
            "in flight: not idle"
        );
        assert_eq!(m.release(later), Action::None);
        assert_eq!(m.idle(later), Idle::At(later + Duration::from_secs(60)));
        let due = later + Duration::from_secs(60);
        assert_eq!(m.idle(due), Idle::Due);
        assert_eq!(m.begin_stop(due), Action::Stop);
        assert_eq!(m.state(), State::Stopping);
        assert_eq!(m.idle(due), Idle::Never);
        assert_eq!(m.stop_done(due), Action::None);
        assert_eq!(m.state(), State::Absent);
    }

    #[test]
    fn idle_can_be_disabled() {
        let t = Instant::now();
        let mut m = Machine::new(
            Limits {
                idle_timeout: None,
                ..limits()
            },
            t,
        );
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert_eq!(m.idle(t + Duration::from_secs(1 << 30)), Idle::Never);
    }

    #[test]
    fn request_during_stopping_waits_and_restarts() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert_eq!(m.begin_stop(t), Action::Stop);
        let (a, act) = wait(m.admit(t, None));
        assert_eq!(act, Action::None, "no start while the stop is in flight");
        assert!(matches!(m.claim(a, t), Claim::Wait));
        assert_eq!(m.stop_done(t), Action::Start);
        assert_eq!(m.state(), State::Creating);
        let _ = m.start_succeeded(ep(2), t);
        assert!(matches!(m.claim(a, t), Claim::Ready(e) if e == ep(2)));
    }

    #[test]
    fn explicit_stop_waits_for_in_flight() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        assert!(matches!(m.admit(t, None), Admit::Wait { .. }));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert!(matches!(m.admit(t, None), Admit::Ready(_)));
        assert_eq!(m.begin_stop(t), Action::None, "one request in flight");
        assert_eq!(m.release(t), Action::Stop);
        assert_eq!(m.stop_done(t), Action::None);
    }

    #[test]
    fn force_stop_does_not_wait_for_in_flight() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        assert!(matches!(m.admit(t, None), Admit::Wait { .. }));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert!(matches!(m.admit(t, None), Admit::Ready(_)));
        assert_eq!(m.begin_stop(t), Action::None);
        assert_eq!(m.force_stop(t), Action::Stop);
        assert_eq!(m.force_stop(t), Action::None, "one stop");
        assert_eq!(m.stop_done(t), Action::None);
        assert_eq!(
            m.release(t),
            Action::None,
            "a late release issues no second stop"
        );
        assert_eq!(m.in_flight(), 0);
    }

    #[test]
    fn stop_during_start_happens_after_it() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        m.abandon();
        assert_eq!(m.begin_stop(t), Action::None);
        assert!(
            !m.start_cancelled(),
            "a graceful stop lets the start finish"
        );
        assert_eq!(m.start_succeeded(ep(1), t), Action::Stop);
        assert_eq!(m.state(), State::Stopping);
    }

    #[test]
    fn a_forced_stop_cancels_the_start_and_its_waiters_get_the_error_without_a_back_off() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (a, act) = wait(m.admit(t, None));
        assert_eq!(act, Action::Start);
        assert!(!m.start_cancelled());
        assert_eq!(
            m.force_stop(t),
            Action::None,
            "the start's driver cleans up, no stop of its own"
        );
        assert!(m.start_cancelled());
        assert_eq!(m.force_stop(t), Action::None, "asked twice, cancelled once");
        // Until the cleanup is done the machine stays Creating: nothing starts it meanwhile.
        assert_eq!(m.state(), State::Creating);
        let (b, act) = wait(m.admit(t, None));
        assert_eq!(act, Action::None);
        assert!(matches!(m.wake(t), Wake::NotYet(Action::None)));
        assert!(matches!(m.claim(a, t), Claim::Wait));

        let later = t + Duration::from_millis(200);
        m.start_failed(err("cancelled"), later);
        assert_eq!(m.state(), State::Absent);
        assert!(!m.start_cancelled());
        for ticket in [a, b] {
            match m.claim(ticket, later) {
                Claim::Failed { error, retry_after } => {
                    assert_eq!(error.to_string(), "cancelled");
                    assert_eq!(retry_after, Duration::ZERO, "no back-off to wait out");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(m.pending(), 0);
        // The next request starts it at once, and that start is not cancelled.
        let (c, act) = wait(m.admit(later, None));
        assert_eq!(act, Action::Start);
        assert!(!m.start_cancelled());
        // A cancelled start is no failed one: a real failure next backs off from the start.
        m.start_failed(err("boom"), later);
        assert!(
            matches!(m.claim(c, later), Claim::Failed { retry_after, .. } if retry_after == Duration::from_secs(1))
        );
        assert_eq!(
            backing_off(&mut m, later),
            ("boom".to_owned(), Duration::from_secs(1))
        );
    }

    #[test]
    fn a_cancel_never_reaches_a_later_start() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        // Asked when nothing starts: nothing to cancel, now or later.
        assert_eq!(m.force_stop(t), Action::None);
        assert!(matches!(m.wake(t), Wake::NotYet(Action::Start)));
        assert!(!m.start_cancelled());
        // Cancelled, cleaned up; a page starts it again: the new start runs to the end.
        assert_eq!(m.force_stop(t), Action::None);
        assert!(m.start_cancelled());
        m.start_failed(err("cancelled"), t);
        assert!(matches!(m.wake(t), Wake::NotYet(Action::Start)));
        assert!(!m.start_cancelled());
        assert_eq!(m.start_succeeded(ep(1), t), Action::None);
        assert_eq!(m.state(), State::Running(ep(1)));
        // Once running, a forced stop is a plain stop.
        assert_eq!(m.force_stop(t), Action::Stop);
        assert!(!m.start_cancelled());
    }

    #[test]
    fn a_forced_stop_after_a_graceful_one_cancels_the_start_and_leaves_no_stop_pending() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (a, _) = wait(m.admit(t, None));
        assert_eq!(m.begin_stop(t), Action::None);
        assert!(!m.start_cancelled());
        assert_eq!(m.force_stop(t), Action::None);
        assert!(m.start_cancelled());
        m.start_failed(err("cancelled"), t);
        assert!(matches!(m.claim(a, t), Claim::Failed { .. }));
        assert_eq!(m.state(), State::Absent);
        // The graceful stop was answered by the cancel: the next run is not stopped on arrival.
        run(&mut m, ep(2), t);
        assert_eq!(m.state(), State::Running(ep(2)));
    }

    #[test]
    fn a_start_that_fails_on_its_own_after_a_graceful_stop_backs_off() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (a, _) = wait(m.admit(t, None));
        assert_eq!(m.begin_stop(t), Action::None);
        m.start_failed(err("boom"), t);
        assert!(
            matches!(m.claim(a, t), Claim::Failed { retry_after, .. } if retry_after == Duration::from_secs(1))
        );
        assert_eq!(m.state(), State::Absent);
    }

    #[test]
    fn failed_stop_keeps_the_machine() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert_eq!(m.begin_stop(t), Action::Stop);
        assert_eq!(m.stop_failed(t), Action::None);
        assert_eq!(m.state(), State::Running(ep(1)));
    }

    #[test]
    fn connect_error_is_checked_once_and_gone_restarts_for_waiters() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert!(m.suspect(ep(1)));
        assert!(!m.suspect(ep(1)), "one status check per incident");
        // While suspect, requests wait instead of hitting the dead endpoint.
        let (a, act) = wait(m.admit(t, None));
        assert_eq!(act, Action::None);
        assert_eq!(
            m.idle(t + Duration::from_secs(3600)),
            Idle::At(t + Duration::from_secs(3660))
        );
        // Gone after a healthy uptime: started again at once for the waiter.
        let up = t + Duration::from_secs(10);
        assert_eq!(m.gone(ep(1), up), Action::Start);
        let _ = m.start_succeeded(ep(2), up);
        assert!(matches!(m.claim(a, up), Claim::Ready(e) if e == ep(2)));
        // A stale report about the old endpoint changes nothing.
        assert!(!m.suspect(ep(1)));
        assert_eq!(m.gone(ep(1), up), Action::None);
    }

    #[test]
    fn alive_check_clears_suspicion() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        assert!(m.suspect(ep(1)));
        let (a, _) = wait(m.admit(t, None));
        m.alive(ep(1));
        assert!(matches!(m.claim(a, t), Claim::Ready(_)));
    }

    #[test]
    fn gone_with_nobody_waiting_just_goes_absent() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = wait(m.admit(t, None));
        let _ = m.start_succeeded(ep(1), t);
        m.abandon();
        let up = t + Duration::from_secs(10);
        assert_eq!(m.gone(ep(1), up), Action::None);
        assert_eq!(m.state(), State::Absent);
        let (_, act) = wait(m.admit(up, None));
        assert_eq!(
            act,
            Action::Start,
            "no back-off after a machine went away after a healthy run"
        );
    }

    #[test]
    fn a_page_starts_the_machine_without_waiting() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        assert!(matches!(m.wake(t), Wake::NotYet(Action::Start)));
        assert_eq!(m.state(), State::Creating);
        assert!(
            matches!(m.wake(t), Wake::NotYet(Action::None)),
            "one start however many pages"
        );
        assert_eq!(m.pending(), 0, "a page is no waiter");
        // Pages do not fill the queue that waiters are bounded by.
        for _ in 0..3 {
            let _ = wait(m.admit(t, None));
        }
        assert!(matches!(m.wake(t), Wake::NotYet(Action::None)));
        for _ in 0..3 {
            m.abandon();
        }
        assert_eq!(m.start_succeeded(ep(1), t), Action::None);
        assert_eq!(
            m.idle_stop_at(),
            Some(t + Duration::from_secs(60)),
            "started for nobody in flight: the idle clock runs"
        );
        assert!(matches!(m.wake(t), Wake::Ready(e) if e == ep(1)));
        assert_eq!(m.in_flight(), 1);
    }

    #[test]
    fn a_page_during_a_stop_starts_the_machine_after_it() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        run(&mut m, ep(1), t);
        assert_eq!(m.begin_stop(t), Action::Stop);
        assert!(matches!(m.wake(t), Wake::NotYet(Action::None)));
        assert_eq!(m.stop_done(t), Action::Start);
        assert_eq!(m.state(), State::Creating);
        assert_eq!(m.start_succeeded(ep(2), t), Action::None);
        // The wish was granted: the next stop is final.
        assert_eq!(m.begin_stop(t), Action::Stop);
        assert_eq!(m.stop_done(t), Action::None);
        assert_eq!(m.state(), State::Absent);
    }

    #[test]
    fn a_page_during_a_status_check_restarts_a_machine_found_gone() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        run(&mut m, ep(1), t);
        assert!(m.suspect(ep(1)));
        assert!(matches!(m.wake(t), Wake::NotYet(Action::None)));
        let up = t + Duration::from_secs(10);
        assert_eq!(m.gone(ep(1), up), Action::Start);
        let _ = m.start_succeeded(ep(2), up);
        // Found alive instead: nothing left wanted.
        assert!(m.suspect(ep(2)));
        assert!(matches!(m.wake(up), Wake::NotYet(Action::None)));
        m.alive(ep(2));
        assert!(matches!(m.wake(up), Wake::Ready(_)));
        assert_eq!(m.release(up), Action::None);
        assert_eq!(m.begin_stop(up), Action::Stop);
        assert_eq!(m.stop_done(up), Action::None);
    }

    #[test]
    fn a_page_in_the_back_off_starts_nothing() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        assert!(matches!(m.wake(t), Wake::NotYet(Action::Start)));
        m.start_failed(err("boom"), t);
        match m.wake(t + Duration::from_millis(400)) {
            Wake::BackingOff { error, retry_after } => {
                assert_eq!(error.to_string(), "boom");
                assert_eq!(retry_after, Duration::from_millis(600));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.state(), State::Absent);
        let after = t + Duration::from_secs(1);
        assert!(matches!(m.wake(after), Wake::NotYet(Action::Start)));

        // A machine wanted during a status check that finds it lost right after ready: the
        // back-off answers the wish; it does not linger to restart the machine after a later stop.
        let _ = m.start_succeeded(ep(1), after);
        assert!(m.suspect(ep(1)));
        assert!(matches!(m.wake(after), Wake::NotYet(Action::None)));
        assert_eq!(m.gone(ep(1), after), Action::None);
        let later = after + Duration::from_secs(2);
        run(&mut m, ep(2), later);
        assert_eq!(m.begin_stop(later), Action::Stop);
        assert_eq!(m.stop_done(later), Action::None);
    }

    fn too_slow(admit: Admit) -> (Deadline, Action) {
        match admit {
            Admit::Reject(Reject::TooSlow { deadline, action }) => (deadline, action),
            other => panic!("expected a refusal by the deadline, got {other:?}"),
        }
    }

    const LATE: Option<Deadline> = Some(Deadline {
        wait: Duration::from_secs(5),
        expected: Duration::from_secs(30),
    });
    const IN_TIME: Option<Deadline> = Some(Deadline {
        wait: Duration::from_secs(60),
        expected: Duration::from_secs(30),
    });

    #[test]
    fn a_request_that_cannot_meet_its_deadline_is_refused_but_starts_the_machine() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let (deadline, act) = too_slow(m.admit(t, LATE));
        assert_eq!(deadline, LATE.unwrap());
        assert_eq!(act, Action::Start, "refused, yet the machine starts");
        assert_eq!(m.state(), State::Creating);
        assert_eq!(m.pending(), 0, "a refused request does not wait");
        // Joins the start under way: no second start.
        assert_eq!(too_slow(m.admit(t, LATE)).1, Action::None);
        // Refusals hold no place among the waiters.
        for _ in 0..10 {
            let _ = too_slow(m.admit(t, LATE));
        }
        // One whose deadline is far enough waits, as does one with no estimate to judge by.
        let (a, act) = wait(m.admit(t, IN_TIME));
        assert_eq!(act, Action::None);
        let (b, _) = wait(m.admit(t, None));
        assert_eq!(m.pending(), 2);
        assert_eq!(m.start_succeeded(ep(1), t), Action::None);
        assert!(matches!(m.claim(a, t), Claim::Ready(_)));
        assert!(matches!(m.claim(b, t), Claim::Ready(_)));
        // Running: every request is served, whatever the estimate says.
        assert!(matches!(m.admit(t, LATE), Admit::Ready(_)));
    }

    #[test]
    fn a_deadline_refusal_during_a_stop_starts_the_machine_after_it() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        run(&mut m, ep(1), t);
        assert_eq!(m.begin_stop(t), Action::Stop);
        assert_eq!(too_slow(m.admit(t, LATE)).1, Action::None);
        assert_eq!(
            m.stop_done(t),
            Action::Start,
            "wanted by the refused request"
        );
        assert_eq!(m.state(), State::Creating);
    }

    #[test]
    fn a_deadline_refusal_in_the_back_off_says_why_and_starts_nothing() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let _ = too_slow(m.admit(t, LATE));
        m.start_failed(err("boom"), t);
        let half = t + Duration::from_millis(500);
        match m.admit(half, LATE) {
            Admit::Reject(Reject::BackingOff { error, retry_after }) => {
                assert_eq!(error.to_string(), "boom");
                assert_eq!(retry_after, Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.state(), State::Absent);
    }

    #[test]
    fn a_status_check_is_waited_for_whatever_the_deadline() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        run(&mut m, ep(1), t);
        assert!(m.suspect(ep(1)));
        let (a, act) = wait(m.admit(t, LATE));
        assert_eq!(act, Action::None);
        m.alive(ep(1));
        assert!(matches!(m.claim(a, t), Claim::Ready(_)));
    }

    /// Starts the machine at `now` for one request, which is served and done.
    fn run(m: &mut Machine, at: Endpoint, now: Instant) {
        let (ticket, act) = wait(m.admit(now, None));
        assert_eq!(act, Action::Start);
        assert_eq!(m.start_succeeded(at, now), Action::None);
        assert!(matches!(m.claim(ticket, now), Claim::Ready(e) if e == at));
        assert_eq!(m.release(now), Action::None);
    }

    fn backing_off(m: &mut Machine, now: Instant) -> (String, Duration) {
        match m.admit(now, None) {
            Admit::Reject(Reject::BackingOff { error, retry_after }) => {
                (error.to_string(), retry_after)
            }
            other => panic!("expected a back-off, got {other:?}"),
        }
    }

    #[test]
    fn a_machine_lost_right_after_ready_is_a_failed_start() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        run(&mut m, ep(1), t);
        // The next request finds it unreachable and waits for the status check.
        let lost = t + Duration::from_millis(300);
        assert!(m.suspect(ep(1)));
        let (waiter, act) = wait(m.admit(lost, None));
        assert_eq!(act, Action::None);
        assert_eq!(
            m.gone(ep(1), lost),
            Action::None,
            "no restart with a request waiting"
        );
        assert_eq!(m.state(), State::Absent);
        match m.claim(waiter, lost) {
            Claim::Failed { error, retry_after } => {
                assert_eq!(
                    error.to_string(),
                    "it went down 300 ms after becoming ready"
                );
                assert_eq!(retry_after, Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.pending(), 0);
        // In the pause: refused with the reason.
        let (why, after) = backing_off(&mut m, lost + Duration::from_millis(400));
        assert!(why.contains("300 ms after becoming ready"), "{why}");
        assert_eq!(after, Duration::from_millis(600));
        // After it: a new start, which can succeed.
        run(&mut m, ep(2), lost + Duration::from_secs(1));
        assert_eq!(m.state(), State::Running(ep(2)));
    }

    #[test]
    fn a_crash_loop_backs_off_exponentially_until_a_healthy_run() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        let mut now = t;
        for (i, pause) in [1, 2, 4, 8, 8].into_iter().enumerate() {
            run(&mut m, ep(1), now);
            now += Duration::from_secs(2);
            assert_eq!(m.gone(ep(1), now), Action::None, "crash {i}");
            let (why, after) = backing_off(&mut m, now);
            assert!(why.contains("2.0 s after becoming ready"), "{why}");
            assert_eq!(after, Duration::from_secs(pause), "crash {i}");
            now += after;
        }
        // Up for min_uptime: lost like any machine, started again at once, and the count is
        // reset so that the next early crash pauses 1 s again.
        run(&mut m, ep(1), now);
        now += Duration::from_secs(10);
        assert_eq!(m.gone(ep(1), now), Action::None);
        run(&mut m, ep(1), now);
        now += Duration::from_secs(1);
        let _ = m.gone(ep(1), now);
        assert_eq!(backing_off(&mut m, now).1, Duration::from_secs(1));
        // A machine we stopped did not fail either: the count starts over.
        now += Duration::from_secs(1);
        run(&mut m, ep(1), now);
        let _ = m.gone(ep(1), now);
        assert_eq!(backing_off(&mut m, now).1, Duration::from_secs(2));
        now += Duration::from_secs(2);
        run(&mut m, ep(1), now);
        assert_eq!(m.begin_stop(now), Action::Stop);
        assert_eq!(m.stop_done(now), Action::None);
        run(&mut m, ep(1), now);
        let _ = m.gone(ep(1), now);
        assert_eq!(backing_off(&mut m, now).1, Duration::from_secs(1));
    }

    #[test]
    fn a_start_failure_after_a_crash_loop_keeps_backing_off() {
        let t = Instant::now();
        let mut m = Machine::new(limits(), t);
        run(&mut m, ep(1), t);
        let _ = m.gone(ep(1), t);
        let now = t + Duration::from_secs(1);
        let (_, act) = wait(m.admit(now, None));
        assert_eq!(act, Action::Start);
        m.start_failed(err("boom"), now);
        m.abandon();
        assert_eq!(
            backing_off(&mut m, now),
            ("boom".to_owned(), Duration::from_secs(2))
        );
    }

    #[test]
    fn min_uptime_zero_turns_the_rule_off() {
        let t = Instant::now();
        let mut m = Machine::new(
            Limits {
                min_uptime: Duration::ZERO,
                ..limits()
            },
            t,
        );
        run(&mut m, ep(1), t);
        assert!(m.suspect(ep(1)));
        let (waiter, _) = wait(m.admit(t, None));
        assert_eq!(m.gone(ep(1), t), Action::Start, "restarted for the waiter");
        let _ = m.start_succeeded(ep(2), t);
        assert!(matches!(m.claim(waiter, t), Claim::Ready(e) if e == ep(2)));
    }
}
