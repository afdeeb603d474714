//! The end-to-end benchmark harness for `vmproxy`: one binary, one subcommand per role, driven
//! by `benches/run.sh` (see BENCHMARKS.md). Everything listens on 127.0.0.1 only.
//!
//! ```text
//! e2e backend        --addr-file F [--port P]      the shared backend server (13 B / 1 MiB)
//! e2e front-vmproxy  --backend ADDR --addr-file F  axum + VmProxyLayer, machine pre-warmed
//! e2e front-arp      --backend ADDR --addr-file F  axum-reverse-proxy
//! e2e coldstart      --n N --boot-ms MS --runs R --out F.json
//! e2e parked-mem     --n N                         the layer's memory per parked request
//! e2e parked-bin     --bin PATH --n N              the binary's memory per parked connection
//! e2e accept-storm   --bin PATH --n N [--backlog B] N clients connecting at once
//! e2e readiness      --machines K --runs R --out F.json
//! e2e controlplane   --out F.json                  (needs --features emulator)
//! ```

mod binary;
mod cold;
mod common;
mod controlplane;
mod readiness;
mod warm;

use common::{Args, BoxError};

fn main() -> Result<(), BoxError> {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` appends `--bench`; it means nothing here.
    argv.retain(|a| a != "--bench");
    let Some(cmd) = argv.first().cloned() else {
        eprintln!("usage: e2e <backend|front-vmproxy|front-arp|coldstart|parked-mem|parked-bin|accept-storm|readiness|controlplane> [--flags]");
        eprintln!("(run benches/run.sh to run everything)");
        return Ok(());
    };
    let args = Args::new(argv[1..].to_vec());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd.as_str() {
            "backend" => warm::backend(args).await,
            "front-vmproxy" => warm::front_vmproxy(args).await,
            "front-arp" => warm::front_arp(args).await,
            "front-cold" => cold::front_cold(args).await,
            "coldstart" => cold::coldstart(args).await,
            "parked-mem" => cold::parked_mem(args).await,
            "parked-bin" => binary::parked_bin(args).await,
            "accept-storm" => binary::accept_storm(args).await,
            "readiness" => readiness::readiness(args).await,
            "controlplane" => controlplane::controlplane(args).await,
            other => Err(format!("unknown subcommand {other:?}").into()),
        }
    })
}
