//! The emulated zone: instances, operations, faults, the call log, and the timed transitions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::vm::{self, AbortOnDrop, VmInfo};
use super::{Call, EmulatorOptions, InstanceInfo};

pub(crate) const LINK_BASE: &str = "https://www.googleapis.com/compute/v1/";

/// (project, zone, name)
pub(crate) type Key = (String, String, String);

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A full resource URL for a partial one (`zones/z/machineTypes/m`, `global/...`).
pub(crate) fn full_url(project: &str, partial: &str) -> String {
    if partial.starts_with("https://") {
        partial.to_owned()
    } else if partial.starts_with("projects/") {
        format!("{LINK_BASE}{partial}")
    } else {
        format!("{LINK_BASE}projects/{project}/{partial}")
    }
}

/// An 8-byte fingerprint, base64 like the real ones.
pub(crate) fn fingerprint() -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let n = fastrand::u64(..).to_be_bytes();
    let mut out = String::with_capacity(12);
    for chunk in n.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Debug)]
pub(crate) struct Inst {
    pub(crate) id: u64,
    pub(crate) key: Key,
    pub(crate) status: &'static str,
    /// Bumped by every change of course, so a stale timed transition does nothing.
    pub(crate) gen: u64,
    /// The insert body as received (for the fields echoed back by get).
    pub(crate) body: Value,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) label_fingerprint: String,
    pub(crate) network_ip: IpAddr,
    pub(crate) nat_ip: Option<IpAddr>,
    pub(crate) port: u16,
    pub(crate) delete_on_preempt: bool,
    /// A refused insert leaves this instance TERMINATED instead of removing it.
    pub(crate) leave_on_failure: bool,
    pub(crate) created: String,
    pub(crate) last_start: Option<String>,
    pub(crate) last_stop: Option<String>,
    pub(crate) last_suspended: Option<String>,
    pub(crate) reserved: Vec<TcpSocket>,
    pub(crate) server: Option<AbortOnDrop>,
}

impl Inst {
    pub(crate) fn info(&self) -> InstanceInfo {
        InstanceInfo {
            project: self.key.0.clone(),
            zone: self.key.1.clone(),
            name: self.key.2.clone(),
            id: self.id,
            status: self.status.to_owned(),
            network_ip: self.network_ip,
            nat_ip: self.nat_ip,
            port: self.port,
            labels: self.labels.clone(),
            label_fingerprint: self.label_fingerprint.clone(),
        }
    }

    fn self_link(&self) -> String {
        let (p, z, n) = &self.key;
        format!("{LINK_BASE}projects/{p}/zones/{z}/instances/{n}")
    }

    /// The Instance resource as `instances.get` returns it.
    pub(crate) fn to_json(&self) -> Value {
        let (p, z, n) = &self.key;
        let b = &self.body;
        let shows_nat = matches!(self.status, "RUNNING" | "STOPPING" | "SUSPENDING");
        let nics: Vec<Value> = b["networkInterfaces"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| vec![json!({})])
            .iter()
            .enumerate()
            .map(|(i, nic)| {
                let network = nic["network"].as_str().unwrap_or("global/networks/default");
                let mut out = json!({
                    "kind": "compute#networkInterface",
                    "network": full_url(p, network),
                    "networkIP": self.network_ip.to_string(),
                    "name": format!("nic{i}"),
                    "fingerprint": "ZpHkJ0ymHaE=",
                    "stackType": "IPV4_ONLY",
                });
                if let Some(s) = nic["subnetwork"].as_str() {
                    out["subnetwork"] = json!(full_url(p, s));
                }
                if let Some(acs) = nic["accessConfigs"].as_array() {
                    let acs: Vec<Value> = acs
                        .iter()
                        .map(|ac| {
                            let mut a = json!({
                                "kind": "compute#accessConfig",
                                "type": ac["type"].as_str().unwrap_or("ONE_TO_ONE_NAT"),
                                "name": ac["name"].as_str().unwrap_or("External NAT"),
                                "networkTier": "PREMIUM",
                            });
                            if let (true, Some(ip)) = (shows_nat, self.nat_ip) {
                                a["natIP"] = json!(ip.to_string());
                            }
                            a
                        })
                        .collect();
                    out["accessConfigs"] = json!(acs);
                }
                out
            })
            .collect();
        let disks: Vec<Value> = b["disks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let size = match &d["initializeParams"]["diskSizeGb"] {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => "10".to_owned(),
                };
                let disk_name = if i == 0 {
                    n.clone()
                } else {
                    format!("{n}-{i}")
                };
                json!({
                    "kind": "compute#attachedDisk",
                    "type": "PERSISTENT",
                    "mode": "READ_WRITE",
                    "source": format!("{LINK_BASE}projects/{p}/zones/{z}/disks/{disk_name}"),
                    "deviceName": format!("persistent-disk-{i}"),
                    "index": i,
                    "boot": d["boot"].as_bool().unwrap_or(false),
                    "autoDelete": d["autoDelete"].as_bool().unwrap_or(true),
                    "interface": "SCSI",
                    "diskSizeGb": size,
                    "architecture": "X86_64",
                })
            })
            .collect();
        let mut scheduling = json!({
            "onHostMaintenance": "MIGRATE",
            "automaticRestart": true,
            "preemptible": false,
            "provisioningModel": "STANDARD",
        });
        let spot = b["scheduling"]["provisioningModel"].as_str() == Some("SPOT")
            || b["scheduling"]["preemptible"].as_bool() == Some(true);
        if spot {
            // What get shows for a Spot VM, whatever of it the insert left out.
            scheduling = json!({
                "onHostMaintenance": "TERMINATE",
                "automaticRestart": false,
                "preemptible": true,
            });
            if b["scheduling"]["provisioningModel"].as_str() == Some("SPOT") {
                scheduling["provisioningModel"] = json!("SPOT");
                scheduling["instanceTerminationAction"] = json!("STOP");
            }
        }
        if let Some(s) = b["scheduling"].as_object() {
            for (k, v) in s {
                scheduling[k] = v.clone();
            }
        }
        let mut out = json!({
            "kind": "compute#instance",
            "id": self.id.to_string(),
            "creationTimestamp": self.created,
            "name": n,
            "machineType": full_url(p, b["machineType"].as_str().unwrap_or("")),
            "status": self.status,
            "zone": format!("{LINK_BASE}projects/{p}/zones/{z}"),
            "canIpForward": false,
            "networkInterfaces": nics,
            "disks": disks,
            "metadata": {
                "kind": "compute#metadata",
                "fingerprint": "mOjoXu3qu8o=",
                "items": b["metadata"]["items"].clone(),
            },
            "selfLink": self.self_link(),
            "scheduling": scheduling,
            "cpuPlatform": "Intel Broadwell",
            "labels": self.labels,
            "labelFingerprint": self.label_fingerprint,
            "startRestricted": false,
            "deletionProtection": false,
            "fingerprint": "Qk2UDWbkhdk=",
        });
        if self.labels.is_empty() {
            // No labels: Compute Engine leaves the map out (the fingerprint stays).
            out.as_object_mut().map(|m| m.remove("labels"));
        }
        if out["metadata"]["items"].is_null() {
            out["metadata"].as_object_mut().map(|m| m.remove("items"));
        }
        for key in ["description", "serviceAccounts"] {
            if !b[key].is_null() {
                out[key] = b[key].clone();
            }
        }
        if let Some(tags) = b["tags"]["items"].as_array() {
            out["tags"] = json!({ "items": tags, "fingerprint": "42WmSpB8rSM=" });
        }
        for (key, v) in [
            ("lastStartTimestamp", &self.last_start),
            ("lastStopTimestamp", &self.last_stop),
            ("lastSuspendedTimestamp", &self.last_suspended),
        ] {
            if let Some(v) = v {
                out[key] = json!(v);
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Op {
    pub(crate) name: String,
    pub(crate) id: u64,
    pub(crate) project: String,
    pub(crate) zone: String,
    pub(crate) op_type: String,
    pub(crate) target: String,
    pub(crate) target_id: u64,
    pub(crate) status: &'static str,
    pub(crate) error: Option<(String, String)>,
    pub(crate) http_error: Option<(u16, &'static str)>,
    pub(crate) request_id: Option<String>,
    pub(crate) insert_time: String,
    pub(crate) end_time: Option<String>,
}

impl Op {
    pub(crate) fn to_json(&self) -> Value {
        let (p, z) = (&self.project, &self.zone);
        let mut v = json!({
            "kind": "compute#operation",
            "id": self.id.to_string(),
            "name": self.name,
            "zone": format!("{LINK_BASE}projects/{p}/zones/{z}"),
            "operationType": self.op_type,
            "targetLink": format!("{LINK_BASE}projects/{p}/zones/{z}/instances/{}", self.target),
            "targetId": self.target_id.to_string(),
            "status": self.status,
            "user": "vmproxy-emulator@developer.gserviceaccount.com",
            "progress": if self.status == "DONE" { 100 } else { 0 },
            "insertTime": self.insert_time,
            "startTime": self.insert_time,
            "selfLink": format!("{LINK_BASE}projects/{p}/zones/{z}/operations/{}", self.name),
        });
        if let Some(rid) = &self.request_id {
            v["clientOperationId"] = json!(rid);
        }
        if let Some(end) = &self.end_time {
            v["endTime"] = json!(end);
        }
        if let Some((code, message)) = &self.error {
            v["error"] = json!({ "errors": [{ "code": code, "message": message }] });
        }
        if let Some((status, message)) = self.http_error {
            v["httpErrorStatusCode"] = json!(status);
            v["httpErrorMessage"] = json!(message);
        }
        v
    }
}

#[derive(Debug)]
pub(crate) struct Fault {
    pub(crate) method: String,
    pub(crate) remaining: usize,
    pub(crate) status: u16,
    pub(crate) reason: String,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) instances: HashMap<Key, Inst>,
    pub(crate) ops: HashMap<String, Op>,
    pub(crate) request_ids: HashMap<String, String>,
    pub(crate) faults: Vec<Fault>,
    pub(crate) op_faults: Vec<(String, String)>,
    /// Zones without capacity: insert, start and resume there fail with
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`; the bool: whether a refused insert leaves the instance
    /// behind (TERMINATED).
    pub(crate) stockouts: HashMap<String, bool>,
    /// Methods whose next operation never finishes (the instance is left as it was).
    pub(crate) hangs: Vec<String>,
    /// Zones without Spot capacity only.
    pub(crate) spot_stockouts: HashSet<String>,
    /// (method, remaining, delay): answers computed at once, sent after the delay (a stale
    /// read, as from a slow list).
    pub(crate) delays: Vec<(String, usize, Duration)>,
    /// (method, remaining, delay): calls that take effect only after the delay (still in
    /// flight, as far as the API is concerned).
    pub(crate) holds: Vec<(String, usize, Duration)>,
    /// Zones seen in calls, listed (with a warning when empty) by aggregatedList.
    pub(crate) zones: std::collections::BTreeSet<String>,
    pub(crate) wait_early: bool,
    pub(crate) calls: Vec<Call>,
    pub(crate) tokens: HashSet<String>,
    pub(crate) next_id: u64,
}

impl State {
    pub(crate) fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        // Compute ids are large uint64s, sent as strings.
        4_000_000_000_000_000_000 + self.next_id * 7919
    }

    pub(crate) fn take_fault(&mut self, method: &str) -> Option<(u16, String)> {
        let f = self
            .faults
            .iter_mut()
            .find(|f| f.method == method && f.remaining > 0)?;
        f.remaining -= 1;
        let out = (f.status, f.reason.clone());
        self.faults.retain(|f| f.remaining > 0);
        Some(out)
    }

    pub(crate) fn take_delay(&mut self, method: &str) -> Option<Duration> {
        take_one(&mut self.delays, method)
    }

    pub(crate) fn take_hold(&mut self, method: &str) -> Option<Duration> {
        take_one(&mut self.holds, method)
    }

    pub(crate) fn take_hang(&mut self, method: &str) -> bool {
        match self.hangs.iter().position(|m| m == method) {
            Some(i) => {
                self.hangs.remove(i);
                true
            }
            None => false,
        }
    }

    pub(crate) fn take_op_fault(&mut self, method: &str) -> Option<String> {
        let i = self.op_faults.iter().position(|(m, _)| m == method)?;
        Some(self.op_faults.remove(i).1)
    }

    /// A new operation on `key`, RUNNING (or DONE when `done`).
    pub(crate) fn new_op(
        &mut self,
        key: &Key,
        target_id: u64,
        op_type: &str,
        request_id: Option<&str>,
        done: bool,
    ) -> Op {
        let id = self.new_id();
        let op = Op {
            name: format!(
                "operation-{}-{}",
                id % 10_000_000_000_000,
                uuid::Uuid::new_v4().simple()
            ),
            id,
            project: key.0.clone(),
            zone: key.1.clone(),
            op_type: op_type.to_owned(),
            target: key.2.clone(),
            target_id,
            status: if done { "DONE" } else { "RUNNING" },
            error: None,
            http_error: None,
            request_id: request_id.map(str::to_owned),
            insert_time: now_rfc3339(),
            end_time: done.then(now_rfc3339),
        };
        if let Some(rid) = request_id {
            self.request_ids.insert(rid.to_owned(), op.name.clone());
        }
        self.ops.insert(op.name.clone(), op.clone());
        op
    }

    pub(crate) fn finish_op(&mut self, name: &str, error: Option<&str>) {
        if let Some(op) = self.ops.get_mut(name) {
            op.status = "DONE";
            op.end_time = Some(now_rfc3339());
            if let Some(code) = error {
                let (status, text, message) = match code {
                    c if c.starts_with("ZONE_RESOURCE_POOL_EXHAUSTED") => (
                        503,
                        "SERVICE UNAVAILABLE",
                        format!("The zone 'projects/{}/zones/{}' does not have enough resources available to fulfill the request. Try a different zone, or try again later.", op.project, op.zone),
                    ),
                    "QUOTA_EXCEEDED" => (403, "FORBIDDEN", format!("Quota 'CPUS' exceeded. Limit: 0.0 in region {}.", op.zone)),
                    _ => (400, "BAD REQUEST", format!("Injected operation error {code}")),
                };
                op.error = Some((code.to_owned(), message));
                op.http_error = Some((status, text));
            }
        }
    }
}

/// The emulated world behind one [`Emulator`](super::Emulator).
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) opts: EmulatorOptions,
    state: Mutex<State>,
    pub(crate) changed: watch::Sender<u64>,
    tasks: Mutex<JoinSet<()>>,
    pub(crate) never_healthy: Arc<AtomicBool>,
}

/// How a boot ends when it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BootKind {
    Insert,
    Start,
    Resume,
}

impl World {
    pub(crate) fn new(opts: EmulatorOptions) -> Arc<Self> {
        Arc::new(World {
            opts,
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
            tasks: Mutex::new(JoinSet::new()),
            never_healthy: Arc::new(AtomicBool::new(false)),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub(crate) fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(fut);
    }

    /// `GET /emulator/instances`: every instance, by zone and name, without credentials.
    pub(crate) fn listing(&self) -> axum::response::Response {
        let st = self.lock();
        let mut list: Vec<&Inst> = st.instances.values().collect();
        list.sort_by(|a, b| (&a.key.1, &a.key.2).cmp(&(&b.key.1, &b.key.2)));
        let items: Vec<Value> = list
            .iter()
            .map(|i| {
                let running = i.status == "RUNNING";
                json!({
                    "project": i.key.0,
                    "zone": i.key.1,
                    "name": i.key.2,
                    "status": i.status,
                    "machineType": i.body["machineType"].as_str().unwrap_or("").rsplit('/').next(),
                    "provisioningModel": i.body["scheduling"]["provisioningModel"],
                    "networkIP": i.network_ip.to_string(),
                    "natIP": i.nat_ip.filter(|_| running).map(|ip| ip.to_string()),
                    "port": i.port,
                    "labels": i.labels,
                })
            })
            .collect();
        drop(st);
        super::compute::json_response(http::StatusCode::OK, json!({ "instances": items }))
    }

    /// Stops every timer and every instance server.
    pub(crate) fn shutdown(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
        let instances = std::mem::take(&mut self.lock().instances);
        drop(instances);
    }

    /// Makes sure the instance holds its addresses (again), before a boot. As on Compute
    /// Engine, a restarted instance keeps its internal IP and gets a new ephemeral external IP.
    pub(crate) fn reserve(inst: &mut Inst) {
        if !inst.reserved.is_empty() || inst.server.is_some() {
            return;
        }
        let mut sockets = Vec::new();
        match vm::bind(inst.network_ip, inst.port) {
            Ok(s) => sockets.push(s),
            Err(_) => {
                // Taken meanwhile (another process?): move to a new address.
                if let Ok((ip, s)) = vm::allocate(inst.port) {
                    inst.network_ip = ip;
                    sockets.push(s);
                }
            }
        }
        if inst.nat_ip.is_some() {
            if let Ok((ip, s)) = vm::allocate(inst.port) {
                inst.nat_ip = Some(ip);
                sockets.push(s);
            }
        }
        inst.reserved = sockets;
    }

    /// RUNNING: the guest's HTTP server answers after the boot delay.
    pub(crate) fn run(&self, inst: &mut Inst) {
        Self::reserve(inst);
        inst.status = "RUNNING";
        inst.last_start = Some(now_rfc3339());
        let info = Arc::new(VmInfo {
            name: inst.key.2.clone(),
            health_path: self.opts.health_path.clone(),
            never_healthy: self.never_healthy.clone(),
        });
        inst.server = Some(vm::boot(
            std::mem::take(&mut inst.reserved),
            self.opts.boot_delay,
            info,
        ));
    }

    /// PROVISIONING → STAGING → RUNNING, then the operation is DONE (or fails with `fail`).
    pub(crate) fn boot(
        self: &Arc<Self>,
        key: Key,
        gen: u64,
        op: String,
        kind: BootKind,
        fail: Option<String>,
    ) {
        let world = self.clone();
        self.spawn(async move {
            tokio::time::sleep(world.opts.provisioning).await;
            {
                let mut st = world.lock();
                match st.instances.get_mut(&key) {
                    Some(i) if i.gen == gen => i.status = "STAGING",
                    _ => {
                        st.finish_op(&op, None);
                        drop(st);
                        world.bump();
                        return;
                    }
                }
                drop(st);
                world.bump();
            }
            if let Some(code) = fail {
                let mut st = world.lock();
                if let Some(i) = st.instances.get_mut(&key).filter(|i| i.gen == gen) {
                    match kind {
                        BootKind::Insert if i.leave_on_failure => {
                            i.status = "TERMINATED";
                            i.reserved.clear();
                        }
                        BootKind::Insert => {
                            st.instances.remove(&key);
                        }
                        BootKind::Start => {
                            i.status = "TERMINATED";
                            i.reserved.clear();
                        }
                        BootKind::Resume => {
                            i.status = "SUSPENDED";
                            i.reserved.clear();
                        }
                    }
                }
                st.finish_op(&op, Some(&code));
                drop(st);
                world.bump();
                return;
            }
            tokio::time::sleep(world.opts.staging).await;
            let mut st = world.lock();
            if let Some(i) = st.instances.get_mut(&key).filter(|i| i.gen == gen) {
                world.run(i);
            }
            st.finish_op(&op, None);
            drop(st);
            world.bump();
        });
    }

    /// STOPPING/SUSPENDING → `to` (None: deleted) after `delay`, then the operation is DONE.
    pub(crate) fn settle(
        self: &Arc<Self>,
        key: Key,
        gen: u64,
        op: String,
        delay: Duration,
        to: Option<&'static str>,
    ) {
        let world = self.clone();
        self.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = world.lock();
            if st.instances.get(&key).is_some_and(|i| i.gen == gen) {
                match to {
                    None => {
                        st.instances.remove(&key);
                    }
                    Some(status) => {
                        let i = st.instances.get_mut(&key).expect("checked");
                        i.status = status;
                        let now = now_rfc3339();
                        if status == "SUSPENDED" {
                            i.last_suspended = Some(now);
                        } else {
                            i.last_stop = Some(now);
                        }
                    }
                }
            }
            st.finish_op(&op, None);
            drop(st);
            world.bump();
        });
    }
}

/// The delay of the first entry for `method` in `list`, counted down.
fn take_one(list: &mut Vec<(String, usize, Duration)>, method: &str) -> Option<Duration> {
    let d = list.iter_mut().find(|d| d.0 == method && d.1 > 0)?;
    d.1 -= 1;
    let out = d.2;
    list.retain(|d| d.1 > 0);
    Some(out)
}
