//! The instance to create: its spec, the checks made at build time, and the insert body.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::route::ConfigError;

/// The Compute Engine label every instance created by vmproxy carries.
pub(crate) const MANAGED_BY: (&str, &str) = ("managed-by", "vmproxy");
/// The label replicas refresh while they serve traffic (unix seconds).
pub(crate) const ACTIVE_LABEL: &str = "vmproxy-active";
/// The metadata item that tells the VM (and the emulator) which port is proxied to.
pub(crate) const PORT_METADATA: &str = "vmproxy-port";

pub(crate) const DEFAULT_MACHINE_TYPE: &str = "e2-small";
pub(crate) const DEFAULT_IMAGE: &str = "projects/debian-cloud/global/images/family/debian-12";
pub(crate) const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// What a Spot VM becomes when Compute Engine reclaims it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationAction {
    /// Stopped (`TERMINATED`); the next request starts it again (the default).
    #[default]
    Stop,
    /// Deleted; the next request creates it again.
    Delete,
}

/// How the VM is provisioned (`scheduling.provisioningModel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisioningModel {
    /// Spot: heavily discounted, may be reclaimed at any time (the default).
    #[default]
    Spot,
    /// Standard: no discount, runs until stopped.
    Standard,
    /// Flex-start: queued for scarce hardware (GPUs), runs at most `max_run_duration`, then is
    /// deleted.
    FlexStart,
}

impl ProvisioningModel {
    /// The discovery document's enum value.
    pub fn api_name(self) -> &'static str {
        match self {
            ProvisioningModel::Spot => "SPOT",
            ProvisioningModel::Standard => "STANDARD",
            ProvisioningModel::FlexStart => "FLEX_START",
        }
    }
}

/// A GPU (or other accelerator) to attach: `{ type = "nvidia-l4", count = 1 }`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accelerator {
    /// The accelerator type's name in the zone, e.g. `nvidia-l4`, `nvidia-tesla-t4`.
    #[serde(rename = "type")]
    pub kind: String,
    /// How many (default 1).
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Everything needed to create the instance; checked by [`InstanceSpec::validate`].
#[derive(Clone, Debug)]
pub(crate) struct InstanceSpec {
    pub(crate) name: String,
    /// The first zone (the one-zone form).
    pub(crate) zone: String,
    /// Every zone to try, in order (`[zone]` unless a list was given).
    pub(crate) zones: Vec<String>,
    pub(crate) machine_type: String,
    /// Machine types to try, in order (`[machine_type]` unless a list was given); bare names.
    pub(crate) machine_types: Vec<String>,
    pub(crate) accelerators: Vec<Accelerator>,
    pub(crate) provisioning: ProvisioningModel,
    /// After every zone and shape refused Spot, try standard provisioning.
    pub(crate) spot_fallback: bool,
    pub(crate) max_run_duration: Option<std::time::Duration>,
    /// Whether `termination_action` was set explicitly.
    pub(crate) termination_action_set: bool,
    pub(crate) image: String,
    pub(crate) disk_size_gb: Option<u64>,
    pub(crate) disk_type: Option<String>,
    pub(crate) network: String,
    pub(crate) subnetwork: Option<String>,
    pub(crate) external_ip: bool,
    pub(crate) tags: Vec<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) service_account: Option<String>,
    pub(crate) scopes: Vec<String>,
    pub(crate) termination_action: TerminationAction,
    pub(crate) port: u16,
}

/// `[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?`: instance names, zones, tags.
pub(crate) fn is_rfc1035_name(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 || !b[0].is_ascii_lowercase() {
        return false;
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return false;
    }
    b[b.len() - 1] != b'-'
}

fn is_label_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

fn is_metadata_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// The region of a zone: `us-central1-a` → `us-central1`.
pub(crate) fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(r, _)| r)
}

/// Public image projects for short family names (`debian-12`, `ubuntu-2404-lts-amd64`…).
const IMAGE_PROJECTS: &[(&str, &str)] = &[
    ("debian-", "debian-cloud"),
    ("ubuntu-pro-", "ubuntu-os-pro-cloud"),
    ("ubuntu-", "ubuntu-os-cloud"),
    ("cos-", "cos-cloud"),
    ("rocky-linux-", "rocky-linux-cloud"),
    ("centos-", "centos-cloud"),
    ("rhel-", "rhel-cloud"),
    ("fedora-coreos-", "fedora-coreos-cloud"),
    ("sles-", "suse-cloud"),
    ("opensuse-", "opensuse-cloud"),
    ("windows-", "windows-cloud"),
    ("almalinux-", "almalinux-cloud"),
];

/// Normalizes an image reference to something `initializeParams.sourceImage` accepts:
/// - a full URL (`https://www.googleapis.com/compute/v1/projects/...`) or a partial one
///   (`projects/P/global/images/...`, `global/images/...`) is kept as is;
/// - `family/NAME` is the family NAME in the instance's own project;
/// - a short name of a public OS family (`debian-12`, `ubuntu-2404-lts-amd64`, `cos-stable`…)
///   is that family in its public project;
/// - any other short name is an image of the instance's own project (`global/images/NAME`).
pub(crate) fn normalize_image(image: &str) -> Result<String, ConfigError> {
    let image = image.trim();
    if image.is_empty() {
        return Err(ConfigError::new("image", "must not be empty"));
    }
    if image.starts_with("https://")
        || image.starts_with("projects/")
        || image.starts_with("global/images/")
    {
        return Ok(image.to_owned());
    }
    if let Some(family) = image.strip_prefix("family/") {
        if !is_rfc1035_name(family) {
            return Err(ConfigError::new(
                "image",
                format!("{image:?}: bad family name"),
            ));
        }
        return Ok(format!("global/images/family/{family}"));
    }
    if !is_rfc1035_name(image) {
        return Err(ConfigError::new(
            "image",
            format!("{image:?}: expected a name like debian-12, family/NAME, projects/P/global/images/... or a URL"),
        ));
    }
    for (prefix, project) in IMAGE_PROJECTS {
        if image.starts_with(prefix) {
            return Ok(format!("projects/{project}/global/images/family/{image}"));
        }
    }
    Ok(format!("global/images/{image}"))
}

/// `e2-small` (or any URL ending in it) → `zones/Z/machineTypes/e2-small`: the zone is always
/// the one of the attempt, so a fallback to another zone rewrites it.
fn partial(kind: &str, zone: &str, value: &str) -> String {
    let bare = value.rsplit('/').next().unwrap_or(value);
    format!("zones/{zone}/{kind}/{bare}")
}

/// The longest run Compute Engine accepts for `maxRunDuration` (Flex-start: 7 days).
const MAX_RUN_DURATION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

impl InstanceSpec {
    pub(crate) fn new(zone: String, name: String) -> Self {
        InstanceSpec {
            name,
            zones: Vec::new(),
            zone,
            machine_type: DEFAULT_MACHINE_TYPE.to_owned(),
            machine_types: Vec::new(),
            accelerators: Vec::new(),
            provisioning: ProvisioningModel::Spot,
            spot_fallback: false,
            max_run_duration: None,
            termination_action_set: false,
            image: DEFAULT_IMAGE.to_owned(),
            disk_size_gb: None,
            disk_type: None,
            network: "default".to_owned(),
            subnetwork: None,
            external_ip: true,
            tags: vec!["http-server".to_owned()],
            labels: BTreeMap::new(),
            metadata: BTreeMap::new(),
            service_account: None,
            scopes: Vec::new(),
            termination_action: TerminationAction::Stop,
            port: 80,
        }
    }

    /// Checks everything Compute Engine would refuse, and normalizes names to partial URLs.
    pub(crate) fn validate(mut self) -> Result<Self, ConfigError> {
        if !is_rfc1035_name(&self.name) {
            return Err(ConfigError::new(
                "instance",
                format!("{:?} is not a valid instance name: 1-63 characters, [a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?", self.name),
            ));
        }
        let field = if self.zones.is_empty() {
            self.zones = vec![self.zone.clone()];
            "zone"
        } else {
            "zones"
        };
        for (i, zone) in self.zones.iter().enumerate() {
            if !is_rfc1035_name(zone) || !zone.contains('-') {
                return Err(ConfigError::new(
                    field,
                    format!("{zone:?} is not a zone name like us-central1-a"),
                ));
            }
            if self.zones[..i].contains(zone) {
                return Err(ConfigError::new(field, format!("{zone:?} is listed twice")));
            }
        }
        self.zone = self.zones[0].clone();
        let field = if self.machine_types.is_empty() {
            self.machine_types = vec![self.machine_type.clone()];
            "machine_type"
        } else {
            "machine_types"
        };
        for mt in &mut self.machine_types {
            let bare = mt.trim().rsplit('/').next().unwrap_or("").to_owned();
            if !is_rfc1035_name(&bare) && !bare.starts_with("custom-") {
                return Err(ConfigError::new(
                    field,
                    format!("{mt:?} is not a machine type like e2-small"),
                ));
            }
            *mt = bare;
        }
        self.machine_type = partial("machineTypes", &self.zone, &self.machine_types[0]);
        for a in &self.accelerators {
            if !is_rfc1035_name(&a.kind) {
                return Err(ConfigError::new(
                    "accelerators",
                    format!("{:?} is not an accelerator type like nvidia-l4", a.kind),
                ));
            }
            if a.count == 0 {
                return Err(ConfigError::new(
                    "accelerators",
                    format!("{}: count must be at least 1", a.kind),
                ));
            }
        }
        if let Some(d) = self.max_run_duration {
            if d < std::time::Duration::from_secs(30) || d > MAX_RUN_DURATION {
                return Err(ConfigError::new(
                    "max_run_duration",
                    "must be between 30 seconds and 7 days",
                ));
            }
        }
        match self.provisioning {
            ProvisioningModel::FlexStart => {
                if self.max_run_duration.is_none() {
                    return Err(ConfigError::new(
                        "max_run_duration",
                        "flex-start VMs need a max_run_duration (e.g. \"4h\")",
                    ));
                }
                if self.termination_action_set
                    && self.termination_action != TerminationAction::Delete
                {
                    return Err(ConfigError::new(
                        "termination_action",
                        "flex-start VMs are deleted at the end of their run (termination_action = \"delete\")",
                    ));
                }
                self.termination_action = TerminationAction::Delete;
            }
            ProvisioningModel::Standard | ProvisioningModel::Spot => {}
        }
        if self.spot_fallback && self.provisioning != ProvisioningModel::Spot {
            return Err(ConfigError::new(
                "spot_fallback",
                "falls back from Spot to standard: it needs provisioning_model = \"spot\"",
            ));
        }
        self.image = normalize_image(&self.image)?;
        if let Some(size) = self.disk_size_gb {
            if size < 10 {
                return Err(ConfigError::new(
                    "disk_size_gb",
                    format!("{size} is below the minimum of 10 GB"),
                ));
            }
        }
        if let Some(t) = &self.disk_type {
            if t.trim().is_empty() {
                return Err(ConfigError::new("disk_type", "must not be empty"));
            }
            self.disk_type = Some(t.trim().to_owned());
        }
        if self.network.trim().is_empty() {
            return Err(ConfigError::new("network", "must not be empty"));
        }
        if !self.network.contains('/') {
            self.network = format!("global/networks/{}", self.network.trim());
        }
        if let Some(s) = &self.subnetwork {
            if s.trim().is_empty() {
                return Err(ConfigError::new("subnetwork", "must not be empty"));
            }
            // A bare name is resolved per zone (in its region) by `insert_body`.
            self.subnetwork = Some(s.trim().to_owned());
        }
        for tag in &self.tags {
            if !is_rfc1035_name(tag) {
                return Err(ConfigError::new(
                    "tags",
                    format!("{tag:?} is not a valid network tag (RFC 1035, 1-63 characters)"),
                ));
            }
        }
        for (k, v) in &self.labels {
            if !is_label_key(k) {
                return Err(ConfigError::new(
                    "labels",
                    format!("{k:?} is not a valid label key ([a-z][a-z0-9_-]{{0,62}})"),
                ));
            }
            if !is_label_value(v) {
                return Err(ConfigError::new(
                    "labels",
                    format!("{k}={v:?}: label values are [a-z0-9_-]{{0,63}}"),
                ));
            }
        }
        if self
            .labels
            .get(MANAGED_BY.0)
            .is_some_and(|v| v != MANAGED_BY.1)
        {
            return Err(ConfigError::new(
                "labels",
                "managed-by is reserved for vmproxy",
            ));
        }
        self.labels
            .insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
        for k in self.metadata.keys() {
            if !is_metadata_key(k) {
                return Err(ConfigError::new(
                    "metadata",
                    format!("{k:?} is not a valid metadata key ([a-zA-Z0-9_-], 1-128)"),
                ));
            }
        }
        let size: usize = self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size >= 512 * 1024 {
            return Err(ConfigError::new(
                "metadata",
                "keys and values must total less than 512 KB",
            ));
        }
        if self.port == 0 {
            return Err(ConfigError::new("port", "must not be 0"));
        }
        self.metadata
            .insert(PORT_METADATA.to_owned(), self.port.to_string());
        if let Some(sa) = &self.service_account {
            if sa.trim().is_empty() {
                return Err(ConfigError::new(
                    "service_account",
                    "must not be empty (use \"default\")",
                ));
            }
            if self.scopes.is_empty() {
                self.scopes.push(DEFAULT_SCOPE.to_owned());
            }
            for s in &mut self.scopes {
                if !s.starts_with("https://") {
                    *s = format!("https://www.googleapis.com/auth/{s}");
                }
            }
        } else if !self.scopes.is_empty() {
            return Err(ConfigError::new(
                "scopes",
                "scopes need a service_account (e.g. \"default\")",
            ));
        }
        Ok(self)
    }

    /// Every attempt a start may make, in order: for each provisioning model (Spot, then
    /// standard if `spot_fallback`), each machine type, each zone.
    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        let mut models = vec![self.provisioning];
        if self.spot_fallback {
            models.push(ProvisioningModel::Standard);
        }
        let mut out = Vec::new();
        for &model in &models {
            for machine_type in 0..self.machine_types.len() {
                for zone in 0..self.zones.len() {
                    out.push(Attempt {
                        zone,
                        machine_type,
                        model,
                    });
                }
            }
        }
        out
    }

    /// The first attempt's `instances.insert` body.
    pub(crate) fn insert_body(&self) -> Value {
        self.insert_body_for(&Attempt {
            zone: 0,
            machine_type: 0,
            model: self.provisioning,
        })
    }

    /// The `instances.insert` body of one attempt (field names from the v1 discovery
    /// document): every zonal URL names the attempt's zone.
    pub(crate) fn insert_body_for(&self, at: &Attempt) -> Value {
        let zone = &self.zones[at.zone];
        let mut init = json!({ "sourceImage": self.image });
        if let Some(size) = self.disk_size_gb {
            // int64 fields travel as JSON strings.
            init["diskSizeGb"] = json!(size.to_string());
        }
        if let Some(t) = &self.disk_type {
            init["diskType"] = json!(partial("diskTypes", zone, t));
        }
        let mut nic = json!({ "network": self.network });
        if let Some(s) = &self.subnetwork {
            let s = if s.contains('/') {
                s.clone()
            } else {
                format!("regions/{}/subnetworks/{s}", region_of(zone))
            };
            nic["subnetwork"] = json!(s);
        }
        if self.external_ip {
            nic["accessConfigs"] = json!([{ "type": "ONE_TO_ONE_NAT", "name": "External NAT" }]);
        }
        let items: Vec<Value> = self
            .metadata
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        let action = match self.termination_action {
            TerminationAction::Stop => "STOP",
            TerminationAction::Delete => "DELETE",
        };
        let mut scheduling = match at.model {
            ProvisioningModel::Spot => json!({
                "provisioningModel": "SPOT",
                "instanceTerminationAction": action,
                "automaticRestart": false,
                "onHostMaintenance": "TERMINATE",
            }),
            ProvisioningModel::FlexStart => json!({
                "provisioningModel": "FLEX_START",
                "instanceTerminationAction": "DELETE",
                "automaticRestart": false,
                "onHostMaintenance": "TERMINATE",
            }),
            ProvisioningModel::Standard => json!({
                "provisioningModel": "STANDARD",
                "automaticRestart": true,
                // GPUs cannot live-migrate: Compute Engine refuses MIGRATE with them.
                "onHostMaintenance": if self.accelerators.is_empty() { "MIGRATE" } else { "TERMINATE" },
            }),
        };
        if let Some(d) = self.max_run_duration {
            // A Duration object: seconds is an int64, so a JSON string; nanos an int32.
            scheduling["maxRunDuration"] =
                json!({ "seconds": d.as_secs().to_string(), "nanos": d.subsec_nanos() });
            // What happens at the end of the run.
            scheduling["instanceTerminationAction"] = json!(match at.model {
                ProvisioningModel::FlexStart => "DELETE",
                _ => action,
            });
        }
        let mut labels = self.labels.clone();
        if at.model != self.provisioning {
            // So that the fallback is visible on the VM itself.
            labels.insert(
                "vmproxy-provisioning".to_owned(),
                at.model.api_name().to_ascii_lowercase(),
            );
        }
        let mut body = json!({
            "name": self.name,
            "description": "Started on demand by vmproxy",
            "machineType": partial("machineTypes", zone, &self.machine_types[at.machine_type]),
            "disks": [{
                "boot": true,
                "autoDelete": true,
                "type": "PERSISTENT",
                "initializeParams": init,
            }],
            "networkInterfaces": [nic],
            "metadata": { "items": items },
            "labels": labels,
            "scheduling": scheduling,
        });
        if !self.accelerators.is_empty() {
            let gpus: Vec<Value> = self
                .accelerators
                .iter()
                .map(|a| {
                    json!({
                        "acceleratorType": partial("acceleratorTypes", zone, &a.kind),
                        "acceleratorCount": a.count,
                    })
                })
                .collect();
            body["guestAccelerators"] = json!(gpus);
        }
        if !self.tags.is_empty() {
            body["tags"] = json!({ "items": self.tags });
        }
        if let Some(sa) = &self.service_account {
            body["serviceAccounts"] = json!([{ "email": sa, "scopes": self.scopes }]);
        }
        body
    }
}

/// One way of creating the VM: indexes into the spec's zones and machine types, and a
/// provisioning model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub(crate) zone: usize,
    pub(crate) machine_type: usize,
    pub(crate) model: ProvisioningModel,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "vm-1", "a1", &"a".repeat(63)] {
            assert!(is_rfc1035_name(ok), "{ok}");
        }
        for bad in ["", "1a", "A", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_rfc1035_name(bad), "{bad}");
        }
    }

    #[test]
    fn images() {
        assert_eq!(normalize_image("debian-12").unwrap(), DEFAULT_IMAGE);
        assert_eq!(
            normalize_image("family/my-app").unwrap(),
            "global/images/family/my-app"
        );
        assert_eq!(
            normalize_image("my-image").unwrap(),
            "global/images/my-image"
        );
        let url = "https://www.googleapis.com/compute/v1/projects/p/global/images/x";
        assert_eq!(normalize_image(url).unwrap(), url);
        assert!(normalize_image("Bad Image").is_err());
    }

    #[test]
    fn insert_body_has_the_discovery_field_names() {
        let mut spec = InstanceSpec::new("us-central1-a".into(), "vm-1".into());
        spec.disk_size_gb = Some(20);
        spec.disk_type = Some("pd-balanced".into());
        spec.subnetwork = Some("sub".into());
        spec.service_account = Some("default".into());
        let spec = spec.validate().unwrap();
        let b = spec.insert_body();
        assert_eq!(
            b["machineType"],
            "zones/us-central1-a/machineTypes/e2-small"
        );
        assert_eq!(b["disks"][0]["initializeParams"]["diskSizeGb"], "20");
        assert_eq!(
            b["disks"][0]["initializeParams"]["diskType"],
            "zones/us-central1-a/diskTypes/pd-balanced"
        );
        assert_eq!(
            b["networkInterfaces"][0]["subnetwork"],
            "regions/us-central1/subnetworks/sub"
        );
        assert_eq!(b["scheduling"]["automaticRestart"], false);
        assert_eq!(b["scheduling"]["onHostMaintenance"], "TERMINATE");
        assert_eq!(b["labels"]["managed-by"], "vmproxy");
        assert_eq!(b["tags"]["items"][0], "http-server");
        assert_eq!(b["serviceAccounts"][0]["scopes"][0], DEFAULT_SCOPE);
    }
}
