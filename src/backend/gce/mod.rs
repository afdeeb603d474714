//! Compute Engine backend (placeholder: being written).
//!
//! # Example
//!
//! ```
//! ```

use serde::Deserialize;

use crate::ConfigError;

/// The `[route.gce]` table of the binary's config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GceConfig {
    /// The instance name.
    pub instance: String,
}

impl GceConfig {
    /// Checks the table and builds the backend.
    pub fn into_backend(self) -> Result<crate::backend::process::ProcessBackend, ConfigError> {
        Err(ConfigError::new("gce", "not implemented yet"))
    }
}
