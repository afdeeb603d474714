//! The `vmproxy` binary as a child process: a config file in the temp dir, the address it
//! listens on read from its log, and a kill when the test ends, however it ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_vmproxy");

/// A file in the system temp dir, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(text: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmproxy-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `vmproxy --config FILE --check`: the exit code and what it wrote to stderr.
pub fn check(config: &str) -> (i32, String) {
    let file = TempFile::new(config);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(file.path())
        .arg("--check")
        .env_remove("VMPROXY_CONFIG")
        .env_remove("VMPROXY_LISTEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running binary; killed on drop, so a failing test leaves nothing behind.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _config: TempFile,
}

impl Proxy {
    /// Serves `config` (its `listen` should use port 0) with extra environment `env`.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Proxy {
        Self::start_with_open_files(config, env, None)
    }

    /// As [`start`](Self::start), with the open-file limit (soft and hard) set to `nofile`.
    pub fn start_with_open_files(config: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Proxy {
        Self::launch(config, &[], env, nofile)
    }

    /// As [`start`](Self::start), with `args` after `--config FILE`.
    #[allow(dead_code)]
    pub fn start_with_args(config: &str, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Self::launch(config, args, env, None)
    }

    fn launch(config: &str, args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Proxy {
        let config = TempFile::new(config);
        let log_filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let mut cmd = Command::new(BIN);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and allocates nothing.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd.arg("--config")
            .arg(config.path())
            .args(args)
            // The test's environment must not choose for the binary.
            .env_remove("VMPROXY_CONFIG")
            .env_remove("VMPROXY_LISTEN")
            .env("RUST_LOG", log_filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening addr=").nth(1) {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    if let Ok(a) = addr.parse::<SocketAddr>() {
                        let _ = tx.send(a);
                    }
                }
                let mut all = lines.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let mut proxy = Proxy {
            child,
            addr: ([127, 0, 0, 1], 0).into(),
            log,
            _config: config,
        };
        proxy.addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!("the binary did not say where it listens:\n{}", proxy.log())
            });
        proxy
    }

    /// The admin listener's address (`[admin]` with port 0), from its log line, which comes
    /// before the proxy's own.
    pub fn admin_addr(&self) -> SocketAddr {
        let log = self.log();
        let rest = log
            .split("admin_addr=")
            .nth(1)
            .unwrap_or_else(|| panic!("the binary did not say where the admin API is:\n{log}"));
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse().unwrap()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `signal` and waits for the exit, without blocking the runtime (servers the binary
    /// talks to may run on it); returns the exit code (None: ended by a signal).
    pub async fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) -> Option<i32> {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
        for _ in 0..6000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the binary did not exit within 60 s of {signal}:\n{}",
            self.log()
        );
    }
}

/// A request left waiting on the binary (for a machine that does not come up): GET `path`, sent
/// in a task of its own.
pub struct Parked(tokio::task::JoinHandle<Result<http::StatusCode, super::BoxError>>);

impl Parked {
    pub fn get(addr: SocketAddr, path: &str) -> Parked {
        let req = http::Request::get(path)
            .header("host", "front.test")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        Parked(tokio::spawn(async move {
            super::send(addr, req).await.map(|res| res.status())
        }))
    }

    /// Asserts that the request ended, within `limit`, with a 503 or its connection closed,
    /// rather than hanging.
    pub async fn assert_refused_or_closed(self, limit: Duration) {
        let answer = tokio::time::timeout(limit, self.0)
            .await
            .expect("the parked request hangs")
            .unwrap();
        if let Ok(status) = answer {
            assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
