//! Data scripts: the engine that compiles and sandboxes them, their
//! instances, limits, outputs and fixtures.

mod bindings;
pub mod build;
mod cache;
mod component;
mod engine;
mod error;
mod fields;
pub mod fixture;
mod host;
mod instance;
mod limits;
mod output;
mod registry;
pub mod reload;
pub mod scaffold;
mod state;

pub use cache::{CacheOutcome, default_cache_dir};
pub use engine::{EngineError, EngineOptions, LoadInfo, ScriptEngine, ScriptSettings};
pub use error::{ScriptError, ScriptId};
pub use fields::Fields;
pub use host::Params;
pub use instance::{Script, ScriptInstance, ScriptStats, StatsSnapshot};
pub use limits::Limits;
pub use output::{Output, OutputKind, Severity};
pub use registry::{Product, ScriptRegistry, load_product, settings_of};
