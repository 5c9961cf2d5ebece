//! Which devices a client may see, and what is known of them now.

use std::collections::BTreeSet;

use super::auth::Identity;
use super::frames::{FrameError, Subscribe};
use crate::devices::Device;
use crate::latest::Snapshot;
use crate::pipeline::PipelineState;
use crate::status::DeviceStatus;

/// Whether `identity` may see `device`: without authentication, any
/// device that is registered or has reported; with it, a registered
/// device of the identity's tenant, or an unregistered one created for it
/// (admin: every one).
pub(super) fn sees_device(
    state: &PipelineState,
    identity: Option<&Identity>,
    device: &str,
) -> bool {
    if let Some(registered) = state.registry.load().get(device) {
        return identity.is_none_or(|i| i.sees(&registered.tenant));
    }
    match state.seen.get(device) {
        Some(seen) => identity.is_none_or(|i| {
            i.allows(super::auth::Scope::Admin) || (!seen.tenant.is_empty() && i.sees(&seen.tenant))
        }),
        None => false,
    }
}

/// The answer for a device the caller may not see: the same whether it
/// belongs to another tenant or does not exist, so nothing tells them apart.
pub(super) fn unknown_device(device: &str) -> String {
    format!("no device {device:?} is known")
}

/// [`sees_device`], as a frame error.
pub(super) fn check_device(
    state: &PipelineState,
    identity: Option<&Identity>,
    device: &str,
) -> Result<(), FrameError> {
    if sees_device(state, identity, device) {
        Ok(())
    } else {
        Err(FrameError::new("unknown_device", unknown_device(device)))
    }
}

fn visible(device: &Device, identity: Option<&Identity>) -> bool {
    identity.is_none_or(|i| i.sees(&device.tenant))
}

/// Whether a registered device matches the registry filters of `request`
/// (AND across kinds, OR within one).
pub(super) fn matches(device: &Device, request: &Subscribe) -> bool {
    let any = |wanted: &[String], have: &str| wanted.is_empty() || wanted.iter().any(|w| w == have);
    any(&request.device_types, &device.device_type)
        && any(&request.locations, &device.location)
        && (request.groups.is_empty() || device.groups.iter().any(|g| request.groups.contains(g)))
        && (request.device_ids.is_empty() || request.device_ids.contains(&device.id))
}

/// The devices `request` covers for `identity`, checking every device it
/// names (one the identity may not see is an `unknown_device` error).
pub(super) fn resolve(
    state: &PipelineState,
    identity: Option<&Identity>,
    request: &Subscribe,
) -> Result<BTreeSet<String>, FrameError> {
    for device in &request.device_ids {
        check_device(state, identity, device)?;
    }
    Ok(covered(state, identity, request))
}

/// The devices `request` covers for `identity` now: named devices it may
/// still see, and registered devices that match its filters.
pub(super) fn covered(
    state: &PipelineState,
    identity: Option<&Identity>,
    request: &Subscribe,
) -> BTreeSet<String> {
    let named = request
        .device_ids
        .iter()
        .filter(|d| sees_device(state, identity, d))
        .cloned();
    if !request.selects_from_registry() {
        return named.collect();
    }
    let registry = state.registry.load();
    let mut devices: BTreeSet<String> = registry
        .iter()
        .filter(|d| visible(d, identity) && matches(d, request))
        .map(|d| d.id.clone())
        .collect();
    // Named devices that only reported (no registry entry) are covered too
    // when nothing else narrows the set.
    if request.device_types.is_empty() && request.locations.is_empty() && request.groups.is_empty()
    {
        devices.extend(named);
    }
    devices
}

/// Registered devices visible to `identity`.
pub(super) fn visible_devices(state: &PipelineState, identity: Option<&Identity>) -> Vec<Device> {
    state
        .registry
        .load()
        .iter()
        .filter(|d| visible(d, identity))
        .map(|d| Device::clone(d))
        .collect()
}

/// The latest values of `device`: this instance's, else the bus's.
pub(super) async fn latest_of(state: &PipelineState, device: &str) -> Option<Snapshot> {
    latest_of_many(state, &[device.to_owned()])
        .await
        .pop()
        .flatten()
}

/// The status of `device`: this instance's, else the bus's table.
pub(super) async fn status_of(state: &PipelineState, device: &str) -> Option<DeviceStatus> {
    status_of_many(state, &[device.to_owned()])
        .await
        .pop()
        .flatten()
}

/// The latest values of each of `devices`, in order: this instance's,
/// else the bus's, fetched for all of them in pipelined round trips.
pub(super) async fn latest_of_many(
    state: &PipelineState,
    devices: &[String],
) -> Vec<Option<Snapshot>> {
    here_else_bus(
        devices,
        |d| state.latest.get(d),
        |missing| async move { state.bus.load_latest_many(&missing).await },
    )
    .await
}

/// The status of each of `devices`, in order: this instance's, else the
/// bus's table, fetched for all of them in pipelined round trips.
pub(super) async fn status_of_many(
    state: &PipelineState,
    devices: &[String],
) -> Vec<Option<DeviceStatus>> {
    here_else_bus(
        devices,
        |d| state.status.get(d),
        |missing| async move { state.bus.load_status_many(&missing).await },
    )
    .await
}

/// What `here` knows of each device, and for the devices it does not
/// know, what `load` fetches from the bus in one go (nothing, logged, when
/// the bus fails).
async fn here_else_bus<T, Load, Loading>(
    devices: &[String],
    here: impl Fn(&str) -> Option<T>,
    load: Load,
) -> Vec<Option<T>>
where
    Load: FnOnce(Vec<String>) -> Loading,
    Loading: std::future::Future<Output = Result<Vec<Option<T>>, crate::bus::BusError>>,
{
    let mut found: Vec<Option<T>> = devices.iter().map(|d| here(d)).collect();
    let missing: Vec<String> = devices
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(d, _)| d.clone())
        .collect();
    if missing.is_empty() {
        return found;
    }
    let count = missing.len();
    match load(missing).await {
        Ok(loaded) => {
            let mut loaded = loaded.into_iter();
            for slot in found.iter_mut().filter(|f| f.is_none()) {
                *slot = loaded.next().flatten();
            }
        }
        Err(error) => tracing::warn!(%error, devices = count, "cannot load from the bus"),
    }
    found
}
