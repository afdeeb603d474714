//! The Compute v1 subset: routing, auth, fault injection, validation and the methods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{json, Map, Value};

use super::state::{fingerprint, now_rfc3339, BootKind, Inst, Key, World};
use super::vm;
use super::Call;

pub(crate) fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(
            http::header::CONTENT_TYPE,
            "application/json; charset=UTF-8",
        )],
        v.to_string(),
    )
        .into_response()
}

/// The canonical `status` Google puts beside an HTTP error code.
pub(crate) fn grpc_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        409 => "ALREADY_EXISTS",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

/// A Google API error body:
/// `{"error":{"code","message","errors":[{"domain","reason","message"}],"status"}}`.
pub(crate) fn api_error(status: u16, reason: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    let item = json!({ "domain": "global", "reason": reason, "message": message });
    error_body(status, message, item)
}

fn error_body(status: u16, message: String, item: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        code,
        json!({ "error": {
            "code": status,
            "message": message,
            "errors": [item],
            "status": grpc_status(status),
        }}),
    )
}

/// What Google answers for a missing, expired or foreign access token.
fn unauthenticated() -> Response {
    let mut res = error_body(
        401,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.".to_owned(),
        json!({
            "message": "Invalid Credentials",
            "domain": "global",
            "reason": "authError",
            "location": "Authorization",
            "locationType": "header",
        }),
    );
    res.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
    );
    res
}

/// What Google answers a request without an `Authorization` header: 401, reason `required`,
/// and an `ErrorInfo` detail `CREDENTIALS_MISSING`.
fn credentials_missing(method: &str) -> Response {
    let code = StatusCode::UNAUTHORIZED;
    let rpc = match method {
        "instances.list" => "List",
        "instances.aggregatedList" => "AggregatedList",
        "instances.get" => "Get",
        "instances.insert" => "Insert",
        "instances.delete" => "Delete",
        "instances.start" => "Start",
        "instances.stop" => "Stop",
        "instances.suspend" => "Suspend",
        "instances.resume" => "Resume",
        "instances.setLabels" => "SetLabels",
        "zoneOperations.wait" => "Wait",
        "zoneOperations.get" => "Get",
        _ => "List",
    };
    let service = if method.starts_with("zoneOperations") {
        "ZoneOperationsService"
    } else {
        "InstancesService"
    };
    let mut res = json_response(
        code,
        json!({ "error": {
            "code": 401,
            "message": "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            "errors": [{
                "message": "Login Required.",
                "domain": "global",
                "reason": "required",
                "location": "Authorization",
                "locationType": "header",
            }],
            "status": "UNAUTHENTICATED",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "CREDENTIALS_MISSING",
                "domain": "googleapis.com",
                "metadata": {
                    "method": format!("compute.v1.{service}.{rpc}"),
                    "service": "compute.googleapis.com",
                },
            }],
        }}),
    );
    res.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
    );
    res
}

/// 412 for a stale or missing label fingerprint, as Compute Engine words it.
fn fingerprint_mismatch() -> Response {
    let message = "Labels fingerprint either invalid or resource labels have changed";
    error_body(
        412,
        message.to_owned(),
        json!({
            "message": message,
            "domain": "global",
            "reason": "conditionNotMet",
            "location": "If-Match",
            "locationType": "header",
        }),
    )
}

enum Route {
    List {
        project: String,
        zone: String,
    },
    Aggregated {
        project: String,
    },
    OpList {
        project: String,
        zone: String,
    },
    Insert {
        project: String,
        zone: String,
    },
    Get(Key),
    Delete(Key),
    Action(Key, &'static str),
    OpGet {
        project: String,
        zone: String,
        op: String,
    },
    OpWait {
        project: String,
        zone: String,
        op: String,
    },
}

fn route(method: &Method, path: &str) -> Option<(&'static str, Route)> {
    let rest = path.strip_prefix("/compute/v1/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    let key = |p: &str, z: &str, n: &str| (p.to_owned(), z.to_owned(), n.to_owned());
    Some(match (method.as_str(), segs.as_slice()) {
        ("GET", ["projects", p, "zones", z, "instances"]) => (
            "instances.list",
            Route::List {
                project: (*p).to_owned(),
                zone: (*z).to_owned(),
            },
        ),
        ("GET", ["projects", p, "aggregated", "instances"]) => (
            "instances.aggregatedList",
            Route::Aggregated {
                project: (*p).to_owned(),
            },
        ),
        ("GET", ["projects", p, "zones", z, "operations"]) => (
            "zoneOperations.list",
            Route::OpList {
                project: (*p).to_owned(),
                zone: (*z).to_owned(),
            },
        ),
        ("POST", ["projects", p, "zones", z, "instances"]) => (
            "instances.insert",
            Route::Insert {
                project: (*p).to_owned(),
                zone: (*z).to_owned(),
            },
        ),
        ("GET", ["projects", p, "zones", z, "instances", n]) => {
            ("instances.get", Route::Get(key(p, z, n)))
        }
        ("DELETE", ["projects", p, "zones", z, "instances", n]) => {
            ("instances.delete", Route::Delete(key(p, z, n)))
        }
        ("POST", ["projects", p, "zones", z, "instances", n, action]) => {
            let m = match *action {
                "start" => "instances.start",
                "stop" => "instances.stop",
                "suspend" => "instances.suspend",
                "resume" => "instances.resume",
                "setLabels" => "instances.setLabels",
                _ => return None,
            };
            (m, Route::Action(key(p, z, n), m))
        }
        ("GET", ["projects", p, "zones", z, "operations", op]) => (
            "zoneOperations.get",
            Route::OpGet {
                project: (*p).to_owned(),
                zone: (*z).to_owned(),
                op: (*op).to_owned(),
            },
        ),
        ("POST", ["projects", p, "zones", z, "operations", op, "wait"]) => (
            "zoneOperations.wait",
            Route::OpWait {
                project: (*p).to_owned(),
                zone: (*z).to_owned(),
                op: (*op).to_owned(),
            },
        ),
        _ => return None,
    })
}

fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, l)| g.len() == l && g.bytes().all(|c| c.is_ascii_hexdigit()))
        && s.bytes().any(|c| c != b'0' && c != b'-')
}

fn not_found(kind: &str, project: &str, zone: &str, name: &str) -> Response {
    api_error(
        404,
        "notFound",
        format!("The resource 'projects/{project}/zones/{zone}/{kind}/{name}' was not found"),
    )
}

/// Every Compute API request.
pub(crate) async fn handle(
    world: Arc<World>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let Some((name, route)) = route(&method, &path) else {
        let res = api_error(
            404,
            "notFound",
            format!("The requested URL {path} was not found on this server."),
        );
        log(&world, "unknown", &method, &uri, 404);
        return res;
    };
    let unframed = !headers.contains_key(http::header::CONTENT_LENGTH)
        && !headers.contains_key(http::header::TRANSFER_ENCODING);
    if world.opts.require_content_length && method == Method::POST && unframed {
        // Google's front end refuses these before any API sees them.
        let res = (
            StatusCode::LENGTH_REQUIRED,
            [(http::header::CONTENT_TYPE, "text/html; charset=UTF-8")],
            "<!DOCTYPE html>\n<html lang=en>\n  <title>Error 411 (Length Required)!!1</title>\n  <p><b>411.</b> <ins>That’s an error.</ins>\n  <p>POST requests require a <code>Content-length</code> header.  <ins>That’s all we know.</ins>\n",
        )
            .into_response();
        log(&world, name, &method, &uri, 411);
        return res;
    }
    let hold = world.lock().take_hold(name);
    let res = match hold {
        // Like Compute Engine, a call that arrived is carried out even if its client goes away.
        Some(d) => {
            let (world, uri) = (world.clone(), uri.clone());
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                handle_route(&world, name, route, &uri, &headers, &body).await
            })
            .await
            .expect("the emulator's handler does not panic")
        }
        None => handle_route(&world, name, route, &uri, &headers, &body).await,
    };
    let delay = world.lock().take_delay(name);
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    log(&world, name, &method, &uri, res.status().as_u16());
    res
}

fn log(world: &World, name: &str, method: &Method, uri: &Uri, status: u16) {
    tracing::debug!(target: "vmproxy::emulator", call = name, %method, %uri, status, "compute call");
    world.lock().calls.push(Call {
        method: name.to_owned(),
        http_method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
        status,
    });
}

async fn handle_route(
    world: &Arc<World>,
    name: &'static str,
    route: Route,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !headers.contains_key(http::header::AUTHORIZATION) {
        return credentials_missing(name);
    }
    {
        let mut st = world.lock();
        if !token.is_some_and(|t| st.tokens.contains(t)) {
            drop(st);
            return unauthenticated();
        }
        if let Some((status, reason)) = st.take_fault(name) {
            drop(st);
            return api_error(
                status,
                &reason,
                format!("Injected fault for {name}: {reason}"),
            );
        }
    }
    if let Some(v) = query_param(uri, "discardLocalSsd") {
        if v != "true" && v != "false" {
            return api_error(
                400,
                "invalid",
                format!("Invalid value for field 'discardLocalSsd': '{v}'. Expected a boolean."),
            );
        }
    }
    let request_id = query_param(uri, "requestId");
    if let Some(rid) = request_id {
        if !is_uuid(rid) {
            return api_error(400, "invalid", format!("Invalid value for field 'requestId': '{rid}'. The requestId must be a valid UUID (not all zeros)."));
        }
        let st = world.lock();
        if let Some(op) = st.request_ids.get(rid).and_then(|o| st.ops.get(o)) {
            return json_response(StatusCode::OK, op.to_json());
        }
    }
    match &route {
        Route::List { zone, .. } | Route::Insert { zone, .. } | Route::OpList { zone, .. } => {
            world.lock().zones.insert(zone.clone());
        }
        Route::Get(k) | Route::Delete(k) | Route::Action(k, _) => {
            world.lock().zones.insert(k.1.clone());
        }
        _ => {}
    }
    match route {
        Route::Insert { project, zone } => insert(world, project, zone, request_id, body),
        Route::List { project, zone } => {
            let page = match super::list::Page::from_query(uri) {
                Ok(p) => p,
                Err(m) => return api_error(400, "invalid", m),
            };
            let st = world.lock();
            let mut items: Vec<Value> = st
                .instances
                .values()
                .filter(|i| i.key.0 == project && i.key.1 == zone)
                .map(|i| i.to_json())
                .collect();
            drop(st);
            items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            let (items, next) = match page.apply(items) {
                Ok(v) => v,
                Err(m) => return api_error(400, "invalid", m),
            };
            let mut v = list_json("compute#instanceList", &project, &zone, "instances", items);
            if let Some(t) = next {
                v["nextPageToken"] = json!(t);
            }
            json_response(StatusCode::OK, v)
        }
        Route::Aggregated { project } => {
            let page = match super::list::Page::from_query(uri) {
                Ok(p) => p,
                Err(m) => return api_error(400, "invalid", m),
            };
            let st = world.lock();
            let mut items: Vec<Value> = st
                .instances
                .values()
                .filter(|i| i.key.0 == project)
                .map(|i| i.to_json())
                .collect();
            let mut zones: Vec<String> = st.zones.iter().cloned().collect();
            drop(st);
            // By zone, then name: the order Google's aggregated pages come in.
            items.sort_by(|a, b| {
                (a["zone"].as_str(), a["name"].as_str())
                    .cmp(&(b["zone"].as_str(), b["name"].as_str()))
            });
            let (items, next) = match page.apply(items) {
                Ok(v) => v,
                Err(m) => return api_error(400, "invalid", m),
            };
            for i in &items {
                let z = i["zone"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                if !zones.contains(&z) {
                    zones.push(z);
                }
            }
            zones.sort();
            json_response(
                StatusCode::OK,
                aggregated_json(&project, &zones, items, next),
            )
        }
        Route::OpList { project, zone } => {
            let st = world.lock();
            let mut items: Vec<&super::state::Op> = st
                .ops
                .values()
                .filter(|o| o.project == project && o.zone == zone)
                .collect();
            items.sort_by_key(|o| o.id);
            let items: Vec<Value> = items.iter().map(|o| o.to_json()).collect();
            json_response(
                StatusCode::OK,
                list_json(
                    "compute#operationList",
                    &project,
                    &zone,
                    "operations",
                    items,
                ),
            )
        }
        Route::Get(key) => {
            let st = world.lock();
            match st.instances.get(&key) {
                Some(i) => json_response(StatusCode::OK, i.to_json()),
                None => not_found("instances", &key.0, &key.1, &key.2),
            }
        }
        Route::Delete(key) => delete(world, key, request_id),
        Route::Action(key, "instances.setLabels") => set_labels(world, key, request_id, body),
        Route::Action(key, action) => act(world, key, action, request_id),
        Route::OpGet { project, zone, op } => {
            let st = world.lock();
            match st
                .ops
                .get(&op)
                .filter(|o| o.zone == zone && o.project == project)
            {
                Some(o) => json_response(StatusCode::OK, o.to_json()),
                None => not_found("operations", &project, &zone, &op),
            }
        }
        Route::OpWait { project, zone, op } => wait(world, project, zone, op).await,
    }
}

/// A list answer; `items` is left out when empty, as Compute Engine does.
fn list_json(kind: &str, project: &str, zone: &str, what: &str, items: Vec<Value>) -> Value {
    let mut v = json!({
        "kind": kind,
        "id": format!("projects/{project}/zones/{zone}/{what}"),
        "selfLink": format!("{}projects/{project}/zones/{zone}/{what}", super::state::LINK_BASE),
    });
    if !items.is_empty() {
        v["items"] = Value::Array(items);
    }
    v
}

/// `InstanceAggregatedList`: `items` keyed `zones/ZONE`, each with `instances` or, for a zone
/// with none, a `NO_RESULTS_ON_PAGE` warning.
fn aggregated_json(
    project: &str,
    zones: &[String],
    items: Vec<Value>,
    next: Option<String>,
) -> Value {
    let mut map = Map::new();
    for zone in zones {
        let here: Vec<Value> = items
            .iter()
            .filter(|i| {
                i["zone"]
                    .as_str()
                    .is_some_and(|z| z.rsplit('/').next() == Some(zone.as_str()))
            })
            .cloned()
            .collect();
        let scoped = if here.is_empty() {
            json!({ "warning": {
                "code": "NO_RESULTS_ON_PAGE",
                "message": "There are no results for scope 'zones/".to_owned() + zone + "' on this page.",
                "data": [{ "key": "scope", "value": format!("zones/{zone}") }],
            }})
        } else {
            json!({ "instances": here })
        };
        map.insert(format!("zones/{zone}"), scoped);
    }
    let mut v = json!({
        "kind": "compute#instanceAggregatedList",
        "id": format!("projects/{project}/aggregated/instances"),
        "items": Value::Object(map),
        "selfLink": format!("{}projects/{project}/aggregated/instances", super::state::LINK_BASE),
    });
    if let Some(t) = next {
        v["nextPageToken"] = json!(t);
    }
    v
}

async fn wait(world: &Arc<World>, project: String, zone: String, op: String) -> Response {
    let deadline = tokio::time::Instant::now() + world.opts.wait_deadline;
    let mut rx = world.changed.subscribe();
    loop {
        let (current, early) = {
            let st = world.lock();
            (
                st.ops
                    .get(&op)
                    .filter(|o| o.zone == zone && o.project == project)
                    .cloned(),
                st.wait_early,
            )
        };
        let Some(current) = current else {
            return not_found("operations", &project, &zone, &op);
        };
        if current.status == "DONE" || early {
            return json_response(StatusCode::OK, current.to_json());
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return json_response(StatusCode::OK, current.to_json());
        }
    }
}

const INSTANCE_FIELDS: &[&str] = &[
    "params",
    "serviceAccounts",
    "displayDevice",
    "fingerprint",
    "labelFingerprint",
    "deletionProtection",
    "networkInterfaces",
    "resourceStatus",
    "status",
    "shieldedInstanceIntegrityPolicy",
    "confidentialInstanceConfig",
    "satisfiesPzs",
    "id",
    "description",
    "shieldedInstanceConfig",
    "keyRevocationActionType",
    "scheduling",
    "advancedMachineFeatures",
    "resourcePolicies",
    "networkPerformanceConfig",
    "privateIpv6GoogleAccess",
    "machineType",
    "zone",
    "creationTimestamp",
    "lastStopTimestamp",
    "hostname",
    "guestAccelerators",
    "reservationAffinity",
    "startRestricted",
    "labels",
    "disks",
    "sourceMachineImage",
    "lastSuspendedTimestamp",
    "name",
    "sourceMachineImageEncryptionKey",
    "lastStartTimestamp",
    "metadata",
    "kind",
    "selfLink",
    "minCpuPlatform",
    "tags",
    "instanceEncryptionKey",
    "cpuPlatform",
    "statusMessage",
    "canIpForward",
];
const DISK_FIELDS: &[&str] = &[
    "shieldedInstanceInitialState",
    "autoDelete",
    "interface",
    "type",
    "boot",
    "index",
    "diskEncryptionKey",
    "source",
    "deviceName",
    "kind",
    "guestOsFeatures",
    "licenses",
    "architecture",
    "diskSizeGb",
    "savedState",
    "initializeParams",
    "forceAttach",
    "mode",
];
const INIT_FIELDS: &[&str] = &[
    "onUpdateAction",
    "replicaZones",
    "labels",
    "diskType",
    "architecture",
    "provisionedIops",
    "sourceSnapshotEncryptionKey",
    "sourceImage",
    "resourcePolicies",
    "sourceImageEncryptionKey",
    "diskName",
    "licenses",
    "provisionedThroughput",
    "description",
    "diskSizeGb",
    "resourceManagerTags",
    "sourceSnapshot",
];
const NIC_FIELDS: &[&str] = &[
    "kind",
    "name",
    "stackType",
    "ipv6Address",
    "networkIP",
    "fingerprint",
    "subnetwork",
    "queueCount",
    "network",
    "aliasIpRanges",
    "nicType",
    "accessConfigs",
    "ipv6AccessType",
    "internalIpv6PrefixLength",
    "networkAttachment",
    "ipv6AccessConfigs",
];
const ACCESS_FIELDS: &[&str] = &[
    "publicPtrDomainName",
    "kind",
    "networkTier",
    "setPublicPtr",
    "natIP",
    "externalIpv6PrefixLength",
    "type",
    "externalIpv6",
    "name",
];
const SCHEDULING_FIELDS: &[&str] = &[
    "provisioningModel",
    "onHostMaintenance",
    "preemptible",
    "automaticRestart",
    "locationHint",
    "nodeAffinities",
    "instanceTerminationAction",
    "minNodeCpus",
    "availabilityDomain",
    "gracefulShutdown",
    "hostErrorTimeoutSeconds",
    "localSsdRecoveryTimeout",
    "maxRunDuration",
    "onInstanceStopAction",
    "preemptionNoticeDuration",
    "skipGuestOsShutdown",
    "terminationTime",
];
const DURATION_FIELDS: &[&str] = &["seconds", "nanos"];
const ACCELERATOR_FIELDS: &[&str] = &["acceleratorType", "acceleratorCount"];
const METADATA_FIELDS: &[&str] = &["kind", "items", "fingerprint"];
const TAGS_FIELDS: &[&str] = &["items", "fingerprint"];
const SA_FIELDS: &[&str] = &["email", "scopes"];

fn check_fields(v: &Value, allowed: &[&str], at: &str) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return if v.is_null() {
            Ok(())
        } else {
            Err(format!("Invalid value at '{at}': expected an object"))
        };
    };
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{k}\" at '{at}': Cannot find field."
            ));
        }
    }
    Ok(())
}

/// A `Duration` object: `{"seconds": "<int64>", "nanos": <int32>}` (int64 as a string, or a
/// number, which Google's JSON parser also takes).
fn check_duration(v: &Value, at: &str) -> Result<(), String> {
    check_fields(v, DURATION_FIELDS, at)?;
    let seconds = match &v["seconds"] {
        Value::String(s) => s.parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        Value::Null => Some(0),
        _ => None,
    };
    let Some(seconds) = seconds.filter(|s| (0..=315_576_000_000).contains(s)) else {
        return Err(format!(
            "Invalid value for field '{at}.seconds': {}",
            v["seconds"]
        ));
    };
    let nanos = match &v["nanos"] {
        Value::Null => Some(0),
        n => n.as_i64(),
    };
    if !nanos.is_some_and(|n| (0..=999_999_999).contains(&n)) {
        return Err(format!(
            "Invalid value for field '{at}.nanos': {}",
            v["nanos"]
        ));
    }
    if seconds == 0 && nanos == Some(0) {
        return Err(format!(
            "Invalid value for field '{at}': the duration must be positive."
        ));
    }
    Ok(())
}

fn rfc1035(s: &str) -> bool {
    crate::backend::gce::is_valid_name(s)
}

fn label_ok(k: &str, v: &str) -> bool {
    let kb = k.as_bytes();
    let key_ok = !kb.is_empty()
        && kb.len() <= 63
        && kb[0].is_ascii_lowercase()
        && kb
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    key_ok
        && v.len() <= 63
        && v.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

fn check_labels(v: &Value, at: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    if v.is_null() {
        return Ok(out);
    }
    let obj = v
        .as_object()
        .ok_or_else(|| format!("Invalid value at '{at}': expected a map"))?;
    for (k, val) in obj {
        let val = val
            .as_str()
            .ok_or_else(|| format!("Invalid value for label '{k}': expected a string"))?;
        if !label_ok(k, val) {
            return Err(format!("Invalid value for field '{at}': label '{k}'='{val}' does not match the label format"));
        }
        out.insert(k.clone(), val.to_owned());
    }
    Ok(out)
}

/// What the real API would refuse in an insert body; Ok: (labels, port, delete on preempt, external).
fn validate_insert(
    body: &Value,
    zone: &str,
    default_port: u16,
) -> Result<(BTreeMap<String, String>, u16, bool, bool), String> {
    if !body.is_object() {
        return Err("Invalid JSON payload received. Expected an object.".into());
    }
    check_fields(body, INSTANCE_FIELDS, "resource")?;
    let name = body["name"].as_str().unwrap_or("");
    if name.is_empty() {
        return Err("Invalid value for field 'resource.name': ''. Must be a match of regex '[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?'".into());
    }
    if !rfc1035(name) {
        return Err(format!("Invalid value for field 'resource.name': '{name}'. Must be a match of regex '[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?'"));
    }
    let mt = body["machineType"].as_str().unwrap_or("");
    let mt_ok = mt.rsplit_once("machineTypes/").is_some_and(|(head, t)| {
        !t.is_empty()
            && head
                .trim_end_matches('/')
                .ends_with(&format!("zones/{zone}"))
    });
    if !mt_ok {
        return Err(format!("Invalid value for field 'resource.machineType': '{mt}'. Machine type must be a URL of a machine type in zone '{zone}'."));
    }
    let disks = body["disks"].as_array().cloned().unwrap_or_default();
    let boots = disks
        .iter()
        .filter(|d| d["boot"].as_bool() == Some(true))
        .count();
    if disks.is_empty() || boots != 1 || disks[0]["boot"].as_bool() != Some(true) {
        return Err("Invalid value for field 'resource.disks': exactly one boot disk is required, and it must come first.".into());
    }
    for (i, d) in disks.iter().enumerate() {
        check_fields(d, DISK_FIELDS, &format!("resource.disks[{i}]"))?;
        check_fields(
            &d["initializeParams"],
            INIT_FIELDS,
            &format!("resource.disks[{i}].initializeParams"),
        )?;
        let init = &d["initializeParams"];
        if init["sourceImage"].as_str().is_none()
            && init["sourceSnapshot"].as_str().is_none()
            && d["source"].as_str().is_none()
        {
            return Err(format!("Invalid value for field 'resource.disks[{i}]': a source image, snapshot or disk is required."));
        }
        let size = match &init["diskSizeGb"] {
            Value::Null => None,
            Value::String(s) => Some(s.parse::<u64>().map_err(|_| format!("Invalid value for field 'resource.disks[{i}].initializeParams.diskSizeGb': '{s}'"))?),
            Value::Number(n) => n.as_u64(),
            other => return Err(format!("Invalid value for field 'resource.disks[{i}].initializeParams.diskSizeGb': {other}")),
        };
        if size.is_some_and(|s| s < 10) {
            return Err(format!("Invalid value for field 'resource.disks[{i}].initializeParams.diskSizeGb': disks must be at least 10 GB."));
        }
    }
    let mut external = false;
    if let Some(nics) = body["networkInterfaces"].as_array() {
        for (i, nic) in nics.iter().enumerate() {
            check_fields(nic, NIC_FIELDS, &format!("resource.networkInterfaces[{i}]"))?;
            if let Some(acs) = nic["accessConfigs"].as_array() {
                if acs.len() > 1 {
                    return Err("Invalid value for field 'resource.networkInterfaces[0].accessConfigs': at most one access config.".into());
                }
                for ac in acs {
                    check_fields(
                        ac,
                        ACCESS_FIELDS,
                        &format!("resource.networkInterfaces[{i}].accessConfigs[0]"),
                    )?;
                    if !matches!(ac["type"].as_str(), None | Some("ONE_TO_ONE_NAT")) {
                        return Err(format!("Invalid value for field 'resource.networkInterfaces[{i}].accessConfigs[0].type': {}", ac["type"]));
                    }
                    external |= i == 0;
                }
            }
        }
    }
    check_fields(&body["metadata"], METADATA_FIELDS, "resource.metadata")?;
    let mut port = default_port;
    if let Some(items) = body["metadata"]["items"].as_array() {
        let mut seen = std::collections::HashSet::new();
        for item in items {
            let (Some(k), Some(v)) = (item["key"].as_str(), item["value"].as_str()) else {
                return Err("Invalid value for field 'resource.metadata.items': each item needs a string key and value.".into());
            };
            if k.is_empty()
                || k.len() > 128
                || !k
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(format!(
                    "Invalid value for field 'resource.metadata.items.key': '{k}'"
                ));
            }
            if !seen.insert(k) {
                return Err(format!(
                    "Invalid value for field 'resource.metadata': duplicate key '{k}'"
                ));
            }
            if k == "vmproxy-port" {
                port = v
                    .parse()
                    .map_err(|_| format!("Invalid vmproxy-port metadata value '{v}'"))?;
            }
        }
    }
    check_fields(&body["tags"], TAGS_FIELDS, "resource.tags")?;
    if let Some(tags) = body["tags"]["items"].as_array() {
        for t in tags {
            if !t.as_str().is_some_and(rfc1035) {
                return Err(format!("Invalid value for field 'resource.tags.items': {t}. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'"));
            }
        }
    }
    let labels = check_labels(&body["labels"], "resource.labels")?;
    let s = &body["scheduling"];
    check_fields(s, SCHEDULING_FIELDS, "resource.scheduling")?;
    let model = s["provisioningModel"].as_str();
    if !matches!(
        model,
        None | Some("SPOT") | Some("STANDARD") | Some("FLEX_START")
    ) {
        return Err(format!(
            "Invalid value for field 'resource.scheduling.provisioningModel': {}",
            s["provisioningModel"]
        ));
    }
    let spot = model == Some("SPOT") || s["preemptible"].as_bool() == Some(true);
    // Spot and preemptible VMs default to automaticRestart false and onHostMaintenance
    // TERMINATE (Google's own REST examples send only provisioningModel and
    // instanceTerminationAction); only an explicit contrary setting is refused.
    if spot && s["automaticRestart"].as_bool() == Some(true) {
        return Err("Invalid value for field 'resource.scheduling.automaticRestart': 'true'. Preemptible and Spot instances cannot be automatically restarted.".into());
    }
    if !matches!(
        s["onHostMaintenance"].as_str(),
        None | Some("MIGRATE") | Some("TERMINATE")
    ) {
        return Err(format!(
            "Invalid value for field 'resource.scheduling.onHostMaintenance': {}",
            s["onHostMaintenance"]
        ));
    }
    if spot && s["onHostMaintenance"].as_str() == Some("MIGRATE") {
        return Err("Invalid value for field 'resource.scheduling.onHostMaintenance': Preemptible and Spot instances must use onHostMaintenance TERMINATE.".into());
    }
    let action = s["instanceTerminationAction"].as_str();
    if !matches!(
        action,
        None | Some("STOP") | Some("DELETE") | Some("INSTANCE_TERMINATION_ACTION_UNSPECIFIED")
    ) {
        return Err(format!(
            "Invalid value for field 'resource.scheduling.instanceTerminationAction': {}",
            s["instanceTerminationAction"]
        ));
    }
    let flex = model == Some("FLEX_START");
    if !s["maxRunDuration"].is_null() {
        check_duration(&s["maxRunDuration"], "resource.scheduling.maxRunDuration")?;
        if action.is_none() {
            return Err("Invalid value for field 'resource.scheduling.instanceTerminationAction': ''. instanceTerminationAction must be set when maxRunDuration is set.".into());
        }
    }
    if flex {
        if s["maxRunDuration"].is_null() {
            return Err("Invalid value for field 'resource.scheduling.maxRunDuration': ''. FLEX_START instances need a max run duration.".into());
        }
        if action != Some("DELETE") {
            return Err("Invalid value for field 'resource.scheduling.instanceTerminationAction': FLEX_START instances must use DELETE.".into());
        }
        if s["automaticRestart"].as_bool() == Some(true) {
            return Err("Invalid value for field 'resource.scheduling.automaticRestart': 'true'. FLEX_START instances cannot be automatically restarted.".into());
        }
    }
    let gpus = match &body["guestAccelerators"] {
        Value::Null => 0,
        Value::Array(list) => {
            for (i, g) in list.iter().enumerate() {
                let at = format!("resource.guestAccelerators[{i}]");
                check_fields(g, ACCELERATOR_FIELDS, &at)?;
                let t = g["acceleratorType"].as_str().unwrap_or("");
                let in_zone = t
                    .rsplit_once("acceleratorTypes/")
                    .is_some_and(|(head, name)| {
                        rfc1035(name)
                            && head
                                .trim_end_matches('/')
                                .ends_with(&format!("zones/{zone}"))
                    });
                if !in_zone {
                    return Err(format!("Invalid value for field '{at}.acceleratorType': '{t}'. Accelerator type must be a URL of an accelerator type in zone '{zone}'."));
                }
                if !g["acceleratorCount"]
                    .as_u64()
                    .is_some_and(|n| (1..=16).contains(&n))
                {
                    return Err(format!("Invalid value for field '{at}.acceleratorCount': {}. Must be a positive integer.", g["acceleratorCount"]));
                }
            }
            list.len()
        }
        other => {
            return Err(format!(
                "Invalid value for field 'resource.guestAccelerators': {other}"
            ))
        }
    };
    if gpus > 0 {
        // Spot, preemptible and Flex-start default to TERMINATE; standard to MIGRATE.
        let maintenance = s["onHostMaintenance"].as_str().unwrap_or(if spot || flex {
            "TERMINATE"
        } else {
            "MIGRATE"
        });
        if maintenance == "MIGRATE" {
            return Err("Invalid value for field 'resource.scheduling.onHostMaintenance': 'MIGRATE'. Instances with guest accelerators do not support live migration.".into());
        }
    }
    if let Some(sas) = body["serviceAccounts"].as_array() {
        if sas.len() > 1 {
            return Err(
                "Invalid value for field 'resource.serviceAccounts': at most one service account."
                    .into(),
            );
        }
        for sa in sas {
            check_fields(sa, SA_FIELDS, "resource.serviceAccounts[0]")?;
        }
    }
    Ok((labels, port, spot && action == Some("DELETE"), external))
}

fn insert(
    world: &Arc<World>,
    project: String,
    zone: String,
    request_id: Option<&str>,
    body: &Bytes,
) -> Response {
    let body: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return api_error(
                400,
                "parseError",
                format!("Invalid JSON payload received. {e}"),
            )
        }
    };
    let (labels, port, delete_on_preempt, external) =
        match validate_insert(&body, &zone, world.opts.default_port) {
            Ok(v) => v,
            Err(message) => return api_error(400, "invalid", message),
        };
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    let key = (project.clone(), zone.clone(), name.clone());
    let mut st = world.lock();
    if st.instances.contains_key(&key) {
        return api_error(
            409,
            "alreadyExists",
            format!(
                "The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists"
            ),
        );
    }
    let (network_ip, internal_socket) = match vm::allocate(port) {
        Ok(v) => v,
        Err(e) => {
            return api_error(
                503,
                "backendError",
                format!("emulator: no loopback address for port {port}: {e}"),
            )
        }
    };
    let mut reserved = vec![internal_socket];
    let nat_ip = if external {
        match vm::allocate(port) {
            Ok((ip, s)) => {
                reserved.push(s);
                Some(ip)
            }
            Err(e) => {
                return api_error(
                    503,
                    "backendError",
                    format!("emulator: no loopback address for port {port}: {e}"),
                )
            }
        }
    } else {
        None
    };
    let id = st.new_id();
    let inst = Inst {
        id,
        key: key.clone(),
        status: "PROVISIONING",
        gen: 1,
        body,
        labels,
        label_fingerprint: fingerprint(),
        network_ip,
        nat_ip,
        port,
        delete_on_preempt,
        leave_on_failure: false,
        created: now_rfc3339(),
        last_start: None,
        last_stop: None,
        last_suspended: None,
        reserved,
        server: None,
    };
    let mut inst = inst;
    let spot = inst.body["scheduling"]["provisioningModel"].as_str() == Some("SPOT");
    let stockout = st
        .stockouts
        .get(&zone)
        .copied()
        .or_else(|| (spot && st.spot_stockouts.contains(&zone)).then_some(false));
    inst.leave_on_failure = stockout == Some(true);
    st.instances.insert(key.clone(), inst);
    let fail = st
        .take_op_fault("instances.insert")
        .or_else(|| stockout.map(|_| "ZONE_RESOURCE_POOL_EXHAUSTED".to_owned()));
    let hang = st.take_hang("instances.insert");
    let op = st.new_op(&key, id, "insert", request_id, false);
    drop(st);
    world.bump();
    if !hang {
        world.boot(key, 1, op.name.clone(), BootKind::Insert, fail);
    }
    json_response(StatusCode::OK, op.to_json())
}

fn delete(world: &Arc<World>, key: Key, request_id: Option<&str>) -> Response {
    let mut st = world.lock();
    let hang = st.take_hang("instances.delete");
    let Some(inst) = st.instances.get_mut(&key) else {
        return not_found("instances", &key.0, &key.1, &key.2);
    };
    if hang {
        let id = inst.id;
        let op = st.new_op(&key, id, "delete", request_id, false);
        return json_response(StatusCode::OK, op.to_json());
    }
    inst.gen += 1;
    inst.status = "STOPPING";
    inst.server = None;
    inst.reserved.clear();
    let (gen, id) = (inst.gen, inst.id);
    let op = st.new_op(&key, id, "delete", request_id, false);
    drop(st);
    world.bump();
    world.settle(key, gen, op.name.clone(), world.opts.stopping, None);
    json_response(StatusCode::OK, op.to_json())
}

fn set_labels(world: &Arc<World>, key: Key, request_id: Option<&str>, body: &Bytes) -> Response {
    let body: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return api_error(
                400,
                "parseError",
                format!("Invalid JSON payload received. {e}"),
            )
        }
    };
    if let Err(m) = check_fields(&body, &["labels", "labelFingerprint"], "resource") {
        return api_error(400, "invalid", m);
    }
    let labels = match check_labels(&body["labels"], "labels") {
        Ok(l) => l,
        Err(m) => return api_error(400, "invalid", m),
    };
    let mut st = world.lock();
    let Some(inst) = st.instances.get_mut(&key) else {
        return not_found("instances", &key.0, &key.1, &key.2);
    };
    // The real API answers a missing fingerprint like a stale one: 412 conditionNotMet.
    let fp = body["labelFingerprint"].as_str().unwrap_or("");
    if fp.is_empty() || fp != inst.label_fingerprint {
        return fingerprint_mismatch();
    }
    inst.labels = labels;
    inst.label_fingerprint = fingerprint();
    let id = inst.id;
    let op = st.new_op(&key, id, "setLabels", request_id, true);
    drop(st);
    world.bump();
    json_response(StatusCode::OK, op.to_json())
}

fn act(world: &Arc<World>, key: Key, action: &'static str, request_id: Option<&str>) -> Response {
    let mut st = world.lock();
    let mut fail = st.take_op_fault(action);
    if fail.is_none() && matches!(action, "instances.start" | "instances.resume") {
        fail = st
            .stockouts
            .contains_key(&key.1)
            .then(|| "ZONE_RESOURCE_POOL_EXHAUSTED".to_owned());
    }
    let hang = st.take_hang(action);
    let Some(inst) = st.instances.get_mut(&key) else {
        return not_found("instances", &key.0, &key.1, &key.2);
    };
    let status = inst.status;
    let busy = || {
        api_error(
            400,
            "resourceNotReady",
            format!(
                "The resource 'projects/{}/zones/{}/instances/{}' is not ready",
                key.0, key.1, key.2
            ),
        )
    };
    let id = inst.id;
    enum Next {
        Done,
        Boot(BootKind),
        Settle(&'static str, Duration),
    }
    let next = match (action, status) {
        ("instances.start", "RUNNING") | ("instances.resume", "RUNNING") => Next::Done,
        ("instances.start", "TERMINATED" | "STOPPED") => Next::Boot(BootKind::Start),
        ("instances.resume", "SUSPENDED") => Next::Boot(BootKind::Resume),
        ("instances.start", "SUSPENDED") => {
            return api_error(
                400,
                "invalid",
                "The instance is suspended: use instances.resume.",
            );
        }
        ("instances.resume", "TERMINATED" | "STOPPED") => {
            return api_error(
                400,
                "invalid",
                "The instance is not suspended: use instances.start.",
            );
        }
        ("instances.stop", "TERMINATED" | "STOPPED") => Next::Done,
        ("instances.stop", "RUNNING" | "PROVISIONING" | "STAGING" | "SUSPENDED") => {
            Next::Settle("TERMINATED", world.opts.stopping)
        }
        ("instances.suspend", "SUSPENDED") => Next::Done,
        ("instances.suspend", "RUNNING") => Next::Settle("SUSPENDED", world.opts.suspending),
        ("instances.suspend", "TERMINATED" | "STOPPED") => {
            return api_error(
                400,
                "invalid",
                "The instance is not running and cannot be suspended.",
            );
        }
        _ => return busy(),
    };
    let op_type = action.trim_start_matches("instances.");
    if hang && !matches!(next, Next::Done) {
        // The operation never ends and the instance stays as it is.
        let op = st.new_op(&key, id, op_type, request_id, false);
        return json_response(StatusCode::OK, op.to_json());
    }
    match next {
        Next::Done => {
            let op = st.new_op(&key, id, op_type, request_id, true);
            drop(st);
            world.bump();
            json_response(StatusCode::OK, op.to_json())
        }
        Next::Boot(kind) => {
            inst.gen += 1;
            inst.status = "PROVISIONING";
            World::reserve(inst);
            let gen = inst.gen;
            let op = st.new_op(&key, id, op_type, request_id, false);
            drop(st);
            world.bump();
            world.boot(key, gen, op.name.clone(), kind, fail);
            json_response(StatusCode::OK, op.to_json())
        }
        Next::Settle(to, delay) => {
            inst.gen += 1;
            inst.status = if to == "SUSPENDED" {
                "SUSPENDING"
            } else {
                "STOPPING"
            };
            inst.server = None;
            inst.reserved.clear();
            let gen = inst.gen;
            let op = st.new_op(&key, id, op_type, request_id, false);
            drop(st);
            world.bump();
            world.settle(key, gen, op.name.clone(), delay, Some(to));
            json_response(StatusCode::OK, op.to_json())
        }
    }
}

/// Preemption, as Compute Engine does it to a Spot VM: a soft-off period in STOPPING (the
/// guest is told to shut down; up to 30 s, [`EmulatorOptions::preemption_soft_off`]), then
/// TERMINATED, or deleted if its termination action is DELETE; a `compute.instances.preempted`
/// operation records it.
///
/// [`EmulatorOptions::preemption_soft_off`]: super::EmulatorOptions::preemption_soft_off
pub(crate) fn preempt(world: &Arc<World>, key: &Key) -> bool {
    let mut st = world.lock();
    let Some(inst) = st.instances.get_mut(key) else {
        return false;
    };
    if !matches!(inst.status, "RUNNING" | "STAGING" | "PROVISIONING") {
        return false;
    }
    inst.gen += 1;
    inst.status = "STOPPING";
    let (id, gen, delete) = (inst.id, inst.gen, inst.delete_on_preempt);
    let op = st.new_op(key, id, "compute.instances.preempted", None, false);
    drop(st);
    world.bump();
    let (w, key, soft_off) = (world.clone(), key.clone(), world.opts.preemption_soft_off);
    world.spawn(async move {
        tokio::time::sleep(soft_off).await;
        let mut st = w.lock();
        if let Some(inst) = st.instances.get_mut(&key).filter(|i| i.gen == gen) {
            inst.server = None;
            inst.reserved.clear();
            inst.status = "TERMINATED";
            inst.last_stop = Some(now_rfc3339());
            if delete {
                st.instances.remove(&key);
            }
        }
        st.finish_op(&op.name, None);
        drop(st);
        w.bump();
    });
    true
}

/// The metadata-less JSON object of a seeded instance.
pub(crate) fn seed_body(zone: &str, name: &str, port: u16, external: bool) -> Value {
    let mut nic = Map::new();
    nic.insert("network".into(), json!("global/networks/default"));
    if external {
        nic.insert(
            "accessConfigs".into(),
            json!([{ "type": "ONE_TO_ONE_NAT", "name": "External NAT" }]),
        );
    }
    json!({
        "name": name,
        "machineType": format!("zones/{zone}/machineTypes/e2-small"),
        "disks": [{ "boot": true, "autoDelete": true, "initializeParams": { "sourceImage": "projects/debian-cloud/global/images/family/debian-12" } }],
        "networkInterfaces": [Value::Object(nic)],
        "metadata": { "items": [{ "key": "vmproxy-port", "value": port.to_string() }] },
        "labels": { "managed-by": "vmproxy" },
        "scheduling": { "provisioningModel": "SPOT", "instanceTerminationAction": "STOP", "automaticRestart": false, "onHostMaintenance": "TERMINATE" },
    })
}

pub(crate) fn seed(world: &World, key: Key, status: &'static str, port: u16) -> Result<(), String> {
    let body = seed_body(&key.1, &key.2, port, true);
    let (network_ip, s1) = vm::allocate(port).map_err(|e| e.to_string())?;
    let (nat_ip, s2) = vm::allocate(port).map_err(|e| e.to_string())?;
    let mut st = world.lock();
    let id = st.new_id();
    let mut inst = Inst {
        id,
        key: key.clone(),
        status,
        gen: 1,
        body,
        labels: BTreeMap::from([("managed-by".to_owned(), "vmproxy".to_owned())]),
        label_fingerprint: fingerprint(),
        network_ip,
        nat_ip: Some(nat_ip),
        port,
        delete_on_preempt: false,
        leave_on_failure: false,
        created: now_rfc3339(),
        last_start: None,
        last_stop: None,
        last_suspended: None,
        reserved: vec![s1, s2],
        server: None,
    };
    if status == "RUNNING" {
        world.run(&mut inst);
    } else {
        inst.reserved.clear();
    }
    st.instances.insert(key, inst);
    drop(st);
    world.bump();
    Ok(())
}
