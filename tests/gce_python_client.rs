//! Google's own Python client library (`google-cloud-compute`, REST transport) against the
//! emulator: list with a filter and paging, aggregatedList, get, and a call without
//! credentials. Skipped (with the reason printed) when Python or the package is missing,
//! unless `CI=true`.
#![cfg(feature = "emulator")]

mod gce_support;

use std::process::Command;

use gce_support::*;
use serde_json::Value;

fn python_with_client() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import google.cloud.compute_v1"])
        .output()
        .map_err(|e| format!("no python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "google-cloud-compute is not installed (pip install google-cloud-compute): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn googles_python_client_lists_filters_pages_and_is_refused_without_credentials() {
    if let Err(why) = python_with_client() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must install google-cloud-compute: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let emu = emulator().await;
    for (name, status) in [
        ("web-1", "RUNNING"),
        ("web-2", "TERMINATED"),
        ("web-3", "RUNNING"),
        ("db-1", "RUNNING"),
    ] {
        emu.add_instance(ZONE, name, status, PORT).unwrap();
    }
    emu.add_instance("europe-west1-b", "web-1", "TERMINATED", PORT)
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let token: Value = http
        .get(format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            emu.url()
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/gce_support/python_client.py"
    );
    let (url, project) = (emu.url(), emu.project().to_owned());
    let token = token["access_token"].as_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &url, &project, ZONE, &token])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(
        v["filtered"],
        serde_json::json!(["web-1", "web-2", "web-3"]),
        "{v}"
    );
    assert_eq!(v["pages"], 4, "{v}");
    assert_eq!(
        v["running"],
        serde_json::json!(["db-1", "web-1", "web-3"]),
        "{v}"
    );
    assert_eq!(
        v["aggregated"],
        serde_json::json!(["zones/europe-west1-b/web-1", "zones/us-central1-a/web-1"]),
        "{v}"
    );
    assert_eq!(v["get"]["status"], "RUNNING");
    assert_eq!(v["get"]["labels"]["managed-by"], "vmproxy");
    assert_eq!(v["anonymous"]["type"], "Unauthorized", "{v}");
    assert_eq!(v["anonymous"]["code"], 401, "{v}");
    assert_eq!(v["anonymous"]["errors"][0], "required", "{v}");
    assert_eq!(v["anonymous"]["reason"], "CREDENTIALS_MISSING", "{v}");
    // Every call the client made was understood.
    let unknown: Vec<_> = emu
        .calls()
        .into_iter()
        .filter(|c| c.method == "unknown")
        .collect();
    assert!(unknown.is_empty(), "{unknown:?}");
}
