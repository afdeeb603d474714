//! The Compute Engine backend end to end through the layer, against the loopback emulator.
#![cfg(feature = "emulator")]

mod gce_support;

use axum::http::StatusCode;
use gce_support::*;
use vmproxy::State;

#[tokio::test]
async fn cold_start_inserts_then_proxies() {
    let emu = emulator().await;
    let route = route(backend(&emu, "cold").build().unwrap());
    let app = app(route.clone());

    let (status, body) = call(&app, "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "front"));
    assert_eq!(
        emu.count("instances.insert"),
        0,
        "the front never touches the VM"
    );

    let echo = echo(&app, "/vm/hello?x=1").await;
    assert_eq!(echo["path"], "/vm/hello?x=1");
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["instance"], "cold");
    assert!(
        echo["headers"].get("authorization").is_none(),
        "the API token never reaches the VM"
    );

    let info = emu.instance(ZONE, "cold").unwrap();
    assert_eq!(info.status, "RUNNING");
    assert_eq!(info.labels["managed-by"], "vmproxy");
    let State::Running(ep) = route.handle().state() else {
        panic!("not running")
    };
    assert_eq!(
        ep.addr(),
        std::net::SocketAddr::new(info.nat_ip.unwrap(), PORT),
        "external address by default"
    );
    assert_ne!(info.nat_ip, Some(info.network_ip));
    assert_eq!(emu.count("instances.insert"), 1);
    assert!(emu.count("zoneOperations.wait") >= 1);
    // The insert carried a requestId.
    let insert = emu
        .calls()
        .into_iter()
        .find(|c| c.method == "instances.insert")
        .unwrap();
    assert!(insert.path.contains("requestId="), "{}", insert.path);
}
