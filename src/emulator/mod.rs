//! Loopback Compute Engine emulator (placeholder: being written).

use crate::BoxError;

/// `vmproxy emulate ARGS…`: runs the emulator until Ctrl-C / SIGTERM.
pub async fn run_cli(args: &[String]) -> Result<(), BoxError> {
    let _ = args;
    Err("not implemented yet".into())
}
