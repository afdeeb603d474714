//! A local command as the machine: the embedded default, which runs anywhere with no account.
//!
//! `start` picks a free port on 127.0.0.1, puts it in place of `{port}` in the arguments and in
//! `$PORT`, and runs the command in a process group of its own. `stop` sends SIGTERM to the
//! group and SIGKILL after `stop_grace`.
//!
//! # Nothing outlives the proxy
//!
//! The command and every process it starts (a shell's children, npm's node, gunicorn's workers)
//! die with the proxy, however the proxy ends: a stop, the backend dropped (also on a panic),
//! or the proxy process killed, SIGKILL included.
//!
//! On Linux, this is how: between the proxy and the command runs a small supervisor, a fork of
//! the proxy that executes nothing (so nothing is re-executed from disk and the host binary can be
//! anything). The kernel signals the supervisor when the proxy dies (`PR_SET_PDEATHSIG`), and
//! SIGKILLs the command when the supervisor dies. The supervisor then sends SIGTERM to the
//! command's process group, waits up to `stop_grace` for the command to exit, and SIGKILLs
//! whatever is left of the group. It is also a child subreaper (`PR_SET_CHILD_SUBREAPER`), so
//! descendants that leave the group (`setsid`, a daemon's double fork) are re-parented to it when
//! their parent dies, and it kills those too, found through `/proc/thread-self/children`. When the
//! command exits on its own, the supervisor kills what it left behind and exits with its status,
//! so the backend's status keeps meaning "the command runs". The supervisor holds none of the
//! proxy's file descriptors, shows as `vmproxy-sup` in `ps -o comm`, and takes SIGTERM or SIGINT
//! sent to it as a stop (graceful, as above); [`ProcessBackend::pid`] is the command's pid, and
//! `stop` still sends one SIGTERM to the command's group, not through the supervisor.
//!
//! The limits: a descendant that leaves the process group is not reached on a kernel without
//! `/proc/<pid>/task/<tid>/children` (`CONFIG_PROC_CHILDREN`, on in the major distributions'
//! kernels), nor after it was re-parented to a subreaper of its own below the supervisor (a
//! nested init or container runtime); and if the supervisor itself is SIGKILLed from outside,
//! only the command dies at once, the rest of its group when the backend next looks at its status
//! or stops. Elsewhere than on Linux there is no supervisor: the group is killed on stop and on
//! drop, but a killed proxy leaves the command running.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use vmproxy::backend::process::ProcessBackend;
//!
//! # fn main() -> Result<(), vmproxy::ConfigError> {
//! let backend = ProcessBackend::new(["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"])?
//!     .env("PYTHONUNBUFFERED", "1")
//!     .stop_grace(Duration::from_secs(5));
//! assert!(ProcessBackend::new(Vec::<String>::new()).is_err());
//! # let _ = backend;
//! # Ok(())
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{Backend, BackendFuture, Endpoint, Status};
use crate::{telemetry, ConfigError};

/// Runs a local command as the on-demand machine.
#[derive(Debug)]
pub struct ProcessBackend {
    name: String,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    current_dir: Option<PathBuf>,
    stop_grace: Duration,
    quiet: bool,
    child: Mutex<Option<Running>>,
}

/// A spawned command; its whole process group is killed when this is dropped.
#[derive(Debug)]
struct Running {
    /// The process waited on: on Linux the supervisor, which exits when the command has exited
    /// and what it left is killed; elsewhere the command itself.
    child: Child,
    /// The command's process id, which is also its process group's.
    pid: Pid,
    endpoint: Endpoint,
    /// The command was found exited (and its group killed).
    exited: bool,
}

impl Running {
    /// Whether the command still runs. The first time it is found exited, whatever it left in
    /// its process group is killed.
    fn running(&mut self) -> bool {
        if self.exited {
            return false;
        }
        if matches!(self.child.try_wait(), Ok(None)) && command_alive(self.pid) {
            return true;
        }
        self.exited = true;
        let _ = killpg(self.pid, Signal::SIGKILL);
        false
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Once the child is reaped, the group's id may in principle name another group.
        if !self.exited && matches!(self.child.try_wait(), Ok(None)) {
            // On Linux the supervisor sees the command die, kills what is left (also outside the
            // group) and exits.
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
    }
}

/// Whether the command, a child of the supervisor, is alive: it may be dead (a zombie, or reaped)
/// a moment before the supervisor exits.
#[cfg(target_os = "linux")]
fn command_alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next(),
            Some('Z' | 'X') | None
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // Out of file descriptors, say: that tells nothing of the command, and taking it for
        // dead would kill a healthy machine.
        Err(_) => true,
    }
}

/// Without a supervisor the command is the child itself, and `try_wait` says it all.
#[cfg(not(target_os = "linux"))]
fn command_alive(_pid: Pid) -> bool {
    true
}

/// `arg` with `{port}`, `${PORT}` and `$PORT` (not followed by a name's character, as a shell
/// reads it) replaced by `port`.
fn with_port(arg: &str, port: &str) -> String {
    let arg = arg.replace("{port}", port).replace("${PORT}", port);
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg.as_str();
    while let Some(at) = rest.find("$PORT") {
        let after = &rest[at + 5..];
        let longer = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&rest[..at]);
        out.push_str(if longer { "$PORT" } else { port });
        rest = after;
    }
    out.push_str(rest);
    out
}

impl ProcessBackend {
    /// A backend that runs `command` (program, then arguments). `{port}`, `$PORT` and
    /// `${PORT}` in an argument are replaced by the port the child must listen on at
    /// 127.0.0.1, which is also in its environment as `PORT`: the command needs no shell to
    /// use it (no other variable is expanded).
    pub fn new<I, S>(command: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut parts = command.into_iter().map(Into::into);
        let program = parts
            .next()
            .ok_or_else(|| ConfigError::new("command", "is empty"))?;
        if program.trim().is_empty() {
            return Err(ConfigError::new("command", "the program name is empty"));
        }
        let args: Vec<String> = parts.collect();
        let name = std::path::Path::new(&program)
            .file_name()
            .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned());
        Ok(ProcessBackend {
            name,
            program,
            args,
            env: Vec::new(),
            current_dir: None,
            stop_grace: Duration::from_secs(10),
            quiet: false,
            child: Mutex::new(None),
        })
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the child in `dir`.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// How long the child has after SIGTERM before SIGKILL (default: 10 s). Also the time its
    /// process group gets after SIGTERM when the proxy dies.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Discard the child's stdout and stderr (default: inherited).
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// The name used in logs (default: the program's file name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The command's process id (also its process group's id), while it runs.
    pub async fn pid(&self) -> Option<u32> {
        let mut slot = self.child.lock().await;
        let running = slot.as_mut()?;
        if !running.running() {
            return None;
        }
        u32::try_from(running.pid.as_raw()).ok()
    }

    fn spawn(&self) -> std::io::Result<Running> {
        // The kernel picks a free port; the child binds it a moment later.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let port_text = port.to_string();
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args.iter().map(|a| with_port(a, &port_text)))
            .env("PORT", &port_text)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .process_group(0);
        if self.quiet {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        let (child, pid) = self.spawn_supervised(cmd)?;
        Ok(Running {
            child,
            pid,
            endpoint: Endpoint::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
            exited: false,
        })
    }

    /// Spawns the supervisor, which forks the command; returns the supervisor and the command's
    /// pid, which the supervisor writes to a pipe before `spawn` returns.
    #[cfg(target_os = "linux")]
    fn spawn_supervised(&self, mut cmd: Command) -> std::io::Result<(Child, Pid)> {
        use std::io::Read;
        use std::os::fd::AsRawFd;

        // Both ends are close-on-exec: the command never sees them.
        let (mut reader, writer) = std::io::pipe()?;
        supervisor::install(&mut cmd, writer.as_raw_fd(), self.stop_grace);
        // Killing the supervisor alone would leave the command's children: `Running`'s drop kills
        // the command's group instead, and the supervisor follows.
        cmd.kill_on_drop(false);
        let spawned = cmd.spawn();
        drop(writer);
        let mut child = spawned?;
        // `spawn` returned once the command was executed, and the supervisor writes the pid
        // before that, so this read does not wait.
        let mut pid = [0u8; 4];
        match reader.read_exact(&mut pid) {
            Ok(()) => Ok((child, Pid::from_raw(i32::from_ne_bytes(pid)))),
            Err(e) => {
                // The command dies with its supervisor (`PR_SET_PDEATHSIG`).
                let _ = child.start_kill();
                Err(std::io::Error::other(format!(
                    "the supervisor did not report the command's pid: {e}"
                )))
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn spawn_supervised(&self, mut cmd: Command) -> std::io::Result<(Child, Pid)> {
        cmd.kill_on_drop(true);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the child exited at once"))?;
        let pid = Pid::from_raw(i32::try_from(pid).map_err(std::io::Error::other)?);
        Ok((child, pid))
    }
}

/// A signal's `result` label.
fn result<T>(sent: &nix::Result<T>) -> &'static str {
    if sent.is_ok() {
        "ok"
    } else {
        "error"
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move {
            let mut slot = self.child.lock().await;
            if let Some(running) = slot.as_mut() {
                if running.running() {
                    return Ok(running.endpoint);
                }
            }
            let spawned = self.spawn();
            telemetry::backend_call(
                &self.name,
                "spawn",
                if spawned.is_ok() { "ok" } else { "error" },
            );
            let running = spawned.map_err(|e| format!("could not run {:?}: {e}", self.program))?;
            info!(machine = %telemetry::machine_name(&self.name), pid = running.pid.as_raw(), endpoint = %running.endpoint, "process started");
            let ep = running.endpoint;
            *slot = Some(running);
            Ok(ep)
        })
    }

    fn stop(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            let Some(mut running) = self.child.lock().await.take() else {
                return Ok(());
            };
            if !running.running() {
                return Ok(());
            }
            let machine = telemetry::machine_name(&self.name);
            debug!(%machine, "SIGTERM");
            let sent = killpg(running.pid, Signal::SIGTERM);
            telemetry::backend_call(&self.name, "terminate", result(&sent));
            // On Linux this waits for the supervisor, which exits once the command has exited
            // and it has killed whatever the command left.
            match tokio::time::timeout(self.stop_grace, running.child.wait()).await {
                Ok(status) => debug!(%machine, ?status, "exited"),
                Err(_) => {
                    warn!(%machine, grace = ?self.stop_grace, "still running after SIGTERM; SIGKILL");
                    let sent = killpg(running.pid, Signal::SIGKILL);
                    telemetry::backend_call(&self.name, "kill", result(&sent));
                    let _ = running.child.wait().await;
                }
            }
            running.exited = true;
            // The leader exited; SIGKILL whatever it left in its group (the supervisor did).
            #[cfg(not(target_os = "linux"))]
            let _ = killpg(running.pid, Signal::SIGKILL);
            Ok(())
        })
    }

    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async move {
            let mut slot = self.child.lock().await;
            let Some(running) = slot.as_mut() else {
                return Ok(Status::Gone);
            };
            Ok(if running.running() {
                Status::Running(running.endpoint)
            } else {
                Status::Stopped
            })
        })
    }

    fn status_interval(&self) -> Option<Duration> {
        // try_wait is a system call, not an API request: check often.
        Some(Duration::from_millis(500))
    }
}

/// The supervisor between the proxy and the command (Linux; see the docs of `backend::process`).
///
/// Everything here but [`install`] runs in a child forked from a possibly multi-threaded
/// process, before or instead of an exec: only async-signal-safe system calls, no allocation, no
/// lock, nothing that can panic (no indexing, no unwrap, no overflowing arithmetic).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod supervisor {
    use std::io;
    use std::os::fd::RawFd;
    use std::time::{Duration, Instant};

    use nix::libc::{self, c_int, pid_t};
    use tokio::process::Command;

    /// How long the final SIGKILL sweep may wait for processes to die (one stuck in the kernel
    /// does not hold the supervisor, and with it the backend's `stop`, forever).
    const SWEEP_LIMIT: Duration = Duration::from_secs(5);

    /// Makes `cmd` fork once more before its exec: the command runs in the grandchild, the child
    /// stays as its supervisor and writes the command's pid to `report`.
    pub(super) fn install(cmd: &mut Command, report: RawFd, grace: Duration) {
        let parent = std::process::id() as pid_t;
        // SAFETY: the closure runs in the child forked by `spawn`, where only async-signal-safe
        // work is sound. It makes raw system calls only (see the module docs), and in the
        // grandchild it returns so that the exec goes ahead; in the supervisor it never returns.
        unsafe {
            cmd.pre_exec(move || fork_supervisor(parent, report, grace));
        }
    }

    fn fork_supervisor(parent: pid_t, report: RawFd, grace: Duration) -> io::Result<()> {
        // Block every signal before the fork, so that neither the command's exit nor the proxy's
        // death can be missed before the supervisor waits for them; the command gets the mask
        // back (std emptied it).
        // SAFETY: sigset_t is plain data; sigfillset initialises it, sigprocmask reads it.
        let (all, old) = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            if libc::sigprocmask(libc::SIG_SETMASK, &all, &mut old) != 0 {
                return Err(io::Error::last_os_error());
            }
            (all, old)
        };
        // SAFETY: getpid and fork are async-signal-safe. This process is single-threaded (a
        // forked child has only the thread that forked), so no lock that fork or the
        // pthread_atfork handlers it runs may take can be held by another thread.
        let (me, app) = unsafe { (libc::getpid(), libc::fork()) };
        match app {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // The command-to-be: its own process group; SIGKILL when the supervisor dies.
                // SAFETY: plain system calls on this process.
                unsafe {
                    if libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) != 0
                        || libc::setpgid(0, 0) != 0
                        || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    // The supervisor died before prctl: nobody would send the signal.
                    if libc::getppid() != me {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                Ok(())
            }
            app => supervise(Supervisor::new(app, &all), parent, report, grace),
        }
    }

    /// What the supervisor knows.
    struct Supervisor<'a> {
        /// The command's pid, also its process group's.
        app: pid_t,
        /// Its wait status once it has exited.
        status: Option<c_int>,
        /// No child is left (waitpid said ECHILD).
        no_children: bool,
        /// Children are listed in /proc/thread-self/children, and re-parented to us.
        sees_children: bool,
        signals: &'a libc::sigset_t,
    }

    fn supervise(mut s: Supervisor<'_>, parent: pid_t, report: RawFd, grace: Duration) -> ! {
        // SAFETY: system calls on this process and its own descriptors; the buffers are locals
        // that outlive each call.
        unsafe {
            // The grandchild does the same; whichever comes first wins, so that the group
            // exists before `spawn` returns.
            libc::setpgid(s.app, s.app);
            let pid = s.app.to_ne_bytes();
            libc::write(report, pid.as_ptr().cast(), pid.len());
            // Hold no descriptor of the proxy's: in particular not the pipe by which std learns
            // that the exec happened (its EOF), nor sockets that would outlive the proxy.
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                let mut limit: libc::rlimit = std::mem::zeroed();
                let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur.min(1 << 20) as c_int
                } else {
                    1 << 16
                };
                for fd in 3..max {
                    libc::close(fd);
                }
            }
            // Exits must leave zombies to wait for, whatever the proxy set for SIGCHLD.
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            libc::prctl(libc::PR_SET_NAME, c"vmproxy-sup".as_ptr());
            s.sees_children = libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) == 0 && children(|_| {});
            // Blocked like every signal: it only wakes the wait below.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP);
        }

        // Until the command exits, the proxy dies, or someone asks the supervisor to stop.
        let graceful = loop {
            s.reap();
            if s.status.is_some() {
                break false;
            }
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                // The proxy is gone. (The death signal also comes when the proxy's thread that
                // spawned us ends; then the parent is unchanged and this goes on.)
                break true;
            }
            if let Some(libc::SIGTERM | libc::SIGINT) = s.wait(None) {
                break true;
            }
        };
        if graceful {
            s.signal_all(libc::SIGTERM);
            let deadline = Instant::now().checked_add(grace);
            loop {
                s.reap();
                if s.status.is_some() {
                    break;
                }
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    break;
                }
                s.wait(left);
            }
        }
        // Whatever is left: SIGKILL, until it is gone.
        let give_up = Instant::now().checked_add(SWEEP_LIMIT);
        loop {
            s.signal_all(libc::SIGKILL);
            s.reap();
            if s.all_gone() || give_up.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            s.wait(Some(Duration::from_millis(10)));
        }
        let code = match s.status {
            Some(st) if libc::WIFEXITED(st) => libc::WEXITSTATUS(st),
            Some(st) if libc::WIFSIGNALED(st) => 128 + (libc::WTERMSIG(st) & 0x7f),
            _ => 1,
        };
        // SAFETY: _exit ends this process without running anything of the proxy's.
        unsafe { libc::_exit(code) }
    }

    impl<'a> Supervisor<'a> {
        fn new(app: pid_t, signals: &'a libc::sigset_t) -> Self {
            Supervisor {
                app,
                status: None,
                no_children: false,
                sees_children: false,
                signals,
            }
        }

        /// Waits for exited children, noting the command's status.
        fn reap(&mut self) {
            loop {
                let mut st: c_int = 0;
                // SAFETY: waitpid writes the status to a local.
                let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if pid == self.app {
                    self.status = Some(st);
                }
                if pid <= 0 {
                    self.no_children = pid == -1
                        && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD);
                    return;
                }
            }
        }

        /// Sends `sig` to the command's process group and to every child of ours outside it
        /// (descendants re-parented to us), with the group each of those leads.
        fn signal_all(&self, sig: c_int) {
            // SAFETY: kill and getpgid have no memory preconditions.
            unsafe {
                libc::kill(-self.app, sig);
            }
            if !self.sees_children {
                return;
            }
            children(|pid| {
                if pid == self.app {
                    return; // signalled with its group
                }
                // SAFETY: as above.
                unsafe {
                    match libc::getpgid(pid) {
                        group if group == self.app => {} // signalled with the group
                        group if group == pid => {
                            libc::kill(-pid, sig);
                        }
                        _ => {
                            libc::kill(pid, sig);
                        }
                    }
                }
            });
        }

        /// The command's group is empty and no child is left (or none could be seen).
        fn all_gone(&self) -> bool {
            // SAFETY: signal 0 only checks that the group exists.
            let group_gone = unsafe { libc::kill(-self.app, 0) } == -1
                && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            group_gone && (self.no_children || !self.sees_children)
        }

        /// Waits for any signal, for at most `timeout`; returns it.
        fn wait(&self, timeout: Option<Duration>) -> Option<c_int> {
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            });
            let ts_ptr = ts
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: the set and the timespec are live locals; siginfo is written to a local.
            let sig = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::sigtimedwait(self.signals, &mut info, ts_ptr)
            };
            (sig > 0).then_some(sig)
        }
    }

    /// Calls `f` with the pid of each child of this (single-threaded) process; false if the
    /// kernel does not list them.
    fn children(mut f: impl FnMut(pid_t)) -> bool {
        // SAFETY: open, read and close on a descriptor of our own, into a local buffer.
        unsafe {
            let fd = libc::open(
                c"/proc/thread-self/children".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return false;
            }
            let mut buf = [0u8; 256];
            let (mut pid, mut digits): (pid_t, bool) = (0, false);
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                for &b in buf.iter().take(n as usize) {
                    if b.is_ascii_digit() {
                        pid = pid.wrapping_mul(10).wrapping_add(pid_t::from(b - b'0'));
                        digits = true;
                    } else {
                        if digits && pid > 0 {
                            f(pid);
                        }
                        (pid, digits) = (0, false);
                    }
                }
            }
            if digits && pid > 0 {
                f(pid);
            }
            libc::close(fd);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_put_in_place_of_port_and_both_spellings_of_the_variable() {
        assert_eq!(with_port("{port}", "8123"), "8123");
        assert_eq!(with_port("--port=${PORT}", "8123"), "--port=8123");
        assert_eq!(with_port("$PORT", "8123"), "8123");
        assert_eq!(with_port("exec srv $PORT -x", "8123"), "exec srv 8123 -x");
        assert_eq!(
            with_port("$PORTS $PORT_X $PORT", "8123"),
            "$PORTS $PORT_X 8123"
        );
        assert_eq!(with_port("${HOME} $HOST", "8123"), "${HOME} $HOST");
    }
}
