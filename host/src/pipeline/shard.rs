//! Sharding by device: `hash(device) % shards` decides a device's worker
//! queue, and [`Sharded`] keeps per-device state in the same shards.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

/// The shard of `device` among `shards`; stable for the life of the process.
pub fn shard_for(device: &str, shards: usize) -> usize {
    // DefaultHasher::new() has fixed keys, so every part of the process
    // agrees on a device's shard.
    let mut hasher = DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % shards.max(1) as u64) as usize
}

/// Per-device state split into shards, each behind its own lock.
///
/// A `std::sync::Mutex` is right here: a shard's lock is held for a few
/// hash-map operations, never across an `.await`, and mostly taken by the
/// one worker that owns the shard, so it is rarely contended.
#[derive(Debug)]
pub struct Sharded<T> {
    shards: Vec<Mutex<T>>,
}

impl<T> Sharded<T> {
    /// `count` shards made by `make`.
    pub fn new(count: usize, mut make: impl FnMut() -> T) -> Self {
        Sharded {
            shards: (0..count.max(1)).map(|_| Mutex::new(make())).collect(),
        }
    }

    /// The shard holding `device`, locked.
    pub fn for_device(&self, device: &str) -> MutexGuard<'_, T> {
        lock(&self.shards[shard_for(device, self.shards.len())])
    }

    /// Every shard in turn, locked one at a time.
    pub fn each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        self.shards.iter().map(lock)
    }

    /// How many shards there are.
    pub fn count(&self) -> usize {
        self.shards.len()
    }
}

/// A poisoned lock means a panic while it was held; the state is plain
/// records that stay consistent, so keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_for("th-1", 4), shard_for("th-1", 4));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard_for(&format!("dev-{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(shard_for("x", 0), 0);
    }

    #[test]
    fn a_device_always_finds_its_shard() {
        let sharded = Sharded::new(3, Vec::new);
        sharded.for_device("a").push(1);
        sharded.for_device("a").push(2);
        assert_eq!(*sharded.for_device("a"), [1, 2]);
        assert_eq!(sharded.each().map(|s| s.len()).sum::<usize>(), 2);
    }
}
