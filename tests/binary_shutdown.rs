//! A shutdown that cannot stop a machine says so and exits non-zero: a VM left billing
//! silently is the failure this crate exists to prevent.
#![cfg(feature = "emulator")]

mod common;
mod gce_support;

use std::net::SocketAddr;

use common::binary::{Parked, Proxy};
use nix::sys::signal::Signal;
use vmproxy::emulator::Emulator;

/// The binary's config: one route, `/vm`, to `instance` on the emulator; `route_extra` is added
/// to the route's keys.
fn config(emu: &Emulator, grace: &str, instance: &str, route_extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n\n[[route]]\npath = \"/vm\"\nstrip_prefix = true\n\
         health_path = \"/healthz\"\n{route_extra}\n[route.gce]\nendpoint = \"{}\"\nzone = \"{}\"\ninstance = \"{instance}\"\nport = {}\n",
        emu.compute_base(),
        gce_support::ZONE,
        gce_support::PORT
    )
}

#[tokio::test]
async fn a_machine_that_cannot_be_stopped_is_named_and_the_exit_is_non_zero() {
    let emu = gce_support::emulator().await;
    let config = config(&emu, "2s", "stuck", "");
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

/// A VM created for a start whose readiness never passes is deleted on shutdown, not left
/// billing while the proxy waits out `start_timeout`.
#[tokio::test]
async fn sigterm_during_a_vm_start_that_never_becomes_ready_deletes_the_vm_and_exits_0() {
    let emu = gce_support::emulator().await;
    emu.set_never_healthy(true);
    let config = config(&emu, "1s", "never-ready", "start_timeout = \"10m\"\n");
    let mut proxy = Proxy::start(&config, &[("GCE_METADATA_HOST", &emu.metadata_host())]);
    let parked = Parked::get(proxy.addr, "/vm/hello");
    common::eventually(std::time::Duration::from_secs(20), || {
        proxy.log().contains("probing readiness")
    })
    .await;
    let created = emu.instance(gce_support::ZONE, "never-ready");
    assert_eq!(created.map(|i| i.status).as_deref(), Some("RUNNING"));

    // Bounded (60 s): on a hang the test fails instead of waiting for start_timeout.
    let code = proxy.signal_and_wait(Signal::SIGTERM).await;
    let log = proxy.log();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("start cancelled"), "{log}");
    assert!(
        emu.instance(gce_support::ZONE, "never-ready").is_none(),
        "the VM is left running:\n{log}"
    );
    parked
        .assert_refused_or_closed(std::time::Duration::from_secs(5))
        .await;
}

/// A start cancelled by SIGTERM whose VM the Compute API then refuses to delete: the VM may
/// bill on, so the exit says so (non-zero, an ERROR naming the machine), as for a machine that
/// cannot be stopped.
#[tokio::test]
async fn a_cancelled_start_whose_vm_cannot_be_deleted_is_named_and_the_exit_is_non_zero() {
    let emu = gce_support::emulator().await;
    emu.set_never_healthy(true);
    let config = config(&emu, "1s", "undeletable", "start_timeout = \"10m\"\n");
    let mut proxy = Proxy::start(&config, &[("GCE_METADATA_HOST", &emu.metadata_host())]);
    let _parked = Parked::get(proxy.addr, "/vm/hello");
    common::eventually(std::time::Duration::from_secs(20), || {
        proxy.log().contains("probing readiness")
    })
    .await;
    emu.fail_next("instances.delete", 1000, 403, "forbidden");
    emu.fail_next("instances.stop", 1000, 403, "forbidden");

    let code = proxy.signal_and_wait(Signal::SIGTERM).await;
    let log = proxy.log();
    assert_ne!(code, Some(0), "exited 0 with the VM left:\n{log}");
    let left = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("LEFT RUNNING"))
        .unwrap_or_else(|| panic!("no ERROR naming the machine left:\n{log}"));
    assert!(left.contains("undeletable"), "{left}");
    assert!(
        emu.instance(gce_support::ZONE, "undeletable").is_some(),
        "the VM is there, as the log says"
    );
}
