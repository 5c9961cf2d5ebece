//! The shared script engine: compiles scripts once (through the on-disk
//! cache), links them against the host functions and a capability-free
//! WASI, and keeps the deadline clock ticking.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasData, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ProfilingStrategy,
};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::random::WasiRandom;

use super::bindings;
use super::cache::{ArtifactCache, CacheOutcome, default_cache_dir};
use super::component::{WasmKind, componentize, older_contract, wasm_kind};
use super::error::{ScriptError, ScriptId};
use super::host::{HostState, Params};
use super::instance::{REBUILD, Script};
use super::limits::Limits;

/// Settings of the engine shared by every script of a sluice process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// Keep compiled scripts on disk so a restart does not recompile.
    pub cache: bool,
    /// Where compiled scripts are kept; default `~/.cache/sluice/compiled`.
    /// It must be writable only by sluice's user (created `0700`).
    pub cache_dir: Option<PathBuf>,
    /// Pre-allocate instance slots: instantiation (after a trap or a reload)
    /// becomes a few microseconds instead of tens.
    pub pooling: bool,
    /// Instance slots in the pool; each worker holds one instance per
    /// product, two while a new version takes over.
    pub pool_instances: u32,
    /// Resolution of the per-call deadline clock.
    #[serde(with = "humantime_serde")]
    pub deadline_tick: Duration,
    /// Write `/tmp/perf-<pid>.map` so `perf` can name the functions of
    /// compiled scripts (for profiling scripts; small cost at load time).
    pub perf_map: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache: true,
            cache_dir: None,
            pooling: false,
            pool_instances: 256,
            deadline_tick: Duration::from_millis(1),
            perf_map: false,
        }
    }
}

/// The engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused the configuration.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Config(String),
    /// No directory for the compiled-script cache is configured or known.
    #[error(
        "no directory for the compiled-script cache: set [scripts] cache_dir, --cache-dir or SLUICE_CACHE_DIR (or HOME), or cache = false"
    )]
    NoCacheDir,
    /// The compiled-script cache directory is unusable.
    #[error("cannot use the compiled-script cache {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// What a product's script gets besides its code.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScriptSettings {
    /// Per-call limits.
    pub limits: Limits,
    /// Product parameters, read by the script's `param`.
    pub params: Params,
}

/// Compiles and links scripts. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct ScriptEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Option<ArtifactCache>,
    deadline_tick: Duration,
}

impl std::fmt::Debug for ScriptEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptEngine")
            .field("cache", &self.inner.cache)
            .field("deadline_tick", &self.inner.deadline_tick)
            .finish_non_exhaustive()
    }
}

impl ScriptEngine {
    /// Sets up wasmtime, the linker and the deadline clock.
    pub fn new(options: &EngineOptions) -> Result<Self, EngineError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        if options.perf_map {
            config.profiler(ProfilingStrategy::PerfMap);
        }
        if options.pooling {
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(options.pool_instances)
                .total_memories(options.pool_instances.saturating_mul(2))
                .total_tables(options.pool_instances.saturating_mul(4))
                .total_core_instances(options.pool_instances.saturating_mul(8));
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config).map_err(|e| EngineError::Config(format!("{e:#}")))?;
        let linker = host_linker(&engine).map_err(|e| EngineError::Config(format!("{e:#}")))?;
        let cache = if options.cache {
            let dir = options
                .cache_dir
                .clone()
                .or_else(default_cache_dir)
                .ok_or(EngineError::NoCacheDir)?;
            Some(
                ArtifactCache::open(&dir, &engine)
                    .map_err(|source| EngineError::Cache { path: dir, source })?,
            )
        } else {
            None
        };
        start_deadline_clock(&engine, options.deadline_tick)
            .map_err(|e| EngineError::Config(format!("cannot start the deadline clock: {e}")))?;
        Ok(ScriptEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                cache,
                deadline_tick: options.deadline_tick,
            }),
        })
    }

    pub(crate) fn wasmtime(&self) -> &Engine {
        &self.inner.engine
    }

    /// How many deadline-clock ticks make up `deadline`, plus one for the
    /// tick already under way.
    pub(crate) fn ticks(&self, deadline: Duration) -> u64 {
        let tick = self.inner.deadline_tick.as_nanos().max(1);
        u64::try_from(deadline.as_nanos().div_ceil(tick))
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Loads `<path>` as the script of `product`.
    pub fn load_file(
        &self,
        product: &str,
        path: &Path,
        settings: ScriptSettings,
    ) -> Result<Script, ScriptError> {
        let wasm = std::fs::read(path).map_err(|source| ScriptError::Read {
            product: product.to_owned(),
            path: path.display().to_string(),
            source,
        })?;
        self.load(product, &wasm, settings)
    }

    /// Compiles (or loads from the cache), links and test-instantiates a
    /// script. The result is ready for [`Script::instantiate`] on any thread.
    pub fn load(
        &self,
        product: &str,
        wasm: &[u8],
        settings: ScriptSettings,
    ) -> Result<Script, ScriptError> {
        let started = Instant::now();
        let sha256 = hex::encode(Sha256::digest(wasm));
        let id = ScriptId {
            product: product.to_owned(),
            version: sha256[..12].to_owned(),
        };
        let component_bytes: Cow<'_, [u8]> = match wasm_kind(wasm) {
            Ok(WasmKind::Component) => Cow::Borrowed(wasm),
            Ok(WasmKind::CoreModule) => {
                componentize(wasm)
                    .map(Cow::Owned)
                    .map_err(|reason| ScriptError::Compile {
                        script: id.clone(),
                        reason,
                    })?
            }
            Err(reason) => return Err(ScriptError::Compile { script: id, reason }),
        };
        // The cache is keyed by what is compiled: a wrapped module's bytes
        // change with the contract, not only with the file.
        let cache_key = match &component_bytes {
            Cow::Borrowed(_) => sha256.clone(),
            Cow::Owned(bytes) => hex::encode(Sha256::digest(bytes)),
        };
        let compiled = match &self.inner.cache {
            Some(cache) => cache.load_or_compile(&self.inner.engine, &cache_key, &component_bytes),
            None => Component::new(&self.inner.engine, &component_bytes)
                .map(|c| (c, CacheOutcome::Compiled)),
        };
        let (component, cache) = compiled.map_err(|e| ScriptError::Compile {
            script: id.clone(),
            reason: format!("{e:#}"),
        })?;
        let component_type = component.component_type();
        let imports: Vec<&str> = component_type
            .imports(&self.inner.engine)
            .map(|(name, _)| name)
            .collect();
        if let Some(old) = older_contract(imports.into_iter()) {
            return Err(ScriptError::Link {
                script: id,
                reason: format!("it imports `{old}`: {REBUILD}"),
            });
        }
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| ScriptError::Link {
                script: id.clone(),
                reason: format!("{e:#}"),
            })?;
        let script = Script::new(
            self.clone(),
            id,
            pre,
            settings,
            LoadInfo {
                sha256,
                cache,
                loaded_at: SystemTime::now(),
                load_time: started.elapsed(),
            },
        );
        // A trial instance proves the exports have the right types and the
        // initial memory fits the limit, so a bad script fails here and not
        // on the first message.
        script.instantiate()?;
        Ok(script)
    }
}

/// How a script was loaded.
#[derive(Debug, Clone)]
pub struct LoadInfo {
    /// Full SHA-256 of the script file, hex.
    pub sha256: String,
    /// Whether it came from the compiled-script cache.
    pub cache: CacheOutcome,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// How long compiling (or loading) and linking took.
    pub load_time: Duration,
}

/// The host functions of the `sluice:script` world plus the parts of WASI
/// that a language's standard library needs to start: clocks, random, an
/// empty environment, discarded stdio and a filesystem without directories.
/// Sockets are not linked, so a script that imports them fails to load.
fn host_linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    use wasmtime_wasi::p2::bindings as wasi;

    struct HasIo;
    impl HasData for HasIo {
        type Data<'a> = &'a mut ResourceTable;
    }

    let mut linker = Linker::new(engine);
    let l = &mut linker;
    bindings::Script::add_to_linker::<HostState, HasSelf<HostState>>(l, |state| state)?;
    wasi::io::error::add_to_linker::<HostState, HasIo>(l, |t| t.ctx().table)?;
    wasi::sync::io::poll::add_to_linker::<HostState, HasIo>(l, |t| t.ctx().table)?;
    wasi::sync::io::streams::add_to_linker::<HostState, HasIo>(l, |t| t.ctx().table)?;
    wasi::clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    wasi::clocks::monotonic_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    wasi::random::random::add_to_linker::<HostState, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    wasi::random::insecure::add_to_linker::<HostState, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    wasi::random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |t| {
        t.ctx().ctx.random()
    })?;
    wasi::cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasi::filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(
        l,
        HostState::filesystem,
    )?;
    wasi::sync::filesystem::types::add_to_linker::<HostState, WasiFilesystem>(
        l,
        HostState::filesystem,
    )?;
    Ok(linker)
}

/// Advances the engine's epoch every `tick` until the engine is dropped.
fn start_deadline_clock(engine: &Engine, tick: Duration) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("sluice-deadline-clock".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(tick);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        let engine = ScriptEngine::new(&EngineOptions {
            cache: false,
            ..EngineOptions::default()
        })
        .unwrap();
        assert_eq!(engine.ticks(Duration::from_millis(50)), 51);
        assert_eq!(engine.ticks(Duration::from_micros(1500)), 3);
    }
}
