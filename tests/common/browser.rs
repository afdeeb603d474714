//! A headless Chromium driven over WebDriver (chromedriver and fantoccini), for tests that look
//! at a page as a person would. chromedriver and the browser end with the [`Browser`], also when
//! the test panics.
//!
//! Not part of `common`, so that the other test binaries do not build the WebDriver client; a
//! test file that needs it says:
//!
//! ```ignore
//! mod common;
//! #[path = "common/browser.rs"]
//! mod browser;
//!
//! let Some(browser) = browser::Browser::start().await else { return }; // not installed, not CI
//! browser.goto("http://127.0.0.1:…/").await;
//! ```
//!
//! The browser is Debian's `chromium` with `chromium-driver` (`.ci/run` installs them). Without
//! them [`Browser::start`] fails the test under `CI=true`, and elsewhere prints a loud notice
//! (past the test harness's capture) and returns `None`.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A browser window (900×600) in a fresh profile, and the chromedriver that runs it.
pub struct Browser {
    client: Client,
    driver: Driver,
}

/// chromedriver, killed with its process group on drop.
struct Driver {
    child: Child,
    /// The profile directory; its name (`vmproxy-test-browser-…`) is on the command line of
    /// the browser's processes, for the leftover check in `.ci/run`.
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a session.
    ///
    /// `None` when chromium or chromedriver is not installed and `CI` is not `true`; panics
    /// under `CI=true`, where a missing browser must fail the run rather than skip the test.
    pub async fn start() -> Option<Browser> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            let what = format!(
                "{} not installed (apt-get install -y chromium chromium-driver)",
                missing.join(" and ")
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true: the browser tests must run, but {what}");
            }
            // Straight to the terminal: the harness captures eprintln! of a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "\n\n*** BROWSER TEST SKIPPED: {what} ***\n*** it passes here without having run; under CI=true it fails ***\n"
            );
            return None;
        }

        static N: AtomicUsize = AtomicUsize::new(0);
        let profile = std::env::temp_dir().join(format!(
            "vmproxy-test-browser-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Chromium's crash handler leaves the process group: with its database in the
            // profile, it names the profile too, and dies with the rest.
            .env("XDG_CONFIG_HOME", profile.join("config"))
            // Its own process group, with the browser it launches: one kill ends them all.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}"));
        // From here on, a panic drops the guard and the processes with it.
        let mut driver = Driver {
            child: driver,
            profile,
        };
        let port = driver.port();
        let client = Self::session(port, &driver.profile)
            .await
            .unwrap_or_else(|e| panic!("chromedriver on port {port} opened no session: {e}"));
        client
            .set_window_size(900, 600)
            .await
            .unwrap_or_else(|e| panic!("window size: {e}"));
        Some(Browser { client, driver })
    }

    async fn session(port: u16, profile: &Path) -> Result<Client, String> {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--window-size=900,600",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| e.to_string())
    }

    /// The WebDriver client, for what the methods here do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The current document's URL.
    pub async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// The current document's HTML.
    pub async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    /// The first element matching the CSS selector, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        self.client.find(Locator::Css(css)).await.ok()
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        self.client.screenshot().await.unwrap()
    }

    /// Polls the page's HTML until `done` holds and returns it; panics after `limit` with the
    /// last HTML seen. A page that reloads itself may be between documents when asked: that
    /// look is skipped.
    pub async fn wait_for_source(&self, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = String::new();
        loop {
            if let Ok(source) = self.client.source().await {
                if done(&source) {
                    return source;
                }
                last = source;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page did not get there within {limit:?}; last seen:\n{last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session (chromedriver closes the browser), then everything else as on drop.
    pub async fn close(self) {
        let Browser { client, driver } = self;
        let _ = client.close().await;
        drop(driver);
    }
}

impl Driver {
    /// Reads chromedriver's "started successfully on port N" line.
    fn port(&mut self) -> u16 {
        let stdout = self.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("on port ")
                    .nth(1)
                    .and_then(|p| p.trim_end_matches('.').trim().parse::<u16>().ok())
                    .filter(|p| *p != 0)
                {
                    let _ = tx.send(port);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("chromedriver did not say which port it listens on within 30 s")
    }
}

impl Drop for Driver {
    /// Kills chromedriver's process group (the browser with it), then any browser process still
    /// naming the profile, and removes the profile.
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        kill_naming(&self.profile);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// SIGKILL to every process whose command line names `profile`: a browser process that left
/// the group (a zygote may start its own session) must not outlive the test either.
fn kill_naming(profile: &Path) {
    let needle = profile.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
