//! Builds what the tests run: the `sluice` binary, the example scripts in
//! `scripts/` and the misbehaving guests in `tests/guests/`, each once per
//! test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sluice::authoring::build::{BuildOutput, BuiltScript, build_scripts};
use sluice::script::{EngineOptions, ScriptEngine};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

/// The profile directory the running test was built into (`target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    // Tests: target/<profile>/deps/<test binary>; tools: target/<profile>/<binary>.
    let dir = exe.parent().expect("binaries live in target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("deps is in a profile directory")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Scratch space for built scripts: `target/sluice-tests`.
pub fn scratch_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("a profile directory has a target directory")
        .join("sluice-tests")
}

fn build_once(cell: &'static OnceLock<Vec<BuiltScript>>, dir: &str) -> &'static [BuiltScript] {
    cell.get_or_init(|| {
        let source = repo_root().join(dir);
        let target = scratch_dir().join(dir.replace('/', "-"));
        build_scripts(&source, Some(&target), BuildOutput::Capture)
            .unwrap_or_else(|e| panic!("building {dir} for the tests failed: {e}"))
    })
}

/// The example scripts of `scripts/`, built for `wasm32-wasip2`.
pub fn example_scripts() -> &'static [BuiltScript] {
    static BUILT: OnceLock<Vec<BuiltScript>> = OnceLock::new();
    build_once(&BUILT, "scripts")
}

/// One example script by product name.
pub fn example_script(name: &str) -> &'static BuiltScript {
    example_scripts()
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no example script {name}"))
}

/// The component of a misbehaving guest in `tests/guests/`.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Vec<BuiltScript>> = OnceLock::new();
    build_once(&BUILT, "tests/guests")
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no test guest {name}"))
        .wasm
        .clone()
}

/// An engine without the on-disk cache, as tests should not share state.
pub fn engine() -> ScriptEngine {
    ScriptEngine::new(&EngineOptions {
        cache: false,
        ..EngineOptions::default()
    })
    .expect("the script engine starts")
}

/// The `sluice` binary of the profile the tests run in, built if needed.
pub fn sluice_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = profile_dir();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        // cargo releases the target directory's lock once the tests are
        // built, so building the binary into the same directory is safe and,
        // after `cargo build`, a no-op.
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--bin",
                "sluice",
                "-p",
                "sluice",
                "--profile",
                &profile,
            ])
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the sluice binary failed");
        profile_dir.join("sluice")
    })
}
