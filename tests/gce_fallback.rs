//! Compute Engine when capacity is scarce, on the emulator: API calls per cold start, zone and
//! shape fallback, one VM per name across zones and replicas, GPU and Flex-start insert bodies
//! (checked against the discovery document), bounded operation waits.
#![cfg(feature = "emulator")]

mod gce_support;

use std::time::Duration;

use axum::http::StatusCode;
use gce_support::*;
use serde_json::Value;
use vmproxy::backend::gce::{GceBackend, ProvisioningModel};
use vmproxy::emulator::{Emulator, EmulatorOptions};
use vmproxy::State;

const A: &str = "us-central1-a";
const B: &str = "us-central1-b";
const C: &str = "us-central1-c";

/// Calls under `/compute/v1` (token and metadata calls apart), by discovery name.
fn compute_calls(emu: &Emulator) -> Vec<String> {
    emu.calls()
        .into_iter()
        .filter(|c| c.path.starts_with("/compute/v1/"))
        .map(|c| c.method)
        .collect()
}

fn zoned(emu: &Emulator, zones: &[&str], name: &str) -> vmproxy::backend::gce::GceBackendBuilder {
    backend(emu, name).zones(zones.iter().copied())
}

/// No periodic status checks: only the start's own calls are counted.
fn quiet(emu: &Emulator, name: &str) -> vmproxy::backend::gce::GceBackendBuilder {
    backend(emu, name).status_interval(None)
}

/// One request through a fresh route, then a pause for the activity report it triggers
/// (spawned at the first lease when an idle timeout is set).
async fn one_request(route: vmproxy::Route) {
    let app = app(route);
    let (status, body) = call(&app, "/vm/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(ms(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_costs_three_calls_without_a_vm_and_two_with_one_running() {
    let emu = emulator().await;
    let idle = Some(Duration::from_secs(600));
    // No VM: insert (the activity label in its body), the operation's wait, one get; the
    // first request's activity report writes nothing (the label is fresh from the insert).
    one_request(route_with(quiet(&emu, "count").build().unwrap(), idle)).await;
    let first = compute_calls(&emu);
    assert_eq!(
        first,
        ["instances.insert", "zoneOperations.wait", "instances.get"],
        "{first:?}"
    );
    let vm = emu.instance(ZONE, "count").unwrap();
    assert!(vm.labels.contains_key("vmproxy-active"), "{:?}", vm.labels);

    // Another replica, the VM running: insert (409) and get.
    emu.clear_calls();
    one_request(route_with(quiet(&emu, "count").build().unwrap(), None)).await;
    let second = compute_calls(&emu);
    assert_eq!(second, ["instances.insert", "instances.get"], "{second:?}");

    // With an idle timeout, the first request's activity report labels the VM as used by
    // this replica too: one setLabels, with the fingerprint the start read (no second get).
    emu.clear_calls();
    one_request(route_with(quiet(&emu, "count").build().unwrap(), idle)).await;
    let third = compute_calls(&emu);
    assert_eq!(
        third,
        ["instances.insert", "instances.get", "instances.setLabels"],
        "{third:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_list_costs_one_aggregated_list_more() {
    let emu = emulator().await;
    one_request(route(quiet(&emu, "agg").zones([A, B]).build().unwrap())).await;
    // Looking everywhere first; after the insert, looking again (another replica may have
    // created it elsewhere) gives the address too.
    assert_eq!(
        compute_calls(&emu),
        [
            "instances.aggregatedList",
            "instances.insert",
            "zoneOperations.wait",
            "instances.aggregatedList"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stockout_in_zone_a_is_served_from_zone_b_and_leaves_nothing_in_a() {
    let emu = emulator().await;
    // The refused insert leaves a TERMINATED instance behind, for the backend to clean up.
    emu.set_stockout(A, true, true);
    let backend = zoned(&emu, &[A, B, C], "scarce").build().unwrap();
    let route = route(backend);
    let app = app(route.clone());
    let (status, body) = call(&app, "/vm/first").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(emu.instance(A, "scarce").is_none(), "left behind in {A}");
    assert_eq!(emu.instance(B, "scarce").unwrap().status, "RUNNING");
    assert!(emu.instance(C, "scarce").is_none());
    let calls = emu.calls();
    assert!(calls
        .iter()
        .any(|c| c.method == "instances.delete" && c.path.contains(&format!("/zones/{A}/"))));
    // The operator sees where it runs and why not in A (admin API, status page).
    let placement = route
        .handle()
        .status()
        .placement
        .expect("the backend says where");
    assert!(placement.starts_with(&format!("{B}/")), "{placement}");
    assert!(
        placement.contains(&format!("refused: {A}/")) && placement.contains("ZONE_RESOURCE_POOL"),
        "{placement}"
    );

    // The serving zone is remembered: the next cold start goes to B at once, even with A
    // back in stock.
    emu.set_stockout(A, false, false);
    route.handle().stop().await;
    state_becomes(&route, "absent", |s| *s == State::Absent).await;
    emu.clear_calls();
    let (status, _) = call(&app, "/vm/again").await;
    assert_eq!(status, StatusCode::OK);
    let inserts: Vec<String> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .map(|c| c.path)
        .collect();
    assert_eq!(inserts.len(), 1, "{inserts:?}");
    assert!(inserts[0].contains(&format!("/zones/{B}/")), "{inserts:?}");
    let placement = route.handle().status().placement.unwrap();
    assert!(
        !placement.contains("refused"),
        "this start was refused nothing: {placement}"
    );
    assert!(placement.starts_with(&format!("{B}/")), "{placement}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_refused_is_a_503_naming_each() {
    let emu = emulator().await;
    emu.set_stockout(A, true, false);
    emu.set_stockout(B, true, false);
    let backend = zoned(&emu, &[A, B], "none-left")
        .machine_types(["g2-standard-8", "g2-standard-12"])
        .spot_fallback(true)
        .build()
        .unwrap();
    let app = app(route(backend));
    let (status, body) = call(&app, "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    for part in [
        "us-central1-a/g2-standard-8/SPOT",
        "us-central1-b/g2-standard-12/SPOT",
        "us-central1-b/g2-standard-12/STANDARD",
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "8 tried",
    ] {
        assert!(body.contains(part), "{part} not in {body}");
    }
    assert!(emu.instances().is_empty(), "{:?}", emu.instances());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_refused_everywhere_falls_back_to_standard() {
    let emu = emulator().await;
    emu.set_spot_stockout(A, true);
    emu.set_spot_stockout(B, true);
    let backend = zoned(&emu, &[A, B], "std")
        .spot_fallback(true)
        .build()
        .unwrap();
    let app = app(route(backend));
    // Spot in A, Spot in B, then standard in A.
    let (status, body) = call(&app, "/vm/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let inserts: Vec<String> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert")
        .map(|c| c.path)
        .collect();
    assert_eq!(inserts.len(), 3, "{inserts:?}");
    assert!(emu.instance(B, "std").is_none());
    let vm = emu.instance(A, "std").unwrap();
    assert_eq!(vm.status, "RUNNING");
    assert_eq!(
        vm.labels.get("vmproxy-provisioning").map(String::as_str),
        Some("standard")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_running_in_zone_c_is_used_with_no_insert() {
    let emu = emulator().await;
    emu.add_instance(C, "found", "RUNNING", PORT).unwrap();
    let backend = zoned(&emu, &[A, B, C], "found").build().unwrap();
    let route = route(backend);
    let app = app(route.clone());
    let v = echo(&app, "/vm/x").await;
    assert_eq!(v["instance"], "found", "{v}");
    assert_eq!(emu.count("instances.insert"), 0);
    assert_eq!(
        emu.count("instances.get"),
        0,
        "the aggregated list said it all"
    );
    let vm = emu.instance(C, "found").unwrap();
    assert!(
        matches!(route.handle().state(), State::Running(ep) if Some(ep.addr().ip()) == vm.nat_ip)
    );
    assert_eq!(emu.instances().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_inserting_in_different_zones_end_with_one_vm() {
    // Slow enough a boot that both replicas look (find nothing) and insert before either VM
    // runs.
    let emu = Emulator::start(
        EmulatorOptions::fast()
            .timings(ms(300), ms(100), ms(50), ms(50))
            .require_content_length(true),
    )
    .await
    .unwrap();
    // Two replicas that last served from different zones prefer them: same list, other order.
    // Both look before either inserts (their lists are answered late, as they were).
    emu.delay_next("instances.aggregatedList", 2, ms(400));
    let ra = route(zoned(&emu, &[A, B], "twin").build().unwrap());
    let rb = route(zoned(&emu, &[B, A], "twin").build().unwrap());
    let (app_a, app_b) = (app(ra.clone()), app(rb.clone()));
    let (x, y) = tokio::join!(call(&app_a, "/vm/a"), call(&app_b, "/vm/b"));
    assert_eq!(x.0, StatusCode::OK, "{}", x.1);
    assert_eq!(y.0, StatusCode::OK, "{}", y.1);
    let inserted: Vec<String> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "instances.insert" && c.status == 200)
        .map(|c| c.path)
        .collect();
    assert_eq!(inserted.len(), 2, "both replicas inserted: {inserted:?}");
    assert!(inserted.iter().any(|p| p.contains(&format!("/zones/{A}/"))));
    assert!(inserted.iter().any(|p| p.contains(&format!("/zones/{B}/"))));
    // One VM stays, the older one; both replicas serve from it.
    eventually("one VM left", || emu.instances().len() == 1).await;
    let vm = emu.instances().pop().unwrap();
    assert_eq!(vm.status, "RUNNING");
    for r in [&ra, &rb] {
        assert!(
            matches!(r.handle().state(), State::Running(ep) if Some(ep.addr().ip()) == vm.nat_ip),
            "{:?} vs {vm:?}",
            r.handle().state()
        );
    }
}

/// Checks `v` against the discovery document's schema `name`: every field is a property of
/// it, of its type (int64 and uint64 as JSON strings, int32 as numbers), enum values listed.
fn check_schema(doc: &Value, name: &str, v: &Value, at: &str) -> Result<(), String> {
    let schema = &doc["schemas"][name];
    assert!(schema.is_object(), "no schema {name}");
    check_value(doc, schema, v, at)
}

fn check_value(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        return check_schema(doc, r, v, at);
    }
    match schema["type"].as_str() {
        Some("object") => {
            let obj = v.as_object().ok_or(format!("{at}: not an object"))?;
            for (k, val) in obj {
                let sub = if let Some(p) = schema["properties"].get(k) {
                    p
                } else if schema["additionalProperties"].is_object() {
                    &schema["additionalProperties"]
                } else {
                    return Err(format!("{at}.{k}: not a field of the schema"));
                };
                check_value(doc, sub, val, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        Some("array") => {
            let items = v.as_array().ok_or(format!("{at}: not an array"))?;
            for (i, item) in items.iter().enumerate() {
                check_value(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("string") => {
            let s = v.as_str().ok_or(format!("{at}: not a string: {v}"))?;
            if let Some(en) = schema["enum"].as_array() {
                if !en.iter().any(|e| e == s) {
                    return Err(format!("{at}: {s:?} is not one of {en:?}"));
                }
            }
            if matches!(schema["format"].as_str(), Some("int64" | "uint64"))
                && s.parse::<i128>().is_err()
            {
                return Err(format!("{at}: {s:?} is not an int64"));
            }
            Ok(())
        }
        Some("integer") => v
            .as_i64()
            .map(drop)
            .ok_or(format!("{at}: not an integer: {v}")),
        Some("boolean") => v
            .as_bool()
            .map(drop)
            .ok_or(format!("{at}: not a boolean: {v}")),
        other => Err(format!("{at}: unknown schema type {other:?}")),
    }
}

fn discovery() -> Value {
    let text = include_str!("gce_support/compute-v1-subset.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn the_schema_check_can_fail() {
    let doc = discovery();
    let good = serde_json::json!({"scheduling": {"maxRunDuration": {"seconds": "60", "nanos": 0}}});
    check_schema(&doc, "Instance", &good, "resource").unwrap();
    for bad in [
        serde_json::json!({"scheduling": {"maxRunDuration": {"seconds": 60}}}),
        serde_json::json!({"scheduling": {"provisioningModel": "FLEXSTART"}}),
        serde_json::json!({"guestAccelerators": [{"acceleratorCount": "1"}]}),
        serde_json::json!({"guestAccelerator": []}),
    ] {
        assert!(
            check_schema(&doc, "Instance", &bad, "resource").is_err(),
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_and_flex_start_insert_bodies_match_the_discovery_document() {
    let doc = discovery();
    let emu = emulator().await;
    let gpu = zoned(&emu, &[A, B], "gpu")
        .machine_types(["g2-standard-8", "g2-standard-12"])
        .accelerator("nvidia-l4", 1)
        .image("projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11")
        .spot_fallback(true)
        .build()
        .unwrap();
    let flex = zoned(&emu, &[A, B], "flex")
        .machine_types(["a3-highgpu-1g"])
        .accelerator("nvidia-h100-80gb", 1)
        .provisioning_model(ProvisioningModel::FlexStart)
        .max_run_duration(Duration::from_secs(4 * 3600))
        .build()
        .unwrap();
    for b in [&gpu, &flex] {
        for body in b.attempt_bodies() {
            check_schema(&doc, "Instance", &body, "resource")
                .unwrap_or_else(|e| panic!("{e}\n{body:#}"));
        }
    }
    let bodies = gpu.attempt_bodies();
    assert_eq!(bodies.len(), 8);
    // Rewritten per zone on fallback.
    assert_eq!(
        bodies[1]["guestAccelerators"][0]["acceleratorType"],
        "zones/us-central1-b/acceleratorTypes/nvidia-l4"
    );
    assert_eq!(bodies[1]["guestAccelerators"][0]["acceleratorCount"], 1);
    for b in &bodies {
        assert_eq!(b["scheduling"]["onHostMaintenance"], "TERMINATE", "{b}");
    }
    assert_eq!(bodies[7]["scheduling"]["provisioningModel"], "STANDARD");
    let f = &flex.insert_body()["scheduling"];
    assert_eq!(f["provisioningModel"], "FLEX_START");
    assert_eq!(
        f["maxRunDuration"],
        serde_json::json!({"seconds": "14400", "nanos": 0})
    );
    assert_eq!(f["instanceTerminationAction"], "DELETE");

    // The emulator takes them, and the VMs come up in the zone of the attempt.
    for (b, name) in [(gpu, "gpu"), (flex, "flex")] {
        let (status, body) = call(&app(route(b)), "/vm/x").await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!(emu.instance(A, name).unwrap().status, "RUNNING");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_operation_never_ends_gives_up_at_stop_timeout_and_keeps_serving() {
    let emu = emulator().await;
    let backend = backend(&emu, "hung").stop_timeout(ms(400)).build().unwrap();
    let route = route(backend);
    let app = app(route.clone());
    let (status, _) = call(&app, "/vm/x").await;
    assert_eq!(status, StatusCode::OK);
    emu.hang_next_operation("instances.delete");
    let stop = tokio::time::timeout(Duration::from_secs(10), route.handle().stop()).await;
    assert!(stop.is_ok(), "the stop never gave up");
    // The delete never finished: the VM still runs, and the next request is served by it.
    assert_eq!(emu.instance(ZONE, "hung").unwrap().status, "RUNNING");
    let (status, body) = call(&app, "/vm/after").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_operation_never_ends_is_abandoned_and_the_next_request_starts_afresh() {
    let emu = emulator().await;
    let backend = backend(&emu, "stuck").build().unwrap();
    let route = vmproxy::Route::builder("/vm", backend)
        .health_path("/healthz")
        .start_backoff(ms(50), ms(100))
        .probe_interval(ms(5), ms(20))
        .cold_start_timeout(Duration::from_secs(20))
        .start_timeout(ms(500))
        .build()
        .unwrap();
    let app = app(route.clone());
    emu.hang_next_operation("instances.insert");
    let (status, _) = call(&app, "/vm/x").await;
    assert!(status.is_server_error(), "{status}");
    // The failed start's cleanup deleted the stuck instance; after the back-off, the next
    // request starts it afresh.
    eventually("the stuck instance is cleaned up", || {
        emu.instance(ZONE, "stuck").is_none()
    })
    .await;
    let mut served = false;
    for _ in 0..50 {
        let (status, _) = call(&app, "/vm/y").await;
        if status == StatusCode::OK {
            served = true;
            break;
        }
        tokio::time::sleep(ms(50)).await;
    }
    assert!(served, "never served after the abandoned start");
    let _ = GceBackend::builder(A, "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_whose_start_is_refused_is_recreated_in_the_next_zone() {
    let emu = emulator().await;
    emu.add_instance(A, "sleepy", "TERMINATED", PORT).unwrap();
    emu.set_stockout(A, true, false);
    let backend = zoned(&emu, &[A, B], "sleepy")
        .stop_policy(vmproxy::backend::gce::StopPolicy::Stop)
        .build()
        .unwrap();
    let (status, body) = call(&app(route(backend)), "/vm/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(emu.count("instances.start"), 1);
    assert!(
        emu.instance(A, "sleepy").is_none(),
        "the refused VM stays in {A}"
    );
    assert_eq!(emu.instance(B, "sleepy").unwrap().status, "RUNNING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_else_to_try_a_refused_start_keeps_the_stopped_vm() {
    let emu = emulator().await;
    let seeded = emu.add_instance(ZONE, "keep", "TERMINATED", PORT).unwrap();
    emu.set_stockout(ZONE, true, false);
    // stop_policy = stop: the failed start's cleanup stops, and so keeps, the VM.
    let b = backend(&emu, "keep")
        .stop_policy(vmproxy::backend::gce::StopPolicy::Stop)
        .build()
        .unwrap();
    let (status, body) = call(&app(route(b)), "/vm/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("ZONE_RESOURCE_POOL_EXHAUSTED"), "{body}");
    let vm = emu.instance(ZONE, "keep").unwrap();
    assert_eq!((vm.id, vm.status.as_str()), (seeded.id, "TERMINATED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fallback_step_is_counted() {
    use metrics_exporter_prometheus::PrometheusBuilder;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
    let emu = emulator().await;
    emu.set_stockout(A, true, false);
    emu.set_stockout(B, true, false);
    let backend = zoned(&emu, &[A, B, C], "counted").build().unwrap();
    let (status, body) = call(&app(route(backend)), "/vm/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = handle.render();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("vmproxy_backend_calls_total{")
                && l.contains("call=\"fallback\"")
                && l.contains("result=\"capacity\"")
        })
        .unwrap_or_else(|| panic!("no fallback sample in\n{text}"));
    assert!(line.ends_with(" 2"), "{line}");
}
