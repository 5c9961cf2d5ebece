//! Building data scripts: cargo for Rust script crates and workspaces,
//! `npm run build` for AssemblyScript projects, and where their output is.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The target Rust scripts are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// One script crate and the component built from it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltScript {
    /// The package name, used as the product name (`json-sensor`).
    pub name: String,
    /// The crate's directory (where `<name>.examples.json` lives).
    pub crate_dir: PathBuf,
    /// The built component.
    pub wasm: PathBuf,
}

/// Building failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// cargo could not be started.
    #[error("cannot run cargo: {0}")]
    Cargo(std::io::Error),
    /// `cargo metadata` failed or printed something unexpected.
    #[error("cannot read the cargo metadata of {dir}: {reason}")]
    Metadata {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The build failed; cargo's output says why.
    #[error("building the scripts in {dir} failed:\n{output}")]
    Failed {
        /// The directory.
        dir: PathBuf,
        /// What cargo printed (when it was captured).
        output: String,
    },
    /// No crate in the directory builds a library (a component).
    #[error("{0} has no script crates (a package with a `cdylib` library)")]
    NoScripts(PathBuf),
    /// npm could not be started (AssemblyScript projects need Node.js and npm).
    #[error("cannot run npm to build the AssemblyScript script in {dir}: {source}")]
    Npm {
        /// The project.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An AssemblyScript project's `package.json` is unusable.
    #[error("cannot read the AssemblyScript project {dir}: {reason}")]
    Project {
        /// The project.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where cargo's output goes while it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutput {
    /// Passed through to this process's stderr: the user sees progress.
    Show,
    /// Captured, and returned in the error if the build fails.
    Capture,
}

/// Builds the scripts in `dir`: an AssemblyScript project (`package.json`
/// beside `asconfig.json`), or every script crate of a cargo package or
/// workspace (release profile, `wasm32-wasip2`, into `target_dir` when given)
/// plus the AssemblyScript projects among its subdirectories. Those are
/// skipped with a warning when npm is not installed.
pub fn build_scripts(
    dir: &Path,
    target_dir: Option<&Path>,
    output: BuildOutput,
) -> Result<Vec<BuiltScript>, BuildError> {
    if is_assemblyscript_dir(dir) {
        return Ok(vec![build_assemblyscript(dir, output)?]);
    }
    let mut built = build_rust_scripts(dir, target_dir, output)?;
    let projects = assemblyscript_projects(dir);
    if !projects.is_empty() && !npm_available() {
        tracing::warn!(
            dir = %dir.display(),
            projects = projects.len(),
            "npm is not installed: AssemblyScript scripts are not built"
        );
        return Ok(built);
    }
    for project in projects {
        built.push(build_assemblyscript(&project, output)?);
    }
    Ok(built)
}

/// Whether `dir` holds scripts [`build_scripts`] can build.
pub fn is_script_source(dir: &Path) -> bool {
    is_cargo_dir(dir) || is_assemblyscript_dir(dir)
}

/// Whether `dir` is an AssemblyScript script project.
pub fn is_assemblyscript_dir(dir: &Path) -> bool {
    dir.join("package.json").is_file() && dir.join("asconfig.json").is_file()
}

/// The AssemblyScript projects directly inside `dir`, sorted.
fn assemblyscript_projects(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut projects: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_assemblyscript_dir(p))
        .collect();
    projects.sort();
    projects
}

fn npm_available() -> bool {
    Command::new("npm")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `npm run build` in an AssemblyScript project; the module lands in
/// `build/<package name>.wasm`, and the package name is the product name.
///
/// Builds of one project are serialised by a lock file, and the result is
/// returned as a copy named by its content
/// (`build/sluice/<name>-<sha256 prefix>.wasm`, written by rename): another
/// build that rewrites `build/<name>.wasm` can never hand a reader half a file.
fn build_assemblyscript(dir: &Path, output: BuildOutput) -> Result<BuiltScript, BuildError> {
    #[derive(Deserialize)]
    struct PackageJson {
        name: String,
    }
    let project_error = |reason: String| BuildError::Project {
        dir: dir.to_path_buf(),
        reason,
    };
    let io_error =
        |path: &Path, e: std::io::Error| project_error(format!("{}: {e}", path.display()));
    let manifest = dir.join("package.json");
    let text = std::fs::read_to_string(&manifest).map_err(|e| io_error(&manifest, e))?;
    let package: PackageJson = serde_json::from_str(&text)
        .map_err(|e| project_error(format!("{}: {e}", manifest.display())))?;
    let out_dir = dir.join("build").join("sluice");
    std::fs::create_dir_all(&out_dir).map_err(|e| io_error(&out_dir, e))?;
    let lock_path = out_dir.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| io_error(&lock_path, e))?;
    lock.lock().map_err(|e| io_error(&lock_path, e))?;

    let mut npm = Command::new("npm");
    npm.args(["run", "build", "--silent"])
        .current_dir(dir)
        .stdin(Stdio::null());
    let npm_error = |source| BuildError::Npm {
        dir: dir.to_path_buf(),
        source,
    };
    let (succeeded, printed) = run(&mut npm, output).map_err(npm_error)?;
    if !succeeded {
        return Err(BuildError::Failed {
            dir: dir.to_path_buf(),
            output: printed,
        });
    }
    let built = dir.join("build").join(format!("{}.wasm", package.name));
    let bytes = std::fs::read(&built).map_err(|e| {
        project_error(format!(
            "`npm run build` succeeded but did not write {}: {e}",
            built.display()
        ))
    })?;
    let hash = hex::encode(Sha256::digest(&bytes));
    let wasm = out_dir.join(format!("{}-{}.wasm", package.name, &hash[..12]));
    if !wasm.is_file() {
        let partial = out_dir.join(format!(".{}-{}.partial", package.name, std::process::id()));
        std::fs::write(&partial, &bytes).map_err(|e| io_error(&partial, e))?;
        std::fs::rename(&partial, &wasm).map_err(|e| io_error(&wasm, e))?;
    }
    drop(lock);
    Ok(BuiltScript {
        name: package.name,
        crate_dir: dir.to_path_buf(),
        wasm,
    })
}

/// Runs `command`, showing or capturing what it prints; whether it
/// succeeded, and what it printed when captured.
fn run(command: &mut Command, output: BuildOutput) -> std::io::Result<(bool, String)> {
    match output {
        BuildOutput::Show => Ok((command.status()?.success(), String::new())),
        BuildOutput::Capture => {
            let out = command.output()?;
            let mut printed = String::from_utf8_lossy(&out.stdout).into_owned();
            printed.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok((out.status.success(), printed))
        }
    }
}

fn build_rust_scripts(
    dir: &Path,
    target_dir: Option<&Path>,
    output: BuildOutput,
) -> Result<Vec<BuiltScript>, BuildError> {
    // cargo runs inside `dir`, so every path it is given must be absolute.
    let absolute = |p: &Path| std::path::absolute(p).map_err(BuildError::Cargo);
    let dir = &absolute(dir)?;
    let target_dir = target_dir.map(absolute).transpose()?;
    let target_dir = target_dir.as_deref();
    let manifest = dir.join("Cargo.toml");
    let metadata = metadata(&manifest, target_dir)?;
    let scripts: Vec<(String, PathBuf, String)> = metadata
        .packages
        .iter()
        .filter(|p| metadata.workspace_members.contains(&p.id))
        .filter_map(|p| {
            let lib = p
                .targets
                .iter()
                .find(|t| t.crate_types.iter().any(|c| c == "cdylib"))?;
            let crate_dir = Path::new(&p.manifest_path).parent()?.to_path_buf();
            Some((p.name.clone(), crate_dir, lib.name.replace('-', "_")))
        })
        .collect();
    if scripts.is_empty() {
        return Err(BuildError::NoScripts(dir.to_path_buf()));
    }

    let mut cargo = cargo(dir, target_dir);
    cargo
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(&manifest);
    for (name, _, _) in &scripts {
        cargo.args(["--package", name]);
    }
    let (succeeded, printed) = run(&mut cargo, output).map_err(BuildError::Cargo)?;
    if !succeeded {
        return Err(BuildError::Failed {
            dir: dir.to_path_buf(),
            output: printed,
        });
    }

    let out_dir = Path::new(&metadata.target_directory)
        .join(TARGET)
        .join("release");
    Ok(scripts
        .into_iter()
        .map(|(name, crate_dir, lib)| BuiltScript {
            name,
            crate_dir,
            wasm: out_dir.join(format!("{lib}.wasm")),
        })
        .collect())
}

/// Whether `dir` holds a cargo package or workspace.
pub fn is_cargo_dir(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file()
}

/// `cargo`, run in `dir` so that rustup picks the toolchain (and its
/// `wasm32-wasip2` target) from the nearest `rust-toolchain.toml`.
fn cargo(dir: &Path, target_dir: Option<&Path>) -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(dir);
    // A build started from inside another cargo command (tests, build
    // scripts) must not inherit that command's target settings.
    cargo.env_remove("CARGO_BUILD_TARGET");
    if let Some(dir) = target_dir {
        cargo.env("CARGO_TARGET_DIR", dir);
    }
    cargo.stdin(Stdio::null());
    cargo
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    workspace_members: Vec<String>,
    target_directory: String,
}

#[derive(Deserialize)]
struct Package {
    id: String,
    name: String,
    manifest_path: String,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    crate_types: Vec<String>,
}

fn metadata(manifest: &Path, target_dir: Option<&Path>) -> Result<Metadata, BuildError> {
    let dir = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
    let out = cargo(&dir, target_dir)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(manifest)
        .stderr(Stdio::piped())
        .output()
        .map_err(BuildError::Cargo)?;
    if !out.status.success() {
        return Err(BuildError::Metadata {
            dir,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| BuildError::Metadata {
        dir,
        reason: e.to_string(),
    })
}
