//! What the benchmarks share.

use std::path::{Path, PathBuf};

use sluice::authoring::build::{BuildOutput, build_scripts};

/// Builds the example scripts (once per target directory, then cached by
/// cargo) and returns the component of the one named `name`.
pub(crate) fn example_script(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = build_scripts(
        &root.join("scripts"),
        Some(&root.join("target/bench-scripts")),
        BuildOutput::Capture,
    )
    .expect("the example scripts build");
    built
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} is an example script"))
        .wasm
}

/// Starts sluice with `loaded` on a loopback port, on `runtime`.
#[allow(dead_code, reason = "not every benchmark starts a whole sluice")]
pub(crate) fn start(
    runtime: &tokio::runtime::Runtime,
    loaded: sluice::config::LoadedConfig,
) -> sluice::server::Running {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        sluice::server::start(loaded, listener)
            .await
            .expect("sluice starts")
    })
}
