//! History: the alerts, events and status transitions of each tenant, in
//! the order they were recorded, each at a position (an offset counted per
//! tenant, and the epoch of the stream it belongs to). A client that lost
//! its connection asks for what came after the last position it saw; the
//! HTTP API reads the same history by time.
//!
//! The Redis bus keeps it in one bounded stream per tenant (see
//! [`super::redis`]); the in-process bus keeps it here, in a bounded ring
//! per tenant, [`HistoryRing`]. Both are trimmed to `max_entries` per
//! tenant and `max_age`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Publication;

/// Where an entry stands in its tenant's history: `offset` counts the
/// tenant's entries from 1; `epoch` names the stream, and changes when the
/// stream starts over (a restart of the in-process bus, a Redis that lost
/// its data), so an offset of another epoch says nothing about this one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The tenant whose history it is (empty for unregistered devices).
    #[serde(default)]
    pub tenant: String,
    /// The entry's number in that history, from 1.
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: String,
}

/// What history keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Entries per tenant, at most.
    pub max_entries: usize,
    /// How long an entry is kept.
    pub max_age: Duration,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_entries: 10_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// One kept entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Where it stands.
    pub position: Position,
    /// When it was recorded, ms since the Unix epoch.
    pub recorded_ms: i64,
    /// The alert, event or status change, carrying `position`.
    pub publication: Publication,
}

/// The kind of history entry a query wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryKind {
    /// Alerts.
    Alert,
    /// Events.
    Event,
    /// Status transitions.
    Status,
    /// Command state changes.
    Command,
}

impl HistoryKind {
    /// The kind of `publication`, if history keeps it.
    pub fn of(publication: &Publication) -> Option<HistoryKind> {
        match publication {
            Publication::Alert(_) => Some(HistoryKind::Alert),
            Publication::Event(_) => Some(HistoryKind::Event),
            Publication::Status(_) => Some(HistoryKind::Status),
            Publication::Command(_) => Some(HistoryKind::Command),
            Publication::Telemetry(_) => None,
        }
    }

    /// Its one-letter tag in the Redis stream.
    pub fn tag(self) -> &'static str {
        match self {
            HistoryKind::Alert => "a",
            HistoryKind::Event => "e",
            HistoryKind::Status => "s",
            HistoryKind::Command => "c",
        }
    }

    /// The kind a tag names.
    pub fn from_tag(tag: &str) -> Option<HistoryKind> {
        match tag {
            "a" => Some(HistoryKind::Alert),
            "e" => Some(HistoryKind::Event),
            "s" => Some(HistoryKind::Status),
            "c" => Some(HistoryKind::Command),
            _ => None,
        }
    }
}

/// Which entries of one tenant a time query wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeQuery {
    /// The tenant.
    pub tenant: String,
    /// This kind.
    pub kind: HistoryKind,
    /// Of this device only.
    pub device: Option<String>,
    /// Recorded at or after (ms).
    pub since_ms: i64,
    /// Recorded at or before (ms).
    pub until_ms: i64,
    /// Strictly past this entry (ms recorded, offset) in the query's
    /// order: the last one of the page before.
    pub after: Option<(i64, u64)>,
    /// Newest first (else oldest first).
    pub newest_first: bool,
    /// At most this many.
    pub limit: usize,
}

impl RangeQuery {
    /// Whether an entry recorded at `ms` with `offset` lies in the range.
    pub fn admits(&self, ms: i64, offset: u64) -> bool {
        ms >= self.since_ms
            && ms <= self.until_ms
            && self.after.is_none_or(|after| {
                if self.newest_first {
                    (ms, offset) < after
                } else {
                    (ms, offset) > after
                }
            })
    }

    /// Whether `publication` is of the kind and device asked for.
    pub fn wants(&self, publication: &Publication) -> bool {
        HistoryKind::of(publication) == Some(self.kind)
            && self
                .device
                .as_deref()
                .is_none_or(|d| d == publication.device())
    }
}

/// What a tenant's history holds after a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// Every entry after the position is still kept (and follows, in
    /// order, in `entries`).
    pub recovered: bool,
    /// The entries after the position, oldest first (empty when not
    /// recovered).
    pub entries: Vec<Recorded>,
    /// The newest position when read.
    pub top: Position,
}

/// One tenant's ring.
#[derive(Debug)]
struct Ring {
    epoch: String,
    /// The offset of the newest entry (0: none yet).
    offset: u64,
    last_ms: i64,
    entries: VecDeque<(u64, i64, Publication)>,
}

/// The history of the in-process bus: a bounded ring per tenant. Its
/// epoch is new with every process, so positions of an earlier run are
/// never taken for this one's.
#[derive(Debug)]
pub struct HistoryRing {
    limits: HistoryLimits,
    epoch: String,
    tenants: Mutex<HashMap<String, Ring>>,
}

/// A new epoch: the time now, in microseconds, in hexadecimal.
fn new_epoch() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{micros:x}")
}

fn max_age_ms(limits: &HistoryLimits) -> i64 {
    i64::try_from(limits.max_age.as_millis()).unwrap_or(i64::MAX)
}

impl HistoryRing {
    /// An empty history.
    pub fn new(limits: HistoryLimits) -> Self {
        HistoryRing {
            limits,
            epoch: new_epoch(),
            tenants: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ring>> {
        // Held for one append or one read, never across an await.
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ring<'a>(&self, tenants: &'a mut HashMap<String, Ring>, tenant: &str) -> &'a mut Ring {
        tenants.entry(tenant.to_owned()).or_insert_with(|| Ring {
            epoch: self.epoch.clone(),
            offset: 0,
            last_ms: 0,
            entries: VecDeque::new(),
        })
    }

    fn trim(&self, ring: &mut Ring, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(max_age_ms(&self.limits));
        while ring.entries.len() > self.limits.max_entries
            || ring.entries.front().is_some_and(|(_, ms, _)| *ms < cutoff)
        {
            ring.entries.pop_front();
        }
    }

    /// Appends `publication` (an alert, event or status change) to the
    /// history of `tenant`, at `now_ms`; returns its position.
    pub fn append(&self, tenant: &str, publication: &Publication, now_ms: i64) -> Position {
        let mut tenants = self.lock();
        let ring = self.ring(&mut tenants, tenant);
        ring.offset += 1;
        // Recorded times never go back, so time ranges follow offsets.
        ring.last_ms = ring.last_ms.max(now_ms);
        ring.entries
            .push_back((ring.offset, ring.last_ms, publication.clone()));
        let position = Position {
            tenant: tenant.to_owned(),
            offset: ring.offset,
            epoch: ring.epoch.clone(),
        };
        self.trim(ring, now_ms);
        position
    }

    fn position(tenant: &str, ring: &Ring, offset: u64) -> Position {
        Position {
            tenant: tenant.to_owned(),
            offset,
            epoch: ring.epoch.clone(),
        }
    }

    fn recorded(tenant: &str, ring: &Ring, entry: &(u64, i64, Publication)) -> Recorded {
        let position = Self::position(tenant, ring, entry.0);
        Recorded {
            publication: entry.2.clone().at(position.clone()),
            position,
            recorded_ms: entry.1,
        }
    }

    /// The newest position of `tenant`'s history.
    pub fn top(&self, tenant: &str) -> Position {
        let mut tenants = self.lock();
        let ring = self.ring(&mut tenants, tenant);
        Self::position(tenant, ring, ring.offset)
    }

    /// What came after `since` in its tenant's history, up to `limit`
    /// entries (more than that is not recovered).
    pub fn after(&self, since: &Position, limit: usize, now_ms: i64) -> Recovery {
        let mut tenants = self.lock();
        let ring = self.ring(&mut tenants, &since.tenant);
        self.trim(ring, now_ms);
        let top = Self::position(&since.tenant, ring, ring.offset);
        let oldest = ring.entries.front().map_or(ring.offset + 1, |e| e.0);
        let missed = ring.offset.saturating_sub(since.offset);
        let recovered = since.epoch == ring.epoch
            && since.offset <= ring.offset
            && since.offset + 1 >= oldest
            && usize::try_from(missed).is_ok_and(|m| m <= limit);
        let entries = if recovered {
            ring.entries
                .iter()
                .filter(|e| e.0 > since.offset)
                .map(|e| Self::recorded(&since.tenant, ring, e))
                .collect()
        } else {
            Vec::new()
        };
        Recovery {
            recovered,
            entries,
            top,
        }
    }

    /// The entries `query` asks for, oldest first.
    pub fn range(&self, query: &RangeQuery, now_ms: i64) -> Vec<Recorded> {
        let mut tenants = self.lock();
        let ring = self.ring(&mut tenants, &query.tenant);
        self.trim(ring, now_ms);
        let wanted = |(offset, ms, publication): &&(u64, i64, Publication)| {
            query.admits(*ms, *offset) && query.wants(publication)
        };
        let found: Vec<&(u64, i64, Publication)> = if query.newest_first {
            ring.entries
                .iter()
                .rev()
                .filter(wanted)
                .take(query.limit)
                .collect()
        } else {
            ring.entries
                .iter()
                .filter(wanted)
                .take(query.limit)
                .collect()
        };
        found
            .into_iter()
            .map(|e| Self::recorded(&query.tenant, ring, e))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::AlertRaised;
    use crate::script::Severity;

    fn alert(device: &str, n: usize) -> Publication {
        Publication::Alert(AlertRaised {
            device_id: device.into(),
            tenant_id: "acme".into(),
            timestamp: n as i64,
            severity: Severity::Warning,
            title: format!("alert {n}"),
            description: String::new(),
            position: None,
        })
    }

    fn limits(max_entries: usize) -> HistoryLimits {
        HistoryLimits {
            max_entries,
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn what_came_after_a_position_is_recovered_in_order() {
        let ring = HistoryRing::new(limits(100));
        let first = ring.append("acme", &alert("d1", 1), 1_000);
        assert_eq!(first.offset, 1);
        for n in 2..=10 {
            ring.append("acme", &alert("d1", n), 1_000 + n as i64);
        }
        // Another tenant's history is counted on its own.
        assert_eq!(ring.append("globex", &alert("d9", 1), 2_000).offset, 1);
        let recovery = ring.after(&first, 1000, 2_000);
        assert!(recovery.recovered);
        let offsets: Vec<u64> = recovery.entries.iter().map(|e| e.position.offset).collect();
        assert_eq!(offsets, (2..=10).collect::<Vec<_>>());
        assert_eq!(recovery.top.offset, 10);
        assert_eq!(
            recovery.entries[0].publication.position(),
            Some(&recovery.entries[0].position)
        );
        // Nothing missed.
        let caught_up = ring.after(&recovery.top, 1000, 2_000);
        assert!(caught_up.recovered && caught_up.entries.is_empty());
    }

    #[test]
    fn a_gap_older_than_what_is_kept_is_not_recovered() {
        let ring = HistoryRing::new(limits(5));
        let first = ring.append("acme", &alert("d1", 1), 1_000);
        for n in 2..=10 {
            ring.append("acme", &alert("d1", n), 1_000);
        }
        assert!(!ring.after(&first, 1000, 1_000).recovered);
        // The oldest kept entry is 6: from 5 on, all is there.
        let five = Position {
            offset: 5,
            ..first.clone()
        };
        assert_eq!(ring.after(&five, 1000, 1_000).entries.len(), 5);
        // Another epoch, an offset from the future, more than the limit.
        let other = Position {
            epoch: "other".into(),
            ..five.clone()
        };
        assert!(!ring.after(&other, 1000, 1_000).recovered);
        let future = Position {
            offset: 11,
            ..five.clone()
        };
        assert!(!ring.after(&future, 1000, 1_000).recovered);
        assert!(!ring.after(&five, 4, 1_000).recovered);
    }

    #[test]
    fn old_entries_age_out() {
        let ring = HistoryRing::new(limits(100));
        let first = ring.append("acme", &alert("d1", 1), 1_000);
        ring.append("acme", &alert("d1", 2), 1_000 + 3_600_000);
        let later = 1_000 + 3_600_001;
        assert_eq!(
            ring.after(&first, 1000, later).entries.len(),
            1,
            "the entry after the first is still kept"
        );
        let before = Position { offset: 0, ..first };
        assert!(!ring.after(&before, 1000, later).recovered);
    }

    #[test]
    fn time_ranges_page_without_gaps_or_repeats() {
        let ring = HistoryRing::new(limits(100));
        for n in 1..=7 {
            // Several entries share a millisecond.
            ring.append("acme", &alert("d1", n), 1_000 + (n as i64 / 3));
        }
        let mut query = RangeQuery {
            tenant: "acme".into(),
            kind: HistoryKind::Alert,
            device: None,
            since_ms: 0,
            until_ms: i64::MAX,
            after: None,
            newest_first: false,
            limit: 3,
        };
        let pages = |query: &mut RangeQuery| {
            let mut seen = Vec::new();
            loop {
                let page = ring.range(query, 2_000);
                let Some(last) = page.last() else { break };
                query.after = Some((last.recorded_ms, last.position.offset));
                seen.extend(page.iter().map(|e| e.position.offset));
            }
            query.after = None;
            seen
        };
        assert_eq!(pages(&mut query), (1..=7).collect::<Vec<_>>());
        query.newest_first = true;
        assert_eq!(pages(&mut query), (1..=7).rev().collect::<Vec<_>>());
        query.kind = HistoryKind::Event;
        query.after = None;
        assert!(ring.range(&query, 2_000).is_empty());
    }
}
