//! One machine's lifecycle — Absent → Creating → Running → Stopping — shared by every request
//! for it, and the [`Handle`] to watch and steer it.
//!
//! The decisions live in a pure state machine (`machine.rs`); this module is its driver: it
//! holds the machine behind a mutex that is never held across an `.await`, publishes every state
//! on a `watch` channel that waiters subscribe to under the same lock, and runs the backend's
//! start and stop in spawned tasks, so that a client that goes away cancels nothing but its own
//! wait.
//!
//! # Example
//!
//! Pre-warm a machine, watch it, and take it down:
//!
//! ```
//! use vmproxy::{backend::process::ProcessBackend, Route, State};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let backend = ProcessBackend::new(["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"])?;
//! let route = Route::builder("/files", backend).health_path("/").build()?;
//! let handle = route.handle();
//! assert_eq!(handle.state(), State::Absent);
//! # if std::process::Command::new("python3").arg("--version").output().is_ok() {
//! let endpoint = handle.start().await?; // resolves once the health probe answers 2xx
//! assert_eq!(handle.state(), State::Running(endpoint));
//! handle.stop().await;
//! assert_eq!(handle.state(), State::Absent);
//! # }
//! # Ok(())
//! # }
//! ```

mod boot;
mod machine;
mod observed;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::backend::{Backend, Endpoint, Status};
use crate::probe::{self, ProbeConfig};
use crate::route::Admission;
use crate::telemetry::{self, StartResult};
use crate::{BoxError, Error};

pub(crate) use machine::Limits;
pub use machine::State;
use machine::{Action, Admit, Claim, Deadline, Idle, Machine, Reject, Wake};
use observed::Observed;
pub use observed::{MachineStatus, StartPhase, StartTimings};

/// Why the waiters of a start cancelled by [`Handle::stop_now`] get an error.
fn cancelled() -> BoxError {
    "the start was cancelled by a forced stop (the proxy is shutting down)".into()
}

/// What a request that will not wait finds: see [`Lifecycle::wake`].
#[derive(Debug)]
pub(crate) enum Woken {
    /// The machine runs: send the request there.
    Ready(Lease),
    /// It does not run yet; it is starting, or will once the stop or status check under way is
    /// over.
    NotYet,
    /// A start failed and starts pause for `retry_after`.
    BackingOff {
        error: Arc<BoxError>,
        retry_after: Duration,
    },
}

/// Timings of one lifecycle besides the limits the state machine itself applies.
#[derive(Clone, Debug)]
pub(crate) struct Timings {
    pub(crate) cold_start_timeout: Duration,
    pub(crate) start_timeout: Duration,
    /// How a proxied request that finds the machine not running is admitted.
    pub(crate) admission: Admission,
}

pub(crate) struct Lifecycle {
    name: Arc<str>,
    /// `name` as a metrics label (shares its allocation).
    label: metrics::SharedString,
    /// The count gauges, set after every change of the counts.
    counts: telemetry::Counts,
    backend: Arc<dyn Backend>,
    machine: Mutex<Machine>,
    tx: watch::Sender<State>,
    timings: Timings,
    probe: ProbeConfig,
    idle_timeout: Option<Duration>,
    /// Completed stops, so `Handle::stop` can wait for the one it asked for; a start that failed
    /// or was cancelled counts too (the machine ends absent without a stop: a stop asked during
    /// the start is done).
    stops: AtomicU64,
    /// What operators are shown; never consulted for a decision.
    observed: Mutex<Observed>,
    /// The runtime the machine was made on; see `spawn_at_home`.
    home: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("name", &self.name)
            .field("state", &*self.tx.borrow())
            .finish()
    }
}

impl Lifecycle {
    pub(crate) fn new(
        name: Arc<str>,
        backend: Arc<dyn Backend>,
        limits: Limits,
        timings: Timings,
        probe: ProbeConfig,
    ) -> Arc<Self> {
        let idle_timeout = limits.idle_timeout;
        let label = metrics::SharedString::from(name.clone());
        telemetry::describe();
        telemetry::state(&label, State::Absent);
        let counts = telemetry::Counts::new(label.clone());
        counts.set(0, 0, None);
        Arc::new(Lifecycle {
            counts,
            label,
            name,
            backend,
            machine: Mutex::new(Machine::new(limits, Instant::now())),
            tx: watch::Sender::new(State::Absent),
            timings,
            probe,
            idle_timeout,
            stops: AtomicU64::new(0),
            observed: Mutex::new(Observed::default()),
            home: tokio::runtime::Handle::try_current().ok(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The name, shared (for a response's metrics).
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    fn observed(&self) -> MutexGuard<'_, Observed> {
        self.observed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The phases of the last cold start that succeeded.
    pub(crate) fn last_start(&self) -> Option<StartTimings> {
        self.observed().last_start()
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock cannot leave the counts half-updated in a way that is
        // worse than refusing every request forever, so keep going with the inner value.
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one decision under the lock, logs a transition, and wakes every watcher.
    fn decide<R>(&self, what: &str, f: impl FnOnce(&mut Machine, Instant) -> R) -> R {
        let now = Instant::now();
        let mut m = self.lock();
        let before = m.state();
        let age = m.phase_age(now);
        let out = f(&mut m, now);
        self.publish(&m, before, age, what);
        out
    }

    /// Logs a transition and wakes every watcher; called with the lock held so that the order of
    /// published states is the order of decisions.
    fn publish(&self, m: &Machine, before: State, age: Duration, what: &str) {
        let after = m.state();
        if before != after {
            match after {
                State::Running(ep) => info!(
                    machine = %self.name, from = before.name(), to = after.name(), %ep,
                    took = ?age, "{what}"
                ),
                _ => {
                    info!(machine = %self.name, from = before.name(), to = after.name(), took = ?age, "{what}")
                }
            }
        }
        if before != after {
            telemetry::state(&self.label, after);
        }
        self.gauges(m);
        // Always notify: waiters re-check under the lock, so a spurious wake-up is harmless
        // and a missed one is not.
        self.tx.send_replace(after);
    }

    /// Sets the count gauges; called with the lock held after every change of the counts, so
    /// that the last value set is the last value decided.
    fn gauges(&self, m: &Machine) {
        let idle_in = m
            .idle_stop_at()
            .map(|at| at.saturating_duration_since(Instant::now()));
        self.counts.set(m.in_flight(), m.pending(), idle_in);
    }

    /// Spawns a task of this machine's driver: its backend calls are recorded under the route's
    /// machine name.
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.spawn_at_home(telemetry::scope(&self.name, fut));
    }

    /// Spawns `fut` on the runtime the machine was made on, when there is one: a server with a
    /// runtime per worker thread ends those runtimes (and every task on them) when it stops
    /// serving, while starting, stopping and upgraded connections must outlive it.
    pub(crate) fn spawn_at_home<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.home {
            Some(home) => drop(home.spawn(fut)),
            None => drop(tokio::spawn(fut)),
        }
    }

    /// Whether a task can be spawned from here.
    fn can_spawn(&self) -> bool {
        self.home.is_some() || tokio::runtime::Handle::try_current().is_ok()
    }

    fn act(self: &Arc<Self>, action: Action) {
        match action {
            Action::None => {}
            Action::Start => self.spawn(self.clone().run_start()),
            Action::Stop => self.spawn(self.clone().run_stop()),
        }
    }

    /// How long until the machine is expected to be ready, from past starts (see
    /// [`MachineStatus::ready_in`]).
    fn ready_in(&self, state: State, now: Instant) -> Option<Duration> {
        self.observed().ready_in(state, now)
    }

    /// For a proxied request: waits until the machine runs, as the route's admission says, and
    /// counts the caller in flight until the lease drops.
    pub(crate) fn acquire(
        self: &Arc<Self>,
    ) -> impl std::future::Future<Output = Result<Lease, Error>> + Send + '_ {
        self.acquire_with(self.timings.admission)
    }

    /// Waits until the machine runs and counts the caller in flight until the lease drops; with
    /// [`Admission::Deadline`], refuses at once when past starts say the wait would outlast
    /// `cold_start_timeout`.
    pub(crate) async fn acquire_with(
        self: &Arc<Self>,
        admission: Admission,
    ) -> Result<Lease, Error> {
        let (ticket, mut rx) = {
            let now = Instant::now();
            // Read before the machine's lock (the two locks are never nested); a change in
            // between only makes the estimate a moment old.
            let deadline = match admission {
                Admission::Deadline => match self.state() {
                    State::Running(_) => None,
                    state => self.ready_in(state, now).map(|expected| Deadline {
                        wait: self.timings.cold_start_timeout,
                        expected,
                    }),
                },
                Admission::Wait => None,
            };
            let mut m = self.lock();
            let (before, age) = (m.state(), m.phase_age(now));
            match m.admit(now, deadline) {
                Admit::Ready(ep) => return Ok(self.lease_now(m, now, ep)),
                Admit::Reject(Reject::Overloaded { max_pending }) => {
                    drop(m);
                    let retry_after = self.ready_in(before, now);
                    return Err(Error::overloaded(&self.name, max_pending, retry_after));
                }
                Admit::Reject(Reject::BackingOff { error, retry_after }) => {
                    return Err(Error::start_failed(&self.name, error, retry_after));
                }
                Admit::Reject(Reject::TooSlow { deadline, action }) => {
                    if action == Action::Start {
                        self.publish(&m, before, age, "request refused by its deadline");
                    }
                    drop(m);
                    debug!(
                        machine = %self.name, expected = ?deadline.expected, wait = ?deadline.wait,
                        "deadline admission: refused at once, the start goes on"
                    );
                    self.act(action);
                    return Err(Error::start_too_slow(
                        &self.name,
                        deadline.expected,
                        deadline.wait,
                    ));
                }
                Admit::Wait { ticket, action } => {
                    // Subscribed under the lock that admitted us: no change can slip between.
                    let rx = self.tx.subscribe();
                    if action == Action::Start {
                        self.publish(&m, before, age, "request arrived");
                    } else {
                        self.gauges(&m);
                    }
                    drop(m);
                    self.act(action);
                    (ticket, rx)
                }
            }
        };
        let mut waiting = Waiting {
            lifecycle: self,
            done: false,
        };
        let wait = async {
            loop {
                if rx.changed().await.is_err() {
                    unreachable!("the lifecycle owns the sender");
                }
                let now = Instant::now();
                let mut m = self.lock();
                let claim = m.claim(ticket, now);
                let report = matches!(claim, Claim::Ready(_)) && m.activity_report_due(now);
                if !matches!(claim, Claim::Wait) {
                    self.gauges(&m);
                }
                drop(m);
                match claim {
                    Claim::Wait => continue,
                    Claim::Ready(ep) => {
                        waiting.done = true;
                        if report {
                            self.report_activity();
                        }
                        return Ok(Lease {
                            lifecycle: self.clone(),
                            endpoint: ep,
                            waited: true,
                        });
                    }
                    Claim::Failed { error, retry_after } => {
                        waiting.done = true;
                        return Err(Error::start_failed(&self.name, error, retry_after));
                    }
                }
            }
        };
        match tokio::time::timeout(self.timings.cold_start_timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::cold_start_timeout(
                &self.name,
                self.timings.cold_start_timeout,
            )),
        }
    }

    /// For a request that will not wait (a browser gets the waiting page instead): the machine
    /// if it runs, counted in flight as by [`acquire`](Self::acquire); otherwise its start is set
    /// going here (or after the stop or status check under way), in a spawned task, so the
    /// machine comes up although no request waits for it.
    pub(crate) fn wake(self: &Arc<Self>) -> Woken {
        let now = Instant::now();
        let mut m = self.lock();
        let (before, age) = (m.state(), m.phase_age(now));
        match m.wake(now) {
            Wake::Ready(ep) => Woken::Ready(self.lease_now(m, now, ep)),
            Wake::BackingOff { error, retry_after } => Woken::BackingOff { error, retry_after },
            Wake::NotYet(action) => {
                if action == Action::Start {
                    self.publish(&m, before, age, "waiting page shown");
                }
                drop(m);
                self.act(action);
                Woken::NotYet
            }
        }
    }

    /// The lease of a request admitted at once to the running machine; releases the lock.
    fn lease_now(
        self: &Arc<Self>,
        mut m: MutexGuard<'_, Machine>,
        now: Instant,
        endpoint: Endpoint,
    ) -> Lease {
        let report = m.activity_report_due(now);
        self.gauges(&m);
        drop(m);
        if report {
            self.report_activity();
        }
        Lease {
            lifecycle: self.clone(),
            endpoint,
            waited: false,
        }
    }

    fn report_activity(self: &Arc<Self>) {
        let this = self.clone();
        self.spawn(async move {
            if let Err(e) = this.backend.record_activity().await {
                warn!(machine = %this.name, error = %e, "could not record activity on the backend");
            }
        });
    }

    /// A connect error at `ep`: ask the backend, once per incident, whether the machine is
    /// still there. Requests that arrive meanwhile wait for the answer.
    pub(crate) fn unreachable(self: &Arc<Self>, ep: Endpoint) {
        if !self.decide("connect error", |m, _| m.suspect(ep)) {
            return;
        }
        warn!(machine = %self.name, %ep, "connect error; checking the machine's status");
        let this = self.clone();
        self.spawn(async move {
            let status = this.backend.status().await;
            this.status_seen(ep, status);
        });
    }

    /// Applies a status answer about the machine we think runs at `ep`.
    fn status_seen(self: &Arc<Self>, ep: Endpoint, status: Result<Status, BoxError>) -> bool {
        match status {
            Ok(Status::Running(now_at)) if now_at == ep => {
                self.decide("status: running", |m, _| m.alive(ep));
                true
            }
            Ok(other) => {
                warn!(machine = %self.name, %ep, status = ?other, "machine is no longer running");
                let (action, failed) = self.decide("machine gone", |m, now| {
                    let before = m.failures();
                    let action = m.gone(ep, now);
                    let failed = (m.failures() != before)
                        .then(|| m.last_failure(now))
                        .flatten();
                    (action, failed)
                });
                if let Some((error, pause)) = failed {
                    warn!(machine = %self.name, %error, ?pause, "lost soon after becoming ready: counted as a failed start; starts back off");
                    self.observed().failed(&error);
                }
                self.act(action);
                false
            }
            Err(e) => {
                warn!(machine = %self.name, error = %e, "status check failed; assuming the machine still runs");
                self.decide("status unknown", |m, _| m.alive(ep));
                true
            }
        }
    }

    // Spelled out so `Send` is stated, not inferred: these futures spawn one another.
    #[allow(clippy::manual_async_fn)]
    fn run_start(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send {
        async move {
            // Subscribed before the first look at the cancel flag: a cancel decided after that
            // look is a change this receiver sees.
            let changes = self.tx.subscribe();
            self.observed().start_began(Instant::now());
            let started = tokio::time::timeout(self.timings.start_timeout, self.start_and_probe());
            let (outcome, result) = tokio::select! {
                // A forced stop: the start is dropped where it is (a readiness probe that never
                // passes would otherwise hold the machine until start_timeout) and cleaned up
                // below like a failed one.
                () = self.cancelled(changes) => (Err(cancelled()), StartResult::Cancelled),
                started = started => match started {
                    Ok(Ok(ep)) => (Ok(ep), StartResult::Ok),
                    Ok(Err(e)) => (Err(e), StartResult::Failed),
                    Err(_) => (
                        Err(format!(
                            "not ready within start_timeout ({})",
                            humantime::format_duration(self.timings.start_timeout)
                        )
                        .into()),
                        StartResult::Timeout,
                    ),
                },
            };
            let timings = match &outcome {
                Ok(_) => self.observed().start_ended(true, Instant::now()),
                Err(error) => {
                    let mut observed = self.observed();
                    observed.start_ended(false, Instant::now());
                    observed.failed(format!("start failed: {error}"));
                    None
                }
            };
            telemetry::cold_start(&self.name, result, timings);
            let (error, what) = match outcome {
                Ok(ep) => {
                    // Decided with the cancel flag under one lock: a forced stop either came
                    // first, and the machine is cleaned up below, or finds it running.
                    let ready = self.decide("ready", |m, now| {
                        (!m.start_cancelled()).then(|| m.start_succeeded(ep, now))
                    });
                    if let Some(action) = ready {
                        let generation = self.lock().generation();
                        self.spawn(self.clone().watch_running(generation));
                        self.act(action);
                        return;
                    }
                    (cancelled(), "start cancelled")
                }
                Err(error) if result == StartResult::Cancelled => (error, "start cancelled"),
                Err(error) => (error, "start failed"),
            };
            // Stop before reporting, so a retry after the back-off cannot race this cleanup;
            // but not a machine another replica serves through (the failure may be this
            // replica's own, e.g. its route to the machine).
            let mut cleaned = true;
            if matches!(self.backend.in_use_elsewhere().await, Ok(true)) {
                warn!(machine = %self.name, %error, "{what} here, but another replica uses the machine; leaving it running");
            } else {
                warn!(machine = %self.name, %error, "{what}; stopping whatever was started");
                if let Err(e) = self.backend.stop().await {
                    error!(machine = %self.name, error = %e, "cleanup after a failed start failed: what it started may still be running");
                    cleaned = false;
                }
            }
            self.decide(what, |m, now| {
                m.start_failed(Arc::new(error), now);
                if !cleaned {
                    m.cleanup_failed();
                }
            });
            // The machine ended absent without a stop: a stop waiting for this start is done.
            self.stops.fetch_add(1, Ordering::SeqCst);
            self.tx.send_modify(|_| {});
        }
    }

    /// Resolves once a forced stop cancelled the start in flight.
    async fn cancelled(&self, mut changes: watch::Receiver<State>) {
        // Every decision notifies `changes`, the forced stop's among them.
        while !self.lock().start_cancelled() {
            if changes.changed().await.is_err() {
                unreachable!("the lifecycle owns the sender");
            }
        }
    }

    async fn start_and_probe(&self) -> Result<Endpoint, BoxError> {
        let ep = self.backend.start().await?;
        self.observed().probing(Instant::now());
        info!(machine = %self.name, %ep, "backend reports running; probing readiness");
        probe::wait_ready(&self.name, ep, &self.probe, &*self.backend).await?;
        Ok(ep)
    }

    // Spelled out so `Send` is stated, not inferred: these futures spawn one another.
    #[allow(clippy::manual_async_fn)]
    fn run_stop(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let result = self.backend.stop().await;
            let action = match result {
                Ok(()) => self.decide("stopped", |m, now| m.stop_done(now)),
                Err(e) => {
                    warn!(machine = %self.name, error = %e, "stop failed; keeping the machine");
                    self.observed().failed(format!("stop failed: {e}"));
                    let action = self.decide("stop failed", |m, now| m.stop_failed(now));
                    if let State::Running(_) = self.state() {
                        let generation = self.lock().generation();
                        self.spawn(self.clone().watch_running(generation));
                    }
                    action
                }
            };
            self.stops.fetch_add(1, Ordering::SeqCst);
            self.tx.send_modify(|_| {});
            self.act(action);
        }
    }

    /// While the machine runs: the idle deadline and the periodic status check.
    // Spelled out so `Send` is stated, not inferred: these futures spawn one another.
    #[allow(clippy::manual_async_fn)]
    fn watch_running(
        self: Arc<Self>,
        generation: u64,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let status_every = self.backend.status_interval();
            let mut next_status = status_every.map(|every| Instant::now() + every);
            loop {
                let now = Instant::now();
                let (idle, ep, busy, report) = {
                    let mut m = self.lock();
                    let State::Running(ep) = m.state() else {
                        return;
                    };
                    if m.generation() != generation {
                        return;
                    }
                    // A long stream or WebSocket sends no new requests, but other replicas must
                    // still see the machine in use.
                    let busy = m.in_flight() > 0;
                    let report = busy && m.activity_report_due(now);
                    (m.idle(now), ep, busy, report)
                };
                if report {
                    self.report_activity();
                }
                if idle == Idle::Due {
                    if self.idle_stop(generation).await {
                        return;
                    }
                    continue;
                }
                let idle_at = match idle {
                    Idle::At(at) => Some(at),
                    _ => None,
                };
                let wake = match (idle_at, next_status) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(a), None) | (None, Some(a)) => a,
                    (None, None) => return,
                };
                let wake = match (busy, self.idle_timeout) {
                    (true, Some(idle)) => wake.min(now + idle / 4),
                    _ => wake,
                };
                tokio::time::sleep_until(wake).await;
                if let (Some(at), Some(every)) = (next_status, status_every) {
                    if Instant::now() >= at {
                        next_status = Some(Instant::now() + every);
                        let status = self.backend.status().await;
                        if !self.status_seen(ep, status) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The idle deadline passed here. Returns true once the machine is being stopped.
    async fn idle_stop(self: &Arc<Self>, generation: u64) -> bool {
        let idle_timeout = self.idle_timeout.unwrap_or_default();
        match self.backend.idle_everywhere(idle_timeout).await {
            Ok(true) => {}
            Ok(false) => {
                info!(machine = %self.name, "idle here, but in use elsewhere; keeping it");
                self.decide("in use elsewhere", |m, now| m.touch(now));
                return false;
            }
            Err(e) => {
                warn!(machine = %self.name, error = %e, "could not tell whether the machine is idle elsewhere; keeping it");
                self.decide("idle check failed", |m, now| m.touch(now));
                return false;
            }
        }
        let action = self.decide("idle", |m, now| {
            if m.generation() == generation && m.idle(now) == Idle::Due {
                m.begin_stop(now)
            } else {
                Action::None
            }
        });
        if action == Action::Stop {
            self.spawn(self.clone().run_stop());
            return true;
        }
        false
    }

    pub(crate) fn state(&self) -> State {
        *self.tx.borrow()
    }
}

/// A waiter's registration; dropping it before it was served takes it off the pending count.
struct Waiting<'a> {
    lifecycle: &'a Lifecycle,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut m = self.lifecycle.lock();
            m.abandon();
            self.lifecycle.gauges(&m);
        }
    }
}

/// A request's claim on the running machine: counted in flight until dropped, which the proxy
/// does when the response body ends or the upgraded connection closes.
pub(crate) struct Lease {
    lifecycle: Arc<Lifecycle>,
    endpoint: Endpoint,
    /// The request waited for a start (rather than finding the machine running).
    waited: bool,
}

impl Lease {
    pub(crate) fn waited(&self) -> bool {
        self.waited
    }

    pub(crate) fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    pub(crate) fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let action = {
            let mut m = self.lifecycle.lock();
            let action = m.release(Instant::now());
            self.lifecycle.gauges(&m);
            action
        };
        if action != Action::None {
            self.lifecycle.decide("drained", |_, _| ());
            if self.lifecycle.can_spawn() {
                self.lifecycle.act(action);
            }
        }
    }
}

/// Watches and steers one machine: its state, a pre-warm, and a stop.
///
/// Cheap to clone; every clone refers to the same machine. See the [module docs](self) for an
/// example.
#[derive(Clone, Debug)]
pub struct Handle {
    lifecycle: Arc<Lifecycle>,
}

impl Handle {
    pub(crate) fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Handle { lifecycle }
    }

    /// The machine's name (for logs).
    pub fn name(&self) -> &str {
        self.lifecycle.name()
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.lifecycle.state()
    }

    /// Whether the backend failed to remove what a failed or cancelled start had made (a VM
    /// created, a process spawned), so that it may still run, and bill, while the machine is
    /// recorded [`State::Absent`]. Cleared by the next start or stop that succeeds.
    pub fn cleanup_failed(&self) -> bool {
        self.lifecycle.lock().leftover()
    }

    /// Requests being served by the machine now (a streaming body or an upgraded connection
    /// counts until it ends).
    pub fn in_flight(&self) -> usize {
        self.lifecycle.lock().in_flight()
    }

    /// Requests waiting for the machine to start.
    pub fn pending(&self) -> usize {
        self.lifecycle.lock().pending()
    }

    /// A snapshot for an operator: state and since when, the phase of a start in flight, the
    /// counts, the time left before the idle stop, the last error, recent boot times.
    pub fn status(&self) -> MachineStatus {
        let lc = &self.lifecycle;
        let now = Instant::now();
        let (state, since, in_flight, waiting, idle_at) = {
            let m = lc.lock();
            (
                m.state(),
                now - m.phase_age(now),
                m.in_flight(),
                m.pending(),
                m.idle_stop_at(),
            )
        };
        let observed = lc.observed();
        MachineStatus {
            name: lc.name.to_string(),
            state,
            state_since: observed::wall_clock(since, now),
            starting: observed
                .starting()
                .filter(|_| state == State::Creating)
                .map(|(phase, at)| (phase, observed::wall_clock(at, now))),
            in_flight,
            waiting,
            idle_stop_in: idle_at.map(|at| at.saturating_duration_since(now)),
            last_error: observed.last_error(),
            boot_time: observed.boot_time(),
            boot_phases: observed.boot_phases(),
            ready_in: observed.ready_in(state, now),
            last_start: observed.last_start(),
            placement: lc.backend.placement(),
        }
    }

    /// A receiver that sees every state change.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.lifecycle.tx.subscribe()
    }

    /// Starts the machine if it is not running (joining a start already in flight) and waits
    /// until it is ready, within the route's `cold_start_timeout`.
    ///
    /// It waits whatever the route's [`admission`](crate::RouteBuilder::admission): a
    /// pre-warm is not refused for being slow.
    pub async fn start(&self) -> Result<Endpoint, Error> {
        let lease = self.lifecycle.acquire_with(Admission::Wait).await?;
        Ok(lease.endpoint())
    }

    /// Takes the machine down now: requests in flight finish first; requests that arrive
    /// meanwhile wait and start it again. A start in flight is let finish, then stopped. Returns
    /// once the stop is done, or the start ended without a machine (it failed); at once if the
    /// machine is absent.
    pub async fn stop(&self) {
        self.stop_with(Machine::begin_stop).await;
    }

    /// Whether another proxy replica served through the machine after this one last did
    /// (see [`Backend::in_use_elsewhere`]); `false` when the backend cannot tell. A proxy that
    /// shuts down asks this before stopping a machine it shares.
    pub async fn in_use_elsewhere(&self) -> bool {
        if self.state() == State::Absent {
            return false;
        }
        let asked = self.lifecycle.backend.in_use_elsewhere();
        match telemetry::scope(&self.lifecycle.name, asked).await {
            Ok(shared) => shared,
            Err(e) => {
                warn!(machine = self.name(), error = %e, "could not tell whether other replicas use the machine");
                false
            }
        }
    }

    /// Takes the machine down now, without waiting for requests in flight (they fail). A start
    /// in flight is cancelled: what it started is stopped and its waiters get an error. For
    /// shutdown after a grace period.
    pub async fn stop_now(&self) {
        self.stop_with(Machine::force_stop).await;
    }

    async fn stop_with(&self, decide: fn(&mut Machine, Instant) -> Action) {
        let lc = &self.lifecycle;
        let mut rx = lc.tx.subscribe();
        let before = lc.stops.load(Ordering::SeqCst);
        let (action, state) = lc.decide("stop requested", |m, now| {
            let state = m.state();
            (decide(m, now), state)
        });
        if state == State::Absent {
            return;
        }
        lc.act(action);
        while lc.stops.load(Ordering::SeqCst) == before {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
