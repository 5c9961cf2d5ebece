//! The `sluice` command line: argument parsing and dispatch. Each command
//! lives in its own file and returns an exit code.

mod demo;
mod run;
mod script;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// sluice: a WebAssembly-extensible stream processor for IoT device data.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the stream processor.
    Run(run::RunArgs),
    /// See sluice work: example scripts, simulated devices and the dashboard.
    Demo(demo::DemoArgs),
    /// Validate a configuration file, its device registry and its scripts.
    Check(run::CheckArgs),
    /// Work with data scripts: run one on an input, check fixtures, create one.
    #[command(subcommand)]
    Script(script::ScriptCommand),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run(_) => "info",
        Command::Demo(_) => "warn",
        Command::Check(_) | Command::Script(_) => "warn",
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Check(args) => run::check(&args),
        Command::Script(command) => script::run(command),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_level`).
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Prints an error (with its causes) to stderr.
pub(crate) fn report(error: &anyhow::Error) {
    eprintln!("error: {error:#}");
}
