//! The host's functions: log, per-device state and product parameters.
//!
//! On WebAssembly these call into sluice; natively they are served by
//! [`crate::native`], so scripts can be unit-tested and benchmarked as plain Rust.

use std::str::FromStr;

use crate::{LogLevel, ScriptError, StateError};

#[cfg(target_arch = "wasm32")]
use crate::bindings::sluice::script::host as imp;
#[cfg(not(target_arch = "wasm32"))]
use crate::native as imp;

/// Writes a line to the host's log, tagged with the product and script version.
pub fn log(level: LogLevel, message: &str) {
    imp::log(level, message);
}

/// The product parameter `key` from the host's configuration.
pub fn param(key: &str) -> Option<String> {
    imp::param(key)
}

/// The product parameter `key` parsed as `T`; `Ok(None)` when it is not set,
/// error code `bad-param` when it does not parse.
pub fn param_as<T: FromStr>(key: &str) -> Result<Option<T>, ScriptError>
where
    T::Err: std::fmt::Display,
{
    match param(key) {
        None => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|e| {
            ScriptError::new(
                "bad-param",
                format!("product parameter {key:?} = {text:?} does not parse: {e}"),
            )
        }),
    }
}

/// The state stored for `device_id` of this product.
pub fn state_get(device_id: &str) -> Option<Vec<u8>> {
    imp::state_get(device_id)
}

/// Stores state for `device_id` (an empty value deletes it); error code
/// `state-too-large` when the host's per-device limit is exceeded,
/// `state-full` when the host keeps state for as many devices as it allows.
pub fn state_set(device_id: &str, value: &[u8]) -> Result<(), ScriptError> {
    imp::state_set(device_id, value).map_err(|error| match error {
        StateError::TooLarge(limit) => ScriptError::new(
            "state-too-large",
            format!(
                "state for device {device_id:?} is {} bytes, the limit is {limit}",
                value.len()
            ),
        ),
        StateError::Full(devices) => ScriptError::new(
            "state-full",
            format!("cannot keep state for device {device_id:?}: state is held for {devices} devices already"),
        ),
    })
}

/// Runs a script's `parse` for one message, or its `encode` for one command.
/// Used by [`crate::script!`].
#[doc(hidden)]
pub fn run<T, R>(input: &T, call: fn(&T) -> Result<R, ScriptError>) -> Result<R, ScriptError> {
    static PANIC_HOOK: std::sync::Once = std::sync::Once::new();
    // A panic aborts the call (the host sees a trap); the hook hands the
    // panic message to the host first, so the trap error can say why.
    PANIC_HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            log(LogLevel::Error, &format!("script {info}"))
        }));
    });
    call(input)
}
