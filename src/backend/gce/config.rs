//! The `[route.gce]` table of the binary's config file.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{Address, GceBackend, StopPolicy, TerminationAction};
use crate::route::ConfigError;

/// The `[route.gce]` table of the binary's config file: one Compute Engine VM.
///
/// Only `zone` (or `zones`) and `instance` are required; see [`GceBackendBuilder`](super::GceBackendBuilder)
/// for what each key means and its default.
///
/// ```toml
/// [route.gce]
/// zone = "europe-west1-b"
/// instance = "heavy-worker"
/// machine_type = "e2-standard-4"
/// port = 8080
/// startup_script = "#!/bin/bash\ndocker run -p 8080:8080 ghcr.io/me/worker"
/// stop_policy = "stop"
/// ```
///
/// A GPU VM on Spot capacity, in whichever of three zones has room:
///
/// ```toml
/// [route.gce]
/// zones = ["us-central1-a", "us-central1-b", "us-central1-c"]
/// instance = "llm"
/// machine_types = ["g2-standard-8", "g2-standard-12"]
/// accelerators = [{ type = "nvidia-l4", count = 1 }]
/// image = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11"
/// spot_fallback = true
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GceConfig {
    /// The project; default: the metadata server's project-id, else `GOOGLE_CLOUD_PROJECT`.
    pub project: Option<String>,
    /// The zone, e.g. `us-central1-a` (or give `zones`).
    pub zone: Option<String>,
    /// Zones to try in order on capacity errors, instead of `zone`.
    pub zones: Option<Vec<String>>,
    /// The instance name (`[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?`).
    pub instance: String,
    /// Machine type (default `e2-small`).
    pub machine_type: Option<String>,
    /// Machine types to try in order on capacity errors, instead of `machine_type`.
    pub machine_types: Option<Vec<String>>,
    /// Accelerators (GPUs): `[{ type = "nvidia-l4", count = 1 }]`.
    #[serde(default)]
    pub accelerators: Vec<super::Accelerator>,
    /// `spot` (default), `standard` or `flex-start`.
    pub provisioning_model: Option<super::ProvisioningModel>,
    /// After every zone and machine type refused Spot, try standard provisioning.
    pub spot_fallback: Option<bool>,
    /// The longest the VM runs, e.g. `"4h"` (`scheduling.maxRunDuration`; required for
    /// flex-start).
    pub max_run_duration: Option<String>,
    /// The longest an idle stop waits for Compute Engine, e.g. `"5m"` (the default).
    pub stop_timeout: Option<String>,
    /// Boot image: `debian-12`, `family/NAME`, `projects/P/global/images/...` or a URL
    /// (default `projects/debian-cloud/global/images/family/debian-12`).
    pub image: Option<String>,
    /// Boot disk size in GB (at least 10; default: the image's size).
    pub disk_size_gb: Option<u64>,
    /// Boot disk type, e.g. `pd-balanced` (default: Compute Engine's).
    pub disk_type: Option<String>,
    /// VPC network (default `default`).
    pub network: Option<String>,
    /// Subnetwork (name in the zone's region, or a partial URL).
    pub subnetwork: Option<String>,
    /// Whether the VM gets an ephemeral external IP (default true).
    pub external_ip: Option<bool>,
    /// Network tags (default `["http-server"]`).
    pub tags: Option<Vec<String>>,
    /// Extra labels (`managed-by = "vmproxy"` is always added).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Extra metadata items.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The `startup-script` metadata item.
    pub startup_script: Option<String>,
    /// The `startup-script-url` metadata item.
    pub startup_script_url: Option<String>,
    /// The VM's service account email, or `default` (default: none).
    pub service_account: Option<String>,
    /// The service account's scopes (default `cloud-platform` when a service account is set).
    pub scopes: Option<Vec<String>>,
    /// Spot provisioning (default true); false for a standard VM.
    pub spot: Option<bool>,
    /// What a reclaimed Spot VM becomes: `stop` (default) or `delete`.
    pub termination_action: Option<TerminationAction>,
    /// The port to proxy to (default 80).
    pub port: Option<u16>,
    /// Which address to proxy to: `external` (the NAT IP, default) or `internal`.
    pub address: Option<Address>,
    /// How an idle VM is taken down: `delete` (default), `stop` or `suspend`.
    pub stop_policy: Option<StopPolicy>,
    /// Compute API base URL (default `https://compute.googleapis.com/compute/v1/`).
    pub endpoint: Option<String>,
    /// How often the VM's status is checked while it runs, e.g. `"30s"`; `"0s"` turns it off.
    pub status_interval: Option<String>,
    /// How often a transitioning VM is polled, e.g. `"2s"` (default 2 s).
    pub poll_interval: Option<String>,
}

fn duration(field: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim()).map_err(|e| ConfigError::new(field, format!("{s:?}: {e}")))
}

impl GceConfig {
    /// Checks the table and builds the backend (no I/O; credentials and the project are
    /// resolved on first use).
    pub fn into_backend(self) -> Result<GceBackend, ConfigError> {
        let mut b = match (self.zone, self.zones) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "zones",
                    "give either zone or zones, not both",
                ))
            }
            (None, None) => return Err(ConfigError::new("zone", "zone (or zones) is required")),
            (Some(zone), None) => GceBackend::builder(zone, self.instance),
            (None, Some(zones)) => {
                let Some(first) = zones.first().cloned() else {
                    return Err(ConfigError::new("zones", "must not be empty"));
                };
                GceBackend::builder(first, self.instance).zones(zones)
            }
        };
        if let Some(v) = self.machine_types {
            if self.machine_type.is_some() {
                return Err(ConfigError::new(
                    "machine_types",
                    "give either machine_type or machine_types, not both",
                ));
            }
            if v.is_empty() {
                return Err(ConfigError::new("machine_types", "must not be empty"));
            }
            b = b.machine_types(v);
        }
        for a in self.accelerators {
            b = b.accelerator(a.kind, a.count);
        }
        if let Some(v) = self.provisioning_model {
            b = b.provisioning_model(v);
        }
        if let Some(v) = self.spot_fallback {
            b = b.spot_fallback(v);
        }
        if let Some(v) = self.max_run_duration {
            b = b.max_run_duration(duration("max_run_duration", &v)?);
        }
        if let Some(v) = self.stop_timeout {
            b = b.stop_timeout(duration("stop_timeout", &v)?);
        }
        if let Some(p) = self.project {
            b = b.project(p);
        }
        if let Some(v) = self.machine_type {
            b = b.machine_type(v);
        }
        if let Some(v) = self.image {
            b = b.image(v);
        }
        if let Some(v) = self.disk_size_gb {
            b = b.disk_size_gb(v);
        }
        if let Some(v) = self.disk_type {
            b = b.disk_type(v);
        }
        if let Some(v) = self.network {
            b = b.network(v);
        }
        if let Some(v) = self.subnetwork {
            b = b.subnetwork(v);
        }
        if let Some(v) = self.external_ip {
            b = b.external_ip(v);
        }
        if let Some(v) = self.tags {
            b = b.tags(v);
        }
        for (k, v) in self.labels {
            b = b.label(k, v);
        }
        for (k, v) in self.metadata {
            b = b.metadata(k, v);
        }
        if let Some(v) = self.startup_script {
            b = b.startup_script(v);
        }
        if let Some(v) = self.startup_script_url {
            b = b.startup_script_url(v);
        }
        if let Some(v) = self.service_account {
            b = b.service_account(v);
        }
        if let Some(v) = self.scopes {
            b = b.scopes(v);
        }
        if let Some(v) = self.spot {
            b = b.spot(v);
        }
        if let Some(v) = self.termination_action {
            b = b.termination_action(v);
        }
        if let Some(v) = self.port {
            b = b.port(v);
        }
        if let Some(v) = self.address {
            b = b.address(v);
        }
        if let Some(v) = self.stop_policy {
            b = b.stop_policy(v);
        }
        if let Some(v) = self.endpoint {
            b = b.endpoint(v);
        }
        if let Some(v) = self.status_interval {
            let d = duration("status_interval", &v)?;
            b = b.status_interval((!d.is_zero()).then_some(d));
        }
        if let Some(v) = self.poll_interval {
            b = b.poll_interval(duration("poll_interval", &v)?);
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let cfg: GceConfig = toml::from_str(
            r#"
            zone = "us-central1-a"
            instance = "vm-1"
            spot = false
            stop_policy = "suspend"
            address = "internal"
            status_interval = "10s"
            labels = { team = "data" }
            "#,
        )
        .unwrap();
        let backend = cfg.into_backend().unwrap();
        assert_eq!(
            crate::backend::Backend::status_interval(&backend),
            Some(Duration::from_secs(10))
        );

        let bad: Result<GceConfig, _> =
            toml::from_str("zone = \"us-central1-a\"\ninstance = \"vm\"\nbogus = 1");
        assert!(bad.is_err());
        let cfg: GceConfig =
            toml::from_str("zone = \"us-central1-a\"\ninstance = \"VM_1\"").unwrap();
        assert_eq!(cfg.into_backend().unwrap_err().field(), "instance");
    }

    fn err(toml: &str) -> String {
        let cfg: GceConfig = toml::from_str(toml).unwrap();
        cfg.into_backend().unwrap_err().field().to_owned()
    }

    #[test]
    fn fallback_and_provisioning_keys_are_checked() {
        let base = "instance = \"vm\"\n";
        assert_eq!(
            err(&format!(
                "{base}zone = \"us-central1-a\"\nzones = [\"us-central1-b\"]"
            )),
            "zones"
        );
        assert_eq!(err(base), "zone");
        assert_eq!(err(&format!("{base}zones = []")), "zones");
        assert_eq!(
            err(&format!(
                "{base}zones = [\"us-central1-a\", \"us-central1-a\"]"
            )),
            "zones"
        );
        let z = format!("{base}zone = \"us-central1-a\"\n");
        assert_eq!(
            err(&format!("{z}spot = false\nprovisioning_model = \"spot\"")),
            "provisioning_model"
        );
        assert_eq!(
            err(&format!(
                "{z}spot = true\nprovisioning_model = \"flex-start\"\nmax_run_duration = \"4h\""
            )),
            "provisioning_model"
        );
        assert_eq!(
            err(&format!("{z}provisioning_model = \"flex-start\"")),
            "max_run_duration"
        );
        assert_eq!(
            err(&format!("{z}provisioning_model = \"flex-start\"\nmax_run_duration = \"4h\"\ntermination_action = \"stop\"")),
            "termination_action"
        );
        assert_eq!(
            err(&format!(
                "{z}provisioning_model = \"standard\"\nspot_fallback = true"
            )),
            "spot_fallback"
        );
        assert_eq!(
            err(&format!(
                "{z}accelerators = [{{ type = \"nvidia-l4\", count = 0 }}]"
            )),
            "accelerators"
        );
        assert_eq!(
            err(&format!(
                "{z}machine_type = \"e2-small\"\nmachine_types = [\"e2-medium\"]"
            )),
            "machine_types"
        );
        assert!(
            toml::from_str::<GceConfig>(&format!("{z}provisioning_model = \"preemptible\""))
                .is_err()
        );

        let cfg: GceConfig = toml::from_str(&format!(
            "{base}zones = [\"us-central1-a\", \"europe-west4-b\"]\nmachine_types = [\"g2-standard-8\", \"g2-standard-12\"]\naccelerators = [{{ type = \"nvidia-l4\" }}]\nspot_fallback = true\nsubnetwork = \"sub\""
        ))
        .unwrap();
        let b = cfg.into_backend().unwrap();
        let bodies = b.attempt_bodies();
        // 2 zones x 2 machine types x (Spot, then standard).
        assert_eq!(bodies.len(), 8);
        assert_eq!(
            bodies[1]["machineType"],
            "zones/europe-west4-b/machineTypes/g2-standard-8"
        );
        assert_eq!(
            bodies[1]["guestAccelerators"][0]["acceleratorType"],
            "zones/europe-west4-b/acceleratorTypes/nvidia-l4"
        );
        assert_eq!(
            bodies[1]["networkInterfaces"][0]["subnetwork"],
            "regions/europe-west4/subnetworks/sub"
        );
        assert_eq!(
            bodies[2]["machineType"],
            "zones/us-central1-a/machineTypes/g2-standard-12"
        );
        assert_eq!(bodies[4]["scheduling"]["provisioningModel"], "STANDARD");
        assert_eq!(bodies[4]["scheduling"]["onHostMaintenance"], "TERMINATE");
        assert_eq!(bodies[0]["scheduling"]["provisioningModel"], "SPOT");
    }
}
