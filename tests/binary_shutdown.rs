//! A shutdown that cannot stop a machine says so and exits non-zero: a VM left billing
//! silently is the failure this crate exists to prevent.
#![cfg(feature = "emulator")]

mod common;
mod gce_support;

use std::net::SocketAddr;

use common::binary::Proxy;
use nix::sys::signal::Signal;

#[tokio::test]
async fn a_machine_that_cannot_be_stopped_is_named_and_the_exit_is_non_zero() {
    let emu = gce_support::emulator().await;
    let config = format!(
        "listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[[route]]\npath = \"/vm\"\nstrip_prefix = true\n\
         health_path = \"/healthz\"\n\n[route.gce]\nendpoint = \"{}\"\nzone = \"{}\"\ninstance = \"stuck\"\nport = {}\n",
        emu.compute_base(),
        gce_support::ZONE,
        gce_support::PORT
    );
    let mut proxy = Proxy::start(&config, &[("GCE_METADATA_HOST", &emu.metadata_host())]);
    let (status, _, body) = common::get_text(proxy.addr, "/vm/hello").await;
    assert_eq!(status, 200, "{body}");
    // The Compute API refuses every stop from now on.
    emu.fail_next("instances.delete", 1000, 403, "forbidden");
    emu.fail_next("instances.stop", 1000, 403, "forbidden");

    let code = proxy.signal_and_wait(Signal::SIGTERM).await;
    let log = proxy.log();
    assert_ne!(code, Some(0), "exited 0 with a VM left running:\n{log}");
    let left = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("LEFT RUNNING"))
        .unwrap_or_else(|| panic!("no ERROR naming the machine left running:\n{log}"));
    assert!(left.contains("stuck"), "{left}");
    assert!(
        emu.instance(gce_support::ZONE, "stuck").is_some(),
        "the VM is there, as the log says"
    );
    let _: SocketAddr = proxy.addr;
}
