//! Starting and stopping a sluice process: configuration → script engine
//! → products → bus → workers → sources and HTTP, and an orderly stop that
//! drains what was taken in, ends every WebSocket with 1001 and gives back
//! this instance's watcher counts, all within the drain timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bus::{
    Bus, BusError, Interest, MemoryBus, Publication, RedisBus, RedisTarget, TransitionFeed,
    mirror_interest,
};
use crate::commands::{CommandStore, Commands, MemoryCommands, MqttDownlinks, RedisCommands};
use crate::config::{Config, ConfigError, LoadedConfig};
use crate::devices::DeviceRegistry;
use crate::gateway::auth::Authenticator;
use crate::gateway::hub::Hub;
use crate::gateway::socket::Connections;
use crate::gateway::{AppState, WsContext, app};
use crate::latest::LatestStore;
use crate::pipeline::{
    Effect, Envelope, Ingest, PipelineState, SeenDevices, SharedDeadlines, apply_effects,
    follow_table, follow_transitions, run_status_timers, run_write_behind, spawn_worker,
};
use crate::records::{RecordsError, RecordsOutput};
use crate::route::Router;
use crate::script::reload::spawn_reloader;
use crate::script::{EngineError, ScriptEngine, ScriptRegistry};
use crate::source::{KafkaSourceError, SourceHealth, kafka_consumer, run_kafka, run_mqtt};
use crate::status::StatusBoard;
use crate::supervisor::Supervisor;

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
    #[error("cannot reach the bus")]
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
    hub: Arc<Hub>,
    connections: Arc<Connections>,
    intake_stop: watch::Sender<bool>,
    timers_stop: watch::Sender<bool>,
    sessions_stop: watch::Sender<bool>,
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

/// The bus, the hub that feeds local WebSockets from it, and what only
/// one of the two kinds has.
struct Buses {
    bus: Arc<dyn Bus>,
    hub: Arc<Hub>,
    memory: Option<Arc<MemoryBus>>,
    redis: Option<RedisTarget>,
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
    let scripts = load_scripts(&engine, &config).await?;
    let registry = match &config.registry.file {
        Some(file) => DeviceRegistry::load(file)?,
        None => DeviceRegistry::default(),
    };
    let worker_count = config.workers.effective_count();
    let records = RecordsOutput::new(&config.records)?.map(Arc::new);
    let tasks = Supervisor::new();
    let interest = Arc::new(Interest::new());
    let (timers_stop, timers_rx) = watch::channel(false);
    let buses = connect_bus(&config, &interest, &tasks, &timers_rx).await?;
    let mqtt_downlinks = Arc::new(MqttDownlinks::default());
    let commands = start_commands(&config, &buses, &mqtt_downlinks, &tasks, &timers_rx).await?;
    let shared = buses.bus.shares_deadlines();
    let state = Arc::new(PipelineState {
        registry: ArcSwap::from_pointee(registry),
        scripts: scripts.clone(),
        status: StatusBoard::new(worker_count, config.status.tick),
        latest: LatestStore::new(worker_count, shared),
        interest,
        bus: buses.bus.clone(),
        deadlines: shared.then(|| SharedDeadlines::new(worker_count)),
        records: records.is_some(),
        seen: SeenDevices::new(worker_count, config.registry.max_unregistered),
        tasks: tasks.clone(),
        commands: commands.clone(),
    });
    // With a shared table, start from it and follow it from the position
    // it had before it was read, so no change in between is missed.
    let feed = match &buses.redis {
        Some(target) => {
            let feed = TransitionFeed::open(&target.client(), Duration::from_secs(2)).await?;
            let devices = follow_table(&state).await?;
            if devices > 0 {
                tracing::info!(devices, "status restored from the bus");
            }
            Some(feed)
        }
        None => None,
    };

    let (effects_tx, effects) = start_effects(&tasks, &buses.bus, &records, &commands, &timers_rx);
    let (ingest, workers) = start_workers(&config, &state, &effects_tx, worker_count)?;
    commands.attach(ingest.clone());
    let mut timers = start_timers(
        &config,
        &state,
        &effects_tx,
        &buses,
        feed,
        &tasks,
        &timers_rx,
    );
    drop(effects_tx);

    let (intake_stop, intake_rx) = watch::channel(false);
    let router = Arc::new(
        Router::new(&config.routes, config.status.topic.as_deref()).map_err(RunError::Routes)?,
    );
    let (mut intake, health) = start_sources(
        &config,
        &router,
        &ingest,
        &mqtt_downlinks,
        &tasks,
        &intake_rx,
    )?;
    if config.scripts.watch {
        match spawn_reloader(
            engine.clone(),
            Arc::new(config.clone()),
            scripts,
            &tasks,
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
        let (file, state, stop) = (file.clone(), state.clone(), timers_rx.clone());
        let changes = Arc::new(registry_tx);
        timers.push(
            tasks.spawn("registry follower", timers_rx.clone(), move || {
                follow_registry(file.clone(), state.clone(), changes.clone(), stop.clone())
            }),
        );
    }
    let (sessions_stop, sessions_rx) = watch::channel(false);
    let connections = Arc::new(Connections::default());
    let app_state = AppState {
        pipeline: state.clone(),
        ingest: config.sources.http.enabled.then(|| ingest.clone()),
        http: config.sources.http.clone(),
        accept_unregistered: config.auth.as_ref().is_some_and(|a| a.accept_unregistered),
        metrics,
        ws: Arc::new(WsContext {
            hub: buses.hub.clone(),
            auth: Authenticator::new(config.auth.as_ref()),
            config: config.websocket.clone(),
            history: config.history.clone(),
            connections: connections.clone(),
            registry_changes,
            shutdown: sessions_rx,
        }),
        sources: health.clone(),
    };
    if let Some(metrics_addr) = config.server.metrics_listen {
        let metrics_listener = TcpListener::bind(metrics_addr).await?;
        tracing::info!(%metrics_addr, "serving /metrics without credentials on a loopback address");
        intake.push(serve_router(
            metrics_listener,
            crate::gateway::metrics_app(app_state.clone()),
            intake_rx.clone(),
        ));
    }
    intake.push(serve_router(listener, app(app_state), intake_rx.clone()));
    tracing::info!(
        %addr,
        bus = buses.bus.kind(),
        workers = worker_count,
        products = state.scripts.list().len(),
        devices = state.registry.load().len(),
        "sluice running"
    );
    Ok(Running {
        addr,
        state,
        memory_bus: buses.memory,
        hub: buses.hub,
        connections,
        intake_stop,
        timers_stop,
        sessions_stop,
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

/// Compiles every product's script off the async threads.
async fn load_scripts(
    engine: &ScriptEngine,
    config: &Config,
) -> Result<Arc<ScriptRegistry>, RunError> {
    let (engine, config) = (engine.clone(), config.clone());
    tokio::task::spawn_blocking(move || Arc::new(ScriptRegistry::load(&engine, &config)))
        .await
        .map_err(|e| RunError::Io(std::io::Error::other(e.to_string())))
}

/// Connects the configured bus and starts the hub (and, with Redis, the
/// interest mirror).
async fn connect_bus(
    config: &Config,
    interest: &Arc<Interest>,
    tasks: &Arc<Supervisor>,
    stop: &watch::Receiver<bool>,
) -> Result<Buses, RunError> {
    let Some(redis) = &config.bus.redis else {
        let bus = Arc::new(MemoryBus::new(
            config.deadletter.capacity,
            config.history.limits(),
        ));
        let hub = Hub::in_process(interest.clone(), bus.clone(), tasks, stop.clone());
        return Ok(Buses {
            bus: bus.clone(),
            hub,
            memory: Some(bus),
            redis: None,
        });
    };
    let stream = config
        .records
        .redis_stream
        .as_ref()
        .map(|s| (s.key.clone(), s.maxlen));
    let target = RedisTarget::connect(redis)
        .await
        .map_err(|e| BusError::Unavailable(e.to_string()))?;
    let bus = RedisBus::new(
        target.clone(),
        redis,
        config.deadletter.capacity,
        stream,
        config.history.limits(),
    );
    bus.ping().await?;
    {
        let (target, stop_rx) = (target.clone(), stop.clone());
        tasks.spawn("redis master", stop.clone(), move || {
            target.clone().follow_master(stop_rx.clone())
        });
    }
    {
        let (target, interest, resync, stop_rx) =
            (target.clone(), interest.clone(), redis.resync, stop.clone());
        tasks.spawn("interest mirror", stop.clone(), move || {
            mirror_interest(target.clone(), interest.clone(), resync, stop_rx.clone())
        });
    }
    let hub = Hub::with_redis(target.clone(), interest.clone(), tasks, stop.clone());
    Ok(Buses {
        bus: Arc::new(bus),
        hub,
        memory: None,
        redis: Some(target),
    })
}

/// The commands service on the bus's store (Redis, or the process), and
/// its supervised tasks: state changes and deadlines, and with Redis the
/// channel every instance announces changes on.
async fn start_commands(
    config: &Config,
    buses: &Buses,
    mqtt: &Arc<MqttDownlinks>,
    tasks: &Arc<Supervisor>,
    stop: &watch::Receiver<bool>,
) -> Result<Arc<Commands>, RunError> {
    let store: Arc<dyn CommandStore> = match &buses.redis {
        Some(target) => {
            let store = Arc::new(RedisCommands::new(target.clone(), config.commands.retain));
            let (follower, stop_rx) = (store.clone(), stop.clone());
            tasks.spawn("command channel", stop.clone(), move || {
                follower.clone().follow(stop_rx.clone())
            });
            store
        }
        None => Arc::new(MemoryCommands::new(config.commands.keep)),
    };
    let transports = config
        .products
        .iter()
        .filter_map(|(product, settings)| Some((product.clone(), settings.commands.clone()?)))
        .collect();
    let commands = Arc::new(
        Commands::new(store, config.commands.clone(), transports, mqtt.clone())
            .map_err(|e| RunError::Io(std::io::Error::other(e.to_string())))?
            .with_history(buses.bus.clone()),
    );
    let (service, stop_rx) = (commands.clone(), stop.clone());
    tasks.spawn("commands", stop.clone(), move || {
        service.clone().run(stop_rx.clone())
    });
    Ok(commands)
}

/// Starts the task that applies effects, supervised.
fn start_effects(
    tasks: &Arc<Supervisor>,
    bus: &Arc<dyn Bus>,
    records: &Option<Arc<RecordsOutput>>,
    commands: &Arc<Commands>,
    stop: &watch::Receiver<bool>,
) -> (mpsc::Sender<Effect>, JoinHandle<()>) {
    let (effects_tx, effects_rx) = mpsc::channel::<Effect>(EFFECTS_QUEUE);
    let queue = Arc::new(tokio::sync::Mutex::new(effects_rx));
    let (bus, records, commands) = (bus.clone(), records.clone(), commands.clone());
    // It ends when every sender is gone, not at a signal: what workers
    // hand over is applied first.
    let handle = tasks.spawn("effects", stop.clone(), move || {
        apply_effects(
            queue.clone(),
            bus.clone(),
            records.clone(),
            commands.clone(),
        )
    });
    (effects_tx, handle)
}

/// Starts one worker thread per shard and the way into their queues.
fn start_workers(
    config: &Config,
    state: &Arc<PipelineState>,
    effects: &mpsc::Sender<Effect>,
    count: usize,
) -> Result<(Ingest, Vec<std::thread::JoinHandle<()>>), RunError> {
    let mut queues = Vec::with_capacity(count);
    let mut workers = Vec::with_capacity(count);
    for index in 0..count {
        let (tx, rx) = mpsc::channel::<Envelope>(config.workers.queue);
        queues.push(tx);
        workers.push(spawn_worker(
            index,
            state.clone(),
            effects.clone(),
            rx,
            config.workers.batch,
        )?);
    }
    Ok((Ingest::new(queues, effects.clone()), workers))
}

/// Starts the status timers, the write-behind and, with a shared table,
/// the follower of every instance's status changes; all supervised.
fn start_timers(
    config: &Config,
    state: &Arc<PipelineState>,
    effects: &mpsc::Sender<Effect>,
    buses: &Buses,
    feed: Option<TransitionFeed>,
    tasks: &Arc<Supervisor>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut timers = Vec::new();
    let flush = config
        .bus
        .redis
        .as_ref()
        .map_or(Duration::from_millis(200), |r| r.flush);
    // A deadline is taken only once it is a flush old: by then every
    // refresh from before it has been written behind.
    let (tick, grace) = (config.status.tick, flush);
    {
        let (state, effects, stop_rx) = (state.clone(), effects.clone(), stop.clone());
        timers.push(tasks.spawn("status timers", stop.clone(), move || {
            run_status_timers(state.clone(), effects.clone(), tick, grace, stop_rx.clone())
        }));
    }
    if state.deadlines.is_some() {
        let (state, stop_rx) = (state.clone(), stop.clone());
        timers.push(tasks.spawn("write-behind", stop.clone(), move || {
            run_write_behind(state.clone(), flush, stop_rx.clone())
        }));
    }
    if let Some(target) = &buses.redis {
        let (state, effects, target, stop_rx) =
            (state.clone(), effects.clone(), target.clone(), stop.clone());
        // The first run takes the feed opened at start; a restart opens a new one.
        let feed = Arc::new(Mutex::new(feed));
        timers.push(tasks.spawn("status follower", stop.clone(), move || {
            let first = feed.lock().unwrap_or_else(|e| e.into_inner()).take();
            follow_transitions(
                state.clone(),
                effects.clone(),
                target.clone(),
                first,
                stop_rx.clone(),
            )
        }));
    }
    timers
}

/// Source tasks and the health of each source.
type Sources = (Vec<JoinHandle<()>>, Vec<(String, Arc<SourceHealth>)>);

/// Starts every MQTT and Kafka source, supervised.
fn start_sources(
    config: &Config,
    router: &Arc<Router>,
    ingest: &Ingest,
    downlinks: &Arc<MqttDownlinks>,
    tasks: &Arc<Supervisor>,
    stop: &watch::Receiver<bool>,
) -> Result<Sources, RunError> {
    let mut intake = Vec::new();
    let mut health = Vec::new();
    for (index, mqtt) in config.sources.mqtt.iter().enumerate() {
        // Commands leave through the first broker connection.
        let downlinks = (index == 0).then(|| downlinks.clone());
        let source_health = Arc::new(SourceHealth::default());
        health.push((format!("mqtt {}", mqtt.url), source_health.clone()));
        let (mqtt, router, ingest, stop_rx) =
            (mqtt.clone(), router.clone(), ingest.clone(), stop.clone());
        let drain = config.workers.drain_timeout;
        intake.push(tasks.spawn("mqtt source", stop.clone(), move || {
            run_mqtt(
                mqtt.clone(),
                router.clone(),
                ingest.clone(),
                source_health.clone(),
                downlinks.clone(),
                drain,
                stop_rx.clone(),
            )
        }));
    }
    for kafka in &config.sources.kafka {
        let consumer = Arc::new(kafka_consumer(kafka)?);
        let source_health = Arc::new(SourceHealth::default());
        health.push((format!("kafka {}", kafka.brokers), source_health.clone()));
        let (kafka, ingest, stop_rx) = (kafka.clone(), ingest.clone(), stop.clone());
        let drain = config.workers.drain_timeout;
        intake.push(tasks.spawn("kafka source", stop.clone(), move || {
            run_kafka(
                kafka.clone(),
                consumer.clone(),
                ingest.clone(),
                source_health.clone(),
                drain,
                stop_rx.clone(),
            )
        }));
    }
    Ok((intake, health))
}

/// Serves `router` on `listener` until `stop`.
fn serve_router(
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Small frames must leave at once: no Nagle delay on any connection.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        });
        if let Err(error) = server.await {
            tracing::error!(%error, "HTTP server failed");
        }
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
    changes: Arc<watch::Sender<u64>>,
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
                state.seen.forget_registered(&registry);
                state.registry.store(Arc::new(registry));
                changes.send_modify(|generation| *generation += 1);
            }
            Err(error) => {
                tracing::warn!(%error, "device registry not reloaded; keeping the previous one");
            }
        }
    }
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

    /// Stops in order, all within the drain timeout: sources stop reading
    /// (and acknowledge what was processed) while every WebSocket client
    /// is closed with 1001; the workers finish what they hold; timers
    /// write state behind; the last effects are applied; this instance's
    /// watcher counts are given back.
    pub async fn stop(self) {
        tracing::info!("sluice stopping: no new messages; draining");
        let deadline = Instant::now() + self.drain;
        let _ = self.intake_stop.send(true);
        let _ = self.sessions_stop.send(true);
        drop(self.ingest);
        // The commands service holds a way to the workers too.
        self.state.commands.detach();
        for task in self.intake {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        let workers = tokio::task::spawn_blocking(move || {
            for worker in self.workers {
                let _ = worker.join();
            }
        });
        if tokio::time::timeout_at(deadline, workers).await.is_err() {
            tracing::warn!(
                drain = ?self.drain,
                "workers did not drain in time; their queued messages stay unacknowledged"
            );
        }
        let _ = self.timers_stop.send(true);
        for task in self.timers {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        if tokio::time::timeout_at(deadline, self.effects)
            .await
            .is_err()
        {
            tracing::warn!("effects were still being applied at the drain timeout");
        }
        // WebSocket sessions give back their own counts as they end.
        while self.connections.open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout_at(deadline, self.hub.release_all()).await;
        if let Some(records) = &self.records {
            records.flush(deadline.saturating_duration_since(Instant::now()));
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
