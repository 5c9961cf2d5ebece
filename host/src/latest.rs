//! The latest values of every device: telemetry merged into a snapshot
//! with the time of the last report, and the device's attributes.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::pipeline::Sharded;
use crate::script::Fields;

/// A device's last known values.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Telemetry, each key with its latest value.
    pub telemetry: Fields,
    /// Attributes, each key with its latest value.
    pub attributes: Fields,
    /// When telemetry was last reported, in ms since the Unix epoch (0: never).
    pub updated_ms: i64,
}

impl Snapshot {
    /// Merges a telemetry report measured at `at_ms`.
    pub fn merge_telemetry(&mut self, fields: &Fields, at_ms: i64) {
        for (key, value) in fields.iter() {
            self.telemetry.insert(key, value.clone());
        }
        self.updated_ms = self.updated_ms.max(at_ms);
    }

    /// Merges attributes.
    pub fn merge_attributes(&mut self, fields: &Fields) {
        for (key, value) in fields.iter() {
            self.attributes.insert(key, value.clone());
        }
    }
}

/// What changed for one device since the last write-behind.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    /// Changed telemetry.
    pub telemetry: Fields,
    /// Changed attributes.
    pub attributes: Fields,
    /// The snapshot's report time after the changes.
    pub updated_ms: i64,
}

#[derive(Debug, Default)]
struct Shard {
    snapshots: HashMap<String, Snapshot>,
    /// Changes not yet written behind (only when write-behind is on).
    pending: HashMap<String, Delta>,
}

/// Latest values of all devices, sharded like the workers; optionally
/// collecting changes for a write-behind to a shared store.
#[derive(Debug)]
pub struct LatestStore {
    shards: Sharded<Shard>,
    write_behind: bool,
}

impl LatestStore {
    /// An empty store; with `write_behind`, changes are kept for [`LatestStore::take_pending`].
    pub fn new(shards: usize, write_behind: bool) -> Self {
        LatestStore {
            shards: Sharded::new(shards, Shard::default),
            write_behind,
        }
    }

    /// Merges a telemetry report of `device` measured at `at_ms`.
    pub fn merge_telemetry(&self, device: &str, fields: &Fields, at_ms: i64) {
        let mut shard = self.shards.for_device(device);
        match shard.snapshots.get_mut(device) {
            Some(snapshot) => snapshot.merge_telemetry(fields, at_ms),
            None => {
                let mut snapshot = Snapshot::default();
                snapshot.merge_telemetry(fields, at_ms);
                shard.snapshots.insert(device.to_owned(), snapshot);
            }
        }
        if self.write_behind {
            let delta = shard.pending.entry(device.to_owned()).or_default();
            for (key, value) in fields.iter() {
                delta.telemetry.insert(key, value.clone());
            }
            delta.updated_ms = delta.updated_ms.max(at_ms);
        }
    }

    /// Merges attributes of `device`.
    pub fn merge_attributes(&self, device: &str, fields: &Fields) {
        let mut shard = self.shards.for_device(device);
        shard
            .snapshots
            .entry(device.to_owned())
            .or_default()
            .merge_attributes(fields);
        if self.write_behind {
            let delta = shard.pending.entry(device.to_owned()).or_default();
            for (key, value) in fields.iter() {
                delta.attributes.insert(key, value.clone());
            }
        }
    }

    /// The snapshot of `device`, if it has reported here.
    pub fn get(&self, device: &str) -> Option<Snapshot> {
        self.shards
            .for_device(device)
            .snapshots
            .get(device)
            .cloned()
    }

    /// Keeps a snapshot loaded from elsewhere, unless a newer one is here.
    pub fn adopt(&self, device: &str, snapshot: Snapshot) {
        let mut shard = self.shards.for_device(device);
        let newer_here = shard
            .snapshots
            .get(device)
            .is_some_and(|s| s.updated_ms >= snapshot.updated_ms);
        if !newer_here {
            shard.snapshots.insert(device.to_owned(), snapshot);
        }
    }

    /// How many devices have a snapshot.
    pub fn len(&self) -> usize {
        self.shards.each().map(|s| s.snapshots.len()).sum()
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the changes collected since the last call.
    pub fn take_pending(&self) -> Vec<(String, Delta)> {
        self.shards
            .each()
            .flat_map(|mut s| {
                std::mem::take(&mut s.pending)
                    .into_iter()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Puts changes back that could not be written (they merge under newer ones).
    pub fn restore_pending(&self, deltas: Vec<(String, Delta)>) {
        for (device, old) in deltas {
            let mut shard = self.shards.for_device(&device);
            let delta = shard.pending.entry(device).or_default();
            for (key, value) in old.telemetry {
                if !delta.telemetry.contains_key(&key) {
                    delta.telemetry.insert(key, value);
                }
            }
            for (key, value) in old.attributes {
                if !delta.attributes.contains_key(&key) {
                    delta.attributes.insert(key, value);
                }
            }
            delta.updated_ms = delta.updated_ms.max(old.updated_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(pairs: &[(&str, serde_json::Value)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn reports_merge_into_the_snapshot() {
        let store = LatestStore::new(2, false);
        store.merge_telemetry("d", &fields(&[("t", json!(20)), ("h", json!(40))]), 100);
        store.merge_telemetry("d", &fields(&[("t", json!(21))]), 200);
        let snapshot = store.get("d").unwrap();
        assert_eq!(
            serde_json::to_string(&snapshot.telemetry).unwrap(),
            r#"{"t":21,"h":40}"#
        );
        assert_eq!(snapshot.updated_ms, 200);
        assert!(
            store.take_pending().is_empty(),
            "no write-behind unless asked"
        );
    }

    #[test]
    fn write_behind_collects_and_restores_deltas() {
        let store = LatestStore::new(2, true);
        store.merge_telemetry("d", &fields(&[("t", json!(20))]), 100);
        store.merge_attributes("d", &fields(&[("fw", json!("1.2"))]));
        let pending = store.take_pending();
        assert_eq!(pending.len(), 1);
        assert!(store.take_pending().is_empty());
        store.merge_telemetry("d", &fields(&[("t", json!(22))]), 300);
        store.restore_pending(pending);
        let again = store.take_pending();
        let delta = &again[0].1;
        assert_eq!(
            delta.telemetry["t"],
            json!(22),
            "newer values win over restored ones"
        );
        assert_eq!(delta.attributes["fw"], json!("1.2"));
        assert_eq!(delta.updated_ms, 300);
    }

    #[test]
    fn adopted_snapshots_do_not_replace_newer_ones() {
        let store = LatestStore::new(1, false);
        store.merge_telemetry("d", &fields(&[("t", json!(1))]), 500);
        store.adopt(
            "d",
            Snapshot {
                updated_ms: 400,
                ..Snapshot::default()
            },
        );
        assert_eq!(store.get("d").unwrap().telemetry["t"], json!(1));
        store.adopt(
            "e",
            Snapshot {
                updated_ms: 400,
                ..Snapshot::default()
            },
        );
        assert_eq!(store.len(), 2);
    }
}
