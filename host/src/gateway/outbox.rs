//! A connection's bounded send queue. Telemetry is conflated per key
//! (newest wins: a lagging dashboard wants the present, not the backlog);
//! every other frame is kept in order, and a client that lets too many of
//! them pile up is marked too slow, to be closed, never silently skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

/// What the writer should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this text frame.
    Frame(String),
    /// The client fell too far behind: close it (1013).
    TooSlow,
}

#[derive(Debug)]
enum Slot {
    Frame(String),
    Latest(String),
}

#[derive(Debug, Default)]
struct Queue {
    slots: VecDeque<Slot>,
    /// The pending telemetry frame of each conflation key.
    latest: HashMap<String, String>,
    reliable: usize,
    too_slow: bool,
}

/// The send queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    limit: usize,
}

impl Outbox {
    /// A queue holding at most `limit` frames that must not be dropped.
    pub fn new(limit: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame that must arrive (status, alert, event, reply). Over
    /// the limit, the connection is marked too slow instead.
    pub fn push(&self, frame: String) {
        let mut queue = self.lock();
        if queue.too_slow {
            return;
        }
        if queue.reliable >= self.limit {
            queue.too_slow = true;
            metrics::counter!("sluice_ws_frames_dropped_total").increment(1);
        } else {
            queue.reliable += 1;
            queue.slots.push_back(Slot::Frame(frame));
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// Queues a telemetry frame; one still waiting under the same `key` is
    /// replaced (keeping its place in the queue).
    pub fn push_latest(&self, key: &str, frame: String) {
        let mut queue = self.lock();
        if queue.too_slow {
            return;
        }
        match queue.latest.get_mut(key) {
            Some(waiting) => {
                *waiting = frame;
                metrics::counter!("sluice_ws_frames_conflated_total").increment(1);
                return;
            }
            None => {
                queue.latest.insert(key.to_owned(), frame);
                queue.slots.push_back(Slot::Latest(key.to_owned()));
            }
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// The next frame, waiting for one.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.ready.notified();
            if let Some(next) = self.try_next() {
                return next;
            }
            notified.await;
        }
    }

    /// The next queued frame, without waiting (none when too slow).
    pub fn try_frame(&self) -> Option<String> {
        match self.try_next() {
            Some(Next::Frame(frame)) => Some(frame),
            _ => None,
        }
    }

    fn try_next(&self) -> Option<Next> {
        let mut queue = self.lock();
        if queue.too_slow {
            return Some(Next::TooSlow);
        }
        loop {
            match queue.slots.pop_front()? {
                Slot::Frame(frame) => {
                    queue.reliable -= 1;
                    return Some(Next::Frame(frame));
                }
                Slot::Latest(key) => {
                    if let Some(frame) = queue.latest.remove(&key) {
                        return Some(Next::Frame(frame));
                    }
                }
            }
        }
    }

    /// Frames waiting (for tests and stats).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn telemetry_is_conflated_and_order_is_kept() {
        let outbox = Outbox::new(10);
        outbox.push_latest("d1", "t1".into());
        outbox.push("s1".into());
        outbox.push_latest("d1", "t2".into());
        outbox.push_latest("d2", "u1".into());
        assert_eq!(outbox.len(), 3);
        assert_eq!(outbox.next().await, Next::Frame("t2".into()));
        assert_eq!(outbox.next().await, Next::Frame("s1".into()));
        assert_eq!(outbox.next().await, Next::Frame("u1".into()));
        assert!(outbox.is_empty());
    }

    #[tokio::test]
    async fn too_many_reliable_frames_mark_the_client_too_slow() {
        let outbox = Outbox::new(2);
        outbox.push("a".into());
        outbox.push("b".into());
        outbox.push("c".into());
        assert_eq!(outbox.next().await, Next::TooSlow);
    }
}
