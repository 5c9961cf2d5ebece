//! What a script instance's store holds, and the host functions it offers
//! to the script: `log`, per-device state and product parameters.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{LogLevel, StateError, host_api, sluice};
use super::error::ScriptId;
use super::instance::ScriptStats;
use super::limits::{Limits, MemoryLimiter};
use super::state::DeviceState;

/// Product parameters from the configuration, as the script reads them.
pub type Params = BTreeMap<String, String>;

/// The longest log line kept from a script; longer ones are cut.
const LOG_LINE_BYTES: usize = 1024;

/// The data of one instance's store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) script: ScriptId,
    pub(crate) params: Arc<Params>,
    pub(crate) state: DeviceState,
    pub(crate) log: CallLog,
    stats: Arc<ScriptStats>,
}

/// Log lines of the running call.
#[derive(Debug, Default)]
pub(crate) struct CallLog {
    lines: u32,
    limit: u32,
    /// The last error-level line of the running call (a Rust script's panic
    /// message arrives this way just before it traps).
    pub(crate) last_error: Option<String>,
}

impl CallLog {
    /// Starts a call that may write `lines` lines.
    pub(crate) fn begin(&mut self, lines: u32) {
        self.lines = 0;
        self.limit = lines;
        self.last_error = None;
    }
}

impl HostState {
    pub(crate) fn new(
        script: ScriptId,
        params: Arc<Params>,
        limits: &Limits,
        state: DeviceState,
        stats: Arc<ScriptStats>,
    ) -> Self {
        HostState {
            // No preopened directories, no environment, no arguments, no
            // network, stdio discarded: the script gets what std needs to
            // start and nothing more.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(limits.memory_bytes()),
            script,
            params,
            state,
            log: CallLog::default(),
            stats,
        }
    }
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("script", &self.script)
            .field("state_devices", &self.state.devices())
            .finish_non_exhaustive()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl sluice::script::types::Host for HostState {}

impl host_api::Host for HostState {
    fn log(&mut self, level: LogLevel, mut message: String) {
        if message.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        if matches!(level, LogLevel::Error) {
            self.log.last_error = Some(message.clone());
        }
        if self.log.lines >= self.log.limit {
            self.stats.log_dropped();
            return;
        }
        self.log.lines += 1;
        let product = self.script.product.as_str();
        let version = self.script.version.as_str();
        match level {
            LogLevel::Trace => tracing::trace!(product, version, "{message}"),
            LogLevel::Debug => tracing::debug!(product, version, "{message}"),
            LogLevel::Info => tracing::info!(product, version, "{message}"),
            LogLevel::Warn => tracing::warn!(product, version, "{message}"),
            LogLevel::Error => tracing::error!(product, version, "{message}"),
        }
    }

    fn state_get(&mut self, device_id: String) -> Option<Vec<u8>> {
        self.state.get(&device_id)
    }

    fn state_set(&mut self, device_id: String, value: Vec<u8>) -> Result<(), StateError> {
        self.state.set(device_id, value)
    }

    fn param(&mut self, key: String) -> Option<String> {
        self.params.get(&key).cloned()
    }

    fn json_fields(&mut self, text: Vec<u8>) -> Result<Vec<u8>, String> {
        let mut fields = Vec::with_capacity(text.len() + text.len() / 2 + 16);
        super::packed::put_json_fields(&mut fields, &text)?;
        Ok(fields)
    }
}
