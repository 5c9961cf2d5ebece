//! A script worker: an OS thread that owns one queue (one shard of the
//! devices), keeps one script instance per product, and turns each
//! message's outputs into latest values, status and effects.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::effects::{Effect, Reply};
use super::envelope::{Completion, Envelope, Inbound};
use super::state::PipelineState;
use crate::bus::{AlertRaised, EventReported, Publication, StatusChange, TelemetryReport};
use crate::deadletter::{DeadLetter, Reason};
use crate::message::{RawMessage, SourceKind, now_ms};
use crate::records::record_json;
use crate::script::{Limits, Output, OutputKind, ScriptError, ScriptInstance};
use crate::status::{StatusMode, Transition};
use crate::supervisor::panic_message;

/// One worker thread's state.
struct Worker {
    index: usize,
    state: Arc<PipelineState>,
    effects: mpsc::Sender<Effect>,
    instances: HashMap<String, ScriptInstance>,
    batch: usize,
    outbox: Vec<Effect>,
    /// Completions of the messages of the running batch.
    done: Vec<Completion>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Starts worker `index` on its own thread; it ends when its queue closes
/// and is empty.
pub fn spawn_worker(
    index: usize,
    state: Arc<PipelineState>,
    effects: mpsc::Sender<Effect>,
    queue: mpsc::Receiver<Envelope>,
    batch: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let worker = Worker {
        index,
        state,
        effects,
        instances: HashMap::new(),
        batch: batch.max(1),
        outbox: Vec::new(),
        done: Vec::new(),
    };
    std::thread::Builder::new()
        .name(format!("sluice-worker-{index}"))
        .spawn(move || worker.run(queue))
}

impl Worker {
    fn run(mut self, mut queue: mpsc::Receiver<Envelope>) {
        tracing::debug!(worker = self.index, "worker started");
        let mut envelopes = Vec::with_capacity(self.batch);
        while let Some(first) = queue.blocking_recv() {
            envelopes.push(first);
            while envelopes.len() < self.batch {
                match queue.try_recv() {
                    Ok(next) => envelopes.push(next),
                    Err(_) => break,
                }
            }
            metrics::counter!("sluice_worker_messages_total").increment(envelopes.len() as u64);
            // A panic in host code must not stop the shard: it is logged,
            // counted, and the worker goes on with fresh instances. The
            // batch's messages stay unacknowledged, so their sources
            // deliver them again.
            let processed =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.process(&mut envelopes)));
            if let Err(payload) = processed {
                self.state.tasks.panicked("worker", &panic_message(payload));
                envelopes.clear();
                self.outbox.clear();
                self.done.clear();
                self.instances.clear();
                continue;
            }
            if !self.flush_outbox() {
                break;
            }
        }
        tracing::debug!(worker = self.index, "worker stopped");
    }

    /// Hands this batch's effects over, then the acknowledgement of its
    /// messages; waits while the effects queue is full (backpressure).
    /// False if the effects task is gone.
    fn flush_outbox(&mut self) -> bool {
        if !self.done.is_empty() {
            let done = std::mem::take(&mut self.done);
            self.outbox.push(Effect::Acknowledge(done));
        }
        for effect in self.outbox.drain(..) {
            if self.effects.blocking_send(effect).is_err() {
                tracing::error!(worker = self.index, "effects task is gone; stopping worker");
                return false;
            }
        }
        true
    }

    /// Processes envelopes in order; consecutive messages of one product
    /// go to its script in one call.
    fn process(&mut self, envelopes: &mut Vec<Envelope>) {
        let mut run: Vec<RawMessage> = Vec::new();
        for envelope in envelopes.drain(..) {
            self.done.extend(envelope.done);
            match envelope.inbound {
                Inbound::Data(message) => {
                    if !self.state.admit(
                        &message.device_id,
                        &message.product,
                        message.received_at,
                        "",
                    ) {
                        self.refuse(&message);
                        continue;
                    }
                    if run
                        .last()
                        .is_some_and(|last| last.product != message.product)
                    {
                        self.process_run(&mut run);
                    }
                    run.push(message);
                }
                Inbound::Status {
                    device,
                    online,
                    source,
                } => {
                    self.process_run(&mut run);
                    self.signal(&device, online, source);
                    if online {
                        self.deliver_queued(&device);
                    }
                }
                Inbound::Encode { call, answer } => {
                    self.process_run(&mut run);
                    let result = match self.instance(&call.product) {
                        Ok(instance) => instance.encode(&call),
                        Err((_, reason)) => Err(ScriptError::Instantiate {
                            script: crate::script::ScriptId {
                                product: call.product.clone(),
                                version: String::new(),
                            },
                            reason,
                        }),
                    };
                    // A caller that gave up is not an error.
                    let _ = answer.send(result);
                }
            }
        }
        self.process_run(&mut run);
    }

    /// Asks for the device's queued commands to be sent, if it has any.
    fn deliver_queued(&mut self, device: &str) {
        if self.state.commands.has_queued(device) {
            self.outbox.push(Effect::DeliverQueued(device.to_owned()));
        }
    }

    /// Parses messages of one product and handles each result in order.
    fn process_run(&mut self, run: &mut Vec<RawMessage>) {
        if run.is_empty() {
            return;
        }
        let product = run[0].product.clone();
        let results = match self.instance(&product) {
            Ok(instance) if run.len() == 1 => vec![instance.parse(&run[0])],
            Ok(instance) => instance.parse_batch(run),
            Err((reason, error)) => {
                for message in run.iter() {
                    self.dead_letter(message, reason, error.clone(), "");
                    self.observe(message, None, &[]);
                }
                run.clear();
                return;
            }
        };
        let (version, limits) = match self.instances.get(&product) {
            Some(instance) => (
                instance.script().id().version.clone(),
                instance.script().limits().clone(),
            ),
            None => (String::new(), Limits::default()),
        };
        for (message, result) in run.drain(..).zip(results) {
            match result {
                Ok(outputs) => self.apply(&message, outputs, &version, &limits),
                Err(error) => self.failed(&message, &error, &version),
            }
        }
    }

    /// The instance of `product`'s current script, started or upgraded as needed.
    fn instance(&mut self, product: &str) -> Result<&mut ScriptInstance, (Reason, String)> {
        let Some(entry) = self.state.scripts.get(product) else {
            return Err((Reason::Unroutable, format!("unknown product {product:?}")));
        };
        let Some(script) = entry.script.clone() else {
            let why = entry
                .error
                .clone()
                .unwrap_or_else(|| "no script is loaded".into());
            return Err((
                Reason::NoScript,
                format!("product {product:?} has no script: {why}"),
            ));
        };
        match self.instances.get_mut(product) {
            Some(instance) => {
                if instance.script().id() != script.id() {
                    instance.upgrade(script);
                }
            }
            None => {
                let instance = script
                    .instantiate()
                    .map_err(|e| (Reason::of(&e), e.to_string()))?;
                self.instances.insert(product.to_owned(), instance);
            }
        }
        Ok(self
            .instances
            .get_mut(product)
            .expect("the instance was just ensured"))
    }

    /// A message of an unregistered device this instance has no room for.
    fn refuse(&mut self, message: &RawMessage) {
        self.dead_letter(
            message,
            Reason::DeviceLimit,
            format!(
                "device {:?} is not registered, and this instance already keeps track of {} unregistered devices (registry.max_unregistered)",
                message.device_id,
                self.state.seen.len()
            ),
            "",
        );
    }

    /// A message whose script failed: dead letter, and it still shows the
    /// device is alive.
    fn failed(&mut self, message: &RawMessage, error: &ScriptError, version: &str) {
        tracing::debug!(device = %message.device_id, product = %message.product, %error, "message dead-lettered");
        self.dead_letter(message, Reason::of(error), error.to_string(), version);
        self.observe(message, None, &[]);
    }

    fn dead_letter(&mut self, message: &RawMessage, reason: Reason, error: String, version: &str) {
        let mut letter = DeadLetter::of(message, reason, error, version);
        letter.tenant_id = self.state.tenant_of(&message.device_id);
        self.outbox.push(Effect::DeadLetter(letter));
    }

    /// Applies a script's outputs: latest values, publications for watched
    /// devices, records, and status for every device named. Outputs naming
    /// a device the reporting device may not write, or one this instance
    /// has no room to track, change nothing; the message is dead-lettered
    /// with them named.
    fn apply(
        &mut self,
        message: &RawMessage,
        outputs: Vec<Output>,
        version: &str,
        limits: &Limits,
    ) {
        // The reporting device's own explicit signal, and the other devices
        // the outputs named with theirs: the common case (outputs for the
        // reporting device only) allocates nothing here.
        let mut own: Option<bool> = None;
        let mut others: Vec<(String, Option<bool>)> = Vec::new();
        let mut foreign: Vec<String> = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let mut reporter_tenant: Option<String> = None;
        for output in outputs {
            let timestamp = output.timestamp.unwrap_or(message.received_at);
            let device: &str = output.device_id.as_deref().unwrap_or(&message.device_id);
            let is_own = device == message.device_id;
            if !is_own {
                if !self
                    .state
                    .may_write(&message.device_id, &message.product, device)
                {
                    if !foreign.iter().any(|d| d == device) {
                        foreign.push(device.to_owned());
                    }
                    continue;
                }
                let tenant =
                    reporter_tenant.get_or_insert_with(|| self.state.tenant_of(&message.device_id));
                if !self
                    .state
                    .admit(device, &message.product, message.received_at, tenant)
                {
                    if !refused.iter().any(|d| d == device) {
                        refused.push(device.to_owned());
                    }
                    continue;
                }
            }
            if self.state.records
                && let Some(record) = record_json(
                    message,
                    &output,
                    device,
                    &self.state.tenant_of(device),
                    version,
                )
            {
                self.outbox.push(Effect::Record(record));
            }
            let watched = self.state.interest.is_watched(device);
            let signal = if is_own {
                &mut own
            } else {
                let slot = match others.iter().position(|(d, _)| d == device) {
                    Some(slot) => slot,
                    None => {
                        others.push((device.to_owned(), None));
                        others.len() - 1
                    }
                };
                &mut others[slot].1
            };
            if let OutputKind::Status { online } = output.kind {
                *signal = Some(online);
            }
            let published = |state: &PipelineState| (state.tenant_of(device), device.to_owned());
            match output.kind {
                OutputKind::Telemetry { fields } => {
                    self.state.latest.merge_telemetry(
                        device,
                        &fields,
                        timestamp,
                        limits.snapshot_keys,
                    );
                    let (groups, member_of) = self.state.watched_groups(device);
                    if watched || !groups.is_empty() {
                        let (tenant_id, device_id) = published(&self.state);
                        let report = TelemetryReport {
                            tenant_id,
                            device_id,
                            timestamp,
                            data: fields,
                            groups: Vec::new(),
                        };
                        if !groups.is_empty() {
                            let member = Publication::Telemetry(TelemetryReport {
                                groups: member_of,
                                ..report.clone()
                            });
                            for group in groups {
                                self.outbox.push(Effect::GroupPublish {
                                    group,
                                    publication: member.clone(),
                                });
                            }
                        }
                        if watched {
                            self.outbox
                                .push(Effect::Publish(Publication::Telemetry(report)));
                        }
                    }
                }
                OutputKind::Attributes { fields } => {
                    self.state
                        .latest
                        .merge_attributes(device, &fields, limits.snapshot_keys)
                }
                OutputKind::Status { .. } => {}
                OutputKind::Event { name, fields } => {
                    let (tenant_id, device_id) = published(&self.state);
                    self.outbox.push(Effect::Discrete {
                        publication: Publication::Event(EventReported {
                            tenant_id,
                            device_id,
                            timestamp,
                            name,
                            data: fields,
                            position: None,
                        }),
                        watched,
                        groups: self.state.groups_of(device),
                    });
                }
                OutputKind::Alert {
                    severity,
                    title,
                    description,
                } => {
                    let (tenant_id, device_id) = published(&self.state);
                    self.outbox.push(Effect::Discrete {
                        publication: Publication::Alert(AlertRaised {
                            tenant_id,
                            device_id,
                            timestamp,
                            severity,
                            title,
                            description,
                            position: None,
                        }),
                        watched,
                        groups: self.state.groups_of(device),
                    });
                }
                OutputKind::Reply {
                    command_id,
                    ok,
                    error,
                    fields,
                } => self.outbox.push(Effect::Reply(Reply {
                    device_id: device.to_owned(),
                    command_id,
                    ok,
                    error,
                    fields,
                })),
            }
        }
        if !foreign.is_empty() {
            metrics::counter!("sluice_foreign_outputs_total").increment(foreign.len() as u64);
            self.dead_letter(
                message,
                Reason::ForeignDevice,
                format!(
                    "outputs for {foreign:?} were left out: {:?} may write only its declared children (registry `parent`), or devices of its tenant where the product has `children = \"same_tenant\"`",
                    message.device_id
                ),
                version,
            );
        }
        if !refused.is_empty() {
            self.dead_letter(
                message,
                Reason::DeviceLimit,
                format!(
                    "outputs for {refused:?} were left out: those devices are not registered, and this instance already keeps track of {} unregistered devices (registry.max_unregistered)",
                    self.state.seen.len()
                ),
                version,
            );
        }
        self.observe(message, own, &others);
        let commands = &self.state.commands;
        commands.learn(&message.product, &message.device_id, &message.topic);
        self.deliver_queued(&message.device_id);
    }

    /// Status bookkeeping for a message: its own device (with its explicit
    /// signal, if the script gave one) and every other device its outputs
    /// named (with theirs).
    fn observe(
        &mut self,
        message: &RawMessage,
        own: Option<bool>,
        others: &[(String, Option<bool>)],
    ) {
        self.observe_device(&message.device_id, &message.product, own);
        for (device, signal) in others {
            let product = self
                .state
                .product_of(device)
                .unwrap_or_else(|| message.product.clone());
            self.observe_device(device, &product, *signal);
        }
    }

    /// An explicit signal from the status topic.
    fn signal(&mut self, device: &str, online: bool, _source: SourceKind) {
        let product = self.state.product_of(device).unwrap_or_default();
        if !self.state.admit(device, &product, now_ms(), "") {
            metrics::counter!("sluice_status_signals_refused_total").increment(1);
            return;
        }
        self.observe_device(device, &product, Some(online));
    }

    fn observe_device(&mut self, device: &str, product: &str, signal: Option<bool>) {
        let mode = self.state.mode_of(device, product);
        if mode == StatusMode::Message && signal.is_none() {
            return;
        }
        let wall = now_ms();
        if let Some(deadlines) = &self.state.deadlines {
            deadlines.note(device, mode, signal == Some(false), wall);
        }
        if let Some(transition) =
            self.state
                .status
                .observe(device, mode, signal, Instant::now(), wall)
        {
            self.outbox.push(transition_effect(&self.state, transition));
        }
    }
}

/// The effect of a status transition.
pub fn transition_effect(state: &PipelineState, transition: Transition) -> Effect {
    let watched = state.interest.is_watched(&transition.device);
    let tenant_id = state.tenant_of(&transition.device);
    let groups = state.groups_of(&transition.device);
    Effect::Transition {
        change: StatusChange {
            device_name: state.name_of(&transition.device),
            device_id: transition.device,
            is_online: transition.online,
            timestamp: transition.at_ms,
            source: transition.source,
            tenant_id,
            position: None,
        },
        watched,
        groups,
    }
}
