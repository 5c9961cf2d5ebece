//! `sluice demo`: sluice working in one command. Builds the example scripts,
//! runs the pipeline on embedded defaults (in-process bus, no Redis or
//! broker) with the configuration in `examples/demo/`, drives it with the
//! built-in device simulator and serves the dashboard.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use tokio::sync::watch;

use crate::authoring::build::is_script_source;
use crate::config::{Config, LoadedConfig};
use crate::source::simulator::Simulator;

/// The demo's configuration and device registry, written beside the built
/// scripts so that the file the demo runs is one a user can read and reuse.
const DEMO_CONFIG: &str = include_str!("../../../examples/demo/sluice.toml");
const DEMO_DEVICES: &str = include_str!("../../../examples/demo/devices.toml");

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Where to serve the dashboard, the API and the WebSockets.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The example scripts: a cargo workspace (with AssemblyScript projects
    /// beside its crates), built first; or a directory of built
    /// `<product>.wasm` files, used as it is.
    #[arg(long, default_value = "scripts")]
    scripts: PathBuf,
    /// Where compiled scripts are kept (default `~/.cache/sluice/compiled`).
    #[arg(long, env = "SLUICE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

pub(crate) fn run(args: &DemoArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let loaded = prepare(args)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(serve(loaded, args.listen))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            super::report(&error);
            ExitCode::from(2)
        }
    }
}

/// Builds the scripts (when given their sources) and writes the demo's
/// configuration beside them.
fn prepare(args: &DemoArgs) -> anyhow::Result<LoadedConfig> {
    let dir = if is_script_source(&args.scripts) {
        let dir = args.scripts.join("target").join("sluice-demo");
        eprintln!(
            "sluice demo: building the example scripts in {} (the first build takes a few minutes)",
            args.scripts.display()
        );
        super::script::build_into(&args.scripts, &dir)?;
        dir
    } else if args.scripts.is_dir() {
        args.scripts.clone()
    } else {
        anyhow::bail!(
            "{} is neither the example scripts' sources nor a directory of built scripts; \
             run the demo from sluice's repository or pass --scripts",
            args.scripts.display()
        );
    };
    write(&dir.join("sluice.toml"), DEMO_CONFIG)?;
    write(&dir.join("devices.toml"), DEMO_DEVICES)?;
    let mut loaded = Config::load(&dir.join("sluice.toml"))?;
    // A product whose script was not built (AssemblyScript without npm)
    // is left out rather than shown as broken.
    loaded.config.products.retain(|product, _| {
        let built = dir.join(format!("{product}.wasm")).is_file();
        if !built {
            eprintln!("sluice demo: {product} was not built; its devices stay silent");
        }
        built
    });
    if let Some(dir) = &args.cache_dir {
        loaded.config.scripts.engine.cache_dir = Some(dir.clone());
    }
    Ok(loaded)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

async fn serve(mut loaded: LoadedConfig, listen: SocketAddr) -> anyhow::Result<()> {
    loaded.config.server.listen = listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let running = crate::server::start(loaded, listener).await?;
    let products = running.state().scripts.loaded_products();
    let simulator = Simulator::from_registry(&running.state().registry.load(), &products);
    let devices = simulator.len();
    let (stop, stopped) = watch::channel(false);
    let downlinks = running.state().commands.simulated_downlinks();
    let simulation = tokio::spawn(simulator.run(running.ingest(), downlinks, stopped));
    println!(
        "sluice demo: dashboard at http://{addr}/ · {devices} simulated devices over {} products ({}) · in-process bus · Ctrl-C stops",
        products.len(),
        products.join(", ")
    );
    super::run::shutdown_signal().await;
    let _ = stop.send(true);
    let _ = simulation.await;
    running.stop().await;
    Ok(())
}
