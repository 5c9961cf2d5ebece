//! `sluice script test | bench | check | new | build`.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;

use crate::authoring;
use crate::authoring::build::{BuildOutput, build_scripts, is_script_source};
use crate::authoring::scaffold::{Lang, scaffold};
use crate::message::{RawMessage, SourceKind, now_ms};
use crate::script::fixture::{CaseReport, DEFAULT_DEVICE, Fixtures};
use crate::script::{CommandCall, EngineOptions, ScriptEngine, ScriptInstance, ScriptSettings};

#[derive(Debug, Subcommand)]
pub(crate) enum ScriptCommand {
    /// Run a script on one input and print its outputs as JSON.
    Test(TestArgs),
    /// Run a script on one input again and again under the real engine and
    /// limits, and print calls/s, time per call and the instance's memory.
    Bench(BenchArgs),
    /// Run the `<name>.examples.json` fixtures of a script, a directory of
    /// scripts, or a cargo workspace of script crates (built first).
    Check(CheckArgs),
    /// Create a Rust script crate that builds and passes `check` as generated.
    New(NewArgs),
    /// Build a cargo workspace (or crate) of Rust scripts and put each as
    /// `<product>.wasm`, with its fixtures, in a scripts directory.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BuildArgs {
    /// The cargo workspace or crate of the scripts.
    path: PathBuf,
    /// The scripts directory to fill.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct EngineArgs {
    /// Do not keep compiled scripts on disk.
    #[arg(long)]
    no_cache: bool,
    /// Where compiled scripts are kept.
    #[arg(long, env = "SLUICE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Write `/tmp/perf-<pid>.map`, so `perf report` names the script's
    /// own functions (compiles afresh: the cache holds no symbols).
    #[arg(long)]
    perf_map: bool,
}

impl EngineArgs {
    fn engine(&self) -> anyhow::Result<ScriptEngine> {
        Ok(ScriptEngine::new(&EngineOptions {
            cache: !self.no_cache && !self.perf_map,
            cache_dir: self.cache_dir.clone(),
            perf_map: self.perf_map,
            ..EngineOptions::default()
        })?)
    }
}

/// The message a script runs on.
#[derive(Debug, Args)]
pub(crate) struct MessageArgs {
    /// The payload: a file, or `-` for stdin (required unless
    /// `script test` is given `--command`).
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// The input is hex digits (spaces allowed), not raw bytes.
    #[arg(long)]
    hex: bool,
    /// The message's topic.
    #[arg(long, default_value = "")]
    topic: String,
    /// The message's device id.
    #[arg(long, default_value = DEFAULT_DEVICE)]
    device: String,
    /// The product name (default: the script's name).
    #[arg(long)]
    product: Option<String>,
    /// A product parameter, `key=value`; repeatable.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(crate) struct TestArgs {
    /// The script component (`.wasm`).
    script: PathBuf,
    /// Run the script's `encode` on this command instead of `parse` on a
    /// payload, and print its downlinks: `{"name": "set_interval",
    /// "params": {"seconds": 60}}`.
    #[arg(long)]
    command: Option<String>,
    #[command(flatten)]
    message: MessageArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The script (`.wasm`), or a cargo workspace or crate of Rust scripts
    /// or an AssemblyScript project (built first; with several scripts,
    /// `--product` picks one).
    script: PathBuf,
    #[command(flatten)]
    message: MessageArgs,
    /// How long to time calls, after a warm-up of 0.2 s.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// A script (`.wasm`), a directory of scripts, or a cargo workspace or
    /// crate of Rust scripts.
    path: PathBuf,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
pub(crate) struct NewArgs {
    /// The script's name, which is also its product name (`door-sensor`).
    name: String,
    /// The directory to create it in: a script workspace, which the crate joins.
    #[arg(long, default_value = "scripts")]
    dir: PathBuf,
    /// Path to sluice's `guest-sdk`, for a standalone crate outside a script workspace.
    #[arg(long)]
    sdk: Option<PathBuf>,
    /// The script's language.
    #[arg(long, value_enum, default_value = "rust")]
    lang: LangArg,
}

/// `--lang` of `sluice script new`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum LangArg {
    /// A Rust crate (cargo, `wasm32-wasip2`).
    Rust,
    /// An AssemblyScript project (npm).
    #[value(name = "assemblyscript", alias = "as")]
    AssemblyScript,
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

pub(crate) fn run(command: ScriptCommand) -> ExitCode {
    let result = match command {
        ScriptCommand::Test(args) => test(&args),
        ScriptCommand::Bench(args) => bench(&args),
        ScriptCommand::Check(args) => check(&args),
        ScriptCommand::New(args) => new(&args),
        ScriptCommand::Build(args) => build(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            super::report(&error);
            ExitCode::from(2)
        }
    }
}

fn product_of(path: &Path) -> String {
    path.file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

impl MessageArgs {
    /// The payload, read from the file or stdin (and decoded from hex).
    fn payload(&self) -> anyhow::Result<Vec<u8>> {
        let Some(path) = &self.input else {
            bail!("give the payload with --input <file> (or `-` for stdin)");
        };
        let mut input = Vec::new();
        if path == Path::new("-") {
            std::io::stdin()
                .read_to_end(&mut input)
                .context("cannot read stdin")?;
        } else {
            input = std::fs::read(path)
                .with_context(|| format!("cannot read input {}", path.display()))?;
        }
        if self.hex {
            let digits: String = String::from_utf8_lossy(&input).split_whitespace().collect();
            input = hex::decode(&digits).context("--hex input is not hex digits")?;
        }
        Ok(input)
    }

    /// Loads `wasm` as the script of `product` (unless `--product` names
    /// another) with the parameters, and makes the message.
    fn load(
        &self,
        engine: &EngineArgs,
        wasm: &Path,
        product: String,
    ) -> anyhow::Result<(ScriptInstance, RawMessage)> {
        let payload = self.payload()?;
        let product = self.product.clone().unwrap_or(product);
        let settings = ScriptSettings {
            params: self.params.iter().cloned().collect(),
            ..ScriptSettings::default()
        };
        let script = engine.engine()?.load_file(&product, wasm, settings)?;
        let instance = script.instantiate()?;
        let message = RawMessage {
            device_id: self.device.clone(),
            product,
            topic: self.topic.clone(),
            payload,
            received_at: now_ms(),
            source: SourceKind::Internal,
        };
        Ok((instance, message))
    }
}

/// The `--command` of `script test`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandArg {
    name: String,
    #[serde(default)]
    params: Option<serde_json::Value>,
    #[serde(default)]
    id: Option<String>,
}

fn test(args: &TestArgs) -> anyhow::Result<ExitCode> {
    if let Some(command) = &args.command {
        return test_command(args, command);
    }
    let (mut instance, message) =
        args.message
            .load(&args.engine, &args.script, product_of(&args.script))?;
    match instance.parse(&message) {
        Ok(outputs) => {
            println!("{}", serde_json::to_string_pretty(&outputs)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn test_command(args: &TestArgs, command: &str) -> anyhow::Result<ExitCode> {
    let command: CommandArg = serde_json::from_str(command)
        .context("--command is not {\"name\": ..., \"params\": {...}}")?;
    let params = command.params.unwrap_or_else(|| serde_json::json!({}));
    if !params.is_object() {
        bail!("--command: `params` must be a JSON object");
    }
    let product = args
        .message
        .product
        .clone()
        .unwrap_or_else(|| product_of(&args.script));
    let settings = ScriptSettings {
        params: args.message.params.iter().cloned().collect(),
        ..ScriptSettings::default()
    };
    let script = args
        .engine
        .engine()?
        .load_file(&product, &args.script, settings)?;
    let mut instance = script.instantiate()?;
    let call = CommandCall {
        id: command
            .id
            .unwrap_or_else(|| crate::script::fixture::DEFAULT_COMMAND_ID.to_owned()),
        device_id: args.message.device.clone(),
        product,
        name: command.name,
        params: params.to_string(),
        issued_at: now_ms(),
    };
    match instance.encode(&call) {
        Ok(downlinks) => {
            println!("{}", serde_json::to_string_pretty(&downlinks)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        bail!("--seconds must be more than 0 and at most 3600");
    }
    let (wasm, product) = bench_target(&args.script, args.message.product.as_deref())?;
    let (mut instance, message) = args.message.load(&args.engine, &wasm, product)?;
    let duration = std::time::Duration::from_secs_f64(args.seconds);
    eprintln!(
        "{} on {} bytes for {:.1} s (after a 0.2 s warm-up)",
        instance.script().id(),
        message.payload.len(),
        args.seconds
    );
    let terminal = std::io::stderr().is_terminal();
    let every = std::time::Duration::from_millis(if terminal { 250 } else { 1000 });
    let report = authoring::bench::bench(&mut instance, &message, duration, every, |p| {
        let line = format!(
            "  {:>5.1} s  {:>12} calls  {:>9.0} calls/s",
            p.elapsed.as_secs_f64(),
            p.calls,
            p.calls as f64 / p.elapsed.as_secs_f64()
        );
        if terminal {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    });
    if terminal {
        eprintln!();
    }
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            eprintln!(
                "error: the script fails on this input, so there is nothing to time: {error}"
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let limit = instance.script().limits().memory;
    println!("script      {}", instance.script().id());
    println!(
        "calls       {} in {:.2} s: {:.0} calls/s",
        report.calls,
        report.elapsed.as_secs_f64(),
        report.calls_per_second()
    );
    println!(
        "per call    median {:?}, p99 {:?}, max {:?}",
        report.median, report.p99, report.max
    );
    println!(
        "memory      {} of linear memory (limit {limit})",
        bytesize::ByteSize::b(report.memory_bytes as u64)
    );
    Ok(ExitCode::SUCCESS)
}

/// The component to bench and its product name: the file itself, or the
/// one script (or the one named `product`) a source directory builds.
fn bench_target(path: &Path, product: Option<&str>) -> anyhow::Result<(PathBuf, String)> {
    if path.is_file() {
        return Ok((path.to_path_buf(), product_of(path)));
    }
    if !is_script_source(path) {
        bail!(
            "{} is neither a .wasm file nor a script workspace, crate or AssemblyScript project",
            path.display()
        );
    }
    eprintln!("building the scripts in {} ...", path.display());
    let built = build_scripts(path, None, BuildOutput::Show)?;
    let names: Vec<&str> = built.iter().map(|s| s.name.as_str()).collect();
    let chosen = match product {
        Some(name) => built.iter().find(|s| s.name == name),
        None if built.len() == 1 => built.first(),
        None => bail!(
            "{} builds {} scripts ({}): pick one with --product",
            path.display(),
            built.len(),
            names.join(", ")
        ),
    };
    let Some(script) = chosen else {
        bail!(
            "{} builds no script named {:?} (it builds {})",
            path.display(),
            product.unwrap_or_default(),
            names.join(", ")
        );
    };
    Ok((script.wasm.clone(), script.name.clone()))
}

/// A script to check: its product name, component and fixture file.
struct Target {
    product: String,
    wasm: PathBuf,
    fixtures: PathBuf,
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let targets = check_targets(&args.path)?;
    let engine = args.engine.engine()?;
    let (mut examples, mut failed, mut broken) = (0usize, 0usize, 0usize);
    for target in &targets {
        match check_one(&engine, target) {
            Ok((label, reports)) => {
                println!("{label} ({} examples)", reports.len());
                for report in &reports {
                    print_case(report);
                }
                examples += reports.len();
                failed += reports.iter().filter(|r| !r.passed()).count();
            }
            Err(error) => {
                println!("{}: {error:#}", target.product);
                broken += 1;
            }
        }
    }
    println!(
        "{} script(s), {examples} example(s): {} passed, {failed} failed{}",
        targets.len(),
        examples - failed,
        if broken > 0 {
            format!(", {broken} script(s) did not load")
        } else {
            String::new()
        }
    );
    Ok(if failed == 0 && broken == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_case(report: &CaseReport) {
    if report.passed() {
        println!("  ok    {}", report.name);
    } else {
        println!("  FAIL  {}", report.name);
        for line in &report.failures {
            println!("        {line}");
        }
    }
}

fn check_one(engine: &ScriptEngine, target: &Target) -> anyhow::Result<(String, Vec<CaseReport>)> {
    let fixtures = Fixtures::load(&target.fixtures)?;
    let settings = ScriptSettings {
        params: fixtures.params.clone(),
        ..ScriptSettings::default()
    };
    let script = engine.load_file(&target.product, &target.wasm, settings)?;
    let mut instance = script.instantiate()?;
    let reports = fixtures.run(&mut instance, &target.product);
    Ok((script.id().to_string(), reports))
}

/// The scripts `path` names, each with its fixture file.
fn check_targets(path: &Path) -> anyhow::Result<Vec<Target>> {
    if path.is_file() {
        let fixtures = Fixtures::path_for(path);
        if !fixtures.is_file() {
            bail!(
                "{} has no fixtures: expected {}",
                path.display(),
                fixtures.display()
            );
        }
        return Ok(vec![Target {
            product: product_of(path),
            wasm: path.to_path_buf(),
            fixtures,
        }]);
    }
    if is_script_source(path) {
        eprintln!("building the scripts in {} ...", path.display());
        let built = build_scripts(path, None, BuildOutput::Show)?;
        let mut targets = Vec::new();
        for script in built {
            let fixtures = script
                .crate_dir
                .join(format!("{}.examples.json", script.name));
            if fixtures.is_file() {
                targets.push(Target {
                    product: script.name,
                    wasm: script.wasm,
                    fixtures,
                });
            } else {
                eprintln!(
                    "{}: no fixtures at {}, skipped",
                    script.name,
                    fixtures.display()
                );
            }
        }
        return Ok(targets);
    }
    let mut targets = Vec::new();
    let entries =
        std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut wasm_files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    wasm_files.sort();
    for wasm in wasm_files {
        let fixtures = Fixtures::path_for(&wasm);
        if fixtures.is_file() {
            targets.push(Target {
                product: product_of(&wasm),
                wasm,
                fixtures,
            });
        } else {
            eprintln!("{}: no fixtures, skipped", wasm.display());
        }
    }
    if targets.is_empty() {
        bail!("{} holds no scripts with fixtures", path.display());
    }
    Ok(targets)
}

fn new(args: &NewArgs) -> anyhow::Result<ExitCode> {
    let lang = match args.lang {
        LangArg::Rust => Lang::Rust,
        LangArg::AssemblyScript => Lang::AssemblyScript,
    };
    let made = scaffold(&args.dir, &args.name, args.sdk.as_deref(), lang)?;
    for file in &made.files {
        println!("created {}", file.display());
    }
    if made.joined_workspace {
        println!(
            "added {} to the workspace {}",
            args.name,
            args.dir.join("Cargo.toml").display()
        );
    }
    println!(
        "next: sluice script check {}",
        if made.joined_workspace {
            args.dir.display()
        } else {
            made.crate_dir.display()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn build(args: &BuildArgs) -> anyhow::Result<ExitCode> {
    for target in build_into(&args.path, &args.out)? {
        println!("{}", target.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds the Rust scripts of the cargo workspace (or crate) `dir` and puts
/// each in `out` as `<name>.wasm` with its `<name>.examples.json`; returns
/// the components written.
/// Writes `bytes` as `dir/name` (through a hidden temporary file and a
/// rename) unless the file already holds exactly them; returns the path.
fn write_if_changed(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let target = dir.join(name);
    if std::fs::read(&target).is_ok_and(|current| current == bytes) {
        return Ok(target);
    }
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, &target))
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(target)
}

pub(crate) fn build_into(dir: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    eprintln!("building the scripts in {} ...", dir.display());
    let built = build_scripts(dir, None, BuildOutput::Show)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for script in built {
        // Fixtures first (a reload checks the script against them), then the
        // script; each is written only when its content changed (so other
        // instances watching the directory see nothing), under a temporary
        // name and renamed, so a watcher never sees half a file.
        let fixtures = script
            .crate_dir
            .join(format!("{}.examples.json", script.name));
        if fixtures.is_file() {
            let bytes = std::fs::read(&fixtures)
                .with_context(|| format!("cannot read {}", fixtures.display()))?;
            write_if_changed(out, &format!("{}.examples.json", script.name), &bytes)?;
        }
        let bytes = std::fs::read(&script.wasm)
            .with_context(|| format!("cannot read {}", script.wasm.display()))?;
        let target = write_if_changed(out, &format!("{}.wasm", script.name), &bytes)?;
        written.push(target);
    }
    Ok(written)
}
