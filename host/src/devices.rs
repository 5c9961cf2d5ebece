//! The device registry: each device's name, product, tenant, type,
//! location and groups, from a TOML or JSON file.
//!
//! ```toml
//! [[devices]]
//! id = "th-0001"
//! name = "Lab thermometer"
//! product = "json-sensor"
//! tenant = "acme"
//! type = "thermometer"
//! location = "lab-1"
//! groups = ["floor-1"]
//! status = { mode = "timeout", after = "5m" }   # optional, overrides the product's
//! parent = "gw-01"                              # optional: the gateway that reports for it
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, check_name, load_file};
use crate::status::StatusMode;

/// One registered device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Its id, as devices and topics name it.
    pub id: String,
    /// A name for people; the id when empty.
    #[serde(default)]
    pub name: String,
    /// The product whose script parses its messages.
    pub product: String,
    /// The tenant it belongs to.
    #[serde(default)]
    pub tenant: String,
    /// Its type (for filters).
    #[serde(default, rename = "type")]
    pub device_type: String,
    /// Where it is (for filters).
    #[serde(default)]
    pub location: String,
    /// Groups it belongs to (for filters).
    #[serde(default)]
    pub groups: Vec<String>,
    /// A status mode overriding the product's.
    #[serde(default)]
    pub status: Option<StatusMode>,
    /// The device (a gateway) whose script may write this device's
    /// telemetry, attributes, events, alerts and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl Device {
    /// The name to show: the name, or the id when there is none.
    pub fn display_name(&self) -> &str {
        if self.name.is_empty() {
            &self.id
        } else {
            &self.name
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    devices: Vec<Device>,
}

/// Every registered device by id.
#[derive(Debug, Clone, Default)]
pub struct DeviceRegistry {
    devices: HashMap<String, Arc<Device>>,
}

impl DeviceRegistry {
    /// Reads and checks a registry file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let parsed: RegistryFile = load_file(file)?;
        Self::from_devices(parsed.devices, file)
    }

    /// A registry of `devices`; `file` names the source in errors.
    pub fn from_devices(devices: Vec<Device>, file: &Path) -> Result<Self, ConfigError> {
        let mut map = HashMap::with_capacity(devices.len());
        for (i, device) in devices.into_iter().enumerate() {
            check_name(&device.id)
                .map_err(|r| ConfigError::invalid(file, format!("devices[{i}].id"), r))?;
            check_name(&device.product)
                .map_err(|r| ConfigError::invalid(file, format!("devices[{i}].product"), r))?;
            if let Some(parent) = &device.parent {
                check_name(parent)
                    .map_err(|r| ConfigError::invalid(file, format!("devices[{i}].parent"), r))?;
            }
            if map.contains_key(&device.id) {
                return Err(ConfigError::invalid(
                    file,
                    format!("devices[{i}].id"),
                    format!("device {:?} is listed twice", device.id),
                ));
            }
            map.insert(device.id.clone(), Arc::new(device));
        }
        Ok(DeviceRegistry { devices: map })
    }

    /// The device with `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Device>> {
        self.devices.get(id)
    }

    /// How many devices are registered.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Every device, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.devices.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_text;

    fn registry(text: &str) -> Result<DeviceRegistry, ConfigError> {
        let file = Path::new("devices.toml");
        let parsed: RegistryFile = parse_text(text, file, &|_| None)?;
        DeviceRegistry::from_devices(parsed.devices, file)
    }

    #[test]
    fn devices_load_with_their_metadata() {
        let r = registry(
            r#"
            [[devices]]
            id = "th-1"
            name = "Lab"
            product = "json-sensor"
            tenant = "acme"
            type = "thermometer"
            groups = ["a", "b"]
            status = { mode = "heartbeat", interval = "30s" }

            [[devices]]
            id = "th-2"
            product = "json-sensor"
            "#,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        let d = r.get("th-1").unwrap();
        assert_eq!(
            (d.display_name(), d.device_type.as_str(), d.groups.len()),
            ("Lab", "thermometer", 2)
        );
        assert_eq!(r.get("th-2").unwrap().display_name(), "th-2");
    }

    #[test]
    fn duplicates_and_bad_ids_name_the_entry() {
        let err = registry(
            "[[devices]]\nid = \"a\"\nproduct = \"p\"\n[[devices]]\nid = \"a\"\nproduct = \"p\"",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "devices.toml: key `devices[1].id`: device \"a\" is listed twice"
        );
        let err = registry("[[devices]]\nid = \"a/b\"\nproduct = \"p\"").unwrap_err();
        assert!(err.to_string().contains("devices[0].id"), "{err}");
        let err = registry("[[devices]]\nid = \"a\"\nproduct = \"p\"\ncolor = 1").unwrap_err();
        assert!(err.to_string().contains("unknown field `color`"), "{err}");
    }
}
