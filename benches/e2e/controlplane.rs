//! Control-plane calls per cold start on the Compute Engine emulator.

use crate::common::{Args, BoxError};

pub async fn controlplane(args: Args) -> Result<(), BoxError> {
    let _ = args;
    Err("the emulator is not ready yet (vmproxy::emulator is a placeholder)".into())
}
