//! A connection's bounded send queue. Telemetry is conflated per key
//! (newest wins: a lagging dashboard wants the present, not the backlog);
//! every other frame is kept in order, and a client that lets too many of
//! them, or too many bytes, pile up is marked too slow, to be closed,
//! never silently skipped. Subscription snapshots are paced instead: the
//! subscribing task waits for the writer, so a subscription to thousands
//! of devices neither floods the queue nor closes the client.

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

/// Snapshot frames that may wait for the writer at once.
const PACED_WINDOW: usize = 64;

#[derive(Debug)]
enum Slot {
    /// A frame that must arrive; `paced` when it is a snapshot.
    Frame {
        frame: String,
        paced: bool,
    },
    Latest(String),
}

#[derive(Debug, Default)]
struct Queue {
    slots: VecDeque<Slot>,
    /// The pending telemetry frame of each conflation key.
    latest: HashMap<String, String>,
    /// Must-arrive frames waiting (snapshots not included).
    reliable: usize,
    /// Snapshot frames waiting.
    paced: usize,
    /// Bytes of every frame waiting, conflation keys included.
    bytes: usize,
    too_slow: bool,
    /// The writer is gone: nothing will be taken any more.
    shut: bool,
}

impl Queue {
    fn slow(&mut self) {
        if !self.too_slow {
            self.too_slow = true;
            metrics::counter!("sluice_ws_frames_dropped_total").increment(1);
        }
    }
}

/// The send queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// A frame was queued, or the client was marked too slow.
    ready: Notify,
    /// A frame was taken, or the writer is gone.
    room: Notify,
    frame_limit: usize,
    byte_limit: usize,
}

impl Outbox {
    /// A queue holding at most `frame_limit` frames that must not be
    /// dropped, and at most `byte_limit` bytes in all.
    pub fn new(frame_limit: usize, byte_limit: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            room: Notify::new(),
            frame_limit,
            byte_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Held for a few queue operations, never across an await.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame that must arrive (status, alert, event, reply). Over
    /// a limit, the connection is marked too slow instead.
    pub fn push(&self, frame: String) {
        let mut queue = self.lock();
        if queue.too_slow || queue.shut {
            return;
        }
        if queue.reliable >= self.frame_limit || queue.bytes + frame.len() > self.byte_limit {
            queue.slow();
        } else {
            queue.reliable += 1;
            queue.bytes += frame.len();
            queue.slots.push_back(Slot::Frame {
                frame,
                paced: false,
            });
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// Queues a snapshot frame, waiting while the writer is behind; false
    /// when the connection is going away (too slow, or its writer gone).
    pub async fn push_paced(&self, frame: String) -> bool {
        loop {
            let room = self.room.notified();
            {
                let mut queue = self.lock();
                if queue.too_slow || queue.shut {
                    return false;
                }
                let fits = queue.bytes + frame.len() <= self.byte_limit / 2 || queue.paced == 0;
                if queue.paced < PACED_WINDOW && fits {
                    queue.paced += 1;
                    queue.bytes += frame.len();
                    queue.slots.push_back(Slot::Frame { frame, paced: true });
                    drop(queue);
                    self.ready.notify_one();
                    return true;
                }
            }
            room.await;
        }
    }

    /// Queues a telemetry frame; one still waiting under the same `key` is
    /// replaced (keeping its place in the queue).
    pub fn push_latest(&self, key: &str, frame: String) {
        let mut queue = self.lock();
        if queue.too_slow || queue.shut {
            return;
        }
        let Queue { latest, bytes, .. } = &mut *queue;
        if let Some(waiting) = latest.get_mut(key) {
            *bytes = *bytes - waiting.len() + frame.len();
            *waiting = frame;
            metrics::counter!("sluice_ws_frames_conflated_total").increment(1);
            if queue.bytes > self.byte_limit {
                queue.slow();
                drop(queue);
                self.ready.notify_one();
            }
            return;
        }
        let size = frame.len() + 2 * key.len();
        if queue.bytes + size > self.byte_limit {
            queue.slow();
        } else {
            queue.bytes += size;
            queue.latest.insert(key.to_owned(), frame);
            queue.slots.push_back(Slot::Latest(key.to_owned()));
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
        let next = loop {
            match queue.slots.pop_front()? {
                Slot::Frame { frame, paced } => {
                    if paced {
                        queue.paced -= 1;
                    } else {
                        queue.reliable -= 1;
                    }
                    queue.bytes -= frame.len();
                    break frame;
                }
                Slot::Latest(key) => {
                    if let Some(frame) = queue.latest.remove(&key) {
                        queue.bytes -= frame.len() + 2 * key.len();
                        break frame;
                    }
                }
            }
        };
        drop(queue);
        self.room.notify_waiters();
        Some(Next::Frame(next))
    }

    /// The writer is gone: every frame queued from now on is dropped, and
    /// a task waiting to queue a snapshot stops waiting.
    pub fn shut(&self) {
        self.lock().shut = true;
        self.room.notify_waiters();
    }

    /// Frames waiting (for tests and stats).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Bytes waiting, conflation keys included.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn telemetry_is_conflated_and_order_is_kept() {
        let outbox = Outbox::new(10, 1 << 20);
        outbox.push_latest("d1", "t1".into());
        outbox.push("s1".into());
        outbox.push_latest("d1", "t2".into());
        outbox.push_latest("d2", "u1".into());
        assert_eq!(outbox.len(), 3);
        assert_eq!(outbox.next().await, Next::Frame("t2".into()));
        assert_eq!(outbox.next().await, Next::Frame("s1".into()));
        assert_eq!(outbox.next().await, Next::Frame("u1".into()));
        assert!(outbox.is_empty());
        assert_eq!(outbox.bytes(), 0, "every byte is accounted for");
    }

    #[tokio::test]
    async fn too_many_reliable_frames_mark_the_client_too_slow() {
        let outbox = Outbox::new(2, 1 << 20);
        outbox.push("a".into());
        outbox.push("b".into());
        outbox.push("c".into());
        assert_eq!(outbox.next().await, Next::TooSlow);
    }

    #[tokio::test]
    async fn the_byte_budget_includes_conflated_telemetry() {
        let outbox = Outbox::new(1000, 1000);
        for device in 0..9 {
            outbox.push_latest(&format!("d{device}"), "x".repeat(100));
        }
        assert_eq!(outbox.try_frame().map(|f| f.len()), Some(100));
        for device in 10..30 {
            outbox.push_latest(&format!("d{device}"), "x".repeat(100));
        }
        assert_eq!(outbox.next().await, Next::TooSlow);
    }

    #[tokio::test]
    async fn snapshots_wait_for_the_writer_instead_of_closing_the_client() {
        let outbox = Arc::new(Outbox::new(4, 1 << 20));
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut taken = 0;
                while taken < 1000 {
                    match outbox.next().await {
                        Next::Frame(_) => taken += 1,
                        Next::TooSlow => panic!("snapshots never make a client too slow"),
                    }
                    if taken % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                taken
            })
        };
        for i in 0..1000 {
            assert!(outbox.push_paced(format!("snapshot {i}")).await);
            assert!(outbox.len() <= PACED_WINDOW);
        }
        assert_eq!(writer.await.unwrap(), 1000);
        outbox.shut();
        assert!(
            !outbox.push_paced("late".into()).await,
            "no writer: no wait"
        );
    }
}
