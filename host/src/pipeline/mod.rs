//! The pipeline: envelopes from sources are sharded by device to script
//! workers; their effects reach the bus in batches; timers expire
//! deadlines and write state behind.

mod effects;
mod envelope;
mod ingest;
mod shard;
mod state;
mod timers;
mod worker;

pub use effects::{BACKLOG, Effect, EffectsQueue, Reply, apply_effects};
pub use envelope::{Completion, Envelope, Inbound};
pub use ingest::{Closed, Ingest};
pub use shard::{Sharded, shard_for};
pub use state::{PipelineState, Seen, SeenDevices, SharedDeadlines};
pub use timers::{
    follow_change, follow_table, follow_transitions, run_status_timers, run_write_behind,
};
pub use worker::{spawn_worker, transition_effect};
