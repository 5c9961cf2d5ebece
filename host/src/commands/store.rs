//! Where commands are kept: in the process with the in-process bus, in
//! Redis with the Redis bus (so any instance can complete a command
//! another one accepted). Both keep the same records, deadlines and
//! per-device queues, and tell every instance of each state change.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::model::{Change, CommandError, CommandRecord, CommandState};

/// How many state changes an instance's listeners may lag behind.
pub(crate) const EVENTS: usize = 4096;

/// The store of commands behind the service.
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Keeps a new command, with its deadline, and for a queued one its
    /// place at the end of its device's queue, unless that already holds
    /// `queue_limit` commands.
    async fn insert(&self, record: &CommandRecord, queue_limit: usize) -> Result<(), CommandError>;

    /// The command `id`.
    async fn get(&self, id: &str) -> Result<Option<CommandRecord>, CommandError>;

    /// Moves command `id` by `change` if its state is one of `from` and,
    /// with `device`, it is for that device; the changed record, or `None`
    /// when it is not (so exactly one of several instances trying wins).
    async fn transition(
        &self,
        id: &str,
        from: &[CommandState],
        device: Option<&str>,
        change: &Change,
    ) -> Result<Option<CommandRecord>, CommandError>;

    /// Takes every command queued for `device`, oldest first; a command is
    /// taken by one caller only.
    async fn take_queue(&self, device: &str) -> Result<Vec<String>, CommandError>;

    /// Commands whose deadline (a reply's timeout, a queued command's
    /// expiry) is at or before `now`, each answered to one caller only.
    async fn due(&self, now: i64) -> Result<Vec<String>, CommandError>;

    /// The devices that have queued commands now.
    async fn queued_devices(&self) -> Result<Vec<String>, CommandError>;

    /// Tells every instance (this one included) of `record`'s new state.
    async fn announce(&self, record: &CommandRecord) -> Result<(), CommandError>;

    /// State changes announced by any instance, from now on.
    fn events(&self) -> broadcast::Receiver<Arc<CommandRecord>>;
}

/// When `record` must next be looked at: its reply timeout when sent and
/// two-way, its expiry when queued; `None` otherwise.
pub(crate) fn deadline_of(record: &CommandRecord) -> Option<i64> {
    match record.state {
        CommandState::Sent if !record.oneway => Some(
            record
                .updated_at
                .saturating_add(i64::try_from(record.timeout_ms).unwrap_or(i64::MAX)),
        ),
        CommandState::Queued => Some(record.expires_at),
        _ => None,
    }
}

/// Whether a change from one of `from` (for `device`, when given) applies
/// to `record`.
pub(crate) fn applies(record: &CommandRecord, from: &[CommandState], device: Option<&str>) -> bool {
    from.contains(&record.state) && device.is_none_or(|d| d == record.device_id)
}

/// `record` after `change`.
pub(crate) fn changed(record: &CommandRecord, change: &Change) -> CommandRecord {
    let mut next = record.clone();
    next.state = change.state;
    next.updated_at = change.at;
    if change.reply.is_some() {
        next.reply = change.reply.clone();
    }
    if change.error.is_some() {
        next.error = change.error.clone();
    }
    if change.failure.is_some() {
        next.failure = change.failure;
    }
    if change.state != CommandState::Queued {
        next.expires_at = 0;
    }
    next
}

/// Commands in the process.
#[derive(Debug)]
pub struct MemoryCommands {
    inner: Mutex<Kept>,
    events: broadcast::Sender<Arc<CommandRecord>>,
}

/// A `std::sync::Mutex` is right here: it is held for a few map operations
/// and never across an `.await`.
#[derive(Debug, Default)]
struct Kept {
    records: HashMap<String, CommandRecord>,
    /// Ids in the order they were accepted, for dropping old finished ones.
    order: VecDeque<String>,
    deadlines: BTreeSet<(i64, String)>,
    queues: HashMap<String, VecDeque<String>>,
    limit: usize,
}

impl MemoryCommands {
    /// A store keeping at most `limit` commands; beyond it, the oldest
    /// finished ones are dropped, and new ones are refused while every
    /// kept one is still pending.
    pub fn new(limit: usize) -> Self {
        MemoryCommands {
            inner: Mutex::new(Kept {
                limit: limit.max(1),
                ..Kept::default()
            }),
            events: broadcast::channel(EVENTS).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Kept {
    /// Makes room for one more command, dropping the oldest finished one.
    fn make_room(&mut self) -> bool {
        if self.records.len() < self.limit {
            return true;
        }
        let finished = self.order.iter().position(|id| {
            self.records
                .get(id)
                .is_none_or(|record| record.state.is_final())
        });
        match finished {
            Some(at) => {
                if let Some(id) = self.order.remove(at) {
                    self.records.remove(&id);
                }
                true
            }
            None => false,
        }
    }

    fn set_deadline(&mut self, old: Option<i64>, record: &CommandRecord) {
        if let Some(at) = old {
            self.deadlines.remove(&(at, record.id.clone()));
        }
        if let Some(at) = deadline_of(record) {
            self.deadlines.insert((at, record.id.clone()));
        }
    }
}

#[async_trait]
impl CommandStore for MemoryCommands {
    async fn insert(&self, record: &CommandRecord, queue_limit: usize) -> Result<(), CommandError> {
        let mut kept = self.lock();
        if record.state == CommandState::Queued {
            let queued = kept.queues.get(&record.device_id).map_or(0, VecDeque::len);
            if queued >= queue_limit {
                return Err(CommandError::QueueFull {
                    device: record.device_id.clone(),
                    limit: queue_limit,
                });
            }
        }
        if !kept.make_room() {
            return Err(CommandError::Unavailable(format!(
                "{} commands are pending, the most this instance keeps",
                kept.limit
            )));
        }
        if record.state == CommandState::Queued {
            kept.queues
                .entry(record.device_id.clone())
                .or_default()
                .push_back(record.id.clone());
        }
        kept.set_deadline(None, record);
        kept.order.push_back(record.id.clone());
        kept.records.insert(record.id.clone(), record.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<CommandRecord>, CommandError> {
        Ok(self.lock().records.get(id).cloned())
    }

    async fn transition(
        &self,
        id: &str,
        from: &[CommandState],
        device: Option<&str>,
        change: &Change,
    ) -> Result<Option<CommandRecord>, CommandError> {
        let mut kept = self.lock();
        let Some(record) = kept.records.get(id) else {
            return Ok(None);
        };
        if !applies(record, from, device) {
            return Ok(None);
        }
        let old = deadline_of(record);
        let next = changed(record, change);
        if record.state == CommandState::Queued
            && next.state != CommandState::Queued
            && let Some(queue) = kept.queues.get_mut(&next.device_id)
        {
            queue.retain(|queued| queued != id);
            if queue.is_empty() {
                kept.queues.remove(&next.device_id);
            }
        }
        kept.set_deadline(old, &next);
        kept.records.insert(id.to_owned(), next.clone());
        Ok(Some(next))
    }

    async fn take_queue(&self, device: &str) -> Result<Vec<String>, CommandError> {
        Ok(self
            .lock()
            .queues
            .remove(device)
            .map(Vec::from)
            .unwrap_or_default())
    }

    async fn due(&self, now: i64) -> Result<Vec<String>, CommandError> {
        let mut kept = self.lock();
        let mut due = Vec::new();
        while let Some((at, _)) = kept.deadlines.first()
            && *at <= now
        {
            let (_, id) = kept.deadlines.pop_first().expect("the first entry exists");
            due.push(id);
        }
        Ok(due)
    }

    async fn queued_devices(&self) -> Result<Vec<String>, CommandError> {
        Ok(self.lock().queues.keys().cloned().collect())
    }

    async fn announce(&self, record: &CommandRecord) -> Result<(), CommandError> {
        // No listener is not an error: nobody waits here.
        let _ = self.events.send(Arc::new(record.clone()));
        Ok(())
    }

    fn events(&self) -> broadcast::Receiver<Arc<CommandRecord>> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: CommandState) -> CommandRecord {
        CommandRecord {
            id: id.into(),
            tenant_id: "acme".into(),
            device_id: "th-1".into(),
            product: "json-sensor".into(),
            name: "configure".into(),
            params: serde_json::json!({}),
            state,
            oneway: false,
            persistent: state == CommandState::Queued,
            created_at: 1_000,
            updated_at: 1_000,
            timeout_ms: 500,
            expires_at: if state == CommandState::Queued {
                9_000
            } else {
                0
            },
            reply: None,
            error: None,
            failure: None,
            downlinks: Vec::new(),
            position: None,
        }
    }

    fn change(state: CommandState, at: i64) -> Change {
        Change {
            state,
            reply: None,
            error: None,
            failure: None,
            at,
        }
    }

    #[tokio::test]
    async fn a_change_applies_once_and_only_for_its_device() {
        let store = MemoryCommands::new(10);
        store
            .insert(&record("c1", CommandState::Sent), 4)
            .await
            .unwrap();
        let reply = change(CommandState::Replied, 1_100);
        let sent = [CommandState::Sent];
        assert_eq!(
            store
                .transition("c1", &sent, Some("th-2"), &reply)
                .await
                .unwrap(),
            None
        );
        let done = store
            .transition("c1", &sent, Some("th-1"), &reply)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (done.state, done.updated_at),
            (CommandState::Replied, 1_100)
        );
        // A second reply, or a late timeout, changes nothing.
        assert_eq!(
            store
                .transition("c1", &sent, Some("th-1"), &reply)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.due(10_000).await.unwrap(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn deadlines_come_due_once_at_their_time() {
        let store = MemoryCommands::new(10);
        store
            .insert(&record("c1", CommandState::Sent), 4)
            .await
            .unwrap();
        store
            .insert(&record("q1", CommandState::Queued), 4)
            .await
            .unwrap();
        assert!(store.due(1_499).await.unwrap().is_empty());
        assert_eq!(store.due(1_500).await.unwrap(), ["c1"]);
        assert!(store.due(8_999).await.unwrap().is_empty());
        assert_eq!(store.due(9_000).await.unwrap(), ["q1"]);
        assert!(store.due(20_000).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn queues_are_bounded_and_taken_once() {
        let store = MemoryCommands::new(10);
        for id in ["q1", "q2"] {
            store
                .insert(&record(id, CommandState::Queued), 2)
                .await
                .unwrap();
        }
        let full = store.insert(&record("q3", CommandState::Queued), 2).await;
        assert!(matches!(
            full,
            Err(CommandError::QueueFull { limit: 2, .. })
        ));
        assert_eq!(store.queued_devices().await.unwrap(), ["th-1"]);
        assert_eq!(store.take_queue("th-1").await.unwrap(), ["q1", "q2"]);
        assert!(store.take_queue("th-1").await.unwrap().is_empty());
        assert!(store.queued_devices().await.unwrap().is_empty());
        // Sending a taken command starts its reply timeout.
        let sent = store
            .transition(
                "q1",
                &[CommandState::Queued],
                None,
                &change(CommandState::Sent, 5_000),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!((sent.expires_at, deadline_of(&sent)), (0, Some(5_500)));
    }

    #[tokio::test]
    async fn finished_commands_make_room_and_pending_ones_do_not() {
        let store = MemoryCommands::new(2);
        store
            .insert(&record("a", CommandState::Sent), 4)
            .await
            .unwrap();
        store
            .insert(&record("b", CommandState::Sent), 4)
            .await
            .unwrap();
        let refused = store.insert(&record("c", CommandState::Sent), 4).await;
        assert!(matches!(refused, Err(CommandError::Unavailable(_))));
        store
            .transition(
                "a",
                &[CommandState::Sent],
                None,
                &change(CommandState::Failed, 2_000),
            )
            .await
            .unwrap();
        store
            .insert(&record("c", CommandState::Sent), 4)
            .await
            .unwrap();
        assert!(store.get("a").await.unwrap().is_none());
        assert!(store.get("b").await.unwrap().is_some());
    }
}
