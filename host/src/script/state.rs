//! Per-device state a script keeps between messages, with writes held back
//! until the call that made them succeeds.

use std::collections::HashMap;

use super::bindings::StateError;

/// State of one product's devices on one worker.
///
/// Writes during a call land in a journal; [`DeviceState::commit`] applies
/// them when the call returns, [`DeviceState::rollback`] drops them when it
/// traps, so a crashed call leaves no half-written state behind.
#[derive(Debug, Default)]
pub(crate) struct DeviceState {
    committed: HashMap<String, Vec<u8>>,
    /// Writes of the running call; an empty value deletes.
    pending: HashMap<String, Vec<u8>>,
    value_limit: u32,
    device_limit: u32,
}

impl DeviceState {
    pub(crate) fn new(value_limit: u32, device_limit: u32) -> Self {
        DeviceState {
            committed: HashMap::new(),
            pending: HashMap::new(),
            value_limit,
            device_limit,
        }
    }

    /// The state of `device`, as the running call sees it.
    pub(crate) fn get(&self, device: &str) -> Option<Vec<u8>> {
        match self.pending.get(device) {
            Some(value) if value.is_empty() => None,
            Some(value) => Some(value.clone()),
            None => self.committed.get(device).cloned(),
        }
    }

    /// Records a write of the running call.
    pub(crate) fn set(&mut self, device: String, value: Vec<u8>) -> Result<(), StateError> {
        if value.len() > self.value_limit as usize {
            return Err(StateError::TooLarge(self.value_limit));
        }
        let known = self.committed.contains_key(&device) || self.pending.contains_key(&device);
        if !value.is_empty()
            && !known
            && self.committed.len() + self.pending.len() >= self.device_limit as usize
        {
            return Err(StateError::Full(self.device_limit));
        }
        self.pending.insert(device, value);
        Ok(())
    }

    /// Applies the running call's writes.
    pub(crate) fn commit(&mut self) {
        for (device, value) in self.pending.drain() {
            if value.is_empty() {
                self.committed.remove(&device);
            } else {
                self.committed.insert(device, value);
            }
        }
    }

    /// Drops the running call's writes.
    pub(crate) fn rollback(&mut self) {
        self.pending.clear();
    }

    /// How many devices have state.
    pub(crate) fn devices(&self) -> usize {
        self.committed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_visible_in_the_call_and_kept_on_commit() {
        let mut state = DeviceState::new(16, 10);
        state.set("a".into(), b"1".to_vec()).unwrap();
        assert_eq!(state.get("a"), Some(b"1".to_vec()));
        state.commit();
        assert_eq!(state.get("a"), Some(b"1".to_vec()));
        assert_eq!(state.devices(), 1);
    }

    #[test]
    fn rollback_forgets_the_call() {
        let mut state = DeviceState::new(16, 10);
        state.set("a".into(), b"1".to_vec()).unwrap();
        state.commit();
        state.set("a".into(), b"2".to_vec()).unwrap();
        state.set("b".into(), b"3".to_vec()).unwrap();
        state.rollback();
        assert_eq!(state.get("a"), Some(b"1".to_vec()));
        assert_eq!(state.get("b"), None);
    }

    #[test]
    fn empty_values_delete() {
        let mut state = DeviceState::new(16, 10);
        state.set("a".into(), b"1".to_vec()).unwrap();
        state.commit();
        state.set("a".into(), Vec::new()).unwrap();
        assert_eq!(state.get("a"), None);
        state.commit();
        assert_eq!(state.devices(), 0);
    }

    #[test]
    fn limits_refuse_large_values_and_new_devices_when_full() {
        let mut state = DeviceState::new(4, 2);
        assert_eq!(
            state.set("a".into(), vec![0; 5]),
            Err(StateError::TooLarge(4))
        );
        state.set("a".into(), vec![0; 4]).unwrap();
        state.set("b".into(), vec![0; 4]).unwrap();
        state.commit();
        assert_eq!(state.set("c".into(), vec![1]), Err(StateError::Full(2)));
        state.set("a".into(), vec![1]).unwrap();
    }
}
