//! The stand-in host used off WebAssembly: state, parameters and log lines
//! live in thread-local memory, so native tests and benchmarks of a script
//! run without sluice.
//!
//! ```
//! use sluice_guest::{native, param};
//!
//! native::set_param("temp_max", "30");
//! assert_eq!(param("temp_max").as_deref(), Some("30"));
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use crate::{LogLevel, StateError};

/// The per-device state limit of the stand-in host, as sluice's default.
pub const STATE_LIMIT: u32 = 4096;

#[derive(Default)]
struct NativeHost {
    params: HashMap<String, String>,
    state: HashMap<String, Vec<u8>>,
    logs: Vec<(LogLevel, String)>,
}

thread_local! {
    static HOST: RefCell<NativeHost> = RefCell::new(NativeHost::default());
}

/// Sets a product parameter for this thread.
pub fn set_param(key: &str, value: &str) {
    HOST.with_borrow_mut(|h| h.params.insert(key.to_owned(), value.to_owned()));
}

/// Removes every parameter, state entry and log line of this thread.
pub fn reset() {
    HOST.with_borrow_mut(|h| *h = NativeHost::default());
}

/// Takes the log lines written so far on this thread.
pub fn take_logs() -> Vec<(LogLevel, String)> {
    HOST.with_borrow_mut(|h| std::mem::take(&mut h.logs))
}

pub(crate) fn log(level: LogLevel, message: &str) {
    HOST.with_borrow_mut(|h| h.logs.push((level, message.to_owned())));
}

pub(crate) fn param(key: &str) -> Option<String> {
    HOST.with_borrow(|h| h.params.get(key).cloned())
}

pub(crate) fn state_get(device_id: &str) -> Option<Vec<u8>> {
    HOST.with_borrow(|h| h.state.get(device_id).cloned())
}

pub(crate) fn state_set(device_id: &str, value: &[u8]) -> Result<(), StateError> {
    if value.len() > STATE_LIMIT as usize {
        return Err(StateError::TooLarge(STATE_LIMIT));
    }
    HOST.with_borrow_mut(|h| {
        if value.is_empty() {
            h.state.remove(device_id);
        } else {
            h.state.insert(device_id.to_owned(), value.to_vec());
        }
    });
    Ok(())
}
