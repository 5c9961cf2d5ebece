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

/// Merges `fields` into `into`, adding new keys only while `into` holds
/// fewer than `max_keys`; returns how many keys were not kept.
fn merge_capped(into: &mut Fields, fields: &Fields, max_keys: usize) -> usize {
    let mut dropped = 0;
    for (key, value) in fields.entries() {
        if into.len() < max_keys || into.contains_key(key) {
            // The report's key is shared, not copied.
            into.insert(key.clone(), value.clone());
        } else {
            dropped += 1;
        }
    }
    dropped
}

impl Snapshot {
    /// Merges a telemetry report measured at `at_ms`, keeping at most
    /// `max_keys` keys; returns how many new keys were not kept.
    pub fn merge_telemetry(&mut self, fields: &Fields, at_ms: i64, max_keys: usize) -> usize {
        self.updated_ms = self.updated_ms.max(at_ms);
        merge_capped(&mut self.telemetry, fields, max_keys)
    }

    /// Merges attributes, keeping at most `max_keys` keys; returns how many
    /// new keys were not kept.
    pub fn merge_attributes(&mut self, fields: &Fields, max_keys: usize) -> usize {
        merge_capped(&mut self.attributes, fields, max_keys)
    }
}

/// The entry of `device` in `map`, created empty when missing; the id is
/// copied only then, not on every report.
fn entry<'a, V: Default>(map: &'a mut HashMap<String, V>, device: &str) -> &'a mut V {
    if !map.contains_key(device) {
        map.insert(device.to_owned(), V::default());
    }
    map.get_mut(device).expect("the entry was just made")
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

    /// Merges a telemetry report of `device` measured at `at_ms`, keeping
    /// at most `max_keys` keys (new keys beyond it are not kept, and counted).
    pub fn merge_telemetry(&self, device: &str, fields: &Fields, at_ms: i64, max_keys: usize) {
        let mut shard = self.shards.for_device(device);
        let dropped = entry(&mut shard.snapshots, device).merge_telemetry(fields, at_ms, max_keys);
        if self.write_behind {
            let delta = entry(&mut shard.pending, device);
            merge_capped(&mut delta.telemetry, fields, max_keys);
            delta.updated_ms = delta.updated_ms.max(at_ms);
        }
        count_dropped(dropped);
    }

    /// Merges attributes of `device`, keeping at most `max_keys` keys.
    pub fn merge_attributes(&self, device: &str, fields: &Fields, max_keys: usize) {
        let mut shard = self.shards.for_device(device);
        let dropped = entry(&mut shard.snapshots, device).merge_attributes(fields, max_keys);
        if self.write_behind {
            let delta = entry(&mut shard.pending, device);
            merge_capped(&mut delta.attributes, fields, max_keys);
        }
        count_dropped(dropped);
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

fn count_dropped(dropped: usize) {
    if dropped > 0 {
        metrics::counter!("sluice_snapshot_keys_dropped_total").increment(dropped as u64);
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
        store.merge_telemetry("d", &fields(&[("t", json!(20)), ("h", json!(40))]), 100, 10);
        store.merge_telemetry("d", &fields(&[("t", json!(21))]), 200, 10);
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
        store.merge_telemetry("d", &fields(&[("t", json!(20))]), 100, 10);
        store.merge_attributes("d", &fields(&[("fw", json!("1.2"))]), 10);
        let pending = store.take_pending();
        assert_eq!(pending.len(), 1);
        assert!(store.take_pending().is_empty());
        store.merge_telemetry("d", &fields(&[("t", json!(22))]), 300, 10);
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
    fn snapshots_keep_at_most_their_cap_of_keys() {
        let store = LatestStore::new(1, true);
        store.merge_telemetry("d", &fields(&[("a", json!(1)), ("b", json!(2))]), 1, 2);
        store.merge_telemetry("d", &fields(&[("c", json!(3)), ("a", json!(4))]), 2, 2);
        let snapshot = store.get("d").unwrap();
        assert_eq!(
            serde_json::to_string(&snapshot.telemetry).unwrap(),
            r#"{"a":4,"b":2}"#,
            "known keys update, new ones past the cap are not kept"
        );
        let pending = store.take_pending();
        assert_eq!(pending[0].1.telemetry.len(), 2);
    }

    #[test]
    fn adopted_snapshots_do_not_replace_newer_ones() {
        let store = LatestStore::new(1, false);
        store.merge_telemetry("d", &fields(&[("t", json!(1))]), 500, 10);
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
