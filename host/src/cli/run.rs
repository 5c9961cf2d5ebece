//! `sluice run` and `sluice check`: run the stream processor, or validate
//! its configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::authoring::build::is_script_source;
use crate::config::{Config, LoadedConfig};
use crate::devices::DeviceRegistry;
use crate::route::Router;
use crate::script::{ScriptEngine, load_product};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The configuration file; without it, embedded defaults run (in-process
    /// bus, HTTP on 127.0.0.1:8080, MQTT off).
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen here instead of the configured address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The scripts directory of the embedded defaults: `<product>.wasm`
    /// files, or a cargo workspace of Rust scripts, which is built first.
    #[arg(long, default_value = "scripts")]
    scripts: PathBuf,
    /// Where compiled scripts are kept (instead of `[scripts] cache_dir`,
    /// default `~/.cache/sluice/compiled`); only sluice's user may write there.
    #[arg(long, env = "SLUICE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The configuration file to validate.
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: PathBuf,
}

fn loaded(args: &RunArgs) -> anyhow::Result<LoadedConfig> {
    let mut loaded = match &args.config {
        Some(file) => Config::load(file)?,
        None if is_script_source(&args.scripts) => {
            let out = args.scripts.join("target/sluice");
            super::script::build_into(&args.scripts, &out)?;
            Config::embedded(&out)
        }
        None => Config::embedded(&args.scripts),
    };
    if let Some(listen) = args.listen {
        loaded.config.server.listen = listen;
    }
    if let Some(dir) = &args.cache_dir {
        loaded.config.scripts.engine.cache_dir = Some(dir.clone());
    }
    Ok(loaded)
}

pub(crate) fn run(args: &RunArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let loaded = loaded(args)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let listen = loaded.config.server.listen;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            tracing::info!(config = %loaded.file.display(), "starting");
            crate::server::run(loaded, listener, shutdown_signal()).await?;
            Ok(())
        })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            super::report(&error);
            ExitCode::from(2)
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; stopping on SIGINT only");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

pub(crate) fn check(args: &CheckArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<bool> {
        let LoadedConfig { config, file } = Config::load(&args.config)?;
        println!("{}: configuration is valid", file.display());
        if let Some(registry) = &config.registry.file {
            let devices = DeviceRegistry::load(registry)?;
            println!("{}: {} device(s)", registry.display(), devices.len());
            for device in devices.iter() {
                if !config.products.contains_key(&device.product)
                    && !config.script_path(&device.product).is_file()
                {
                    println!(
                        "  warning: device {:?} names product {:?}, which has no script",
                        device.id, device.product
                    );
                }
            }
        }
        let router = Router::new(&config.routes, config.status.topic.as_deref())
            .map_err(anyhow::Error::msg)?;
        println!(
            "bus: {}",
            if config.bus.redis.is_some() {
                "redis"
            } else {
                "in-process"
            }
        );
        println!("routes: {}", router.filters().join(", "));
        println!(
            "sources: {} MQTT, {} Kafka, HTTP ingest {}",
            config.sources.mqtt.len(),
            config.sources.kafka.len(),
            if config.sources.http.enabled {
                "on"
            } else {
                "off"
            }
        );
        let engine = ScriptEngine::new(&config.scripts.engine)?;
        let mut all_loaded = true;
        for name in config.products.keys() {
            let product = load_product(&engine, &config, name);
            match (&product.script, &product.error) {
                (Some(script), _) => println!(
                    "product {name}: {} ({} mode)",
                    script.id(),
                    product.mode.name()
                ),
                (None, error) => {
                    all_loaded = false;
                    println!(
                        "product {name}: script {} does not load: {}",
                        product.path.display(),
                        error.as_deref().unwrap_or("unknown error")
                    );
                }
            }
        }
        Ok(all_loaded)
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            super::report(&error);
            ExitCode::from(2)
        }
    }
}
