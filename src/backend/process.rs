//! A local command as the machine: the embedded default, which runs anywhere with no account.
//!
//! `start` picks a free port on 127.0.0.1, puts it in place of `{port}` in the arguments and in
//! `$PORT`, and spawns the command in a process group of its own. `stop` sends SIGTERM to the
//! group and SIGKILL after `stop_grace`. The child never outlives the proxy: it is killed when
//! the backend is dropped (also on a panic), and on Linux the kernel kills it if the proxy
//! itself dies (`PR_SET_PDEATHSIG`).
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
use crate::ConfigError;

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

/// A spawned child; its whole process group is killed when this is dropped.
#[derive(Debug)]
struct Running {
    child: Child,
    pgid: Pid,
    endpoint: Endpoint,
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) || self.child.id().is_some() {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

impl ProcessBackend {
    /// A backend that runs `command` (program, then arguments). `{port}` in an argument is
    /// replaced by the port the child must listen on at 127.0.0.1, also given as `$PORT`.
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

    /// How long the child has after SIGTERM before SIGKILL (default: 10 s).
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

    /// The child's process id, while it runs.
    pub async fn pid(&self) -> Option<u32> {
        self.child.lock().await.as_ref().and_then(|r| r.child.id())
    }

    fn spawn(&self) -> std::io::Result<Running> {
        // The kernel picks a free port; the child binds it a moment later.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let port_text = port.to_string();
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args.iter().map(|a| a.replace("{port}", &port_text)))
            .env("PORT", &port_text)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .process_group(0);
        if self.quiet {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the child exited at once"))?;
        let pid = Pid::from_raw(i32::try_from(pid).map_err(std::io::Error::other)?);
        Ok(Running {
            child,
            pgid: pid,
            endpoint: Endpoint::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        })
    }
}

/// Asks the kernel to SIGKILL the child when the proxy dies, however it dies.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The parent may have died before prctl: then nobody will send the signal.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

impl Backend for ProcessBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(&self) -> BackendFuture<'_, Endpoint> {
        Box::pin(async move {
            let mut slot = self.child.lock().await;
            if let Some(running) = slot.as_mut() {
                if matches!(running.child.try_wait(), Ok(None)) {
                    return Ok(running.endpoint);
                }
            }
            let running = self
                .spawn()
                .map_err(|e| format!("could not run {:?}: {e}", self.program))?;
            info!(machine = %self.name, pid = ?running.child.id(), endpoint = %running.endpoint, "process started");
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
            if !matches!(running.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            debug!(machine = %self.name, "SIGTERM");
            let _ = killpg(running.pgid, Signal::SIGTERM);
            match tokio::time::timeout(self.stop_grace, running.child.wait()).await {
                Ok(status) => debug!(machine = %self.name, ?status, "exited"),
                Err(_) => {
                    warn!(machine = %self.name, grace = ?self.stop_grace, "still running after SIGTERM; SIGKILL");
                    let _ = killpg(running.pgid, Signal::SIGKILL);
                    let _ = running.child.wait().await;
                }
            }
            // The leader exited; SIGKILL whatever it left in its group.
            let _ = killpg(running.pgid, Signal::SIGKILL);
            Ok(())
        })
    }

    fn status(&self) -> BackendFuture<'_, Status> {
        Box::pin(async move {
            let mut slot = self.child.lock().await;
            let Some(running) = slot.as_mut() else {
                return Ok(Status::Gone);
            };
            Ok(match running.child.try_wait()? {
                None => Status::Running(running.endpoint),
                Some(_) => Status::Stopped,
            })
        })
    }

    fn status_interval(&self) -> Option<Duration> {
        // try_wait is a system call, not an API request: check often.
        Some(Duration::from_millis(500))
    }
}
