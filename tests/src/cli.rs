//! Runs the `sluice` binary as a user would and captures what it prints.

use std::path::Path;
use std::process::{Command, Output};

use crate::build::sluice_bin;

/// What a finished `sluice` command printed.
#[derive(Debug)]
pub struct Run {
    /// The exit code (`-1` when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs `sluice <args>` in `dir` without the compiled-script cache of the
/// user running the tests.
pub fn sluice(dir: &Path, args: &[&str]) -> Run {
    let cache = tempfile::tempdir().expect("a temporary directory");
    Command::new(sluice_bin())
        .args(args)
        .current_dir(dir)
        .env("SLUICE_CACHE_DIR", cache.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the sluice binary runs")
        .into()
}
