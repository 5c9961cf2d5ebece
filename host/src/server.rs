//! Starting and stopping a sluice process: configuration → script engine
//! → products → bus → workers → sources and HTTP, and an orderly stop that
//! drains what was taken in.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::bus::{Bus, BusError, Interest, MemoryBus, Publication, RedisBus, mirror_interest};
use crate::config::{ConfigError, LoadedConfig};
use crate::devices::DeviceRegistry;
use crate::gateway::auth::Authenticator;
use crate::gateway::hub::Hub;
use crate::gateway::{AppState, WsContext, app};
use crate::latest::LatestStore;
use crate::pipeline::{
    Effect, Envelope, Ingest, PipelineState, SeenDevices, SharedDeadlines, apply_effects,
    run_status_timers, run_write_behind, spawn_worker,
};
use crate::records::{RecordsError, RecordsOutput};
use crate::route::Router;
use crate::script::reload::spawn_reloader;
use crate::script::{EngineError, ScriptEngine, ScriptRegistry};
use crate::source::{KafkaSourceError, SourceHealth, kafka_consumer, run_kafka, run_mqtt};
use crate::status::StatusBoard;

/// Effects that may wait between workers and the bus.
const EFFECTS_QUEUE: usize = 16_384;

/// sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The script engine could not be set up.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The device registry is unusable.
    #[error(transparent)]
    Registry(#[from] ConfigError),
    /// The bus is unreachable.
    #[error("cannot reach the bus: {0}")]
    Bus(#[from] BusError),
    /// A Kafka source could not be created.
    #[error(transparent)]
    Kafka(#[from] KafkaSourceError),
    /// The records output could not be created.
    #[error(transparent)]
    Records(#[from] RecordsError),
    /// The routes are invalid.
    #[error("routes: {0}")]
    Routes(String),
    /// A public address without authentication.
    #[error(
        "refusing to listen on {0} without authentication: add an [auth] section (jwt_secret or api_keys), or listen on a loopback address"
    )]
    Unauthenticated(SocketAddr),
    /// A thread or the listener failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A started sluice process.
pub struct Running {
    addr: SocketAddr,
    state: Arc<PipelineState>,
    memory_bus: Option<Arc<MemoryBus>>,
    intake_stop: watch::Sender<bool>,
    timers_stop: watch::Sender<bool>,
    intake: Vec<JoinHandle<()>>,
    timers: Vec<JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    effects: JoinHandle<()>,
    records: Option<Arc<RecordsOutput>>,
    drain: Duration,
    health: Vec<(String, Arc<SourceHealth>)>,
    ingest: Ingest,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Starts sluice on `listener` and returns once everything runs.
pub async fn start(loaded: LoadedConfig, listener: TcpListener) -> Result<Running, RunError> {
    let config = loaded.config;
    let addr = listener.local_addr()?;
    if config.auth.is_none() && !addr.ip().is_loopback() {
        return Err(RunError::Unauthenticated(addr));
    }
    // Before any script registers its metrics.
    let metrics = crate::metrics::recorder();
    let engine = ScriptEngine::new(&config.scripts.engine)?;
    let scripts = {
        let (engine, config) = (engine.clone(), config.clone());
        tokio::task::spawn_blocking(move || Arc::new(ScriptRegistry::load(&engine, &config)))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    };
    let registry = match &config.registry.file {
        Some(file) => DeviceRegistry::load(file)?,
        None => DeviceRegistry::default(),
    };
    let worker_count = config.workers.effective_count();
    let records = RecordsOutput::new(&config.records)?.map(Arc::new);

    let interest = Arc::new(Interest::new());
    let (timers_stop, timers_rx) = watch::channel(false);
    let mut timers = Vec::new();
    let (bus, memory_bus, hub): (Arc<dyn Bus>, Option<Arc<MemoryBus>>, Arc<Hub>) =
        match &config.bus.redis {
            Some(redis) => {
                let stream = config
                    .records
                    .redis_stream
                    .as_ref()
                    .map(|s| (s.key.clone(), s.maxlen));
                let bus = RedisBus::connect(redis, config.deadletter.capacity, stream).await?;
                bus.ping().await?;
                timers.push(tokio::spawn(mirror_interest(
                    bus.client().clone(),
                    interest.clone(),
                    redis.resync,
                    timers_rx.clone(),
                )));
                let hub =
                    Hub::with_redis(bus.client().clone(), interest.clone(), timers_rx.clone())
                        .await?;
                (Arc::new(bus), None, hub)
            }
            None => {
                let bus = Arc::new(MemoryBus::new(config.deadletter.capacity));
                let hub = Hub::in_process(interest.clone(), bus.subscribe(), timers_rx.clone());
                (bus.clone(), Some(bus), hub)
            }
        };
    let shared = bus.shares_deadlines();
    let flush = config
        .bus
        .redis
        .as_ref()
        .map_or(Duration::from_millis(200), |r| r.flush);
    let state = Arc::new(PipelineState {
        registry: ArcSwap::from_pointee(registry),
        scripts: scripts.clone(),
        status: StatusBoard::new(worker_count, config.status.tick),
        latest: LatestStore::new(worker_count, shared),
        interest,
        bus: bus.clone(),
        deadlines: shared
            .then(|| SharedDeadlines::new(worker_count, config.status.tick.max(flush * 2))),
        records: records.is_some(),
        seen: SeenDevices::new(worker_count),
    });
    restore_status(&state).await?;

    let (effects_tx, effects_rx) = mpsc::channel::<Effect>(EFFECTS_QUEUE);
    let effects = tokio::spawn(apply_effects(effects_rx, bus.clone(), records.clone()));
    let mut queues = Vec::with_capacity(worker_count);
    let mut workers = Vec::with_capacity(worker_count);
    for index in 0..worker_count {
        let (tx, rx) = mpsc::channel::<Envelope>(config.workers.queue);
        queues.push(tx);
        workers.push(spawn_worker(
            index,
            state.clone(),
            effects_tx.clone(),
            rx,
            config.workers.batch,
        )?);
    }
    let ingest = Ingest::new(queues, effects_tx.clone());

    // Deadlines written behind must land before an expiry sweep may take them.
    let grace = flush * 2 + Duration::from_millis(500);
    timers.push(tokio::spawn(run_status_timers(
        state.clone(),
        effects_tx.clone(),
        config.status.tick,
        grace,
        timers_rx.clone(),
    )));
    if shared {
        timers.push(tokio::spawn(run_write_behind(
            state.clone(),
            flush,
            timers_rx.clone(),
        )));
    }
    drop(effects_tx);

    let (intake_stop, intake_rx) = watch::channel(false);
    let mut intake = Vec::new();
    let mut health = Vec::new();
    let router = Arc::new(
        Router::new(&config.routes, config.status.topic.as_deref()).map_err(RunError::Routes)?,
    );
    for mqtt in &config.sources.mqtt {
        let source_health = Arc::new(SourceHealth::default());
        health.push((format!("mqtt {}", mqtt.url), source_health.clone()));
        intake.push(tokio::spawn(run_mqtt(
            mqtt.clone(),
            router.clone(),
            ingest.clone(),
            source_health,
            intake_rx.clone(),
        )));
    }
    for kafka in &config.sources.kafka {
        let consumer = kafka_consumer(kafka)?;
        let source_health = Arc::new(SourceHealth::default());
        health.push((format!("kafka {}", kafka.brokers), source_health.clone()));
        intake.push(tokio::spawn(run_kafka(
            kafka.clone(),
            consumer,
            ingest.clone(),
            source_health,
            config.workers.drain_timeout,
            intake_rx.clone(),
        )));
    }
    if config.scripts.watch {
        match spawn_reloader(
            engine.clone(),
            Arc::new(config.clone()),
            scripts,
            timers_rx.clone(),
        ) {
            Ok(task) => timers.push(task),
            Err(error) => {
                tracing::error!(%error, dir = %config.scripts.dir.display(), "cannot watch the scripts directory; hot reload is off")
            }
        }
    }
    let (registry_tx, registry_changes) = watch::channel(0);
    if let Some(file) = &config.registry.file {
        timers.push(tokio::spawn(follow_registry(
            file.clone(),
            state.clone(),
            registry_tx,
            timers_rx.clone(),
        )));
    }
    let app_state = AppState {
        pipeline: state.clone(),
        ingest: config.sources.http.enabled.then(|| ingest.clone()),
        http: config.sources.http.clone(),
        metrics,
        ws: Arc::new(WsContext {
            hub,
            auth: Authenticator::new(config.auth.as_ref()),
            config: config.websocket.clone(),
            connections: Arc::default(),
            registry_changes,
        }),
        sources: health.clone(),
    };
    let mut http_stop = intake_rx.clone();
    intake.push(tokio::spawn(async move {
        // Small frames must leave at once: no Nagle delay on any connection.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, app(app_state)).with_graceful_shutdown(async move {
            let _ = http_stop.changed().await;
        });
        if let Err(error) = server.await {
            tracing::error!(%error, "HTTP server failed");
        }
    }));
    tracing::info!(
        %addr,
        bus = bus.kind(),
        workers = worker_count,
        products = state.scripts.list().len(),
        devices = state.registry.load().len(),
        "sluice running"
    );
    Ok(Running {
        addr,
        state,
        memory_bus,
        intake_stop,
        timers_stop,
        intake,
        timers,
        workers,
        effects,
        records,
        drain: config.workers.drain_timeout,
        health,
        ingest,
    })
}

/// How often the registry file is checked for changes.
const REGISTRY_POLL: Duration = Duration::from_secs(1);

/// Reloads the device registry when its file changes, and tells the
/// gateway, so filtered subscriptions follow. A file that does not load
/// leaves the registry as it was.
async fn follow_registry(
    file: std::path::PathBuf,
    state: Arc<PipelineState>,
    changes: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stamp = |file: &std::path::Path| {
        std::fs::metadata(file)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&file);
    let mut ticker = tokio::time::interval(REGISTRY_POLL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = stamp(&file);
        if now == last {
            continue;
        }
        last = now;
        match DeviceRegistry::load(&file) {
            Ok(registry) => {
                tracing::info!(devices = registry.len(), file = %file.display(), "device registry reloaded");
                state.registry.store(Arc::new(registry));
                changes.send_modify(|generation| *generation += 1);
            }
            Err(error) => {
                tracing::warn!(%error, "device registry not reloaded; keeping the previous one");
            }
        }
    }
}

/// Loads the shared status table so a restarted instance knows current status.
async fn restore_status(state: &PipelineState) -> Result<(), BusError> {
    let statuses = state.bus.load_status().await?;
    let now = tokio::time::Instant::now();
    for (device, status) in &statuses {
        let product = state.product_of(device).unwrap_or_default();
        state
            .status
            .restore(device, *status, state.mode_of(device, &product), now);
    }
    if !statuses.is_empty() {
        tracing::info!(devices = statuses.len(), "status restored from the bus");
    }
    Ok(())
}

impl Running {
    /// The address the HTTP server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shared state, for in-process inspection.
    pub fn state(&self) -> &Arc<PipelineState> {
        &self.state
    }

    /// Every publication from now on, with the in-process bus.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Arc<Publication>>> {
        self.memory_bus.as_ref().map(|bus| bus.subscribe())
    }

    /// A way into the pipeline for in-process sources (benchmarks,
    /// simulators). Drop every clone before [`Running::stop`], or the
    /// workers wait for them until the drain timeout.
    pub fn ingest(&self) -> Ingest {
        self.ingest.clone()
    }

    /// Sources and whether each is connected.
    pub fn sources(&self) -> Vec<(String, bool)> {
        self.health
            .iter()
            .map(|(name, h)| (name.clone(), h.is_connected()))
            .collect()
    }

    /// Stops taking messages, lets the workers finish what they hold (up to
    /// the drain timeout), writes state behind, and applies the last effects.
    pub async fn stop(self) {
        tracing::info!("sluice stopping: no new messages; draining");
        let _ = self.intake_stop.send(true);
        drop(self.ingest);
        for task in self.intake {
            let _ = tokio::time::timeout(self.drain, task).await;
        }
        let drain = self.drain;
        let workers = tokio::task::spawn_blocking(move || {
            for worker in self.workers {
                let _ = worker.join();
            }
        });
        if tokio::time::timeout(drain, workers).await.is_err() {
            tracing::warn!(
                ?drain,
                "workers did not drain in time; their queued messages are dropped"
            );
        }
        let _ = self.timers_stop.send(true);
        for task in self.timers {
            let _ = tokio::time::timeout(drain, task).await;
        }
        if tokio::time::timeout(drain, self.effects).await.is_err() {
            tracing::warn!("effects were still being applied at the drain timeout");
        }
        if let Some(records) = &self.records {
            records.flush(drain);
        }
        tracing::info!("sluice stopped");
    }
}

/// Runs sluice until `shutdown` completes, then stops it in order.
pub async fn run(
    loaded: LoadedConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let running = start(loaded, listener).await?;
    shutdown.await;
    running.stop().await;
    Ok(())
}
