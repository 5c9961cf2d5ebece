//! A loaded script and its instances: one per worker and product, reused
//! across messages, rebuilt after a trap.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Func, InstancePre, TypedFunc};
use wasmtime::{Store, Trap, WasmBacktrace};

use super::bindings;
use super::command::{CommandCall, Downlink};
use super::engine::{LoadInfo, ScriptEngine, ScriptSettings};
use super::error::{ScriptError, ScriptId};
use super::host::{HostState, Params};
use super::limits::{Limits, MemoryExceeded};
use super::output::{Output, OutputCaps, OutputViolation};
use super::packed::{self, KeyInterner};
use super::state::DeviceState;
use crate::message::RawMessage;

/// `parse`: a packed message in, packed outputs or a typed error out.
type ParseParams<'a> = (&'a [u8],);
type ParseResults = (Result<Vec<u8>, bindings::ScriptError>,);
/// `parse-batch`: packed messages in, packed results out.
type BatchParams<'a> = (&'a [u8],);
type BatchResults = (Vec<u8>,);

/// A product's compiled and linked script at one version. Cheap to clone;
/// every worker instantiates its own [`ScriptInstance`] from it.
#[derive(Clone)]
pub struct Script {
    inner: Arc<ScriptInner>,
}

struct ScriptInner {
    engine: ScriptEngine,
    id: ScriptId,
    pre: InstancePre<HostState>,
    limits: Limits,
    params: Arc<Params>,
    info: LoadInfo,
    stats: Arc<ScriptStats>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("id", &self.inner.id)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// Counters of one script version across all its instances, mirrored into
/// the product's Prometheus metrics.
#[derive(Debug)]
pub struct ScriptStats {
    calls: AtomicU64,
    errors: AtomicU64,
    traps: AtomicU64,
    nanos: AtomicU64,
    instantiations: AtomicU64,
    logs_dropped: AtomicU64,
    metrics: ScriptMetrics,
}

/// The product's metrics, registered once per loaded script so that a call
/// records with a few atomic adds and no label lookup.
struct ScriptMetrics {
    calls: metrics::Counter,
    errors: metrics::Counter,
    traps: metrics::Counter,
    seconds: metrics::Histogram,
}

impl std::fmt::Debug for ScriptMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptMetrics")
    }
}

impl ScriptMetrics {
    fn new(product: &str) -> Self {
        let product = product.to_owned();
        ScriptMetrics {
            calls: metrics::counter!("sluice_script_calls_total", "product" => product.clone()),
            errors: metrics::counter!("sluice_script_errors_total", "product" => product.clone()),
            traps: metrics::counter!("sluice_script_traps_total", "product" => product.clone()),
            seconds: metrics::histogram!("sluice_script_call_seconds", "product" => product),
        }
    }
}

/// A snapshot of [`ScriptStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StatsSnapshot {
    /// Messages parsed.
    pub calls: u64,
    /// Messages that failed (including traps).
    pub errors: u64,
    /// Failures that trapped (panics, timeouts, memory).
    pub traps: u64,
    /// Time spent in calls, in nanoseconds.
    pub nanos: u64,
    /// Instances started.
    pub instantiations: u64,
    /// Log lines dropped over the per-call budget.
    pub logs_dropped: u64,
}

impl ScriptStats {
    fn new(product: &str) -> Self {
        ScriptStats {
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
            instantiations: AtomicU64::new(0),
            logs_dropped: AtomicU64::new(0),
            metrics: ScriptMetrics::new(product),
        }
    }

    /// One call of `messages` messages (a batch is one call).
    fn record(&self, messages: u64, failed: u64, trapped: u64, elapsed: Duration) {
        self.calls.fetch_add(messages, Ordering::Relaxed);
        self.metrics.calls.increment(messages);
        if failed > 0 {
            self.errors.fetch_add(failed, Ordering::Relaxed);
            self.metrics.errors.increment(failed);
        }
        if trapped > 0 {
            self.traps.fetch_add(trapped, Ordering::Relaxed);
            self.metrics.traps.increment(trapped);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        // The histogram is of time per message: a batch call of n messages
        // is n samples of its mean, so its count always equals the calls
        // counter.
        if messages > 0 {
            self.metrics
                .seconds
                .record_many(elapsed.as_secs_f64() / messages as f64, messages as usize);
        }
    }

    pub(crate) fn log_dropped(&self) {
        self.logs_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            traps: self.traps.load(Ordering::Relaxed),
            nanos: self.nanos.load(Ordering::Relaxed),
            instantiations: self.instantiations.load(Ordering::Relaxed),
            logs_dropped: self.logs_dropped.load(Ordering::Relaxed),
        }
    }
}

impl Script {
    pub(crate) fn new(
        engine: ScriptEngine,
        id: ScriptId,
        pre: InstancePre<HostState>,
        settings: ScriptSettings,
        info: LoadInfo,
    ) -> Self {
        let stats = Arc::new(ScriptStats::new(&id.product));
        Script {
            inner: Arc::new(ScriptInner {
                engine,
                id,
                pre,
                limits: settings.limits,
                params: Arc::new(settings.params),
                info,
                stats,
            }),
        }
    }

    /// A number that tells this loaded script apart from every other one
    /// alive (two loads of the same file are two scripts, with their own
    /// counters).
    pub fn identity(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Product and version.
    pub fn id(&self) -> &ScriptId {
        &self.inner.id
    }

    /// The per-call limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// How it was loaded.
    pub fn info(&self) -> &LoadInfo {
        &self.inner.info
    }

    /// Counters across all instances of this version.
    pub fn stats(&self) -> &ScriptStats {
        &self.inner.stats
    }

    /// Starts an instance with no per-device state yet.
    pub fn instantiate(&self) -> Result<ScriptInstance, ScriptError> {
        let limits = &self.inner.limits;
        let state = DeviceState::new(limits.state_bytes(), limits.state_devices);
        let mut instance = ScriptInstance {
            script: self.clone(),
            runtime: Runtime {
                live: None,
                parked: Some(state),
            },
            codec: Codec::default(),
        };
        instance.runtime.live(self)?;
        Ok(instance)
    }
}

/// A running instance of a script, owned by one worker.
///
/// It is reused across messages; a call that traps (panic, deadline, memory
/// cap) poisons the instance, so it is dropped and the next call starts a
/// fresh one. Per-device state survives that, minus the trapped call's writes.
pub struct ScriptInstance {
    script: Script,
    runtime: Runtime,
    codec: Codec,
}

/// The wasmtime side of an instance: live, or parked between a trap and
/// the next call.
struct Runtime {
    live: Option<Live>,
    /// The per-device state while no instance is live.
    parked: Option<DeviceState>,
}

struct Live {
    store: Store<HostState>,
    parse: Func,
    parse_batch: Func,
    /// `None` when the script does not export `encode`.
    encode: Option<Func>,
}

/// The host's side of the packed encoding, kept across calls: the buffer
/// messages are written into, and the field keys seen so far.
#[derive(Debug, Default)]
struct Codec {
    input: Vec<u8>,
    keys: KeyInterner,
}

impl Codec {
    /// Input buffers above this size are given back after the call that
    /// needed them.
    const KEEP_INPUT: usize = 64 << 10;

    fn release(&mut self) {
        if self.input.capacity() > Self::KEEP_INPUT {
            self.input = Vec::new();
        }
    }
}

impl std::fmt::Debug for ScriptInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptInstance")
            .field("script", &self.script.inner.id)
            .field("live", &self.runtime.live.is_some())
            .field("keys", &self.codec.keys.len())
            .finish()
    }
}

impl ScriptInstance {
    /// The script this instance runs.
    pub fn script(&self) -> &Script {
        &self.script
    }

    /// Bytes of the instance's linear memory now (0 while none is live).
    pub fn memory_bytes(&self) -> usize {
        self.runtime
            .live
            .as_ref()
            .map_or(0, |live| live.store.data().limiter.total())
    }

    /// Switches to another version of the product's script, keeping the
    /// per-device state. The new version's instance starts on the next call.
    pub fn upgrade(&mut self, script: Script) {
        let state = self.runtime.take_state();
        self.script = script;
        self.runtime.parked = Some(state);
    }

    /// Parses one message.
    pub fn parse(&mut self, message: &RawMessage) -> Result<Vec<Output>, ScriptError> {
        self.counted(|instance| instance.call_parse(message))
    }

    /// Runs one call and counts it in the script's statistics.
    fn counted<T>(
        &mut self,
        call: impl FnOnce(&mut Self) -> Result<T, ScriptError>,
    ) -> Result<T, ScriptError> {
        let started = Instant::now();
        let result = call(self);
        let (failed, trapped) = match &result {
            Ok(_) => (0, 0),
            Err(e) => (1, u64::from(e.discards_instance())),
        };
        self.script
            .inner
            .stats
            .record(1, failed, trapped, started.elapsed());
        result
    }

    /// Parses several messages in one call into the script; result `i`
    /// belongs to `messages[i]`. Results are the same as calling
    /// [`ScriptInstance::parse`] on each: when the batch traps, the
    /// messages are retried one by one so only the guilty one fails.
    pub fn parse_batch(
        &mut self,
        messages: &[RawMessage],
    ) -> Vec<Result<Vec<Output>, ScriptError>> {
        if messages.len() <= 1 {
            return messages.iter().map(|m| self.parse(m)).collect();
        }
        let started = Instant::now();
        match self.call_batch(messages) {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.is_err()).count() as u64;
                self.script
                    .inner
                    .stats
                    .record(messages.len() as u64, failed, 0, started.elapsed());
                results
            }
            Err(trap) => {
                tracing::debug!(script = %self.script.inner.id, error = %trap, "batch trapped; retrying its messages one by one");
                messages.iter().map(|m| self.parse(m)).collect()
            }
        }
    }

    fn call_parse(&mut self, message: &RawMessage) -> Result<Vec<Output>, ScriptError> {
        let script = &self.script;
        let deadline = script.inner.limits.deadline;
        self.codec.input.clear();
        packed::put_message(&mut self.codec.input, message);
        let live = self.runtime.begin_call(script, deadline)?;
        // SAFETY: `live.parse` was type-checked against exactly these
        // parameter and result types in `start`.
        let parse =
            unsafe { TypedFunc::<ParseParams<'_>, ParseResults>::new_unchecked(live.parse) };
        let result = match parse.call(&mut live.store, (self.codec.input.as_slice(),)) {
            Ok((result,)) => {
                live.store.data_mut().state.commit();
                match result {
                    Ok(answer) => {
                        packed::read_outputs(&answer, script.caps(), &mut self.codec.keys)
                            .map_err(|v| script.violation(v))
                            .and_then(|outputs| {
                                script.check_timestamps(outputs, message.received_at)
                            })
                    }
                    Err(rejected) => Err(script.rejected(rejected.code, rejected.message)),
                }
            }
            Err(error) => Err(self.runtime.trapped(script, error, deadline)),
        };
        self.codec.release();
        result
    }

    /// Turns a command for a device of this product into its downlinks.
    ///
    /// A script without `encode`, or whose `encode` answers
    /// `not-supported`, fails with [`ScriptError::NotSupported`]; one that
    /// rejects the command (an unknown name, bad params) with
    /// [`ScriptError::Rejected`].
    pub fn encode(&mut self, command: &CommandCall) -> Result<Vec<Downlink>, ScriptError> {
        self.counted(|instance| instance.call_encode(command))
    }

    fn call_encode(&mut self, command: &CommandCall) -> Result<Vec<Downlink>, ScriptError> {
        let script = &self.script;
        let deadline = script.inner.limits.deadline;
        self.codec.input.clear();
        packed::put_command(&mut self.codec.input, command);
        let live = self.runtime.begin_call(script, deadline)?;
        let Some(encode) = live.encode else {
            return Err(script.not_supported());
        };
        // SAFETY: `encode` was type-checked against these types in `start`.
        let encode = unsafe { TypedFunc::<ParseParams<'_>, ParseResults>::new_unchecked(encode) };
        let result = match encode.call(&mut live.store, (self.codec.input.as_slice(),)) {
            Ok((result,)) => {
                live.store.data_mut().state.commit();
                match result {
                    Ok(answer) => {
                        packed::read_downlinks(&answer, script.caps().bytes).map_err(|reason| {
                            match reason {
                                Some(reason) => ScriptError::BadOutput {
                                    script: script.inner.id.clone(),
                                    index: 0,
                                    reason: format!("encode: {reason}"),
                                },
                                None => ScriptError::OutputTooLarge {
                                    script: script.inner.id.clone(),
                                    size: answer.len(),
                                    count: 1,
                                    limit: script.caps().bytes,
                                    max_count: packed::MAX_DOWNLINKS,
                                },
                            }
                        })
                    }
                    Err(rejected) if rejected.code == NOT_SUPPORTED => Err(script.not_supported()),
                    Err(rejected) => Err(script.rejected(rejected.code, rejected.message)),
                }
            }
            Err(error) => Err(self.runtime.trapped(script, error, deadline)),
        };
        self.codec.release();
        result
    }

    /// A batch call; `Err` only when the call trapped.
    fn call_batch(
        &mut self,
        messages: &[RawMessage],
    ) -> Result<Vec<Result<Vec<Output>, ScriptError>>, ScriptError> {
        let script = &self.script;
        let deadline = script
            .inner
            .limits
            .deadline
            .saturating_mul(u32::try_from(messages.len()).unwrap_or(u32::MAX));
        self.codec.input.clear();
        packed::put_messages(&mut self.codec.input, messages);
        let live = self.runtime.begin_call(script, deadline)?;
        // SAFETY: type-checked in `start`, as for `parse`.
        let batch =
            unsafe { TypedFunc::<BatchParams<'_>, BatchResults>::new_unchecked(live.parse_batch) };
        let result = match batch.call(&mut live.store, (self.codec.input.as_slice(),)) {
            Ok((answer,)) => {
                live.store.data_mut().state.commit();
                Ok(
                    match packed::read_results(
                        &answer,
                        messages.len(),
                        script.caps(),
                        &mut self.codec.keys,
                    ) {
                        Ok(results) => results
                            .into_iter()
                            .zip(messages)
                            .map(|(result, message)| match result {
                                Ok(Ok(outputs)) => {
                                    script.check_timestamps(outputs, message.received_at)
                                }
                                Ok(Err(rejected)) => {
                                    Err(script.rejected(rejected.code, rejected.message))
                                }
                                Err(violation) => Err(script.violation(violation)),
                            })
                            .collect(),
                        Err(malformed) => messages
                            .iter()
                            .map(|_| {
                                Err(script.violation(OutputViolation::Bad {
                                    index: 0,
                                    reason: format!("parse-batch: {malformed}"),
                                }))
                            })
                            .collect(),
                    },
                )
            }
            Err(error) => Err(self.runtime.trapped(script, error, deadline)),
        };
        self.codec.release();
        result
    }
}

impl Script {
    fn caps(&self) -> OutputCaps {
        let limits = &self.inner.limits;
        OutputCaps {
            bytes: limits.output_bytes(),
            count: limits.max_outputs,
            fields: limits.max_fields,
        }
    }

    /// The script does not encode commands.
    fn not_supported(&self) -> ScriptError {
        ScriptError::NotSupported {
            script: self.inner.id.clone(),
        }
    }

    /// The script's own refusal of a message.
    fn rejected(&self, code: String, message: String) -> ScriptError {
        ScriptError::Rejected {
            script: self.inner.id.clone(),
            code,
            message,
        }
    }

    /// An answer the host refuses.
    fn violation(&self, violation: OutputViolation) -> ScriptError {
        let script = self.inner.id.clone();
        match violation {
            OutputViolation::Bad { index, reason } => ScriptError::BadOutput {
                script,
                index,
                reason,
            },
            OutputViolation::TooLarge { size, count } => {
                let caps = self.caps();
                ScriptError::OutputTooLarge {
                    script,
                    size,
                    count,
                    limit: caps.bytes,
                    max_count: caps.count,
                }
            }
        }
    }

    /// Every timestamp must lie within the product's window around
    /// `received_at`.
    fn check_timestamps(
        &self,
        outputs: Vec<Output>,
        received_at: i64,
    ) -> Result<Vec<Output>, ScriptError> {
        let limits = &self.inner.limits;
        let earliest = received_at.saturating_sub(millis(limits.timestamp_past));
        let latest = received_at.saturating_add(millis(limits.timestamp_future));
        for (index, output) in outputs.iter().enumerate() {
            if let Some(timestamp) = output.timestamp
                && !(earliest..=latest).contains(&timestamp)
            {
                return Err(ScriptError::BadTimestamp {
                    script: self.inner.id.clone(),
                    index,
                    timestamp,
                    received_at,
                    past: humantime::format_duration(limits.timestamp_past).to_string(),
                    future: humantime::format_duration(limits.timestamp_future).to_string(),
                });
            }
        }
        Ok(outputs)
    }
}

impl Runtime {
    /// The live instance, armed with `deadline` and a fresh log budget.
    fn begin_call(
        &mut self,
        script: &Script,
        deadline: Duration,
    ) -> Result<&mut Live, ScriptError> {
        let ticks = script.inner.engine.ticks(deadline);
        let log_lines = script.inner.limits.log_lines;
        let live = self.live(script)?;
        live.store.set_epoch_deadline(ticks);
        live.store.data_mut().log.begin(log_lines);
        Ok(live)
    }

    /// Turns a trap into its typed error and drops the poisoned instance.
    fn trapped(
        &mut self,
        script: &Script,
        error: wasmtime::Error,
        deadline: Duration,
    ) -> ScriptError {
        let panic = self
            .live
            .as_mut()
            .and_then(|l| l.store.data_mut().log.last_error.take());
        self.discard();
        classify_trap(script.inner.id.clone(), error, deadline, panic)
    }

    fn take_state(&mut self) -> DeviceState {
        if let Some(live) = self.live.take() {
            let mut host = live.store.into_data();
            host.state.rollback();
            return host.state;
        }
        self.parked.take().unwrap_or_default()
    }

    fn discard(&mut self) {
        let state = self.take_state();
        self.parked = Some(state);
    }

    /// The live instance, starting one when there is none.
    fn live(&mut self, script: &Script) -> Result<&mut Live, ScriptError> {
        if self.live.is_none() {
            self.live = Some(start(script, &mut self.parked)?);
        }
        Ok(self.live.as_mut().expect("an instance was just started"))
    }
}

/// Starts an instance with the `parked` per-device state; on failure the
/// state is parked again.
fn start(script: &Script, parked: &mut Option<DeviceState>) -> Result<Live, ScriptError> {
    let inner = &script.inner;
    let state = parked.take().unwrap_or_default();
    let host = HostState::new(
        inner.id.clone(),
        inner.params.clone(),
        &inner.limits,
        state,
        inner.stats.clone(),
    );
    let mut store = Store::new(inner.engine.wasmtime(), host);
    store.limiter(|host| &mut host.limiter);
    store.set_epoch_deadline(inner.engine.ticks(inner.limits.deadline));
    inner.stats.instantiations.fetch_add(1, Ordering::Relaxed);
    let instance = match inner.pre.instantiate(&mut store) {
        Ok(instance) => instance,
        Err(error) => {
            let reason = match error.downcast_ref::<MemoryExceeded>() {
                Some(m) => format!(
                    "its initial memory of {} bytes is over the limit of {} bytes",
                    m.requested, m.limit
                ),
                None => format!("{error:#}"),
            };
            *parked = Some(store.into_data().state);
            return Err(ScriptError::Instantiate {
                script: inner.id.clone(),
                reason,
            });
        }
    };
    let export = |store: &mut Store<HostState>, name: &str| -> Result<Func, String> {
        instance
            .get_func(&mut *store, name)
            .ok_or_else(|| format!("it does not export `{name}`"))
    };
    let checked = (|| {
        let parse = export(&mut store, "parse")?;
        parse
            .typed::<ParseParams<'_>, ParseResults>(&store)
            .map_err(|e| format!("its `parse` has the wrong type ({REBUILD}): {e:#}"))?;
        let parse_batch = export(&mut store, "parse-batch")?;
        parse_batch
            .typed::<BatchParams<'_>, BatchResults>(&store)
            .map_err(|e| format!("its `parse-batch` has the wrong type ({REBUILD}): {e:#}"))?;
        let encode = instance.get_func(&mut store, "encode");
        if let Some(encode) = encode {
            encode
                .typed::<ParseParams<'_>, ParseResults>(&store)
                .map_err(|e| format!("its `encode` has the wrong type: {e:#}"))?;
        }
        Ok::<_, String>((parse, parse_batch, encode))
    })();
    match checked {
        Ok((parse, parse_batch, encode)) => Ok(Live {
            store,
            parse,
            parse_batch,
            encode,
        }),
        Err(reason) => {
            *parked = Some(store.into_data().state);
            Err(ScriptError::Link {
                script: inner.id.clone(),
                reason,
            })
        }
    }
}

/// The code with which an `encode` says the script does not encode
/// commands (the Rust SDK's answer for a script that only parses).
const NOT_SUPPORTED: &str = "not-supported";

/// What to do about a script built for another version of the world.
pub(crate) const REBUILD: &str = "this sluice speaks sluice:script@0.2.1; a script built with an \
    older SDK must be rebuilt with the current one (sluice-guest 0.2 for Rust, sluice-script 0.2 \
    for AssemblyScript)";

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Names the limit or fault behind a failed call.
fn classify_trap(
    script: ScriptId,
    error: wasmtime::Error,
    deadline: Duration,
    panic: Option<String>,
) -> ScriptError {
    if let Some(m) = error.downcast_ref::<MemoryExceeded>() {
        return ScriptError::MemoryExceeded {
            script,
            current: m.current,
            requested: m.requested,
            limit: m.limit,
        };
    }
    if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return ScriptError::Timeout {
            script,
            limit: deadline,
        };
    }
    let trap = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{:#}", error.root_cause()),
    };
    let backtrace = error
        .downcast_ref::<WasmBacktrace>()
        .map(summarise_backtrace)
        .unwrap_or_default();
    ScriptError::Trap {
        script,
        trap,
        panic: panic.map(|p| p.replace('\n', " ")),
        backtrace,
    }
}

/// The innermost frames of a guest backtrace, innermost first.
fn summarise_backtrace(backtrace: &WasmBacktrace) -> String {
    const FRAMES: usize = 8;
    let frames = backtrace.frames();
    let mut text: Vec<String> = frames
        .iter()
        .take(FRAMES)
        .map(|frame| {
            let function = frame.func_name().map_or_else(
                || format!("function #{}", frame.func_index()),
                |name| name.to_owned(),
            );
            format!("{}!{function}", frame.module().name().unwrap_or("<module>"))
        })
        .collect();
    if frames.len() > FRAMES {
        text.push(format!("… {} more", frames.len() - FRAMES));
    }
    text.join(" <- ")
}
