//! Readiness probing: `GET` the health path until it answers 2xx, fast at first.
//!
//! The original probed at 3 s, 6 s, 9 s… so a machine that was ready could wait many seconds for
//! its first request. Here the first attempt comes at once and the gap grows ×1.5 from
//! `initial` to `max` (25 ms and 150 ms by default): the lag between ready and served stays
//! under `max`, and a refused connection on loopback or a LAN costs next to nothing.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

/// How often a start that is not ready yet says so at INFO.
const PROBE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

use crate::backend::{Backend, Endpoint};
use crate::BoxError;

/// How readiness is probed.
#[derive(Clone, Debug)]
pub(crate) struct ProbeConfig {
    pub(crate) path: String,
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) attempt_timeout: Duration,
}

/// Probes `ep` until the health path answers 2xx. Between attempts, asks the backend for the
/// machine's status every `status_interval`, so a machine that died while booting fails the
/// start instead of being probed until the start timeout.
pub(crate) async fn wait_ready(
    machine: &str,
    ep: Endpoint,
    cfg: &ProbeConfig,
    backend: &dyn Backend,
) -> Result<(), BoxError> {
    let status_every = backend.status_interval();
    let mut next_status = status_every.map(|every| Instant::now() + every);
    let mut gap = cfg.initial;
    let mut attempts = 0u32;
    let began = Instant::now();
    // Failed probes are logged at INFO now and then, so a start that never becomes ready says
    // why, without a line every 150 ms.
    let mut next_report = began + PROBE_REPORT_EVERY;
    loop {
        attempts += 1;
        let why = match tokio::time::timeout(cfg.attempt_timeout, attempt(ep, &cfg.path)).await {
            Ok(Ok(status)) if status.is_success() => {
                debug!(%ep, attempts, "ready");
                return Ok(());
            }
            Ok(Ok(status)) => format!("{} answered {status}", cfg.path),
            Ok(Err(e)) => format!("{e}"),
            Err(_) => format!("no answer within {:?}", cfg.attempt_timeout),
        };
        debug!(%ep, attempts, %why, "not ready");
        if Instant::now() >= next_report {
            next_report = Instant::now() + PROBE_REPORT_EVERY;
            info!(machine, %ep, attempts, waited = ?began.elapsed(), last = %why, "not ready yet");
        }
        if let (Some(at), Some(every)) = (next_status, status_every) {
            if Instant::now() >= at {
                next_status = Some(Instant::now() + every);
                let status = backend.status().await?;
                if status.is_down() {
                    return Err(format!(
                        "{} went down while starting (status: {status:?})",
                        backend.name()
                    )
                    .into());
                }
            }
        }
        tokio::time::sleep(gap).await;
        gap = gap.mul_f32(1.5).min(cfg.max);
    }
}

async fn attempt(ep: Endpoint, path: &str) -> Result<StatusCode, BoxError> {
    let stream = TcpStream::connect(ep.addr()).await?;
    let _ = stream.set_nodelay(true);
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends when `tx` is dropped after the answer.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(header::HOST, ep.addr().to_string())
        .header(
            header::USER_AGENT,
            concat!("vmproxy-probe/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())?;
    let res = tx.send_request(req).await?;
    Ok(res.status())
}
