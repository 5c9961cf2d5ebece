//! Tools for script authors: building script workspaces, creating a new
//! script, and timing a script on a payload (`sluice script build | new |
//! bench`). The runtime in [`crate::script`] does not depend on them.

pub mod bench;
pub mod build;
pub mod scaffold;
