//! Two proxy replicas (two layers, two backends) sharing one VM through the emulator.
#![cfg(feature = "emulator")]

mod gce_support;

use std::time::Duration;

use axum::http::StatusCode;
use gce_support::*;
use vmproxy::State;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_vm_and_stop_it_only_when_both_are_idle() {
    let emu = emulator().await;
    let idle = Duration::from_secs(3);
    let a = route_with(backend(&emu, "shared").build().unwrap(), Some(idle));
    let b = route_with(backend(&emu, "shared").build().unwrap(), Some(idle));
    let (app_a, app_b) = (app(a.clone()), app(b.clone()));

    // 2 × 500 concurrent first requests.
    let mut tasks = Vec::new();
    for i in 0..500 {
        for app in [&app_a, &app_b] {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                call(&app, &format!("/vm/first/{i}")).await.0
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let inserts: Vec<u16> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .map(|c| c.status)
        .collect();
    assert_eq!(
        inserts.iter().filter(|s| **s == 200).count(),
        1,
        "exactly one VM created: {inserts:?}"
    );
    assert!(
        inserts.iter().all(|s| *s == 200 || *s == 409),
        "{inserts:?}"
    );
    assert!(
        inserts.len() <= 2,
        "at most one insert per replica: {inserts:?}"
    );
    let vm = emu.instance(ZONE, "shared").unwrap();
    assert!(matches!(a.handle().state(), State::Running(ep) if Some(ep.addr().ip()) == vm.nat_ip));
    assert!(matches!(b.handle().state(), State::Running(ep) if Some(ep.addr().ip()) == vm.nat_ip));

    // A goes quiet; B keeps serving for longer than the idle timeout: the VM stays.
    let busy_until = tokio::time::Instant::now() + idle + Duration::from_millis(1500);
    while tokio::time::Instant::now() < busy_until {
        let (status, _) = call(&app_b, "/vm/busy").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            emu.count("instances.delete"),
            0,
            "stopped while replica B was busy"
        );
        tokio::time::sleep(ms(100)).await;
    }
    assert_eq!(emu.instance(ZONE, "shared").unwrap().id, vm.id);
    assert_eq!(emu.instance(ZONE, "shared").unwrap().status, "RUNNING");
    assert!(
        emu.count("instances.setLabels") >= 2,
        "B refreshed the activity label"
    );

    // Both quiet: the VM is taken down, and both replicas see it gone.
    eventually("the VM is deleted once both replicas are idle", || {
        emu.instance(ZONE, "shared").is_none()
    })
    .await;
    state_becomes(&a, "absent", |s| *s == State::Absent).await;
    state_becomes(&b, "absent", |s| *s == State::Absent).await;
    assert!(emu.count("instances.delete") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_shuts_down_can_tell_whether_others_use_the_vm() {
    let emu = emulator().await;
    let idle = Some(Duration::from_secs(60));
    let a = route_with(backend(&emu, "shared-exit").build().unwrap(), idle);
    let b = route_with(backend(&emu, "shared-exit").build().unwrap(), idle);
    let (app_a, app_b) = (app(a.clone()), app(b.clone()));

    assert_eq!(call(&app_a, "/vm/a").await.0, StatusCode::OK);
    assert!(
        !a.handle().in_use_elsewhere().await,
        "only A has used the VM: A may stop it on shutdown"
    );
    // The label has one-second resolution: let B's write land in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&app_b, "/vm/b").await.0, StatusCode::OK);
    assert!(
        a.handle().in_use_elsewhere().await,
        "B served after A: A must leave the VM running when it shuts down"
    );
    assert!(
        !b.handle().in_use_elsewhere().await,
        "B wrote last: nobody else is known to use it"
    );
}
