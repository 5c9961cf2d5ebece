//! The interest set: which devices someone is watching. Checking it for
//! every message costs a hash and an uncontended read lock, never a
//! network call; adding or removing N devices costs O(N).

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Shards of the set: writers (a dashboard subscribing to thousands of
/// devices) lock one shard at a time, so readers on the message path
/// rarely wait.
const SHARDS: usize = 64;

/// The devices that have at least one watcher anywhere, and the groups
/// watched as a whole (`ws:sub:group:{group}`).
///
/// A `std::sync::RwLock` is right here: each lock is held for one set
/// operation, never across an `.await`.
#[derive(Debug)]
pub struct Interest {
    shards: Vec<RwLock<HashSet<String>>>,
    hasher: RandomState,
    /// Watched groups: few next to devices, read once per report of a
    /// device in some group.
    groups: RwLock<HashSet<String>>,
    /// Whether any group is watched: the message path asks this first.
    any_groups: std::sync::atomic::AtomicBool,
}

impl Default for Interest {
    fn default() -> Self {
        Interest {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            groups: RwLock::default(),
            any_groups: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Interest {
    /// Nobody watches anything yet.
    pub fn new() -> Self {
        Interest::default()
    }

    fn shard(&self, device: &str) -> &RwLock<HashSet<String>> {
        let hash = self.hasher.hash_one(device);
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    fn read(shard: &RwLock<HashSet<String>>) -> RwLockReadGuard<'_, HashSet<String>> {
        // A poisoned lock means a panic during one insert or removal; the
        // set is still a set.
        shard
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(shard: &RwLock<HashSet<String>>) -> RwLockWriteGuard<'_, HashSet<String>> {
        shard
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether someone watches `device`.
    pub fn is_watched(&self, device: &str) -> bool {
        Self::read(self.shard(device)).contains(device)
    }

    /// Whether anyone watches anything.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| Self::read(s).is_empty())
    }

    /// How many devices are watched.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| Self::read(s).len()).sum()
    }

    /// Marks `device` watched or not.
    pub fn set(&self, device: &str, watched: bool) {
        let mut shard = Self::write(self.shard(device));
        if watched {
            if !shard.contains(device) {
                shard.insert(device.to_owned());
            }
        } else {
            shard.remove(device);
        }
    }

    /// Marks every one of `devices` watched or not.
    pub fn set_many<'a>(&self, devices: impl IntoIterator<Item = &'a str>, watched: bool) {
        for device in devices {
            self.set(device, watched);
        }
    }

    /// Replaces the whole set (a resync).
    pub fn replace(&self, devices: HashSet<String>) {
        let mut split: Vec<HashSet<String>> = (0..SHARDS).map(|_| HashSet::new()).collect();
        for device in devices {
            let hash = self.hasher.hash_one(device.as_str());
            split[(hash % SHARDS as u64) as usize].insert(device);
        }
        for (shard, devices) in self.shards.iter().zip(split) {
            *Self::write(shard) = devices;
        }
    }

    /// Marks each of `groups` watched as a whole, or not.
    pub fn set_groups<'a>(&self, groups: impl IntoIterator<Item = &'a str>, watched: bool) {
        let mut set = Self::write(&self.groups);
        for group in groups {
            if watched {
                if !set.contains(group) {
                    set.insert(group.to_owned());
                }
            } else {
                set.remove(group);
            }
        }
        self.any_groups
            .store(!set.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the watched groups (a resync).
    pub fn replace_groups(&self, groups: HashSet<String>) {
        let mut set = Self::write(&self.groups);
        *set = groups;
        self.any_groups
            .store(!set.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Which of `groups` (a device's) are watched as a whole.
    pub fn watched_groups(&self, groups: &[String]) -> Vec<String> {
        if groups.is_empty() || !self.any_groups() {
            return Vec::new();
        }
        let set = Self::read(&self.groups);
        if set.is_empty() {
            return Vec::new();
        }
        groups
            .iter()
            .filter(|g| set.contains(*g))
            .cloned()
            .collect()
    }

    /// Whether any group is watched as a whole (one atomic load).
    pub fn any_groups(&self) -> bool {
        self.any_groups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many groups are watched as a whole.
    pub fn group_count(&self) -> usize {
        Self::read(&self.groups).len()
    }

    /// A copy of the set.
    pub fn devices(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| Self::read(s).iter().cloned().collect::<Vec<_>>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_come_and_go() {
        let interest = Interest::new();
        assert!(!interest.is_watched("a"));
        interest.set("a", true);
        interest.set("a", true);
        assert!(interest.is_watched("a"));
        assert_eq!(interest.len(), 1);
        interest.set("a", false);
        assert!(interest.is_empty());
        interest.replace(["x".to_owned(), "y".to_owned()].into());
        assert!(interest.is_watched("y"));
        assert_eq!(interest.len(), 2);
    }

    #[test]
    fn groups_are_watched_apart_from_devices() {
        let interest = Interest::new();
        let groups = ["cold".to_owned(), "lab".to_owned()];
        assert!(interest.watched_groups(&groups).is_empty());
        interest.set_groups(["cold"], true);
        assert_eq!(interest.watched_groups(&groups), ["cold"]);
        assert!(!interest.is_watched("cold"), "a group is not a device");
        interest.replace_groups(["lab".to_owned()].into());
        assert_eq!(interest.watched_groups(&groups), ["lab"]);
        interest.set_groups(["lab"], false);
        assert_eq!(interest.group_count(), 0);
    }

    #[test]
    fn many_devices_at_once() {
        let interest = Interest::new();
        let devices: Vec<String> = (0..100_000).map(|i| format!("d-{i}")).collect();
        interest.set_many(devices.iter().map(String::as_str), true);
        assert_eq!(interest.len(), 100_000);
        assert!(interest.is_watched("d-99999"));
        interest.set_many(devices.iter().take(50_000).map(String::as_str), false);
        assert_eq!(interest.len(), 50_000);
        assert!(!interest.is_watched("d-0"));
    }
}
