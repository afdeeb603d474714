//! What the layer records through the `metrics` facade, read back through a Prometheus recorder
//! installed for this test binary: names, labels and values after cold starts, failures,
//! requests and backend calls; and the exposition passes `promtool check metrics`.
//!
//! The tests share the one global recorder, so each uses machine names of its own.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use vmproxy::backend::process::ProcessBackend;
use vmproxy::{telemetry, Route, State, VmProxyLayer};

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(telemetry::COLD_START_SECONDS.to_owned()),
                telemetry::COLD_START_BUCKETS,
            )
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
        handle
    })
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (set, v) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
            .then(|| v.trim().parse().unwrap())
    })
}

fn must(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
}

fn python3() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok()
}

#[tokio::test]
async fn a_cold_start_is_counted_and_timed_under_the_route_name() {
    let prometheus = prometheus();
    assert!(python3(), "the process tests need python3");
    // The backend calls itself "python3"; the route names the machine.
    let backend = ProcessBackend::new([
        "python3",
        "-m",
        "http.server",
        "{port}",
        "--bind",
        "127.0.0.1",
    ])
    .unwrap()
    .quiet(true);
    let route = Route::builder("/files", backend)
        .name("m-files")
        .strip_prefix(true)
        .health_path("/")
        .probe_interval(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap();
    let handle = route.handle();
    let (addr, _task) = serve(front_app(VmProxyLayer::new(route))).await;

    let m = &[("machine", "m-files")];
    let text = prometheus.render();
    assert_eq!(
        must(&text, "vmproxy_machine_state", &[m[0], ("state", "absent")]),
        1.0
    );

    let (status, _, _) = get_text(addr, "/files/").await;
    assert_eq!(status, 200);
    let (status, _, _) = get_text(addr, "/files/no-such-file").await;
    assert_eq!(status, 404);

    let text = prometheus.render();
    let at = |name: &str, extra: &[(&str, &str)]| {
        let labels: Vec<_> = m.iter().chain(extra).copied().collect();
        must(&text, name, &labels)
    };
    assert_eq!(at("vmproxy_cold_starts_total", &[("result", "ok")]), 1.0);
    assert_eq!(at("vmproxy_requests_total", &[("code", "200")]), 1.0);
    assert_eq!(at("vmproxy_requests_total", &[("code", "404")]), 1.0);
    assert_eq!(at("vmproxy_machine_state", &[("state", "running")]), 1.0);
    for other in ["absent", "creating", "stopping"] {
        assert_eq!(at("vmproxy_machine_state", &[("state", other)]), 0.0);
    }
    assert_eq!(at("vmproxy_in_flight", &[]), 0.0);
    assert_eq!(at("vmproxy_waiting", &[]), 0.0);
    let idle = at("vmproxy_idle_stop_seconds", &[]);
    assert!(idle > 0.0 && idle <= 600.0, "{idle}");
    assert_eq!(
        at(
            "vmproxy_backend_calls_total",
            &[("call", "spawn"), ("result", "ok")]
        ),
        1.0
    );
    assert!(
        value(
            &text,
            "vmproxy_backend_calls_total",
            &[("machine", "python3")]
        )
        .is_none(),
        "recorded under the route's name, not the backend's"
    );
    for phase in ["backend", "readiness", "total"] {
        let count = at("vmproxy_cold_start_seconds_count", &[("phase", phase)]);
        assert_eq!(count, 1.0, "{phase}");
        let inf = at(
            "vmproxy_cold_start_seconds_bucket",
            &[("phase", phase), ("le", "+Inf")],
        );
        assert_eq!(inf, 1.0, "a histogram with buckets, not a summary");
    }
    let total = at("vmproxy_cold_start_seconds_sum", &[("phase", "total")]);
    let backend = at("vmproxy_cold_start_seconds_sum", &[("phase", "backend")]);
    assert!(total >= backend && total > 0.0, "{total} {backend}");

    handle.stop().await;
    let text = prometheus.render();
    assert_eq!(
        must(
            &text,
            "vmproxy_backend_calls_total",
            &[m[0], ("call", "terminate"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        must(&text, "vmproxy_machine_state", &[m[0], ("state", "absent")]),
        1.0
    );
    assert!(must(&text, "vmproxy_idle_stop_seconds", m).is_nan());
}

#[tokio::test]
async fn failed_and_timed_out_starts_and_error_answers_are_counted() {
    let prometheus = prometheus();
    let failing = FakeBackend::with(Knobs {
        fail_starts: 1.into(),
        ..Knobs::default()
    });
    let slow = FakeBackend::new(Duration::from_secs(5));
    let failing = route(failing)
        .name("m-failing")
        .start_backoff(Duration::from_secs(30), Duration::from_secs(30))
        .build()
        .unwrap();
    let slow = Route::builder("/slow", slow)
        .name("m-slow")
        .health_path("/healthz")
        .start_timeout(Duration::from_millis(200))
        .cold_start_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let slow_handle = slow.handle();
    let (addr, _task) = serve(front_app(VmProxyLayer::from_routes([failing, slow]))).await;

    // The failed start's waiter, then one turned away during the back-off.
    assert_eq!(get_text(addr, "/app/x").await.0, 503);
    assert_eq!(get_text(addr, "/app/x").await.0, 503);
    // A path the route refuses, answered by the proxy itself.
    assert_eq!(get_text(addr, "/app/%zz").await.0, 400);
    // A start that outlives the request's wait (504), and then its own limit.
    assert_eq!(get_text(addr, "/slow/x").await.0, 504);
    eventually(Duration::from_secs(10), || {
        let s = slow_handle.status();
        s.last_error.is_some() && s.state == State::Absent
    })
    .await;

    let text = prometheus.render();
    let failing = ("machine", "m-failing");
    assert_eq!(
        must(
            &text,
            "vmproxy_cold_starts_total",
            &[failing, ("result", "failed")]
        ),
        1.0
    );
    assert_eq!(
        must(&text, "vmproxy_requests_total", &[failing, ("code", "503")]),
        2.0
    );
    assert_eq!(
        must(&text, "vmproxy_requests_total", &[failing, ("code", "400")]),
        1.0
    );
    assert!(
        value(&text, "vmproxy_cold_start_seconds_count", &[failing]).is_none(),
        "a failed start has no phases to time"
    );
    let slow = ("machine", "m-slow");
    assert_eq!(
        must(
            &text,
            "vmproxy_cold_starts_total",
            &[slow, ("result", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        must(&text, "vmproxy_requests_total", &[slow, ("code", "504")]),
        1.0
    );
    assert_eq!(
        must(&text, "vmproxy_machine_state", &[slow, ("state", "absent")]),
        1.0
    );
}

#[tokio::test]
async fn in_flight_and_waiting_follow_the_requests() {
    let prometheus = prometheus();
    let backend = FakeBackend::new(Duration::from_millis(300));
    let route = route(backend).name("m-counts").build().unwrap();
    let handle = route.handle();
    let (addr, _task) = serve(front_app(VmProxyLayer::new(route))).await;
    let m = ("machine", "m-counts");

    let waiting = tokio::spawn(async move { get_text(addr, "/app/x").await });
    eventually(Duration::from_secs(5), || handle.pending() == 1).await;
    let text = prometheus.render();
    assert_eq!(must(&text, "vmproxy_waiting", &[m]), 1.0);
    assert_eq!(
        must(&text, "vmproxy_machine_state", &[m, ("state", "creating")]),
        1.0
    );
    assert_eq!(waiting.await.unwrap().0, 200);

    // A streaming response counts in flight until its last byte.
    let req = http::Request::get("/app/stream?chunks=3&every_ms=200")
        .header("host", "front.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    let text = prometheus.render();
    assert_eq!(must(&text, "vmproxy_in_flight", &[m]), 1.0);
    assert_eq!(must(&text, "vmproxy_waiting", &[m]), 0.0);
    assert!(
        must(&text, "vmproxy_idle_stop_seconds", &[m]).is_nan(),
        "no idle stop is due while a request is in flight"
    );
    use http_body_util::BodyExt;
    res.into_body().collect().await.unwrap();
    eventually(Duration::from_secs(5), || handle.in_flight() == 0).await;
    let text = prometheus.render();
    assert_eq!(must(&text, "vmproxy_in_flight", &[m]), 0.0);
    assert!(must(&text, "vmproxy_idle_stop_seconds", &[m]) > 0.0);
}

#[cfg(feature = "emulator")]
mod gce_support;

#[cfg(feature = "emulator")]
#[tokio::test]
async fn compute_engine_calls_are_counted_by_method() {
    let prometheus = prometheus();
    let emu = gce_support::emulator().await;
    let backend = gce_support::backend(&emu, "metrics-vm").build().unwrap();
    let route = Route::builder("/vm", backend)
        .name("m-gce")
        .health_path("/healthz")
        .probe_interval(Duration::from_millis(5), Duration::from_millis(20))
        .build()
        .unwrap();
    let handle = route.handle();
    handle.start().await.unwrap();
    handle.stop().await;

    let text = prometheus.render();
    let m = ("machine", "m-gce");
    // Every REST request the emulator saw is counted, by its discovery name.
    for method in ["instances.get", "instances.insert", "zoneOperations.wait"] {
        let seen = emu.count(method) as f64;
        assert!(seen >= 1.0, "{method}");
        let counted: f64 = ["ok", "4xx", "5xx"]
            .iter()
            .filter_map(|r| {
                value(
                    &text,
                    "vmproxy_backend_calls_total",
                    &[m, ("call", method), ("result", r)],
                )
            })
            .sum();
        assert_eq!(counted, seen, "{method}:\n{text}");
    }
    assert_eq!(
        must(
            &text,
            "vmproxy_backend_calls_total",
            &[m, ("call", "instances.insert"), ("result", "ok")]
        ),
        1.0
    );
    // A cold start inserts first (no look that would find nothing): no 404 to count.
    assert_eq!(
        value(
            &text,
            "vmproxy_backend_calls_total",
            &[m, ("call", "instances.get"), ("result", "4xx")]
        ),
        None,
        "{text}"
    );
    let stop_calls: f64 = ["instances.stop", "instances.delete", "instances.suspend"]
        .iter()
        .filter_map(|c| value(&text, "vmproxy_backend_calls_total", &[m, ("call", c)]))
        .sum();
    assert_eq!(stop_calls, 1.0, "one stop call:\n{text}");
    assert!(
        value(
            &text,
            "vmproxy_backend_calls_total",
            &[("machine", "metrics-vm")]
        )
        .is_none(),
        "recorded under the route's name, not the instance's"
    );
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let prometheus = prometheus();
    let route = route(FakeBackend::new(Duration::ZERO))
        .name("m-promtool")
        .build()
        .unwrap();
    let (addr, _task) = serve(front_app(VmProxyLayer::new(route))).await;
    assert_eq!(get_text(addr, "/app/x").await.0, 200);
    let text = prometheus.render();
    assert!(text.contains("vmproxy_cold_start_seconds_bucket"), "{text}");
    if let Some((ok, said)) = promtool_check(&text) {
        assert!(ok, "promtool check metrics: {said}\n{text}");
    }
}
