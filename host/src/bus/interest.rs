//! The interest set: which devices someone is watching. Reads are
//! wait-free (one atomic load), so checking it for every message costs no
//! more than a hash lookup and never a network call.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// The devices that have at least one watcher anywhere.
#[derive(Debug, Default)]
pub struct Interest {
    watched: ArcSwap<HashSet<String>>,
}

impl Interest {
    /// Nobody watches anything yet.
    pub fn new() -> Self {
        Interest::default()
    }

    /// Whether someone watches `device`.
    pub fn is_watched(&self, device: &str) -> bool {
        self.watched.load().contains(device)
    }

    /// Whether anyone watches anything.
    pub fn is_empty(&self) -> bool {
        self.watched.load().is_empty()
    }

    /// How many devices are watched.
    pub fn len(&self) -> usize {
        self.watched.load().len()
    }

    /// Marks `device` watched or not. Changes are rare (a dashboard opens
    /// or closes), so the set is copied on write.
    pub fn set(&self, device: &str, watched: bool) {
        self.watched.rcu(|current| {
            if current.contains(device) == watched {
                return Arc::clone(current);
            }
            let mut next = HashSet::clone(current);
            if watched {
                next.insert(device.to_owned());
            } else {
                next.remove(device);
            }
            Arc::new(next)
        });
    }

    /// Replaces the whole set (a resync).
    pub fn replace(&self, devices: HashSet<String>) {
        self.watched.store(Arc::new(devices));
    }

    /// A copy of the set.
    pub fn devices(&self) -> Vec<String> {
        self.watched.load().iter().cloned().collect()
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
    }
}
