//! Data scripts at run time: the engine that compiles and sandboxes them,
//! their instances, limits, the packed encoding of their messages and
//! outputs, fixtures and hot reload. Building and creating scripts lives in
//! [`crate::authoring`].

mod bindings;
mod cache;
mod command;
mod component;
mod engine;
mod error;
mod fields;
pub mod fixture;
mod host;
mod instance;
mod limits;
mod output;
mod packed;
mod registry;
pub mod reload;
mod state;

pub use cache::{CacheOutcome, default_cache_dir};
pub use command::{CommandCall, Downlink};
pub use engine::{EngineError, EngineOptions, LoadInfo, ScriptEngine, ScriptSettings};
pub use error::{ScriptError, ScriptId};
pub use fields::{Fields, Key};
pub use host::Params;
pub use instance::{Script, ScriptInstance, ScriptStats, StatsSnapshot};
pub use limits::Limits;
pub use output::{Output, OutputKind, Severity};
pub use registry::{Product, ScriptRegistry, load_product, settings_of};
