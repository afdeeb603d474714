//! `vmproxy --config FILE.toml`: serves the file's routes, each to an on-demand machine, and
//! with `[admin]` the admin API, metrics and status page on a listener of their own.
//! `vmproxy emulate --listen ADDR` (feature `emulator`): a loopback Compute Engine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, StatusCode, Version};
use http_body_util::Full;
use tracing::{error, info, warn};
use vmproxy::config::Config;
use vmproxy::State;

#[path = "cli/access_log.rs"]
mod access_log;
use access_log::AccessLogLayer;

/// Serves the routes of a config file, each by a machine started on first use, stopped when idle.
#[derive(Debug, Parser)]
#[command(
    name = "vmproxy",
    version,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true,
    subcommand_negates_reqs = true,
    after_help = "Logs go to stderr; RUST_LOG sets the filter (default: info).\n\
                  Exit codes: 0 done, 1 machines left running, 2 a usage or config error."
)]
struct Cli {
    /// Serve the routes of FILE (its keys: see the README)
    #[arg(
        short,
        long,
        value_name = "FILE",
        env = "VMPROXY_CONFIG",
        required = true
    )]
    config: Option<PathBuf>,

    /// Only check the file, then exit (0: good, 2: bad)
    #[arg(long)]
    check: bool,

    /// Listen on ADDR (e.g. 0.0.0.0:8080) instead of the file's `listen`
    #[arg(long, value_name = "ADDR", env = "VMPROXY_LISTEN")]
    listen: Option<SocketAddr>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// A loopback Compute Engine for tests and demos (feature `emulator`; see its --help)
    #[command(disable_help_flag = true)]
    Emulate {
        /// The emulator's own options, passed to it as they are
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

/// The binary's allocator; the library leaves the choice to its user. Under load glibc's malloc
/// contended on its arena lock (log lines are allocated on a worker thread and freed on the log
/// writer's), and mimalloc's thread-local heaps make the warm path measurably faster.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Usage errors exit 2, --help and --version 0 (clap's codes, and ours).
    let cli = Cli::parse();
    // No transparent huge pages: mimalloc asks for them on its arenas, and a 2 MiB page made
    // resident for a few bytes raised the memory of a parked connection from ~20 KB to ~33 KB
    // (benches/e2e `parked-bin`). Nothing here gains from them.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    // Held until main returns, so that every line, the last ones included, is written.
    let (log_writer, _log_guard) = tracing_appender::non_blocking(PacedStderr::new());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(log_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    if let Some(Command::Emulate { args }) = &cli.command {
        return emulate(args).await;
    }
    let Some(path) = cli.config else {
        // clap requires it unless a subcommand is given.
        unreachable!("--config is required");
    };
    let mut config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmproxy: {e}");
            return ExitCode::from(2);
        }
    };
    for w in config.warnings() {
        warn!("{}: {w}", path.display());
    }
    if cli.check {
        println!("{}: ok ({} routes)", path.display(), config.routes.len());
        return ExitCode::SUCCESS;
    }
    let listen_from_flag = cli.listen.is_some();
    if let Some(addr) = cli.listen {
        config.listen = addr;
    }
    serve(config, &path, listen_from_flag).await
}

async fn serve(config: Config, path: &std::path::Path, listen_from_flag: bool) -> ExitCode {
    // Before the routes are built, so that their first gauges are recorded. Only the admin
    // listener exports metrics: without it, nothing is recorded.
    #[cfg(feature = "prometheus")]
    let prometheus = config.admin.as_ref().and_then(|_| install_prometheus());
    let layer = match config.layer() {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("vmproxy: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let listener = match config.server().bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            let from = if listen_from_flag {
                "--listen / VMPROXY_LISTEN".to_owned()
            } else {
                format!("{}: listen", path.display())
            };
            eprintln!(
                "vmproxy: {from}: cannot listen on {}: {e}\n\
                 (choose another address with --listen ADDR, VMPROXY_LISTEN=ADDR, or `listen` in {})",
                config.listen,
                path.display()
            );
            return ExitCode::from(2);
        }
    };
    let addr = listener.local_addr().map_or(config.listen, |a| a);
    let handles: Vec<_> = layer.routes().iter().map(|r| r.handle()).collect();
    let admin = match &config.admin {
        None => None,
        Some(admin_config) => {
            let listener = match tokio::net::TcpListener::bind(admin_config.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "vmproxy: {}: admin.listen: cannot listen on {}: {e}",
                        path.display(),
                        admin_config.listen
                    );
                    return ExitCode::from(2);
                }
            };
            let admin_addr = listener.local_addr().map_or(admin_config.listen, |a| a);
            let mut admin = vmproxy::admin::Admin::for_layer(&layer);
            if let Some(token) = &admin_config.token {
                admin = admin.token(token.clone());
            }
            #[cfg(feature = "prometheus")]
            if let Some(prometheus) = prometheus {
                admin = admin.metrics(move || prometheus.render());
            }
            // Served until the proxy's own server has finished, then dropped with its
            // connections (event streams never end on their own).
            let server = config
                .server()
                .workers(1)
                .serve(listener, admin, std::future::pending());
            info!(%admin_addr, token = admin_config.token.is_some(), "admin API and status page");
            Some(tokio::spawn(server))
        }
    };
    for r in layer.routes() {
        info!(machine = %r.handle().name(), prefixes = ?r.prefixes(), "route");
    }
    // Request ids, redacted credentials and the access log in front of everything.
    let app = tower::Layer::layer(
        &AccessLogLayer::new(),
        tower::Layer::layer(&layer, NotFound),
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = config.server().serve(listener, app, async {
        let _ = stop_rx.await;
    });
    let mut server = tokio::spawn(server);
    info!(%addr, "listening");

    shutdown_signal().await;
    info!(grace = ?config.shutdown_grace, "shutting down: no new connections; waiting for requests in flight");
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    let _ = stop_tx.send(());
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "server error"),
        Ok(Err(e)) => error!(error = %e, "server task failed"),
        Err(_) => {
            warn!("requests still in flight after the grace period; closing them");
            server.abort();
        }
    }
    // The admin API goes with the proxy's own listener: a start asked for now would only be
    // stopped again.
    if let Some(admin) = admin {
        admin.abort();
    }
    let mut left_running = 0;
    for handle in handles {
        if handle.in_use_elsewhere().await {
            // Another replica served through it after us: stopping it would cut them off.
            info!(
                machine = %handle.name(),
                "in use by another replica; leaving it running"
            );
            continue;
        }
        info!(machine = %handle.name(), "stopping");
        // Upgraded connections (WebSockets) may outlive the server: give them what is left of
        // the grace period, then stop regardless.
        if tokio::time::timeout_at(deadline, handle.stop())
            .await
            .is_err()
        {
            warn!(
                machine = %handle.name(),
                "still in use after the grace period; stopping it anyway"
            );
            handle.stop_now().await;
        }
        // A failed stop leaves the machine running (and, for a VM, billing): say so loudly.
        if let State::Running(ep) = handle.state() {
            error!(
                machine = %handle.name(),
                endpoint = %ep,
                "could not stop the machine; it is LEFT RUNNING: stop it by hand"
            );
            left_running += 1;
        } else if handle.cleanup_failed() {
            // A failed or cancelled start whose VM (or process) could not be removed.
            error!(
                machine = %handle.name(),
                "what a failed start made could not be removed; it may be LEFT RUNNING: check and remove it by hand"
            );
            left_running += 1;
        }
    }
    if left_running > 0 {
        error!(
            machines = left_running,
            "exiting with machines left running"
        );
        return ExitCode::FAILURE;
    }
    info!("bye");
    ExitCode::SUCCESS
}

/// Stderr as the log writer's thread writes it: buffered, and flushed in bursts. The thread
/// flushes whenever it has drained the lines waiting for it; unbuffered and unpaced, under load
/// that was a write(2) per access-log line and a thread woken (and spinning in `sched_yield`)
/// per line, on the cores the requests need. After a flush it rests [`LOG_PACE`], so lines are
/// written at most that much later and a burst of them is one write.
struct PacedStderr(std::io::BufWriter<std::io::Stderr>);

/// How long the log writer rests after a flush.
const LOG_PACE: std::time::Duration = std::time::Duration::from_millis(2);

impl PacedStderr {
    fn new() -> Self {
        PacedStderr(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ))
    }
}

impl std::io::Write for PacedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        std::thread::sleep(LOG_PACE);
        Ok(())
    }
}

/// Requests no route takes. They reach nothing, but bad ones still get the status that says
/// why: a CONNECT is no tunnel here (405), and a request without exactly one Host is malformed
/// (400, RFC 9112 §3.2). `OPTIONS *` asks about the server in general (RFC 9110 §9.3.7): the
/// methods it serves.
// A plain service rather than an axum `Router` fallback: the router boxed both bodies and
// cloned a boxed service on every request, proxied ones included.
fn not_found<B>(req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut res = http::Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // The text quotes the path: never to be sniffed as HTML.
        res.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        res
    };
    let allow = || HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH");
    if req.method() == Method::OPTIONS && req.uri() == "*" {
        let mut res = text(StatusCode::OK, String::new());
        res.headers_mut().remove(header::CONTENT_TYPE);
        res.headers_mut().insert(header::ALLOW, allow());
        return res;
    }
    if req.method() == Method::CONNECT {
        let mut res = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served here: this is no forward proxy\n".into(),
        );
        res.headers_mut().insert(header::ALLOW, allow());
        res
    } else {
        let hosts = req.headers().get_all(header::HOST).iter().count();
        if hosts > 1 || (hosts == 0 && req.version() == Version::HTTP_11) {
            text(
                StatusCode::BAD_REQUEST,
                "a request needs exactly one Host field (RFC 9112 §3.2)\n".into(),
            )
        } else {
            text(
                StatusCode::NOT_FOUND,
                format!("no route for {}\n", req.uri().path()),
            )
        }
    }
}

/// [`not_found`] as the service the proxy layer wraps.
#[derive(Clone, Copy)]
struct NotFound;

impl<B> tower::Service<http::Request<B>> for NotFound {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(not_found(&req)))
    }
}

/// Installs the Prometheus recorder, with histogram buckets for cold starts; returns the handle
/// that renders `/metrics`.
#[cfg(feature = "prometheus")]
fn install_prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use vmproxy::telemetry;

    let recorder = match PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Full(telemetry::COLD_START_SECONDS.to_owned()),
        telemetry::COLD_START_BUCKETS,
    ) {
        Ok(builder) => builder.build_recorder(),
        Err(e) => {
            warn!(error = %e, "metrics are not recorded");
            return None;
        }
    };
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        warn!(error = %e, "metrics are not recorded");
        return None;
    }
    // Drains histogram samples between scrapes, as the exporter asks of whoever installs it.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(feature = "emulator")]
async fn emulate(args: &[String]) -> ExitCode {
    match vmproxy::emulator::run_cli(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmproxy emulate: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(not(feature = "emulator"))]
async fn emulate(_args: &[String]) -> ExitCode {
    eprintln!("vmproxy: this build has no emulator; run it with `cargo run --features emulator -- emulate --listen 127.0.0.1:8085`");
    ExitCode::from(2)
}
