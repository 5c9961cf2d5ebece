//! Redis as the bus of several instances.
//!
//! Keys and channels (a contract; `sluice:` keys are sluice's own):
//!
//! | key / channel | what |
//! |---|---|
//! | `ws:sub:{device}` | watcher count, kept by gateways (INCR/DECR, EXPIRE 300 s) |
//! | `ws:device:{device}` | telemetry channel |
//! | `ws:sub:group:{group}` | watcher count of a group watched as a whole (like device counts) |
//! | `ws:group:{group}` | a watched group's telemetry channel: each member's report once, with `group` and the device's `groups` |
//! | `ws:group-status:{group}`, `ws:group-alert:{group}`, `ws:group-event:{group}` | a watched group's status, alert and event channels: each member's, with its `position` and `group` |
//! | `device:{device}:status` | status channel (the seed's JSON, plus `tenant_id` and `position` once recorded) |
//! | `sluice:alert:{device}`, `sluice:event:{device}` | alert and event channels |
//! | `sluice:interest` | channel: `{"devices": [...], "watched": true/false}` (or one `"device"`, or `"groups"`) when devices or groups get their first watcher or lose their last |
//! | `sluice:status` | hash: device → its last status change (the status channel's JSON) |
//! | `sluice:status:transitions` | capped stream of status changes (`device`, `change`, and `deadline` for expiries), which every instance follows |
//! | `sluice:latest:{device}` | hash: `t:<key>` and `a:<key>` → JSON value, `systime` → ms |
//! | `sluice:deadlines` | sorted set: `h:{device}` / `t:{device}` scored by deadline (ms) |
//! | `sluice:deadletter` | capped stream of dead letters |
//! | `sluice:history:{tenant}` | stream of the tenant's alerts, events and transitions; ids `<ms>-<offset>`, fields `k` (`a`/`e`/`s`), `d` (device), `j` (JSON) |
//! | `sluice:history:{tenant}:meta` | hash: `epoch`, `offset` (the newest), `ms` (its time), `w:<writer>` and `t:<writer>` (the newest alert or event id each instance start recorded, and when) |
//!
//! - [`bus`]: the [`RedisBus`] itself;
//! - [`scripts`]: the Lua that makes transitions and expiries atomic;
//! - [`mirror`]: the interest mirror;
//! - [`feed`]: the transitions feed trackers follow;
//! - [`target`]: the node all of it talks to, one or the master of
//!   Sentinels, followed through failovers.

mod bus;
mod feed;
mod mirror;
mod scripts;
mod target;

pub use bus::RedisBus;
pub use feed::{Followed, TransitionFeed};
pub use mirror::{GROUP_WATCH_PREFIX, INTEREST_CHANNEL, mirror_interest};
pub use target::{Reconnect, RedisTarget, check_url};
