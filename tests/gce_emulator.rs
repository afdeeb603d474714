//! The emulator's wire format, checked call by call (shapes from the Compute v1 discovery
//! document), and the backend's build-time checks.
#![cfg(feature = "emulator")]

mod gce_support;

use std::time::Duration;

use gce_support::*;
use serde_json::{json, Value};
use vmproxy::backend::gce::{Address, GceBackend};
use vmproxy::emulator::{Emulator, EmulatorOptions};

const RID: &str = "6f1f3c9e-8a55-4a53-9d8e-0c7b0c1d2e3f";

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn new(emu: &Emulator) -> Client {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let res = http
            .get(format!(
                "{}/computeMetadata/v1/instance/service-accounts/default/token",
                emu.url()
            ))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap();
        let v: Value = res.json().await.unwrap();
        let base = format!(
            "{}projects/{}/zones/{ZONE}/",
            emu.compute_base(),
            emu.project()
        );
        Client {
            http,
            base,
            token: v["access_token"].as_str().unwrap().to_owned(),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

fn minimal(name: &str) -> Value {
    json!({
        "name": name,
        "machineType": format!("zones/{ZONE}/machineTypes/e2-small"),
        "disks": [{"boot": true, "autoDelete": true, "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
        "networkInterfaces": [{"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}],
        "metadata": {"items": [{"key": "vmproxy-port", "value": "8080"}]},
        "labels": {"managed-by": "vmproxy"},
        "scheduling": {"provisioningModel": "SPOT", "instanceTerminationAction": "STOP", "automaticRestart": false, "onHostMaintenance": "TERMINATE"}
    })
}

fn reason(v: &Value) -> &str {
    v["error"]["errors"][0]["reason"].as_str().unwrap_or("")
}

#[tokio::test]
async fn metadata_server_needs_the_flavor_header() {
    let emu = emulator().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        emu.url()
    );
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 403);
    let res = http
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["metadata-flavor"], "Google");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    assert!(v["access_token"].as_str().unwrap().len() > 10);
    let res = http
        .get(format!(
            "{}/computeMetadata/v1/project/project-id",
            emu.url()
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), emu.project());
}

#[tokio::test]
async fn compute_accepts_only_its_own_tokens() {
    let emu = emulator().await;
    let mut c = Client::new(&emu).await;
    let (status, _) = c.get("instances/nope").await;
    assert_eq!(status, 404);
    c.token = "ya29.not-from-here".into();
    let (status, v) = c.get("instances/nope").await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], 401);
}

#[tokio::test]
async fn insert_bodies_the_real_api_rejects_get_400_invalid() {
    let emu = emulator().await;
    let c = Client::new(&emu).await;
    let mut no_name = minimal("x");
    no_name.as_object_mut().unwrap().remove("name");
    let mut no_boot = minimal("no-boot");
    no_boot["disks"][0]["boot"] = json!(false);
    let mut no_disks = minimal("no-disks");
    no_disks["disks"] = json!([]);
    let mut restart = minimal("restart");
    restart["scheduling"]["automaticRestart"] = json!(true);
    let mut unknown = minimal("unknown");
    unknown["machinetype"] = json!("typo");
    let mut small = minimal("small");
    small["disks"][0]["initializeParams"]["diskSizeGb"] = json!("5");
    let mut label = minimal("label");
    label["labels"]["Bad"] = json!("x");
    for (what, body) in [
        ("missing name", no_name),
        ("bad name", minimal("Bad_Name")),
        ("no boot disk", no_boot),
        ("no disks", no_disks),
        ("spot with automaticRestart", restart),
        ("unknown field", unknown),
        ("disk below 10 GB", small),
        ("bad label key", label),
    ] {
        let (status, v) = c.post("instances", Some(body)).await;
        assert_eq!((status, reason(&v)), (400, "invalid"), "{what}: {v}");
    }
    assert!(emu.instance(ZONE, "restart").is_none());
}

#[tokio::test]
async fn request_id_makes_insert_idempotent_and_names_are_unique() {
    let emu = emulator().await;
    let c = Client::new(&emu).await;
    let (status, op1) = c
        .post(&format!("instances?requestId={RID}"), Some(minimal("vm-1")))
        .await;
    assert_eq!(status, 200, "{op1}");
    assert_eq!(op1["kind"], "compute#operation");
    assert_eq!(op1["operationType"], "insert");
    assert_eq!(op1["clientOperationId"], RID);
    assert!(op1["targetLink"]
        .as_str()
        .unwrap()
        .starts_with("https://www.googleapis.com/compute/v1/projects/"));
    assert!(op1["id"].is_string(), "uint64 travels as a string");
    let (status, op2) = c
        .post(&format!("instances?requestId={RID}"), Some(minimal("vm-1")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(op2["name"], op1["name"], "same requestId, same operation");
    let (status, v) = c
        .post(
            "instances?requestId=a3f1f3c9-8a55-4a53-9d8e-0c7b0c1d2e3f",
            Some(minimal("vm-1")),
        )
        .await;
    assert_eq!((status, reason(&v)), (409, "alreadyExists"));
    let (status, v) = c
        .post(
            "instances?requestId=00000000-0000-0000-0000-000000000000",
            Some(minimal("vm-2")),
        )
        .await;
    assert_eq!(
        (status, reason(&v)),
        (400, "invalid"),
        "the zero UUID is refused"
    );

    // wait until DONE, then the instance as get shows it.
    let op = op1["name"].as_str().unwrap();
    let (status, done) = c.post(&format!("operations/{op}/wait"), None).await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "DONE");
    assert_eq!(done["progress"], 100);
    assert!(done["endTime"].is_string());
    let (_, inst) = c.get("instances/vm-1").await;
    assert_eq!(inst["status"], "RUNNING");
    assert_eq!(inst["kind"], "compute#instance");
    assert!(inst["machineType"]
        .as_str()
        .unwrap()
        .ends_with(&format!("zones/{ZONE}/machineTypes/e2-small")));
    let nic = &inst["networkInterfaces"][0];
    let info = emu.instance(ZONE, "vm-1").unwrap();
    assert_eq!(nic["networkIP"], info.network_ip.to_string());
    assert_eq!(
        nic["accessConfigs"][0]["natIP"],
        info.nat_ip.unwrap().to_string()
    );
    assert!(inst["labelFingerprint"].is_string());
    let (status, v) = c.get("instances/vm-404").await;
    assert_eq!((status, reason(&v)), (404, "notFound"));
}

#[tokio::test]
async fn set_labels_needs_the_current_fingerprint() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "lab", "RUNNING", PORT).unwrap();
    let c = Client::new(&emu).await;
    let (_, inst) = c.get("instances/lab").await;
    let fp = inst["labelFingerprint"].as_str().unwrap().to_owned();
    let (status, v) = c
        .post(
            "instances/lab/setLabels",
            Some(json!({"labels": {"a": "1"}, "labelFingerprint": "stale="})),
        )
        .await;
    assert_eq!((status, reason(&v)), (412, "conditionNotMet"));
    let (status, op) = c
        .post(
            "instances/lab/setLabels",
            Some(json!({"labels": {"a": "1"}, "labelFingerprint": fp})),
        )
        .await;
    assert_eq!(status, 200, "{op}");
    let (_, inst) = c.get("instances/lab").await;
    assert_eq!(inst["labels"], json!({"a": "1"}));
    assert_ne!(inst["labelFingerprint"].as_str().unwrap(), fp);
}

#[tokio::test]
async fn busy_instances_answer_resource_not_ready_and_servers_follow_the_status() {
    let t = Duration::from_millis(300);
    let emu = Emulator::start(
        EmulatorOptions::fast()
            .timings(t, t, t, t)
            .boot_delay(ms(50)),
    )
    .await
    .unwrap();
    let c = Client::new(&emu).await;
    let (status, _) = c.post("instances", Some(minimal("slow"))).await;
    assert_eq!(status, 200);
    let (status, v) = c.post("instances/slow/suspend", None).await;
    assert_eq!((status, reason(&v)), (400, "resourceNotReady"));
    let (_, inst) = c.get("instances/slow").await;
    assert_eq!(inst["status"], "PROVISIONING");
    assert!(
        inst["networkInterfaces"][0]["accessConfigs"][0]
            .get("natIP")
            .is_none(),
        "no natIP until running"
    );
    let ip = emu.instance(ZONE, "slow").unwrap().network_ip;
    assert!(
        tokio::net::TcpStream::connect((ip, PORT)).await.is_err(),
        "nothing answers while booting"
    );

    eventually("running", || {
        emu.instance(ZONE, "slow")
            .is_some_and(|i| i.status == "RUNNING")
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut answered = None;
    for _ in 0..200 {
        if let Ok(r) = http
            .post(format!("http://{ip}:{PORT}/echo/me"))
            .body("12345")
            .send()
            .await
        {
            answered = Some(r.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    let v = answered.expect("the VM's server answers after the boot delay");
    assert_eq!(
        (
            v["method"].as_str(),
            v["path"].as_str(),
            v["body_bytes"].as_u64()
        ),
        (Some("POST"), Some("/echo/me"), Some(5))
    );
    assert_eq!(
        http.get(format!("http://{ip}:{PORT}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    drop(emu);
    tokio::time::sleep(ms(50)).await;
    assert!(
        tokio::net::TcpStream::connect((ip, PORT)).await.is_err(),
        "the VM's server ends with the emulator"
    );
}

#[tokio::test]
async fn bad_specs_are_rejected_at_build_time() {
    let cases: Vec<(&str, vmproxy::backend::gce::GceBackendBuilder)> = vec![
        ("instance", GceBackend::builder(ZONE, "-bad")),
        ("instance", GceBackend::builder(ZONE, "x".repeat(64))),
        ("instance", GceBackend::builder(ZONE, "")),
        ("zone", GceBackend::builder("Zone A", "ok")),
        (
            "disk_size_gb",
            GceBackend::builder(ZONE, "ok").disk_size_gb(5),
        ),
        ("labels", GceBackend::builder(ZONE, "ok").label("Team", "x")),
        (
            "labels",
            GceBackend::builder(ZONE, "ok").label("team", "Data Science"),
        ),
        ("tags", GceBackend::builder(ZONE, "ok").tags(["HTTP"])),
        ("image", GceBackend::builder(ZONE, "ok").image("my image")),
        (
            "address",
            GceBackend::builder(ZONE, "ok").external_ip(false),
        ),
        (
            "endpoint",
            GceBackend::builder(ZONE, "ok").endpoint("ftp://example"),
        ),
        (
            "scopes",
            GceBackend::builder(ZONE, "ok").scopes(["compute"]),
        ),
        ("port", GceBackend::builder(ZONE, "ok").port(0)),
        (
            "metadata",
            GceBackend::builder(ZONE, "ok").metadata("bad key", "v"),
        ),
    ];
    for (field, builder) in cases {
        let err = builder.build().expect_err(field);
        assert_eq!(err.field(), field, "{err}");
    }
    // And good ones pass, with the defaults brought up to date.
    let b = GceBackend::builder(ZONE, "ok")
        .address(Address::Internal)
        .external_ip(false)
        .build()
        .unwrap();
    let body = b.insert_body();
    assert_eq!(
        body["machineType"],
        format!("zones/{ZONE}/machineTypes/e2-small")
    );
    assert_eq!(
        body["disks"][0]["initializeParams"]["sourceImage"],
        "projects/debian-cloud/global/images/family/debian-12"
    );
    assert_eq!(body["scheduling"]["provisioningModel"], "SPOT");
    assert_eq!(body["tags"]["items"], json!(["http-server"]));
    assert!(body["networkInterfaces"][0].get("accessConfigs").is_none());
    let std = GceBackend::builder(ZONE, "ok").spot(false).build().unwrap();
    assert_eq!(
        std.insert_body()["scheduling"]["provisioningModel"],
        "STANDARD"
    );
}
