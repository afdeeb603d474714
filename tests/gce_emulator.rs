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
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        match body {
            Some(b) => req = req.json(&b),
            // As every Google client does for a POST without a body.
            None if method == reqwest::Method::POST => req = req.header("content-length", "0"),
            None => {}
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

#[tokio::test]
async fn bad_tokens_get_googles_401_body() {
    let emu = emulator().await;
    let mut c = Client::new(&emu).await;
    c.token = "ya29.not-from-here".into();
    let res = c
        .http
        .get(format!("{}instances/x", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().contains_key("www-authenticate"));
    let v: Value = res.json().await.unwrap();
    let e = &v["error"];
    assert_eq!(e["code"], 401);
    assert_eq!(e["status"], "UNAUTHENTICATED");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .starts_with("Request had invalid authentication credentials."));
    assert_eq!(
        e["errors"][0],
        json!({"message": "Invalid Credentials", "domain": "global", "reason": "authError",
               "location": "Authorization", "locationType": "header"})
    );
    // No Authorization header at all: 401 too, but `required` / CREDENTIALS_MISSING, as
    // Google answers it.
    let res = c
        .http
        .get(format!("{}instances", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().contains_key("www-authenticate"));
    let v: Value = res.json().await.unwrap();
    let e = &v["error"];
    assert_eq!(e["status"], "UNAUTHENTICATED");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .starts_with("Request is missing required authentication credential."));
    assert_eq!(
        e["errors"][0],
        json!({"message": "Login Required.", "domain": "global", "reason": "required",
               "location": "Authorization", "locationType": "header"})
    );
    assert_eq!(
        e["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );
    assert_eq!(e["details"][0]["reason"], "CREDENTIALS_MISSING");
    assert_eq!(
        e["details"][0]["metadata"]["method"],
        "compute.v1.InstancesService.List"
    );
}

#[tokio::test]
async fn instances_can_be_looked_at_without_a_token_apart_from_the_api() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "seen", "RUNNING", PORT).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let v: Value = http
        .get(format!("{}/emulator/instances", emu.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = v["instances"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["name"], "seen");
    assert_eq!(list[0]["zone"], ZONE);
    assert_eq!(list[0]["status"], "RUNNING");
    // Read-only: anything else there is the API's 404, and the API still wants a token.
    let res = http
        .delete(format!("{}/emulator/instances", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(emu.instances().len(), 1);
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn list_filters_and_pages_like_compute_engine() {
    let emu = emulator().await;
    for (n, status) in [
        ("web-1", "RUNNING"),
        ("web-2", "TERMINATED"),
        ("db-1", "RUNNING"),
    ] {
        emu.add_instance(ZONE, n, status, PORT).unwrap();
    }
    let c = Client::new(&emu).await;
    let q = |f: &str| {
        format!(
            "instances?filter={}",
            f.replace(' ', "%20")
                .replace('"', "%22")
                .replace('=', "%3D")
        )
    };
    let (s, v) = c.get(&q("name = \"web-2\"")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(names(&v), ["web-2"]);
    let (_, v) = c
        .get(&q("status = RUNNING AND labels.managed-by = vmproxy"))
        .await;
    assert_eq!(names(&v), ["db-1", "web-1"]);
    let (_, v) = c.get(&q("(name eq web-.*) (status ne RUNNING)")).await;
    assert_eq!(names(&v), ["web-2"]);
    let (s, v) = c.get(&q("(name eq web-.*) (status = RUNNING)")).await;
    assert_eq!((s, reason(&v)), (400, "invalid"), "mixed forms: {v}");
    // Paging: two, then one, then no token.
    let (_, p1) = c.get("instances?maxResults=2").await;
    assert_eq!(names(&p1), ["db-1", "web-1"]);
    let token = p1["nextPageToken"].as_str().unwrap();
    let (_, p2) = c
        .get(&format!("instances?maxResults=2&pageToken={token}"))
        .await;
    assert_eq!(names(&p2), ["web-2"]);
    assert!(p2.get("nextPageToken").is_none(), "{p2}");
    let (s, v) = c.get("instances?pageToken=bogus").await;
    assert_eq!((s, reason(&v)), (400, "invalid"));
}

#[tokio::test]
async fn aggregated_list_is_keyed_by_zone_with_warnings_for_empty_ones() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "here", "RUNNING", PORT).unwrap();
    emu.add_instance("europe-west1-b", "there", "TERMINATED", PORT)
        .unwrap();
    emu.add_instance("europe-west1-b", "here", "TERMINATED", PORT)
        .unwrap();
    let c = Client::new(&emu).await;
    // A zone with nothing in it, seen by a call.
    let _ = c
        .http
        .get(c.base.replace(ZONE, "asia-east1-a") + "instances")
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    let url = format!(
        "{}projects/{}/aggregated/instances?filter=name%20%3D%20%22here%22",
        emu.compute_base(),
        emu.project()
    );
    let v: Value = c
        .http
        .get(&url)
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["kind"], "compute#instanceAggregatedList", "{v}");
    let items = v["items"].as_object().unwrap();
    assert_eq!(
        items[&format!("zones/{ZONE}")]["instances"][0]["name"],
        "here"
    );
    assert_eq!(
        items["zones/europe-west1-b"]["instances"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        items["zones/asia-east1-a"]["warning"]["code"],
        "NO_RESULTS_ON_PAGE"
    );
    assert!(items["zones/asia-east1-a"].get("instances").is_none());
    // Without a token: Google's 401.
    let res = c.http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn gpus_need_terminate_and_flex_start_needs_a_run_duration() {
    let emu = emulator().await;
    let c = Client::new(&emu).await;
    let gpu = |scheduling: Value| {
        let mut b = minimal("gpu");
        b["machineType"] = json!(format!("zones/{ZONE}/machineTypes/g2-standard-8"));
        b["guestAccelerators"] = json!([{"acceleratorType": format!("zones/{ZONE}/acceleratorTypes/nvidia-l4"), "acceleratorCount": 1}]);
        b["scheduling"] = scheduling;
        b
    };
    for (what, body) in [
        (
            "GPU with MIGRATE",
            gpu(json!({"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE"})),
        ),
        (
            "GPU standard, maintenance left to the default (MIGRATE)",
            gpu(json!({"provisioningModel": "STANDARD"})),
        ),
        (
            "flex-start without maxRunDuration",
            gpu(json!({"provisioningModel": "FLEX_START", "instanceTerminationAction": "DELETE"})),
        ),
        (
            "flex-start with STOP",
            gpu(
                json!({"provisioningModel": "FLEX_START", "instanceTerminationAction": "STOP", "maxRunDuration": {"seconds": "3600"}}),
            ),
        ),
        (
            "maxRunDuration as a bare number",
            gpu(
                json!({"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE", "maxRunDuration": 3600}),
            ),
        ),
        ("accelerator of another zone", {
            let mut b = gpu(json!({"provisioningModel": "SPOT"}));
            b["guestAccelerators"][0]["acceleratorType"] =
                json!("zones/us-east1-b/acceleratorTypes/nvidia-l4");
            b
        }),
    ] {
        let (s, v) = c.post("instances", Some(body)).await;
        assert_eq!((s, reason(&v)), (400, "invalid"), "{what}: {v}");
    }
    let ok = gpu(
        json!({"provisioningModel": "FLEX_START", "instanceTerminationAction": "DELETE",
        "onHostMaintenance": "TERMINATE", "automaticRestart": false,
        "maxRunDuration": {"seconds": "14400", "nanos": 0}}),
    );
    let (s, v) = c.post("instances", Some(ok)).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn a_preempted_spot_vm_goes_through_a_soft_off_period() {
    let emu =
        Emulator::start(EmulatorOptions::fast().preemption_soft_off(Duration::from_millis(400)))
            .await
            .unwrap();
    emu.add_instance(ZONE, "spot", "RUNNING", PORT).unwrap();
    assert!(emu.preempt(ZONE, "spot"));
    assert_eq!(emu.instance(ZONE, "spot").unwrap().status, "STOPPING");
    let c = Client::new(&emu).await;
    let (_, ops) = c.get("operations").await;
    let op = ops["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["operationType"] == "compute.instances.preempted")
        .cloned()
        .unwrap();
    assert_eq!(op["status"], "RUNNING", "{op}");
    eventually("TERMINATED after the soft-off", || {
        emu.instance(ZONE, "spot").unwrap().status == "TERMINATED"
    })
    .await;
    let (_, op) = c
        .get(&format!("operations/{}", op["name"].as_str().unwrap()))
        .await;
    assert_eq!(op["status"], "DONE");
}

#[tokio::test]
async fn error_bodies_carry_the_canonical_status() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "st", "RUNNING", PORT).unwrap();
    let c = Client::new(&emu).await;
    let status_of = |v: &Value| v["error"]["status"].as_str().unwrap_or("").to_owned();
    let (s, v) = c.get("instances/none").await;
    assert_eq!(
        (s, reason(&v), status_of(&v).as_str()),
        (404, "notFound", "NOT_FOUND")
    );
    assert_eq!(v["error"]["errors"][0]["domain"], "global");
    let (s, v) = c.post("instances", Some(minimal("st"))).await;
    assert_eq!(
        (s, reason(&v), status_of(&v).as_str()),
        (409, "alreadyExists", "ALREADY_EXISTS")
    );
    let (s, v) = c.post("instances", Some(minimal("Bad"))).await;
    assert_eq!(
        (s, reason(&v), status_of(&v).as_str()),
        (400, "invalid", "INVALID_ARGUMENT")
    );
    let (s, v) = c
        .post(
            "instances/st/setLabels",
            Some(json!({"labels": {}, "labelFingerprint": "stale="})),
        )
        .await;
    assert_eq!(
        (s, reason(&v), status_of(&v).as_str()),
        (412, "conditionNotMet", "FAILED_PRECONDITION")
    );
    emu.fail_next("instances.get", 1, 403, "rateLimitExceeded");
    let (s, v) = c.get("instances/st").await;
    assert_eq!(
        (s, reason(&v), status_of(&v).as_str()),
        (403, "rateLimitExceeded", "PERMISSION_DENIED")
    );
    emu.fail_next("instances.get", 1, 500, "backendError");
    let (s, v) = c.get("instances/st").await;
    assert_eq!((s, status_of(&v).as_str()), (500, "INTERNAL"));
    emu.fail_next("instances.get", 1, 429, "rateLimitExceeded");
    let (s, v) = c.get("instances/st").await;
    assert_eq!((s, status_of(&v).as_str()), (429, "RESOURCE_EXHAUSTED"));
    let (s, v) = c.get("operations/operation-none").await;
    assert_eq!((s, reason(&v)), (404, "notFound"));
    // Operations belong to their project: another project's path does not find them.
    let (_, op) = c.post("instances/st/stop", None).await;
    let other = c.base.replace(emu.project(), "other-project");
    let res = c
        .http
        .get(format!(
            "{other}operations/{}",
            op["name"].as_str().unwrap()
        ))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("projects/other-project/"));
}

#[tokio::test]
async fn set_labels_without_a_fingerprint_is_412_like_a_stale_one() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "nofp", "RUNNING", PORT).unwrap();
    let c = Client::new(&emu).await;
    for body in [
        json!({"labels": {"a": "1"}}),
        json!({"labels": {"a": "1"}, "labelFingerprint": ""}),
    ] {
        let (s, v) = c.post("instances/nofp/setLabels", Some(body)).await;
        assert_eq!((s, reason(&v)), (412, "conditionNotMet"), "{v}");
        assert_eq!(
            v["error"]["message"],
            "Labels fingerprint either invalid or resource labels have changed"
        );
        assert_eq!(v["error"]["errors"][0]["location"], "If-Match");
    }
    assert_eq!(
        emu.instance(ZONE, "nofp").unwrap().labels["managed-by"],
        "vmproxy"
    );
}

#[tokio::test]
async fn spot_inserts_may_leave_restart_and_maintenance_to_the_defaults() {
    let emu = emulator().await;
    let c = Client::new(&emu).await;
    // Google's own REST example for a Spot VM sends only these two.
    let mut spot = minimal("spot-vm");
    spot["scheduling"] = json!({"provisioningModel": "SPOT", "instanceTerminationAction": "STOP"});
    let (s, op) = c.post("instances", Some(spot)).await;
    assert_eq!(s, 200, "{op}");
    let (_, inst) = c.get("instances/spot-vm").await;
    let sch = &inst["scheduling"];
    assert_eq!(sch["provisioningModel"], "SPOT");
    assert_eq!(sch["automaticRestart"], false);
    assert_eq!(sch["onHostMaintenance"], "TERMINATE");
    assert_eq!(sch["preemptible"], true);
    let mut legacy = minimal("legacy");
    legacy["scheduling"] = json!({"preemptible": true});
    let (s, v) = c.post("instances", Some(legacy)).await;
    assert_eq!(s, 200, "{v}");
    let (_, inst) = c.get("instances/legacy").await;
    assert_eq!(inst["scheduling"]["automaticRestart"], false);
    assert_eq!(inst["scheduling"]["onHostMaintenance"], "TERMINATE");
    // Explicit contradictions are still refused.
    for (what, sch) in [
        (
            "automaticRestart true",
            json!({"provisioningModel": "SPOT", "automaticRestart": true}),
        ),
        (
            "MIGRATE",
            json!({"provisioningModel": "SPOT", "onHostMaintenance": "MIGRATE"}),
        ),
        (
            "preemptible MIGRATE",
            json!({"preemptible": true, "onHostMaintenance": "MIGRATE"}),
        ),
        ("bad enum", json!({"onHostMaintenance": "SOMETIMES"})),
    ] {
        let mut body = minimal("contra");
        body["scheduling"] = sch;
        let (s, v) = c.post("instances", Some(body)).await;
        assert_eq!((s, reason(&v)), (400, "invalid"), "{what}: {v}");
    }
    // A standard VM keeps the standard defaults.
    let mut std_vm = minimal("std-vm");
    std_vm.as_object_mut().unwrap().remove("scheduling");
    let (s, _) = c.post("instances", Some(std_vm)).await;
    assert_eq!(s, 200);
    let (_, inst) = c.get("instances/std-vm").await;
    assert_eq!(inst["scheduling"]["automaticRestart"], true);
    assert_eq!(inst["scheduling"]["onHostMaintenance"], "MIGRATE");
    assert_eq!(inst["scheduling"]["preemptible"], false);
}

#[tokio::test]
async fn metadata_server_answers_what_googles_clients_ask() {
    let emu = emulator().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str| {
        http.get(format!("{}{path}", emu.url()))
            .header("Metadata-Flavor", "Google")
            .send()
    };
    // The ping of Google's clients (Python's google-auth with GCE_METADATA_IP).
    let res = get("/").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["metadata-flavor"], "Google");
    // project-id is plain text.
    let res = get("/computeMetadata/v1/project/project-id").await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(res.text().await.unwrap(), emu.project());
    // Service account info (google-auth asks for it before the token).
    let res = get("/computeMetadata/v1/instance/service-accounts/default/?recursive=true")
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let info: Value = res.json().await.unwrap();
    let email = info["email"].as_str().unwrap().to_owned();
    assert!(email.ends_with(".iam.gserviceaccount.com"), "{info}");
    assert_eq!(info["aliases"], json!(["default"]));
    assert!(info["scopes"].as_array().is_some_and(|s| !s.is_empty()));
    let res = get("/computeMetadata/v1/instance/service-accounts/default/email")
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), email);
    // A token with scopes, and by the account's email.
    for path in [
        "/computeMetadata/v1/instance/service-accounts/default/token?scopes=https://www.googleapis.com/auth/compute,https://www.googleapis.com/auth/cloud-platform".to_owned(),
        format!("/computeMetadata/v1/instance/service-accounts/{email}/token"),
    ] {
        let res = get(&path).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["token_type"], "Bearer");
    }
    let res = get("/computeMetadata/v1/instance/service-accounts/")
        .await
        .unwrap();
    assert!(res.text().await.unwrap().contains("default/"));
    let res = get("/computeMetadata/v1/universe/universe-domain")
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "googleapis.com");
    for dir in [
        "/computeMetadata/v1/",
        "/computeMetadata/v1/instance",
        "/computeMetadata/v1/instance/",
        "/computeMetadata/v1/project/",
    ] {
        let res = get(dir).await.unwrap();
        assert_eq!(res.status(), 200, "{dir}");
        assert_eq!(res.headers()["metadata-flavor"], "Google");
    }
    let res = get("/computeMetadata/v1/instance/nothing-here")
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["metadata-flavor"], "Google");
    // Without the header, everything under /computeMetadata/ is refused.
    let res = http
        .get(format!(
            "{}/computeMetadata/v1/project/project-id",
            emu.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(emu.tokens_issued(), 2);
}

#[tokio::test]
async fn a_post_without_content_length_gets_googles_411_when_strict() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "len", "RUNNING", PORT).unwrap();
    let c = Client::new(&emu).await;
    // reqwest (hyper) sends no Content-Length for a POST without a body.
    let res = c
        .http
        .post(format!("{}instances/len/stop", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 411);
    assert_eq!(emu.instance(ZONE, "len").unwrap().status, "RUNNING");
    let (s, op) = c.post("instances/len/stop", None).await;
    assert_eq!(s, 200, "{op}");
    let (s, op) = c
        .post(
            &format!("operations/{}/wait", op["name"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!((s, op["status"].as_str()), (200, Some("DONE")));
    // Not strict (the default): bare clients are served.
    let lax = Emulator::start(EmulatorOptions::fast()).await.unwrap();
    lax.add_instance(ZONE, "len", "RUNNING", PORT).unwrap();
    let c = Client::new(&lax).await;
    let res = c
        .http
        .post(format!("{}instances/len/stop", c.base))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn lists_query_params_and_empty_labels_read_like_compute_engine() {
    let emu = emulator().await;
    emu.add_instance(ZONE, "b-vm", "RUNNING", PORT).unwrap();
    emu.add_instance(ZONE, "a-vm", "TERMINATED", PORT).unwrap();
    let c = Client::new(&emu).await;
    let (s, list) = c.get("instances").await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["kind"], "compute#instanceList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-vm", "b-vm"]);
    let (s, op) = c
        .post("instances/b-vm/stop?discardLocalSsd=maybe", None)
        .await;
    assert_eq!((s, reason(&op)), (400, "invalid"), "{op}");
    let (s, op) = c
        .post("instances/b-vm/stop?discardLocalSsd=false", None)
        .await;
    assert_eq!(s, 200, "{op}");
    let (s, ops) = c.get("operations").await;
    assert_eq!(s, 200);
    assert_eq!(ops["kind"], "compute#operationList");
    assert!(ops["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["name"] == op["name"]));
    // Another zone: nothing, and no `items` at all.
    let res = c
        .http
        .get(c.base.replace(ZONE, "europe-west1-b") + "instances")
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    assert!(v.get("items").is_none(), "{v}");
    // Labels removed: the map is left out, the fingerprint stays.
    let (_, inst) = c.get("instances/a-vm").await;
    let fp = inst["labelFingerprint"].as_str().unwrap().to_owned();
    let (s, _) = c
        .post(
            "instances/a-vm/setLabels",
            Some(json!({"labels": {}, "labelFingerprint": fp})),
        )
        .await;
    assert_eq!(s, 200);
    let (_, inst) = c.get("instances/a-vm").await;
    assert!(inst.get("labels").is_none(), "{inst}");
    assert!(inst["labelFingerprint"].is_string());
}
