//! The commands service: accepts a command for a device, has its
//! product's script encode it (on the worker that parses the device's
//! messages), sends or queues the downlinks, and follows the command to
//! its end: a device's reply, a timeout, an expiry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{broadcast, oneshot, watch};

use super::model::{Change, CommandError, CommandRecord, CommandState, Failure};
use super::store::{CommandStore, EVENTS};
use super::transport::{MqttDownlinks, TransportConfig};
use base64::Engine as _;

use crate::config::CommandsConfig;
use crate::deadletter::{DeadLetter, Reason};
use crate::message::now_ms;
use crate::pipeline::{Envelope, Inbound, Ingest, PipelineState, Reply};
use crate::script::{CommandCall, ScriptError};

/// The longest command name.
const MAX_NAME: usize = 64;
/// The largest params object, as JSON text.
const MAX_PARAMS: usize = 64 << 10;
/// How often deadlines are looked at.
const SWEEP: Duration = Duration::from_millis(100);
/// How often the set of devices with queued commands is read again (it
/// heals changes this instance missed).
const RESYNC: Duration = Duration::from_secs(30);
/// Devices whose network-server application this instance remembers from
/// their uplinks, at most.
const LEARNED_APPLICATIONS: usize = 100_000;

/// A command as a caller asks for it (HTTP body, `/ws` call args).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommandRequest {
    /// What to do, such as `set_setpoint`.
    pub name: String,
    /// Parameters for the script, a JSON object.
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    /// How long a two-way command waits for its reply once sent, in ms.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Done once sent; no reply is awaited.
    #[serde(default)]
    pub oneway: bool,
    /// Kept for the device while it is offline, and sent when it reports
    /// again or comes online.
    #[serde(default)]
    pub persistent: bool,
    /// How long a persistent command is kept for an offline device, in ms.
    #[serde(default)]
    pub expires_in_ms: Option<u64>,
}

/// Accepts, sends and tracks commands.
pub struct Commands {
    store: Arc<dyn CommandStore>,
    config: CommandsConfig,
    transports: BTreeMap<String, TransportConfig>,
    mqtt: Arc<MqttDownlinks>,
    /// A producer per product whose commands leave through Kafka.
    kafka: HashMap<String, rdkafka::producer::FutureProducer>,
    /// The way to the workers, until shutdown lets them drain.
    workers: Mutex<Option<Ingest>>,
    /// Callers waiting for a command to settle.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<CommandRecord>>>>,
    /// Devices with queued commands (as far as this instance knows; a
    /// device wrongly in it costs one empty look at its queue).
    queued: RwLock<HashSet<String>>,
    any_queued: AtomicBool,
    /// Every state change, for the `/ws` `commands` channel.
    updates: broadcast::Sender<Arc<CommandRecord>>,
    /// Where announced state changes are recorded first, if anywhere.
    history: Option<Arc<dyn crate::bus::Bus>>,
    /// Per product whose network server's application is not configured:
    /// how its uplink topics name it.
    learners: HashMap<String, fn(&str) -> Option<&str>>,
    /// Device → the application its last uplink named.
    applications: RwLock<HashMap<String, String>>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("transports", &self.transports)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Commands {
    /// The service over `store`, with each product's transport; fails
    /// when a Kafka producer cannot be made from its settings.
    pub fn new(
        store: Arc<dyn CommandStore>,
        config: CommandsConfig,
        transports: BTreeMap<String, TransportConfig>,
        mqtt: Arc<MqttDownlinks>,
    ) -> Result<Self, CommandError> {
        let mut kafka = HashMap::new();
        for (product, transport) in &transports {
            if let TransportConfig::Kafka {
                brokers, options, ..
            } = transport
            {
                let mut client = rdkafka::ClientConfig::new();
                client
                    .set("bootstrap.servers", brokers)
                    .set("message.timeout.ms", "10000");
                for (key, value) in options {
                    client.set(key, value);
                }
                let producer = client.create().map_err(|e| {
                    CommandError::Unavailable(format!(
                        "the Kafka producer of product {product:?}'s commands: {e}"
                    ))
                })?;
                kafka.insert(product.clone(), producer);
            }
        }
        let learners = transports
            .iter()
            .filter_map(|(product, t)| Some((product.clone(), t.learns_application()?)))
            .collect();
        Ok(Commands {
            learners,
            applications: RwLock::new(HashMap::new()),
            store,
            config,
            transports,
            mqtt,
            kafka,
            workers: Mutex::new(None),
            waiters: Mutex::new(HashMap::new()),
            queued: RwLock::new(HashSet::new()),
            any_queued: AtomicBool::new(false),
            updates: broadcast::channel(EVENTS).0,
            history: None,
        })
    }

    /// The same, recording every announced state change in its tenant's
    /// history on `bus` first, so it carries a position and a resuming
    /// client can have it again.
    pub fn with_history(mut self, bus: Arc<dyn crate::bus::Bus>) -> Self {
        self.history = Some(bus);
        self
    }

    /// A service in the process with the default settings and MQTT
    /// transport, for tests and tools.
    pub fn in_process() -> Self {
        let config = CommandsConfig::default();
        let store = Arc::new(super::store::MemoryCommands::new(config.keep));
        Self::new(store, config, BTreeMap::new(), Arc::default())
            .expect("no Kafka producer to make")
    }

    /// The downlinks of the `simulator` transport, for the device simulator.
    pub fn simulated_downlinks(
        &self,
    ) -> tokio::sync::mpsc::Receiver<super::transport::SimulatedDownlink> {
        self.mqtt.simulator()
    }

    /// Connects the service to the workers that run `encode`.
    pub fn attach(&self, workers: Ingest) {
        *lock(&self.workers) = Some(workers);
    }

    /// Lets go of the workers, so their queues close at shutdown; commands
    /// are refused from now on.
    pub fn detach(&self) {
        lock(&self.workers).take();
    }

    /// Every state change of every command from now on (of every tenant:
    /// receivers filter).
    pub fn updates(&self) -> broadcast::Receiver<Arc<CommandRecord>> {
        self.updates.subscribe()
    }

    /// Remembers the network-server application an uplink's topic names,
    /// for products configured without one. Cheap: called for every message.
    pub fn learn(&self, product: &str, device: &str, topic: &str) {
        if self.learners.is_empty() {
            return;
        }
        let Some(application) = self.learners.get(product).and_then(|learn| learn(topic)) else {
            return;
        };
        let known = self
            .applications
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(device)
            .is_some_and(|a| a == application);
        if known {
            return;
        }
        let mut applications = self
            .applications
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if applications.len() >= LEARNED_APPLICATIONS && !applications.contains_key(device) {
            metrics::counter!("sluice_command_applications_dropped_total").increment(1);
            return;
        }
        applications.insert(device.to_owned(), application.to_owned());
    }

    /// Whether `device` may have queued commands. Cheap: called for every
    /// message.
    pub fn has_queued(&self, device: &str) -> bool {
        self.any_queued.load(Ordering::Relaxed)
            && self
                .queued
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(device)
    }

    fn note_queued(&self, device: &str, queued: bool) {
        let mut set = self
            .queued
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if queued {
            set.insert(device.to_owned());
        } else {
            set.remove(device);
        }
        self.any_queued.store(!set.is_empty(), Ordering::Relaxed);
    }

    /// Accepts a command for `device` (already checked to be visible to
    /// the caller): encodes it, then sends it, or queues it when it is
    /// persistent and the device is offline. The record as accepted.
    pub async fn submit(
        &self,
        pipeline: &PipelineState,
        device: &str,
        mut request: CommandRequest,
    ) -> Result<CommandRecord, CommandError> {
        let params = request
            .params
            .take()
            .unwrap_or_else(|| serde_json::json!({}));
        let params_text = params.to_string();
        self.check(&request, &params, params_text.len())?;
        let product = pipeline
            .product_of(device)
            .ok_or_else(|| CommandError::UnknownDevice(device.to_owned()))?;
        let tenant_id = pipeline.tenant_of(device);
        let now = now_ms();
        let id = hex::encode(rand::random::<[u8; 16]>());
        let call = CommandCall {
            id: id.clone(),
            device_id: device.to_owned(),
            product: product.clone(),
            name: request.name.clone(),
            params: params_text,
            issued_at: now,
        };
        let downlinks = match self.encode(call).await {
            Ok(downlinks) => downlinks,
            Err(error) => {
                let result = match &error {
                    CommandError::NotSupported { .. } => "not_supported",
                    _ => "encode_error",
                };
                metrics::counter!("sluice_commands_total", "product" => product.clone(), "result" => result).increment(1);
                if let CommandError::Encode { .. } = &error {
                    let command = serde_json::json!({"name": request.name, "params": params});
                    dead_letter_encode(
                        pipeline, &error, device, &product, &tenant_id, &command, now,
                    )
                    .await;
                }
                return Err(error);
            }
        };
        let offline = pipeline.status.get(device).is_some_and(|s| !s.online);
        let queue = request.persistent && offline;
        let timeout_ms = request
            .timeout_ms
            .unwrap_or_else(|| millis(self.config.timeout));
        let expires_in = request
            .expires_in_ms
            .unwrap_or_else(|| millis(self.config.expiry));
        let record = CommandRecord {
            id,
            tenant_id,
            device_id: device.to_owned(),
            product,
            name: request.name,
            params,
            state: if queue {
                CommandState::Queued
            } else {
                CommandState::Sent
            },
            oneway: request.oneway,
            persistent: request.persistent,
            created_at: now,
            updated_at: now,
            timeout_ms,
            expires_at: if queue {
                now.saturating_add(i64::try_from(expires_in).unwrap_or(i64::MAX))
            } else {
                0
            },
            reply: None,
            error: None,
            failure: None,
            downlinks,
            position: None,
        };
        // Kept before it is sent: a quick device's reply finds it.
        self.store.insert(&record, self.config.queue).await?;
        if queue {
            metrics::gauge!("sluice_commands_queued").increment(1.0);
            self.announce(&record).await;
            return Ok(record);
        }
        Ok(self.send(record).await)
    }

    fn check(
        &self,
        request: &CommandRequest,
        params: &serde_json::Value,
        params_len: usize,
    ) -> Result<(), CommandError> {
        let invalid = |why: String| Err(CommandError::Invalid(why));
        if request.name.is_empty() || request.name.len() > MAX_NAME {
            return invalid(format!(
                "`name` must have 1 to {MAX_NAME} bytes, this one has {}",
                request.name.len()
            ));
        }
        if !params.is_object() {
            return invalid("`params` must be a JSON object".into());
        }
        if params_len > MAX_PARAMS {
            return invalid(format!("`params` is larger than {MAX_PARAMS} bytes"));
        }
        if let Some(timeout) = request.timeout_ms
            && !(1..=millis(self.config.max_timeout)).contains(&timeout)
        {
            return invalid(format!(
                "`timeout_ms` {timeout} is not within 1 to {} (commands.max_timeout)",
                millis(self.config.max_timeout)
            ));
        }
        if let Some(expiry) = request.expires_in_ms
            && !(1..=millis(self.config.max_expiry)).contains(&expiry)
        {
            return invalid(format!(
                "`expires_in_ms` {expiry} is not within 1 to {} (commands.max_expiry)",
                millis(self.config.max_expiry)
            ));
        }
        Ok(())
    }

    /// Has the device's worker run the product's `encode`.
    async fn encode(
        &self,
        call: CommandCall,
    ) -> Result<Vec<crate::script::Downlink>, CommandError> {
        // Cloned out, so no lock is held across the await.
        let workers = lock(&self.workers).clone().ok_or(CommandError::Closed)?;
        let (answer, answered) = oneshot::channel();
        let product = call.product.clone();
        workers
            .submit(Envelope::new(Inbound::Encode { call, answer }))
            .await
            .map_err(|_| CommandError::Closed)?;
        match answered.await.map_err(|_| CommandError::Closed)? {
            Ok(downlinks) => Ok(downlinks),
            Err(ScriptError::NotSupported { .. }) => Err(CommandError::NotSupported { product }),
            Err(ScriptError::Rejected { code, message, .. }) => {
                Err(CommandError::Encode { code, message })
            }
            Err(error) => Err(CommandError::Encode {
                code: error.kind().to_owned(),
                message: error.to_string(),
            }),
        }
    }

    /// Publishes a kept `sent` command's downlinks; on failure it becomes
    /// `failed`. The record as it is now.
    async fn send(&self, record: CommandRecord) -> CommandRecord {
        let transport = self
            .transports
            .get(&record.product)
            .cloned()
            .unwrap_or_default();
        let learned = self
            .applications
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&record.device_id)
            .cloned();
        let mut failure = None;
        for downlink in &record.downlinks {
            let published = match transport.publish_of(&record, downlink, learned.as_deref()) {
                Ok(message) => self.deliver(&transport, &record, message).await,
                Err(why) => Err(why),
            };
            if let Err(why) = published {
                failure = Some(format!("the downlink was not sent: {why}"));
                break;
            }
        }
        metrics::counter!("sluice_command_downlinks_total", "product" => record.product.clone())
            .increment(record.downlinks.len() as u64);
        if let Some(error) = failure {
            let change = Change {
                state: CommandState::Failed,
                reply: None,
                error: Some(error),
                failure: Some(Failure::Send),
                at: now_ms(),
            };
            if let Ok(Some(failed)) = self
                .store
                .transition(&record.id, &[CommandState::Sent], None, &change)
                .await
            {
                self.finished(&failed, "send_failed");
                self.announce(&failed).await;
                return failed;
            }
            return record;
        }
        if record.oneway {
            self.finished(&record, "sent");
        }
        self.announce(&record).await;
        record
    }

    /// Hands one downlink to the product's transport.
    async fn deliver(
        &self,
        transport: &TransportConfig,
        record: &CommandRecord,
        message: super::transport::Outgoing,
    ) -> Result<(), String> {
        match transport {
            TransportConfig::Simulator => self.mqtt.simulate(message.topic, message.payload),
            TransportConfig::Kafka { .. } => {
                let producer = self
                    .kafka
                    .get(&record.product)
                    .ok_or_else(|| "no Kafka producer for this product".to_owned())?;
                let sent = producer
                    .send(
                        rdkafka::producer::FutureRecord::to(&message.topic)
                            .key(&record.device_id)
                            .payload(&message.payload),
                        Duration::from_secs(5),
                    )
                    .await;
                sent.map(drop).map_err(|(error, _)| error.to_string())
            }
            _ => self.mqtt.publish(message).await,
        }
    }

    /// Completes a command with a device's reply. A reply for a command
    /// that is not waiting (unknown, already done, timed out, or for
    /// another device) changes nothing.
    pub async fn complete(&self, reply: &Reply) -> Result<(), CommandError> {
        let fields = serde_json::to_value(&reply.fields).unwrap_or_default();
        let change = Change {
            state: if reply.ok {
                CommandState::Replied
            } else {
                CommandState::Failed
            },
            reply: Some(fields),
            error: (!reply.ok).then(|| {
                if reply.error.is_empty() {
                    "the device answered that it failed".to_owned()
                } else {
                    format!("the device answered: {}", reply.error)
                }
            }),
            failure: (!reply.ok).then_some(Failure::Device),
            at: now_ms(),
        };
        let done = self
            .store
            .transition(
                &reply.command_id,
                &[CommandState::Sent],
                Some(&reply.device_id),
                &change,
            )
            .await?;
        match done {
            Some(record) => {
                self.finished(&record, if reply.ok { "replied" } else { "failed" });
                self.announce(&record).await;
            }
            None => {
                metrics::counter!("sluice_command_replies_ignored_total").increment(1);
                tracing::debug!(device = %reply.device_id, command = %reply.command_id, "a reply for no waiting command of the device");
            }
        }
        Ok(())
    }

    /// Sends the commands queued for `device` (it reported or came online).
    pub async fn deliver_queued(&self, device: &str) -> Result<(), CommandError> {
        let ids = self.store.take_queue(device).await?;
        self.note_queued(device, false);
        for id in ids {
            let change = Change {
                state: CommandState::Sent,
                reply: None,
                error: None,
                failure: None,
                at: now_ms(),
            };
            if let Some(record) = self
                .store
                .transition(&id, &[CommandState::Queued], Some(device), &change)
                .await?
            {
                metrics::gauge!("sluice_commands_queued").decrement(1.0);
                self.send(record).await;
            }
        }
        Ok(())
    }

    /// The command `id`.
    pub async fn get(&self, id: &str) -> Result<Option<CommandRecord>, CommandError> {
        self.store.get(id).await
    }

    /// The command `id` once it settles (final, or handed off), or as it
    /// is when `limit` passes.
    pub async fn wait(&self, id: &str, limit: Duration) -> Result<CommandRecord, CommandError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters)
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        // Registered before looking, so a change in between is not missed.
        let now = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| CommandError::UnknownCommand(id.to_owned()))?;
        if now.settled() {
            return Ok(now);
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(record)) => Ok(record),
            _ => {
                lock(&self.waiters).remove(id);
                Ok(self.store.get(id).await?.unwrap_or(now))
            }
        }
    }

    async fn announce(&self, record: &CommandRecord) {
        let mut announced = record.clone();
        if let Some(bus) = &self.history {
            let change = crate::bus::Publication::Command(Box::new(record.clone()));
            match bus.record_history(&change).await {
                Ok(position) => announced.position = Some(position),
                Err(error) => {
                    tracing::warn!(command = %record.id, %error, "a command's state change was not recorded in history; announced without a position");
                }
            }
        }
        if let Err(error) = self.store.announce(&announced).await {
            // The record is right; listeners elsewhere learn at their next look.
            tracing::warn!(command = %record.id, %error, "a command's state change was not announced");
        }
    }

    /// Counts a command that reached `result` on this instance.
    fn finished(&self, record: &CommandRecord, result: &'static str) {
        metrics::counter!("sluice_commands_total", "product" => record.product.clone(), "result" => result).increment(1);
        if result == "replied" {
            let took = record.updated_at.saturating_sub(record.created_at).max(0) as f64 / 1000.0;
            metrics::histogram!("sluice_command_reply_seconds", "product" => record.product.clone())
                .record(took);
        }
    }

    /// Applies a state change announced by any instance: wakes waiters,
    /// keeps the queued-devices set, tells dashboards.
    fn observe(&self, record: Arc<CommandRecord>) {
        if record.state == CommandState::Queued {
            self.note_queued(&record.device_id, true);
        }
        if record.settled()
            && let Some(waiters) = lock(&self.waiters).remove(&record.id)
        {
            for waiter in waiters {
                let _ = waiter.send((*record).clone());
            }
        }
        let _ = self.updates.send(record);
    }

    /// Follows state changes and deadlines until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut events = self.store.events();
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(record) => self.observe(record),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "command state changes were missed; waiting callers learn at their deadline");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = sweep.tick() => {
                    if let Err(error) = self.expire().await {
                        tracing::warn!(%error, "command deadlines not looked at");
                    }
                }
                _ = resync.tick() => match self.store.queued_devices().await {
                    Ok(devices) => {
                        let mut set = self.queued.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                        *set = devices.into_iter().collect();
                        self.any_queued.store(!set.is_empty(), Ordering::Relaxed);
                    }
                    Err(error) => tracing::warn!(%error, "devices with queued commands not read"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Fails commands whose reply is late and expires queued ones past
    /// their expiry.
    async fn expire(&self) -> Result<(), CommandError> {
        let now = now_ms();
        for id in self.store.due(now).await? {
            let Some(record) = self.store.get(&id).await? else {
                continue;
            };
            let (state, error, result) = match record.state {
                CommandState::Sent => (
                    CommandState::Failed,
                    format!("timed out: no reply within {} ms", record.timeout_ms),
                    "timed_out",
                ),
                CommandState::Queued => (
                    CommandState::Expired,
                    "expired: the device did not report before the command's expiry".to_owned(),
                    "expired",
                ),
                _ => continue,
            };
            let change = Change {
                state,
                reply: None,
                error: Some(error),
                failure: (state == CommandState::Failed).then_some(Failure::TimedOut),
                at: now,
            };
            if let Some(done) = self
                .store
                .transition(&id, &[record.state], None, &change)
                .await?
            {
                if record.state == CommandState::Queued {
                    metrics::gauge!("sluice_commands_queued").decrement(1.0);
                }
                self.finished(&done, result);
                self.announce(&done).await;
            }
        }
        Ok(())
    }
}

/// Keeps a command the script refused (or failed on) as a dead letter with
/// reason `encode_error`; its payload is the command as JSON.
async fn dead_letter_encode(
    pipeline: &PipelineState,
    error: &CommandError,
    device: &str,
    product: &str,
    tenant_id: &str,
    command: &serde_json::Value,
    at: i64,
) {
    let text = command.to_string();
    let letter = DeadLetter {
        at,
        reason: Reason::EncodeError,
        error: error.to_string(),
        source: "command".into(),
        topic: String::new(),
        product: product.to_owned(),
        device_id: device.to_owned(),
        tenant_id: tenant_id.to_owned(),
        script_version: pipeline
            .scripts
            .get(product)
            .and_then(|entry| entry.script.as_ref().map(|s| s.id().version.clone()))
            .unwrap_or_default(),
        payload_base64: base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
        payload_size: text.len(),
        received_at: at,
    };
    metrics::counter!("sluice_deadletters_total", "reason" => "encode_error").increment(1);
    if let Err(e) = pipeline.bus.add_dead_letters(&[letter]).await {
        tracing::warn!(error = %e, "a command's encode failure was not dead-lettered");
    }
}
