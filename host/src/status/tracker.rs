//! The status of many devices and their deadlines, in a structure sized for
//! a million devices: one small record and one timer entry per device, no
//! task or allocation per message.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::time::Duration;

use hashbrown::HashTable;
use tokio::time::Instant;

use super::mode::{StatusMode, StatusSource};

/// A status change, the only thing that is ever published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The device.
    pub device: String,
    /// Its new status.
    pub online: bool,
    /// When it changed, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Why it changed.
    pub source: StatusSource,
}

/// A device's current status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Online or not.
    pub online: bool,
    /// When it last changed, in milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// Why it last changed.
    pub source: StatusSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unknown,
    Online,
    Offline,
}

/// Which mode armed a deadline, so its expiry names the right source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Heartbeat,
    Timeout,
}

/// 16 bytes a device.
#[derive(Debug, Clone, Copy)]
struct Record {
    since_ms: i64,
    /// The tick at which the device expires; 0 when no deadline is armed.
    deadline: u32,
    state: State,
    source: StatusSource,
    timer: Timer,
    /// Whether the device has an entry in the wheel.
    scheduled: bool,
}

/// Status and deadlines of a set of devices.
///
/// Deadlines live in a wheel of ticks (`BTreeMap<tick, Vec<device index>>`)
/// with at most one entry per device: a refresh only moves the device's own
/// deadline, and an entry that comes due early is put back at the device's
/// current deadline. Time comes from the caller, so paused tokio time
/// drives it in tests.
#[derive(Debug)]
pub struct StatusTracker {
    origin: Instant,
    /// The wall clock at `origin`, ms since the Unix epoch.
    origin_wall_ms: i64,
    tick: Duration,
    ids: Vec<Box<str>>,
    index: HashTable<u32>,
    hasher: std::hash::RandomState,
    records: Vec<Record>,
    wheel: BTreeMap<u32, Vec<u32>>,
}

impl StatusTracker {
    /// An empty tracker whose deadlines are precise to `tick`; the wall
    /// clock read `origin_wall_ms` at `origin`.
    pub fn new(origin: Instant, origin_wall_ms: i64, tick: Duration) -> Self {
        StatusTracker {
            origin,
            origin_wall_ms,
            tick: tick.max(Duration::from_millis(1)),
            ids: Vec::new(),
            index: HashTable::new(),
            hasher: std::hash::RandomState::new(),
            records: Vec::new(),
            wheel: BTreeMap::new(),
        }
    }

    /// How many devices have a record.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no device has a record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How many deadlines are armed.
    pub fn armed(&self) -> usize {
        self.records.iter().filter(|r| r.deadline != 0).count()
    }

    /// The current status of `device`, if it is known.
    pub fn get(&self, device: &str) -> Option<DeviceStatus> {
        let record = &self.records[self.find(device)? as usize];
        let online = match record.state {
            State::Unknown => return None,
            State::Online => true,
            State::Offline => false,
        };
        Some(DeviceStatus {
            online,
            since_ms: record.since_ms,
            source: record.source,
        })
    }

    /// Every known device with its status.
    pub fn all(&self) -> impl Iterator<Item = (&str, DeviceStatus)> {
        self.ids
            .iter()
            .filter_map(|id| Some((&**id, self.get(id)?)))
    }

    /// A message from `device` under `mode`; `signal` is the explicit status
    /// it carried (the status topic, or a script's `status` output for the
    /// device), if any. Returns the transition it causes.
    pub fn observe(
        &mut self,
        device: &str,
        mode: StatusMode,
        signal: Option<bool>,
        now: Instant,
        wall_ms: i64,
    ) -> Option<Transition> {
        match (mode, signal) {
            (StatusMode::Message, None) => None,
            (StatusMode::Message, Some(online)) => {
                let index = self.intern(device);
                self.set(index, online, StatusSource::StatusMessage, wall_ms)
            }
            (StatusMode::Heartbeat { interval }, _) => {
                let index = self.intern(device);
                self.arm(index, now + interval, Timer::Heartbeat);
                self.set(index, true, StatusSource::Message, wall_ms)
            }
            (StatusMode::Timeout { after }, None) => {
                let index = self.intern(device);
                self.arm(index, now + after, Timer::Timeout);
                self.set(index, true, StatusSource::Message, wall_ms)
            }
            (StatusMode::Timeout { after }, Some(online)) => {
                let index = self.intern(device);
                if online {
                    self.arm(index, now + after, Timer::Timeout);
                } else {
                    self.records[index as usize].deadline = 0;
                }
                self.set(index, online, StatusSource::StatusMessage, wall_ms)
            }
        }
    }

    /// Sets a status known from elsewhere (after a restart) without a
    /// transition; an online device under a mode with a deadline gets a
    /// full deadline from `now`.
    pub fn restore(&mut self, device: &str, status: DeviceStatus, mode: StatusMode, now: Instant) {
        let index = self.intern(device);
        let record = &mut self.records[index as usize];
        record.state = if status.online {
            State::Online
        } else {
            State::Offline
        };
        record.since_ms = status.since_ms;
        record.source = status.source;
        if status.online {
            match mode {
                StatusMode::Heartbeat { interval } => {
                    self.arm(index, now + interval, Timer::Heartbeat)
                }
                StatusMode::Timeout { after } => self.arm(index, now + after, Timer::Timeout),
                StatusMode::Message => {}
            }
        }
    }

    /// Follows a change the shared status table recorded (made by any
    /// instance, this one included), without a transition of its own,
    /// and without arming a deadline (the shared deadlines are the bus's).
    ///
    /// One exception: an expiry of `deadline_ms` when this tracker has
    /// seen a message from the device that the deadline did not account
    /// for (its own deadline is later): the device spoke after the one
    /// that expired was written, so it is online again, and the returned
    /// transition says so.
    pub fn follow(
        &mut self,
        device: &str,
        online: bool,
        since_ms: i64,
        source: StatusSource,
        deadline_ms: Option<i64>,
        wall_ms: i64,
    ) -> Option<Transition> {
        let index = self.intern(device);
        let newer_message = match (online, deadline_ms) {
            (false, Some(expired)) => {
                let record = &self.records[index as usize];
                record.deadline != 0
                    && self.wall_of(record.deadline) > expired.saturating_add(self.tick_ms())
            }
            _ => false,
        };
        let record = &mut self.records[index as usize];
        record.state = if online {
            State::Online
        } else {
            State::Offline
        };
        record.since_ms = since_ms;
        record.source = source;
        if !online && !newer_message {
            record.deadline = 0;
        }
        if newer_message {
            return self.set(index, true, StatusSource::Message, wall_ms);
        }
        None
    }

    /// The wall-clock time (ms) of deadline tick `tick`.
    fn wall_of(&self, tick: u32) -> i64 {
        let offset = self.tick.saturating_mul(tick);
        self.origin_wall_ms
            .saturating_add(i64::try_from(offset.as_millis()).unwrap_or(i64::MAX))
    }

    fn tick_ms(&self) -> i64 {
        i64::try_from(self.tick.as_millis()).unwrap_or(i64::MAX)
    }

    /// Devices whose deadline has passed by `now` go offline.
    pub fn expire(&mut self, now: Instant, wall_ms: i64) -> Vec<Transition> {
        let now_tick = self.tick_floor(now);
        let mut transitions = Vec::new();
        while let Some(entry) = self.wheel.first_entry() {
            if *entry.key() > now_tick {
                break;
            }
            for index in entry.remove() {
                let record = &mut self.records[index as usize];
                if record.deadline == 0 {
                    record.scheduled = false;
                } else if record.deadline > now_tick {
                    // Refreshed since it was scheduled: wait for the new deadline.
                    self.wheel.entry(record.deadline).or_default().push(index);
                } else {
                    record.scheduled = false;
                    record.deadline = 0;
                    let source = match record.timer {
                        Timer::Heartbeat => StatusSource::HeartbeatExpired,
                        Timer::Timeout => StatusSource::TimeoutExpired,
                    };
                    transitions.extend(self.set(index, false, source, wall_ms));
                }
            }
        }
        transitions
    }

    /// When the next deadline may come due, if any is armed.
    pub fn next_due(&self) -> Option<Instant> {
        let tick = *self.wheel.keys().next()?;
        Some(self.origin + self.tick * tick)
    }

    fn set(
        &mut self,
        index: u32,
        online: bool,
        source: StatusSource,
        wall_ms: i64,
    ) -> Option<Transition> {
        let record = &mut self.records[index as usize];
        let state = if online {
            State::Online
        } else {
            State::Offline
        };
        if record.state == state {
            return None;
        }
        record.state = state;
        record.source = source;
        record.since_ms = wall_ms;
        Some(Transition {
            device: self.ids[index as usize].to_string(),
            online,
            at_ms: wall_ms,
            source,
        })
    }

    fn arm(&mut self, index: u32, at: Instant, timer: Timer) {
        let deadline = self.tick_ceil(at).max(1);
        let record = &mut self.records[index as usize];
        record.deadline = deadline;
        record.timer = timer;
        if !record.scheduled {
            record.scheduled = true;
            self.wheel.entry(deadline).or_default().push(index);
        }
    }

    fn ticks(&self, at: Instant) -> (u128, u128) {
        let elapsed = at.saturating_duration_since(self.origin).as_nanos();
        let tick = self.tick.as_nanos();
        (elapsed / tick, elapsed % tick)
    }

    fn tick_floor(&self, at: Instant) -> u32 {
        u32::try_from(self.ticks(at).0).unwrap_or(u32::MAX)
    }

    fn tick_ceil(&self, at: Instant) -> u32 {
        let (whole, part) = self.ticks(at);
        u32::try_from(whole + u128::from(part > 0)).unwrap_or(u32::MAX)
    }

    fn find(&self, device: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(device);
        self.index
            .find(hash, |&i| &*self.ids[i as usize] == device)
            .copied()
    }

    fn intern(&mut self, device: &str) -> u32 {
        if let Some(index) = self.find(device) {
            return index;
        }
        let index =
            u32::try_from(self.ids.len()).expect("fewer than 4 billion devices per tracker");
        self.ids.push(device.into());
        self.records.push(Record {
            since_ms: 0,
            deadline: 0,
            state: State::Unknown,
            source: StatusSource::Message,
            timer: Timer::Heartbeat,
            scheduled: false,
        });
        let hasher = &self.hasher;
        let ids = &self.ids;
        let hash = hasher.hash_one(device);
        self.index
            .insert_unique(hash, index, |&i| hasher.hash_one(&*ids[i as usize]));
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);
    const MINUTE: Duration = Duration::from_secs(60);

    fn heartbeat() -> StatusMode {
        StatusMode::Heartbeat { interval: MINUTE }
    }

    fn timeout() -> StatusMode {
        StatusMode::Timeout { after: MINUTE }
    }

    fn tracker() -> (StatusTracker, Instant) {
        let start = Instant::now();
        (StatusTracker::new(start, 0, TICK), start)
    }

    fn sources(transitions: &[Transition]) -> Vec<(bool, &'static str)> {
        transitions
            .iter()
            .map(|t| (t.online, t.source.as_str()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn message_mode_follows_explicit_signals_only() {
        let (mut t, start) = tracker();
        assert_eq!(t.observe("d", StatusMode::Message, None, start, 1), None);
        assert_eq!(
            t.get("d"),
            None,
            "a plain message says nothing in message mode"
        );
        let on = t
            .observe("d", StatusMode::Message, Some(true), start, 2)
            .unwrap();
        assert_eq!((on.online, on.source), (true, StatusSource::StatusMessage));
        assert_eq!(
            t.observe("d", StatusMode::Message, Some(true), start, 3),
            None,
            "only transitions"
        );
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(
            t.expire(Instant::now(), 4).is_empty(),
            "no timers in message mode"
        );
        let off = t
            .observe("d", StatusMode::Message, Some(false), Instant::now(), 5)
            .unwrap();
        assert_eq!((off.online, off.at_ms), (false, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_goes_online_on_the_first_message_and_offline_after_silence() {
        let (mut t, start) = tracker();
        let on = t.observe("d", heartbeat(), None, start, 10).unwrap();
        assert_eq!((on.online, on.source), (true, StatusSource::Message));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(t.expire(Instant::now(), 0).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let off = t.expire(Instant::now(), 20);
        assert_eq!(sources(&off), [(false, "heartbeat_expired")]);
        assert_eq!(t.get("d").unwrap().since_ms, 20);
        let again = t
            .observe("d", heartbeat(), None, Instant::now(), 30)
            .unwrap();
        assert!(
            again.online,
            "the first message after offline makes it online"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_moves_the_deadline() {
        let (mut t, start) = tracker();
        t.observe("d", heartbeat(), None, start, 0);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(t.observe("d", heartbeat(), None, Instant::now(), 0), None);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(
            t.expire(Instant::now(), 0).is_empty(),
            "80 s after the first, 40 s after the refresh"
        );
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(
            sources(&t.expire(Instant::now(), 0)),
            [(false, "heartbeat_expired")]
        );
        assert_eq!(
            t.wheel.values().map(Vec::len).sum::<usize>(),
            0,
            "no stale wheel entries"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_ignores_the_devices_own_signals() {
        let (mut t, start) = tracker();
        t.observe("d", heartbeat(), None, start, 0);
        assert_eq!(
            t.observe("d", heartbeat(), Some(false), start, 0),
            None,
            "offline signal ignored"
        );
        assert!(t.get("d").unwrap().online);
        tokio::time::advance(Duration::from_secs(61)).await;
        t.expire(Instant::now(), 0);
        let on = t
            .observe("d", heartbeat(), Some(false), Instant::now(), 0)
            .unwrap();
        assert!(on.online, "even a message saying offline is a heartbeat");
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_honours_explicit_offline_and_cancels_the_deadline() {
        let (mut t, start) = tracker();
        assert!(t.observe("d", timeout(), None, start, 0).unwrap().online);
        let off = t.observe("d", timeout(), Some(false), start, 1).unwrap();
        assert_eq!(
            (off.online, off.source),
            (false, StatusSource::StatusMessage)
        );
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(
            t.expire(Instant::now(), 0).is_empty(),
            "explicitly offline: nothing expires"
        );
        let on = t
            .observe("d", timeout(), Some(true), Instant::now(), 2)
            .unwrap();
        assert_eq!((on.online, on.source), (true, StatusSource::StatusMessage));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            sources(&t.expire(Instant::now(), 3)),
            [(false, "timeout_expired")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_any_message_keeps_the_device_online() {
        let (mut t, start) = tracker();
        t.observe("d", timeout(), Some(true), start, 0);
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(50)).await;
            assert_eq!(t.observe("d", timeout(), None, Instant::now(), 0), None);
            assert!(t.expire(Instant::now(), 0).is_empty());
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            sources(&t.expire(Instant::now(), 0)),
            [(false, "timeout_expired")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_devices_expire_in_deadline_order() {
        let (mut t, start) = tracker();
        for i in 0..1000u64 {
            let device = format!("dev-{i}");
            let mode = StatusMode::Heartbeat {
                interval: Duration::from_secs(1 + i % 10),
            };
            t.observe(&device, mode, None, start, 0);
        }
        assert_eq!(t.len(), 1000);
        tokio::time::advance(Duration::from_millis(5500)).await;
        let gone = t.expire(Instant::now(), 0);
        assert_eq!(gone.len(), 500, "intervals 1..=5 s have passed");
        assert!(gone.iter().all(|g| !g.online));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.expire(Instant::now(), 0).len(), 500);
        assert_eq!(t.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn restored_online_devices_get_a_fresh_deadline() {
        let (mut t, start) = tracker();
        let status = DeviceStatus {
            online: true,
            since_ms: 7,
            source: StatusSource::Message,
        };
        t.restore("d", status, heartbeat(), start);
        assert_eq!(t.get("d"), Some(status));
        assert_eq!(
            t.observe("d", heartbeat(), None, start, 8),
            None,
            "already online: no transition"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.expire(Instant::now(), 9).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_from_elsewhere_are_followed_without_transitions() {
        let (mut t, start) = tracker();
        // Another instance took the device online, then its deadline passed.
        assert_eq!(t.follow("d", true, 5, StatusSource::Message, None, 5), None);
        assert!(t.get("d").unwrap().online);
        assert_eq!(
            t.follow(
                "d",
                false,
                9,
                StatusSource::HeartbeatExpired,
                Some(60_000),
                9
            ),
            None
        );
        assert_eq!(t.get("d").unwrap().source, StatusSource::HeartbeatExpired);
        // The next message here is a transition, whichever instance made the last.
        let on = t.observe("d", heartbeat(), None, start, 10).unwrap();
        assert_eq!((on.online, on.source), (true, StatusSource::Message));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expiry_older_than_a_message_seen_here_turns_online_again() {
        let (mut t, start) = tracker();
        t.observe("d", heartbeat(), None, start, 0);
        // Here the device spoke at 0 s: its deadline is 60 s. An expiry of
        // a deadline written for an earlier message (at 50 s) arrives.
        let back = t
            .follow(
                "d",
                false,
                70_000,
                StatusSource::HeartbeatExpired,
                Some(50_000),
                70_000,
            )
            .expect("online again");
        assert_eq!((back.online, back.source), (true, StatusSource::Message));
        // An expiry of the deadline this tracker knows is simply followed.
        t.observe("d", heartbeat(), None, start, 0);
        assert_eq!(
            t.follow(
                "d",
                false,
                80_000,
                StatusSource::HeartbeatExpired,
                Some(60_000),
                80_000
            ),
            None
        );
        assert!(!t.get("d").unwrap().online);
    }
}
