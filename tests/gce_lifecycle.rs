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

#[tokio::test]
async fn internal_address_is_the_network_ip() {
    let emu = emulator().await;
    let backend = backend(&emu, "inside")
        .address(vmproxy::backend::gce::Address::Internal)
        .build()
        .unwrap();
    let route = route(backend);
    let ep = route.handle().start().await.unwrap();
    let info = emu.instance(ZONE, "inside").unwrap();
    assert_eq!(ep.addr(), std::net::SocketAddr::new(info.network_ip, PORT));
    let echo = echo(&app(route), "/vm/x").await;
    assert_eq!(echo["instance"], "inside");
}

/// Every insert was answered 409: the VM that was there is used.
fn assert_no_vm_created(emu: &vmproxy::emulator::Emulator) {
    let inserts: Vec<u16> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .map(|c| c.status)
        .collect();
    assert!(inserts.iter().all(|s| *s == 409), "{inserts:?}");
}

#[tokio::test]
async fn a_running_vm_is_adopted_without_insert() {
    let emu = emulator().await;
    let seeded = emu.add_instance(ZONE, "already", "RUNNING", PORT).unwrap();
    let route = route(backend(&emu, "already").build().unwrap());
    let echo = echo(&app(route.clone()), "/vm/a").await;
    assert_eq!(echo["instance"], "already");
    // Insert first (no VM is the common case); its 409 says it exists.
    assert_no_vm_created(&emu);
    assert_eq!(emu.count("instances.start"), 0);
    let State::Running(ep) = route.handle().state() else {
        panic!()
    };
    assert_eq!(ep.addr().ip(), seeded.nat_ip.unwrap());
    assert_eq!(emu.instance(ZONE, "already").unwrap().id, seeded.id);
}

#[tokio::test]
async fn a_terminated_vm_is_started() {
    let emu = emulator().await;
    let seeded = emu
        .add_instance(ZONE, "sleeper", "TERMINATED", PORT)
        .unwrap();
    let route = route(backend(&emu, "sleeper").build().unwrap());
    let echo = echo(&app(route), "/vm/b").await;
    assert_eq!(echo["instance"], "sleeper");
    assert_no_vm_created(&emu);
    assert_eq!(emu.count("instances.start"), 1);
    let info = emu.instance(ZONE, "sleeper").unwrap();
    assert_eq!((info.status.as_str(), info.id), ("RUNNING", seeded.id));
    assert_eq!(
        info.network_ip, seeded.network_ip,
        "a restart keeps the internal IP"
    );
}

#[tokio::test]
async fn a_suspended_vm_is_resumed() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "frozen", "SUSPENDED", PORT).unwrap();
    let route = route(backend(&emu, "frozen").build().unwrap());
    echo(&app(route), "/vm/c").await;
    assert_eq!(emu.count("instances.resume"), 1);
    assert_eq!(emu.count("instances.start"), 0);
    assert_no_vm_created(&emu);
    assert_eq!(emu.instance(ZONE, "frozen").unwrap().status, "RUNNING");
}

#[tokio::test]
async fn stop_policy_delete_then_recreated_at_a_new_address() {
    let emu = emulator().await;
    let route = route(backend(&emu, "del").build().unwrap());
    let app = app(route.clone());
    echo(&app, "/vm/1").await;
    let first = emu.instance(ZONE, "del").unwrap();
    route.handle().stop().await;
    assert_eq!(route.handle().state(), State::Absent);
    assert!(emu.instance(ZONE, "del").is_none(), "deleted");
    assert_eq!(emu.count("instances.delete"), 1);

    echo(&app, "/vm/2").await;
    let second = emu.instance(ZONE, "del").unwrap();
    assert_eq!(emu.count("instances.insert"), 2);
    assert_ne!(second.id, first.id);
    assert_ne!(
        second.nat_ip, first.nat_ip,
        "a re-created VM comes back at a new address"
    );
    let State::Running(ep) = route.handle().state() else {
        panic!()
    };
    assert_eq!(ep.addr().ip(), second.nat_ip.unwrap());
}

#[tokio::test]
async fn stop_policy_stop_then_started() {
    let emu = emulator().await;
    let b = backend(&emu, "stopper")
        .stop_policy(vmproxy::backend::gce::StopPolicy::Stop)
        .build()
        .unwrap();
    let route = route(b);
    let app = app(route.clone());
    echo(&app, "/vm/1").await;
    route.handle().stop().await;
    assert_eq!(emu.instance(ZONE, "stopper").unwrap().status, "TERMINATED");
    assert_eq!(emu.count("instances.stop"), 1);
    assert_eq!(emu.count("instances.delete"), 0);

    echo(&app, "/vm/2").await;
    assert_eq!(emu.count("instances.start"), 1);
    assert_eq!(emu.count("instances.insert"), 1);
    assert_eq!(emu.instance(ZONE, "stopper").unwrap().status, "RUNNING");
}

#[tokio::test]
async fn stop_policy_suspend_then_resumed() {
    let emu = emulator().await;
    let b = backend(&emu, "napper")
        .stop_policy(vmproxy::backend::gce::StopPolicy::Suspend)
        .build()
        .unwrap();
    let route = route(b);
    let app = app(route.clone());
    echo(&app, "/vm/1").await;
    route.handle().stop().await;
    assert_eq!(emu.instance(ZONE, "napper").unwrap().status, "SUSPENDED");
    assert_eq!(emu.count("instances.suspend"), 1);

    echo(&app, "/vm/2").await;
    assert_eq!(emu.count("instances.resume"), 1);
    assert_eq!(emu.count("instances.insert"), 1);
}

#[tokio::test]
async fn idle_vm_is_taken_down_by_the_layer() {
    let emu = emulator().await;
    let route = route_with(backend(&emu, "idler").build().unwrap(), Some(ms(300)));
    let app = app(route.clone());
    echo(&app, "/vm/1").await;
    let labels = emu.instance(ZONE, "idler").map(|i| i.labels);
    assert!(
        labels
            .as_ref()
            .is_some_and(|l| l.contains_key("vmproxy-active")),
        "activity was recorded on the VM (with its insert): {labels:?}"
    );
    state_becomes(&route, "absent", |s| *s == State::Absent).await;
    eventually("the VM is deleted", || {
        emu.instance(ZONE, "idler").is_none()
    })
    .await;
    assert_eq!(emu.count("instances.delete"), 1);
}

#[tokio::test]
async fn insert_race_409_is_adopted() {
    let emu = emulator().await;
    // Another replica created it before our insert (409).
    let seeded = emu.add_instance(ZONE, "race", "RUNNING", PORT).unwrap();
    let route = route(backend(&emu, "race").build().unwrap());
    echo(&app(route), "/vm/r").await;
    let inserts: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .collect();
    assert_eq!(inserts.len(), 1);
    assert_eq!(inserts[0].status, 409);
    assert_eq!(
        emu.instance(ZONE, "race").unwrap().id,
        seeded.id,
        "the other replica's VM is used"
    );
}

#[tokio::test]
async fn operation_error_is_a_503_with_the_reason_and_a_later_request_succeeds() {
    let emu = emulator().await;
    emu.fail_next_operation("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED");
    let route = route(backend(&emu, "scarce").build().unwrap());
    let app = app(route.clone());
    let (status, body) = call(&app, "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("ZONE_RESOURCE_POOL_EXHAUSTED"), "{body}");
    assert!(body.contains("scarce") && body.contains(ZONE), "{body}");
    assert!(emu.instance(ZONE, "scarce").is_none());

    // After the layer's back-off, the next request starts it.
    state_becomes(&route, "absent", |s| *s == State::Absent).await;
    let mut ok = false;
    for _ in 0..100 {
        let (status, _) = call(&app, "/vm/x").await;
        if status == StatusCode::OK {
            ok = true;
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(ms(20)).await;
    }
    assert!(ok, "a later request succeeds");
    assert_eq!(emu.count("instances.insert"), 2);
}

#[tokio::test]
async fn quota_fails_at_once_without_retries() {
    let emu = emulator().await;
    emu.fail_next("instances.insert", 1, 403, "quotaExceeded");
    let route = route(backend(&emu, "poor").build().unwrap());
    let (status, body) = call(&app(route), "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("quota"), "{body}");
    assert_eq!(emu.count("instances.insert"), 1, "not retried");

    emu.fail_next_operation("instances.insert", "QUOTA_EXCEEDED");
    let route = self::route(backend(&emu, "poor2").build().unwrap());
    let (status, body) = call(&self::app(route), "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("QUOTA_EXCEEDED"), "{body}");
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_with_the_same_request_id() {
    let emu = emulator().await;
    emu.fail_next("instances.get", 1, 429, "rateLimitExceeded");
    emu.fail_next("instances.insert", 2, 403, "rateLimitExceeded");
    emu.fail_next("zoneOperations.wait", 1, 503, "backendError");
    let route = route(backend(&emu, "busy").build().unwrap());
    echo(&app(route), "/vm/x").await;
    let inserts: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .collect();
    assert_eq!(
        inserts.iter().map(|c| c.status).collect::<Vec<_>>(),
        [403, 403, 200]
    );
    assert!(
        inserts.iter().all(|c| c.path == inserts[0].path),
        "one requestId across retries: {inserts:?}"
    );
    assert_eq!(emu.instance(ZONE, "busy").unwrap().status, "RUNNING");
    assert_eq!(emu.count("instances.insert"), 3);
}

#[tokio::test]
async fn too_many_rate_limits_give_up() {
    let emu = emulator().await;
    emu.fail_next("instances.insert", 100, 429, "rateLimitExceeded");
    let b = backend(&emu, "throttled")
        .retry(3, ms(1), ms(2))
        .build()
        .unwrap();
    let (status, body) = call(&app(route(b)), "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("rate limit"), "{body}");
    let inserts: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .map(|c| c.status)
        .collect();
    assert_eq!(inserts, [429, 429, 429]);
    assert!(emu.instance(ZONE, "throttled").is_none());
}

#[tokio::test]
async fn wait_returning_early_is_looped() {
    let opts = vmproxy::emulator::EmulatorOptions::fast().timings(ms(150), ms(50), ms(20), ms(20));
    let emu = vmproxy::emulator::Emulator::start(opts).await.unwrap();
    emu.set_wait_returns_early(true);
    let route = route(backend(&emu, "early").build().unwrap());
    echo(&app(route), "/vm/x").await;
    let waits: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "zoneOperations.wait")
        .collect();
    assert!(
        waits.len() >= 2,
        "wait called again after an early return: {}",
        waits.len()
    );
    assert!(waits.iter().all(|c| c.status == 200));
}

#[tokio::test]
async fn never_healthy_boot_fails_the_start_and_cleans_up() {
    let emu = emulator().await;
    emu.set_never_healthy(true);
    let b = backend(&emu, "sick").build().unwrap();
    let route = vmproxy::Route::builder("/vm", b)
        .health_path("/healthz")
        .probe_interval(ms(5), ms(20))
        .start_timeout(ms(500))
        .start_backoff(ms(50), ms(100))
        .build()
        .unwrap();
    let (status, body) = call(&app(route.clone()), "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    eventually("the failed VM is deleted", || {
        emu.instance(ZONE, "sick").is_none()
    })
    .await;
    assert_eq!(emu.count("instances.delete"), 1);

    emu.set_never_healthy(false);
    state_becomes(&route, "absent", |s| *s == State::Absent).await;
    let mut ok = false;
    for _ in 0..100 {
        if call(&app(route.clone()), "/vm/x").await.0 == StatusCode::OK {
            ok = true;
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    assert!(ok);
}

async fn preempted_under_load(
    termination: vmproxy::backend::gce::TerminationAction,
    name: &'static str,
) {
    let emu = emulator().await;
    let b = backend(&emu, name)
        .termination_action(termination)
        .build()
        .unwrap();
    let route = route(b);
    let app = app(route.clone());
    echo(&app, "/vm/warm").await;
    let before = emu.instance(ZONE, name).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (app, stop) = (app.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (status, _) = call(&app, &format!("/vm/load/{i}")).await;
                seen.push(status);
                tokio::time::sleep(ms(5)).await;
            }
            seen
        }));
    }
    tokio::time::sleep(ms(100)).await;
    assert!(emu.preempt(ZONE, name));
    // Recovered: the VM is running again and requests are served there.
    eventually("the VM runs again", || {
        emu.instance(ZONE, name)
            .is_some_and(|i| i.status == "RUNNING")
    })
    .await;
    let after = emu.instance(ZONE, name).unwrap();
    state_becomes(
        &route,
        "running at the new address",
        |s| matches!(s, State::Running(ep) if Some(ep.addr().ip()) == after.nat_ip),
    )
    .await;
    echo(&app, "/vm/after").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        let seen = c.await.unwrap();
        assert!(
            seen.iter().all(|s| [200, 502, 503].contains(&s.as_u16())),
            "{seen:?}"
        );
        assert_eq!(seen.last().map(|s| s.as_u16()), Some(200), "{seen:?}");
    }
    assert_ne!(
        after.nat_ip, before.nat_ip,
        "the new external address is used"
    );
    if termination == vmproxy::backend::gce::TerminationAction::Delete {
        assert_eq!(emu.count("instances.insert"), 2);
        assert_ne!(after.id, before.id);
    } else {
        assert_eq!(emu.count("instances.start"), 1);
        assert_eq!(emu.count("instances.insert"), 1);
    }
}

#[tokio::test]
async fn preemption_under_load_recovers_with_start() {
    preempted_under_load(vmproxy::backend::gce::TerminationAction::Stop, "spot-stop").await;
}

#[tokio::test]
async fn preemption_under_load_recovers_with_insert_when_deleted() {
    preempted_under_load(vmproxy::backend::gce::TerminationAction::Delete, "spot-del").await;
}

#[tokio::test]
async fn the_token_comes_from_the_metadata_server() {
    let emu = emulator().await;
    // No project configured: it comes from the metadata server too.
    let route = route(backend(&emu, "authd").build().unwrap());
    echo(&app(route), "/vm/x").await;
    assert!(emu.count("metadata.token") >= 1);
    assert_eq!(emu.count("metadata.projectId"), 1);
    assert!(emu.tokens_issued() >= 1);
    let compute: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| !c.method.starts_with("metadata."))
        .collect();
    assert!(!compute.is_empty());
    assert!(compute.iter().all(|c| c.status != 401), "{compute:?}");
    assert!(compute
        .iter()
        .all(|c| c.path.contains(&format!("projects/{}/", emu.project()))));
}

#[tokio::test]
async fn foreign_tokens_are_refused() {
    let emu = emulator().await;
    let creds = google_cloud_auth::credentials::anonymous::Builder::new().build();
    let b = backend(&emu, "anon")
        .project("p")
        .credentials(creds)
        .build()
        .unwrap();
    let (status, body) = call(&app(route(b)), "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("not authorized") && body.contains("401"),
        "{body}"
    );
    assert_eq!(emu.count("metadata.token"), 0);
}

#[tokio::test]
async fn record_activity_survives_a_fingerprint_race() {
    let emu = emulator().await;
    let b = std::sync::Arc::new(backend(&emu, "labels").build().unwrap());
    let route = route(b.clone());
    route.handle().start().await.unwrap();
    use vmproxy::backend::Backend;
    // The first record after the start finds the label its insert wrote fresh: no call.
    b.record_activity().await.unwrap();
    assert_eq!(emu.count("instances.setLabels"), 0);
    emu.fail_next("instances.setLabels", 1, 412, "conditionNotMet");
    b.record_activity().await.unwrap();
    let info = emu.instance(ZONE, "labels").unwrap();
    let at: u64 = info.labels["vmproxy-active"].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - at <= 1);
    assert_eq!(
        info.labels["managed-by"], "vmproxy",
        "other labels are kept"
    );
    assert!(!b
        .idle_everywhere(std::time::Duration::from_secs(60))
        .await
        .unwrap());
    assert!(b.idle_everywhere(ms(0)).await.unwrap());
    let sets: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.setLabels")
        .map(|c| c.status)
        .collect();
    assert!(sets.ends_with(&[412, 200]), "{sets:?}");
}

/// An insert Compute Engine has not acted on yet when a forced stop cancels its start: the
/// cleanup must not look for the VM before the insert is answered, or it finds none and the
/// VM the insert then creates runs on, billed and unknown to the proxy.
#[tokio::test]
async fn a_start_cancelled_while_its_insert_is_in_flight_leaves_no_vm() {
    let emu = emulator().await;
    emu.hold_next("instances.insert", 1, ms(1500));
    let route = route(backend(&emu, "inflight").build().unwrap());
    let app = app(route.clone());
    let request = tokio::spawn(async move { call(&app, "/vm/x").await });
    // The insert is sent (the first call of a start with no VM believed to exist) and held.
    tokio::time::sleep(ms(500)).await;
    assert!(
        emu.instance(ZONE, "inflight").is_none(),
        "held: not created yet"
    );
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        route.handle().stop_now(),
    )
    .await
    .expect("the forced stop ends");
    let (status, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("cancelled"), "{body}");
    // Past the hold: whatever the insert made has been taken down.
    tokio::time::sleep(ms(1500)).await;
    assert!(
        emu.instance(ZONE, "inflight").is_none(),
        "the VM created by the in-flight insert was left: {:?}",
        emu.instance(ZONE, "inflight").map(|i| i.status)
    );
    assert_eq!(emu.count("instances.insert"), 1);
    assert_eq!(emu.count("instances.delete"), 1);
    assert_eq!(route.handle().state(), State::Absent);
}

/// The same, with an insert that outlasts the stop's own time: the stop cannot tell whether a
/// VM is coming, so it fails, and the machine is recorded as possibly left running (the binary
/// then names it and exits non-zero) instead of absent and clean.
#[tokio::test]
async fn a_stop_that_cannot_wait_out_an_insert_in_flight_says_so() {
    let emu = emulator().await;
    emu.hold_next("instances.insert", 1, ms(2000));
    let b = backend(&emu, "slowinsert")
        .stop_timeout(ms(300))
        .build()
        .unwrap();
    let route = route(b);
    let app = app(route.clone());
    let request = tokio::spawn(async move { call(&app, "/vm/x").await });
    tokio::time::sleep(ms(500)).await;
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        route.handle().stop_now(),
    )
    .await
    .expect("the forced stop ends");
    let (status, _) = request.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        route.handle().cleanup_failed(),
        "a stop that could not see the insert through must not pass for a clean one"
    );
    // The VM the insert made is found and taken down by the next stop.
    eventually("the held insert lands", || {
        emu.instance(ZONE, "slowinsert").is_some()
    })
    .await;
    route.handle().start().await.unwrap();
    route.handle().stop().await;
    eventually("the VM is deleted", || {
        emu.instance(ZONE, "slowinsert").is_none()
    })
    .await;
    assert!(!route.handle().cleanup_failed());
}
