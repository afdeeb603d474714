//! The `vmproxy` binary's configuration file: TOML, checked key by key.
//!
//! Every problem is reported with the key's path and the reason (`route[0].idle_timeout:
//! invalid duration "10x"…`), and unknown keys are errors, so a typo never silently falls
//! back to a default.
//!
//! `listen` and `[admin] listen` may read the environment: `"0.0.0.0:${PORT}"`, or
//! `"0.0.0.0:${PORT:-8080}"` with a default (used when the variable is unset or empty). An unset
//! variable with no default is an error naming it. No other key is expanded: a process
//! `command` keeps its `${...}` for the shell it may run.
//!
//! # Example
//!
//! ```
//! use vmproxy::config::Config;
//!
//! let config = Config::parse(r#"
//!     listen = "127.0.0.1:8080"
//!
//!     [[route]]
//!     path = "/app"
//!     idle_timeout = "10m"
//!
//!     [route.process]
//!     command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
//! "#).unwrap();
//! assert_eq!(config.listen.port(), 8080);
//! let layer = config.layer().unwrap();
//! assert_eq!(layer.routes()[0].prefixes(), ["/app"]);
//!
//! let err = Config::parse("listen = \"127.0.0.1:8080\"\nidle = 3\n").unwrap_err();
//! assert!(err.to_string().contains("idle"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::backend::process::ProcessBackend;
use crate::waiting::Template;
use crate::{Admission, Route, RouteBuilder, VmProxyLayer};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address to serve on.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// How long in-flight requests may run after SIGTERM or Ctrl-C (default 30 s).
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// How long a client has to send a complete request head (default 30 s).
    #[serde(default = "default_header_read_timeout", deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight stays open (default 60 s).
    #[serde(default = "default_keepalive_timeout", deserialize_with = "duration")]
    pub keepalive_timeout: Duration,
    /// How long a request body may send nothing before the request is aborted (default 60 s).
    #[serde(
        default = "default_request_body_timeout",
        deserialize_with = "duration"
    )]
    pub request_body_timeout: Duration,
    /// How long a response may wait for the client to read any of it (default 60 s).
    #[serde(default = "default_send_timeout", deserialize_with = "duration")]
    pub send_timeout: Duration,
    /// Connections served at once; more wait in the backlog (default: from the open-file limit).
    pub max_connections: Option<usize>,
    /// The listen backlog (default 4096, capped by the system's `net.core.somaxconn`).
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
    /// Threads serving connections, each with its own runtime and listening socket (default:
    /// one per core).
    pub workers: Option<usize>,
    /// The routes, matched in order.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// The admin API, metrics and status page on a listener of their own (off when absent).
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: where the [admin API and status page](crate::admin) are served.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The address to serve them on; a loopback address unless a `token` is set.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// When set, every admin request needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// One `[[route]]`: a path prefix and its machine.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The prefix, matched per segment.
    pub path: String,
    /// More prefixes served by the same machine.
    #[serde(default)]
    pub also: Vec<String>,
    /// The machine's name in logs (default: the backend's).
    pub name: Option<String>,
    /// Forward `/app/x` as `/x`.
    #[serde(default)]
    pub strip_prefix: bool,
    /// The readiness probe's path (default: the route's path, or `/` when stripped).
    pub health_path: Option<String>,
    /// Idle time before the machine is stopped; "0s" disables it (default "10m").
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// How long a request waits for a cold start before 504 (default "5m").
    #[serde(default, deserialize_with = "opt_duration")]
    pub cold_start_timeout: Option<Duration>,
    /// `"wait"` (default), or `"deadline"`: a request that past starts say would not be served
    /// within `cold_start_timeout` gets 503 + `Retry-After` at once (see
    /// [`RouteBuilder::admission`]).
    #[serde(default, deserialize_with = "opt_admission")]
    pub admission: Option<Admission>,
    /// How long a start may take before it is given up (default "10m").
    #[serde(default, deserialize_with = "opt_duration")]
    pub start_timeout: Option<Duration>,
    /// How many requests may wait for a start (default 10000).
    pub max_pending: Option<usize>,
    /// Keep X-Forwarded-Proto/-Host from a trusted front (default false).
    #[serde(default)]
    pub trust_forwarded_headers: bool,
    /// A machine lost sooner than this after becoming ready counts as a failed start (default "10s").
    #[serde(default, deserialize_with = "opt_duration")]
    pub min_uptime: Option<Duration>,
    /// `Server-Timing` on responses that waited for a start (default true).
    pub server_timing: Option<bool>,
    /// Protocols a client may switch to with `Upgrade` (default `["websocket"]`).
    pub upgrades: Option<Vec<String>>,
    /// How long the machine may take to start its response once it has the request (default: no limit).
    #[serde(default, deserialize_with = "opt_duration")]
    pub response_header_timeout: Option<Duration>,
    /// Answer browsers at once with a page that reloads until the machine runs (default false).
    #[serde(default)]
    pub waiting_page: bool,
    /// An HTML file to use as the waiting page's template; [`Config::load`] takes a relative
    /// path from the config file's directory.
    pub waiting_page_template: Option<PathBuf>,
    /// A local command as the machine.
    pub process: Option<ProcessConfig>,
    /// A Compute Engine VM as the machine.
    #[cfg(feature = "gce")]
    pub gce: Option<crate::backend::gce::GceConfig>,
}

/// `[route.process]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Program and arguments; `{port}` is replaced by the port to listen on at 127.0.0.1.
    pub command: Vec<String>,
    /// Time between SIGTERM and SIGKILL (default "10s").
    #[serde(default, deserialize_with = "opt_duration")]
    pub stop_grace: Option<Duration>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
}

/// A problem with the file: where it is and why.
#[derive(Debug)]
pub struct ConfigFileError {
    file: Option<PathBuf>,
    key: String,
    reason: String,
}

impl ConfigFileError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigFileError {
            file: None,
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The key's path in the file, e.g. `route[0].idle_timeout` (empty for a syntax error).
    pub fn key(&self) -> &str {
        &self.key
    }

    fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_owned());
        self
    }
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ConfigFileError {}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigFileError::new("", format!("cannot read: {e}")).in_file(path))?;
        Config::parse_in(&text, path.parent()).map_err(|e| e.in_file(path))
    }

    /// Parses and checks the text of a file; relative paths in it are taken from the working
    /// directory.
    pub fn parse(text: &str) -> Result<Config, ConfigFileError> {
        Config::parse_in(text, None)
    }

    fn parse_in(text: &str, dir: Option<&Path>) -> Result<Config, ConfigFileError> {
        let de = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            // toml's message carries the line and a caret under the bad value.
            ConfigFileError::new(key, e.into_inner().to_string().trim_end().to_owned())
        })?;
        if let Some(dir) = dir {
            for r in &mut config.routes {
                if let Some(file) = &mut r.waiting_page_template {
                    *file = dir.join(&*file);
                }
            }
        }
        config.check()?;
        config.layer()?;
        Ok(config)
    }

    /// What the file cannot mean: no route, or a route that an earlier one hides.
    fn check(&self) -> Result<(), ConfigFileError> {
        if self.routes.is_empty() {
            return Err(ConfigFileError::new(
                "route",
                "no [[route]]: every request would get 404; add one (see the README)",
            ));
        }
        for (t, timeout) in [
            ("header_read_timeout", self.header_read_timeout),
            ("keepalive_timeout", self.keepalive_timeout),
            ("request_body_timeout", self.request_body_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if timeout.is_zero() {
                return Err(ConfigFileError::new(t, "must be more than zero"));
            }
        }
        if let Some(admin) = &self.admin {
            admin.check(self.listen)?;
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("workers", self.workers),
            ("listen_backlog", Some(self.listen_backlog as usize)),
        ] {
            if value == Some(0) {
                return Err(ConfigFileError::new(key, "must be at least 1"));
            }
        }
        let mut seen: Vec<(usize, &str, String)> = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            for (j, p) in std::iter::once(&r.path).chain(&r.also).enumerate() {
                let key = if j == 0 {
                    format!("route[{i}].path")
                } else {
                    format!("route[{i}].also[{}]", j - 1)
                };
                let Ok(canonical) = crate::path::canonical_prefix(p) else {
                    continue; // reported with its reason when the route is built
                };
                if let Some((k, earlier, _)) = seen
                    .iter()
                    .find(|(k, _, c)| *k != i && crate::path::under(c, &canonical))
                {
                    return Err(ConfigFileError::new(
                        key,
                        format!("{p:?} can never be reached: route[{k}] ({earlier:?}) comes first and takes every path under it"),
                    ));
                }
                seen.push((i, p, canonical));
            }
            if let Some(dir) = r.process.as_ref().and_then(|p| p.cwd.as_ref()) {
                if !dir.is_dir() {
                    return Err(ConfigFileError::new(
                        format!("route[{i}].process.cwd"),
                        format!("{} is not a directory", dir.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What may be a mistake but is not an error: a process command that does not seem to use
    /// its port, for example.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(layer) = self.layer() {
            let names: Vec<String> = layer
                .routes()
                .iter()
                .map(|r| r.handle().name().to_owned())
                .collect();
            for (i, name) in names.iter().enumerate() {
                if let Some(k) = names[..i].iter().position(|n| n == name) {
                    out.push(format!(
                        "route[{i}].name: route[{k}]'s machine has the same name ({name:?}); logs, metrics and the admin API cannot tell them apart: give each route a `name`"
                    ));
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.waiting_page_template.is_some() && !r.waiting_page {
                out.push(format!(
                    "route[{i}].waiting_page_template: no page is shown without waiting_page = true"
                ));
            }
            if let Some(p) = &r.process {
                let uses_port = p
                    .command
                    .iter()
                    .any(|a| a.contains("{port}") || a.contains("$PORT") || a.contains("${PORT}"));
                if !uses_port {
                    out.push(format!(
                        "route[{i}].process.command: neither {{port}} nor $PORT appears in it; the command must listen on 127.0.0.1 at the port given in $PORT, or the machine never becomes ready"
                    ));
                }
            }
        }
        out
    }

    /// The server with the file's connection limits.
    pub fn server(&self) -> crate::server::Server {
        let server = crate::server::Server::new()
            .header_read_timeout(self.header_read_timeout)
            .keepalive_timeout(self.keepalive_timeout)
            .request_body_timeout(self.request_body_timeout)
            .send_timeout(self.send_timeout)
            .listen_backlog(self.listen_backlog)
            .workers(
                self.workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
            );
        match self.max_connections {
            Some(max) => server.max_connections(max),
            None => server,
        }
    }

    /// Builds the layer that serves the file's routes.
    pub fn layer(&self) -> Result<VmProxyLayer, ConfigFileError> {
        let routes = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.route().map_err(|(key, reason)| {
                    ConfigFileError::new(format!("route[{i}]{key}"), reason)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmProxyLayer::from_routes(routes))
    }
}

impl AdminConfig {
    fn check(&self, proxy_listen: SocketAddr) -> Result<(), ConfigFileError> {
        match &self.token {
            Some(t) if t.trim().is_empty() => {
                return Err(ConfigFileError::new(
                    "admin.token",
                    "is empty; set a long random string, or remove the key",
                ));
            }
            Some(t) if t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(ConfigFileError::new(
                    "admin.token",
                    "must not contain spaces or control characters (it is sent as `Authorization: Bearer <token>`)",
                ));
            }
            None if !self.listen.ip().is_loopback() => {
                return Err(ConfigFileError::new(
                    "admin.token",
                    format!(
                        "is required when admin.listen ({}) is not a loopback address: anyone who reaches it could stop the machines",
                        self.listen
                    ),
                ));
            }
            _ => {}
        }
        if self.listen == proxy_listen && self.listen.port() != 0 {
            return Err(ConfigFileError::new(
                "admin.listen",
                "is the proxy's own `listen` address; give the admin API another port",
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    fn route(&self) -> Result<Route, (String, String)> {
        let mut builder = self.builder()?;
        for p in &self.also {
            builder = builder.prefix(p.clone());
        }
        if let Some(name) = &self.name {
            builder = builder.name(name.clone());
        }
        builder = builder
            .strip_prefix(self.strip_prefix)
            .trust_forwarded_headers(self.trust_forwarded_headers);
        if let Some(p) = &self.health_path {
            builder = builder.health_path(p.clone());
        }
        if let Some(d) = self.idle_timeout {
            builder = builder.idle_timeout((!d.is_zero()).then_some(d));
        }
        if let Some(d) = self.cold_start_timeout {
            builder = builder.cold_start_timeout(d);
        }
        if let Some(a) = self.admission {
            builder = builder.admission(a);
        }
        if let Some(d) = self.start_timeout {
            builder = builder.start_timeout(d);
        }
        if let Some(n) = self.max_pending {
            builder = builder.max_pending(n);
        }
        if let Some(d) = self.min_uptime {
            builder = builder.min_uptime(d);
        }
        if let Some(on) = self.server_timing {
            builder = builder.server_timing(on);
        }
        if let Some(up) = &self.upgrades {
            builder = builder.upgrades(up.iter().cloned());
        }
        builder = builder
            .response_header_timeout(self.response_header_timeout)
            .waiting_page(self.waiting_page);
        if let Some(path) = &self.waiting_page_template {
            let key = ".waiting_page_template".to_owned();
            let text = std::fs::read_to_string(path)
                .map_err(|e| (key.clone(), format!("cannot read {}: {e}", path.display())))?;
            // The template's own line numbers, with the file they are in.
            Template::parse(&text).map_err(|e| (key, format!("{}: {e}", path.display())))?;
            builder = builder.waiting_page_template(text);
        }
        builder.build().map_err(|e| {
            let key = match e.field() {
                "prefix" => "path",
                other => other,
            };
            (format!(".{key}"), e.reason().to_owned())
        })
    }

    fn builder(&self) -> Result<RouteBuilder, (String, String)> {
        #[cfg(feature = "gce")]
        let gce = self.gce.as_ref();
        // Without the backend there is no `[route.gce]` table (the key is refused as unknown).
        #[cfg(not(feature = "gce"))]
        let gce: Option<&std::convert::Infallible> = None;
        match (&self.process, gce) {
            (Some(p), None) => {
                let mut backend = ProcessBackend::new(p.command.iter().cloned())
                    .map_err(|e| (format!(".process.{}", e.field()), e.reason().to_owned()))?;
                if let Some(grace) = p.stop_grace {
                    backend = backend.stop_grace(grace);
                }
                for (k, v) in &p.env {
                    backend = backend.env(k.clone(), v.clone());
                }
                if let Some(dir) = &p.cwd {
                    backend = backend.current_dir(dir.clone());
                }
                Ok(Route::builder(self.path.clone(), backend))
            }
            #[cfg(feature = "gce")]
            (None, Some(g)) => {
                let backend = g
                    .clone()
                    .into_backend()
                    .map_err(|e| (format!(".gce.{}", e.field()), e.reason().to_owned()))?;
                Ok(Route::builder(self.path.clone(), backend))
            }
            #[cfg(not(feature = "gce"))]
            (None, Some(never)) => match *never {},
            (Some(_), Some(_)) => Err((
                String::new(),
                "has both [route.process] and [route.gce]; pick one".into(),
            )),
            (None, None) => Err((
                String::new(),
                "needs a backend table: [route.process] or [route.gce]".into(),
            )),
        }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_header_read_timeout() -> Duration {
    crate::server::HEADER_READ_TIMEOUT
}

fn default_keepalive_timeout() -> Duration {
    crate::server::KEEPALIVE_TIMEOUT
}

fn default_request_body_timeout() -> Duration {
    crate::server::REQUEST_BODY_TIMEOUT
}

fn default_listen_backlog() -> u32 {
    crate::server::LISTEN_BACKLOG
}

fn default_send_timeout() -> Duration {
    crate::server::SEND_TIMEOUT
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write it like \"250ms\", \"30s\" or \"10m\"")
    })
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn opt_admission<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Admission>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map(Some)
        .map_err(|e: crate::ConfigError| serde::de::Error::custom(e.reason()))
}

/// A listen address; `${VAR}` and `${VAR:-default}` in it are read from the environment, so a
/// platform that picks the port (Cloud Run's `$PORT`) needs no edit of the file.
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let written = String::deserialize(d)?;
    let s = expand_env(&written, |name| std::env::var(name).ok())
        .map_err(|e| serde::de::Error::custom(e.to_string()))?;
    s.parse().map_err(|_| {
        let from = if s == written {
            String::new()
        } else {
            format!(" (expanded from {written:?})")
        };
        serde::de::Error::custom(format!(
            "{s:?}{from} is not an address like \"127.0.0.1:8080\" or \"[::]:8080\""
        ))
    })
}

/// Why a `${...}` in a listen address could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ExpandError {
    /// `${NAME}` with `NAME` unset (or empty) and no `:-default`.
    Unset(String),
    /// A `${` with no closing `}`, or a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    Malformed(String),
}

impl fmt::Display for ExpandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpandError::Unset(name) => write!(
                f,
                "environment variable {name} is not set; set it, or give a default: ${{{name}:-8080}}"
            ),
            ExpandError::Malformed(text) => write!(
                f,
                "{text:?}: write a variable as ${{NAME}} or ${{NAME:-default}} (NAME: letters, digits, _)"
            ),
        }
    }
}

impl std::error::Error for ExpandError {}

/// Replaces `${NAME}` and `${NAME:-default}` the way a POSIX shell does (an empty value takes the
/// default too). Nothing else is special: a lone `$` stays as written.
fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ExpandError::Malformed(rest[at..].to_owned()))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ExpandError::Malformed(rest[at..at + 3 + end].to_owned()));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => return Err(ExpandError::Unset(name.to_owned())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8080"

[[route]]
path = "/app"
strip_prefix = false
health_path = "/healthz"
idle_timeout = "10m"
cold_start_timeout = "5m"
max_pending = 10000

[route.process]
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
stop_grace = "10s"
"#;

    fn err(text: &str) -> ConfigFileError {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            c.routes[0].process.as_ref().unwrap().stop_grace,
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&GOOD.replace("idle_timeout = \"10m\"", "idle_timeout = \"10x\""));
        assert_eq!(e.key(), "route[0].idle_timeout", "{e}");
        assert!(e.to_string().contains("invalid duration"), "{e}");

        let e = err(&GOOD.replace("strip_prefix", "strip_prefixx"));
        assert_eq!(e.key(), "route[0].strip_prefixx", "{e}");
        assert!(e.to_string().contains("strip_prefixx"), "{e}");

        let e = err(&GOOD.replace(
            "\"python3\", \"-m\", \"http.server\", \"{port}\", \"--bind\", \"127.0.0.1\"",
            "",
        ));
        assert_eq!(e.key(), "route[0].process.command", "{e}");

        let e = err(&GOOD.replace("127.0.0.1:8080", "localhost:99999"));
        assert_eq!(e.key(), "listen", "{e}");

        let e = err(&GOOD.replace("path = \"/app\"", "path = \"app\""));
        assert_eq!(e.key(), "route[0].path", "{e}");

        let e = err(&GOOD.replace("max_pending = 10000", "max_pending = 0"));
        assert_eq!(e.key(), "route[0].max_pending", "{e}");

        let e = err("listen = \"127.0.0.1:1\"\n[[route]]\npath = \"/a\"\n");
        assert_eq!(e.key(), "route[0]", "{e}");

        let e = err("listen = [");
        assert!(e.to_string().contains("line 1"), "{e}");

        // A name goes into log lines: a newline in it would forge one.
        let e = err(&GOOD.replace(
            "strip_prefix = false",
            "strip_prefix = false\nname = \"a\\nb\"",
        ));
        assert_eq!(e.key(), "route[0].name", "{e}");
        assert!(e.to_string().contains("control characters"), "{e}");
    }

    #[test]
    fn what_cannot_serve_is_refused_before_serving() {
        let e = err("listen = \"127.0.0.1:8080\"\n");
        assert_eq!(e.key(), "route", "{e}");

        let shadowed = format!(
            "{GOOD}\n[[route]]\npath = \"/app/admin\"\n[route.process]\ncommand = [\"x\", \"{{port}}\"]\n"
        );
        let e = err(&shadowed);
        assert_eq!(e.key(), "route[1].path", "{e}");
        assert!(e.to_string().contains("route[0]"), "names both: {e}");
        let e = err(&shadowed.replace("path = \"/app/admin\"", "path = \"/b\"\nalso = [\"/app\"]"));
        assert_eq!(e.key(), "route[1].also[0]", "{e}");
        // A longer prefix first, a shorter one after: both reachable.
        let both = shadowed.replacen("path = \"/app\"", "path = \"/app/x\"", 1);
        let both = both.replace("path = \"/app/admin\"", "path = \"/app\"");
        Config::parse(&both).unwrap();

        let e = err(&GOOD.replace("stop_grace", "cwd = \"/no/such/dir\"\nstop_grace"));
        assert_eq!(e.key(), "route[0].process.cwd", "{e}");
        assert!(e.to_string().contains("/no/such/dir"), "{e}");

        for (key, line) in [
            ("header_read_timeout", "header_read_timeout = \"0s\""),
            ("max_connections", "max_connections = 0"),
            ("workers", "workers = 0"),
            ("listen_backlog", "listen_backlog = 0"),
        ] {
            let e = err(&GOOD.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{line}"),
            ));
            assert_eq!(e.key(), key, "{e}");
        }
        let e = err(&GOOD.replace("max_pending = 10000", "upgrades = [\"websocket\", \"h2c\"]"));
        assert_eq!(e.key(), "route[0].upgrades", "{e}");
    }

    #[test]
    fn a_command_that_ignores_its_port_is_warned_about() {
        assert!(Config::parse(GOOD).unwrap().warnings().is_empty());
        let c = Config::parse(&GOOD.replace("\"{port}\", ", "")).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("route[0].process.command"), "{w:?}");
        let c = Config::parse(&GOOD.replace(
            "[\"python3\", \"-m\", \"http.server\", \"{port}\", \"--bind\", \"127.0.0.1\"]",
            "[\"sh\", \"-c\", \"exec python3 -m http.server $PORT\"]",
        ))
        .unwrap();
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn a_waiting_page_template_is_read_and_checked_at_load() {
        let dir = std::env::temp_dir().join(format!("vmproxy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let with = |line: &str| GOOD.replace("max_pending = 10000", line);

        let c = Config::parse(&with("waiting_page = true")).unwrap();
        assert!(c.routes[0].waiting_page);
        assert!(c.warnings().is_empty());

        let e = err(&with(
            "waiting_page = true\nwaiting_page_template = \"/no/such/page.html\"",
        ));
        assert_eq!(e.key(), "route[0].waiting_page_template", "{e}");
        assert!(e.to_string().contains("/no/such/page.html"), "{e}");

        // A relative path is the config file's neighbour, wherever the proxy runs from.
        std::fs::write(dir.join("page.html"), "<p>\n{{machin}}</p>").unwrap();
        let file = dir.join("vmproxy.toml");
        std::fs::write(
            &file,
            with("waiting_page = true\nwaiting_page_template = \"page.html\""),
        )
        .unwrap();
        let e = Config::load(&file).unwrap_err();
        assert_eq!(e.key(), "route[0].waiting_page_template", "{e}");
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("{{machin}}"), "{e}");
        std::fs::write(dir.join("page.html"), "<p>{{machine}}</p>").unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(
            c.routes[0].waiting_page_template.as_deref(),
            Some(dir.join("page.html").as_path())
        );

        // A template with no page to show is a likely slip.
        let c = Config::parse(&with(&format!(
            "waiting_page_template = {:?}",
            dir.join("page.html")
        )))
        .unwrap();
        assert_eq!(c.warnings().len(), 1, "{:?}", c.warnings());
        assert!(c.warnings()[0].starts_with("route[0].waiting_page_template"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_admin_listener_is_loopback_or_needs_a_token() {
        let with = |admin: &str| format!("{GOOD}\n[admin]\n{admin}\n");
        let c = Config::parse(&with("listen = \"127.0.0.1:9090\"")).unwrap();
        assert_eq!(c.admin.unwrap().listen.port(), 9090);
        Config::parse(&with("listen = \"[::1]:9090\"")).unwrap();
        let e = err(&with("listen = \"0.0.0.0:9090\""));
        assert_eq!(e.key(), "admin.token", "{e}");
        assert!(e.to_string().contains("0.0.0.0:9090"), "{e}");
        let c = Config::parse(&with("listen = \"0.0.0.0:9090\"\ntoken = \"s3cret\"")).unwrap();
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token stays out of Debug"
        );
        let e = err(&with("listen = \"127.0.0.1:9090\"\ntoken = \"\""));
        assert_eq!(e.key(), "admin.token", "{e}");
        let e = err(&with("listen = \"127.0.0.1:8080\""));
        assert_eq!(e.key(), "admin.listen", "{e}");
        let e = err(&with("listen = \"127.0.0.1:9090\"\nport = 1"));
        assert_eq!(e.key(), "admin.port", "{e}");
    }

    #[test]
    fn machines_with_one_name_are_warned_about() {
        let two = format!(
            "{GOOD}\n[[route]]\npath = \"/b\"\n[route.process]\ncommand = [\"python3\", \"{{port}}\"]\n"
        );
        let w = Config::parse(&two).unwrap().warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("route[1].name"), "{w:?}");
        let named = two.replace("path = \"/b\"", "path = \"/b\"\nname = \"b\"");
        assert!(Config::parse(&named).unwrap().warnings().is_empty());
    }

    #[test]
    fn listen_expands_variables() {
        let env = |name: &str| match name {
            "PORT" => Some("9000".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let x = |s: &str| expand_env(s, env);
        assert_eq!(x("0.0.0.0:${PORT}").unwrap(), "0.0.0.0:9000");
        assert_eq!(x("0.0.0.0:${PORT:-8080}").unwrap(), "0.0.0.0:9000");
        assert_eq!(x("0.0.0.0:${NOPE:-8080}").unwrap(), "0.0.0.0:8080");
        assert_eq!(
            x("${EMPTY:-8080}").unwrap(),
            "8080",
            "empty takes the default"
        );
        assert_eq!(x("${HOST:-[::]}:${PORT}").unwrap(), "[::]:9000");
        assert_eq!(x("127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(x("$PORT").unwrap(), "$PORT", "only ${{...}} is expanded");
        assert_eq!(x("0.0.0.0:${NOPE}"), Err(ExpandError::Unset("NOPE".into())));
        assert_eq!(
            x("0.0.0.0:${EMPTY}"),
            Err(ExpandError::Unset("EMPTY".into()))
        );
        assert!(matches!(
            x("0.0.0.0:${PORT"),
            Err(ExpandError::Malformed(_))
        ));
        assert!(matches!(x("0.0.0.0:${}"), Err(ExpandError::Malformed(_))));
        assert!(matches!(x("0.0.0.0:${1X}"), Err(ExpandError::Malformed(_))));
        assert!(matches!(
            x("0.0.0.0:${A B}"),
            Err(ExpandError::Malformed(_))
        ));
    }

    #[test]
    fn an_unset_listen_variable_is_a_config_error_naming_it() {
        // A name no environment sets; no set_var needed (other tests run in parallel).
        let var = "VMPROXY_TEST_SURELY_UNSET_PORT";
        let e = err(&GOOD.replace("127.0.0.1:8080", &format!("127.0.0.1:${{{var}}}")));
        assert_eq!(e.key(), "listen", "{e}");
        assert!(e.to_string().contains(var), "{e}");
        let c =
            Config::parse(&GOOD.replace("127.0.0.1:8080", &format!("127.0.0.1:${{{var}:-8181}}")))
                .unwrap();
        assert_eq!(c.listen.port(), 8181);

        let admin = |listen: &str| format!("{GOOD}\n[admin]\nlisten = \"{listen}\"\n");
        let c = Config::parse(&admin(&format!("127.0.0.1:${{{var}:-9191}}"))).unwrap();
        assert_eq!(c.admin.unwrap().listen.port(), 9191);
        let e = err(&admin(&format!("127.0.0.1:${{{var}}}")));
        assert_eq!(e.key(), "admin.listen", "{e}");
        assert!(e.to_string().contains(var), "{e}");
        let e = err(&admin(&format!("127.0.0.1:${{{var}:-x}}")));
        assert!(e.to_string().contains("expanded from"), "{e}");

        // Nowhere else: a command keeps its `${...}` for the shell it runs.
        let c = Config::parse(&GOOD.replace(
            "[\"python3\", \"-m\", \"http.server\", \"{port}\", \"--bind\", \"127.0.0.1\"]",
            &format!("[\"sh\", \"-c\", \"exec python3 -m http.server ${{PORT}} # ${{{var}}}\"]"),
        ))
        .unwrap();
        assert!(c.routes[0].process.as_ref().unwrap().command[2].contains(var));
    }

    #[test]
    fn admission_is_wait_or_deadline() {
        let with = |line: &str| GOOD.replace("max_pending = 10000", line);
        assert_eq!(Config::parse(GOOD).unwrap().routes[0].admission, None);
        for (value, admission) in [("wait", Admission::Wait), ("deadline", Admission::Deadline)] {
            let c = Config::parse(&with(&format!("admission = \"{value}\""))).unwrap();
            assert_eq!(c.routes[0].admission, Some(admission));
        }
        for bad in ["\"Deadline\"", "\"\"", "\"fast\"", "true", "1"] {
            let e = err(&with(&format!("admission = {bad}")));
            assert_eq!(e.key(), "route[0].admission", "{bad}: {e}");
        }
        let e = err(&with("admission = \"fast\""));
        assert!(
            e.to_string()
                .contains("\"fast\" is not an admission; write \"wait\" or \"deadline\""),
            "{e}"
        );
    }

    #[test]
    fn zero_idle_disables_scale_to_zero() {
        let c = Config::parse(&GOOD.replace("\"10m\"", "\"0s\"")).unwrap();
        assert_eq!(c.routes[0].idle_timeout, Some(Duration::ZERO));
        c.layer().unwrap();
    }
}
