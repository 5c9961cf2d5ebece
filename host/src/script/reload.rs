//! Hot reload: the scripts directory is watched; when `<product>.wasm` (or
//! its `<product>.examples.json`) is created, replaced or removed, the
//! change is taken once the file has settled (editors and build tools
//! write by rename or in several writes) and its content differs from the
//! running version's (reads, and writes of the same bytes, by this or
//! another instance sharing the directory, change nothing), compiled off
//! the hot path,
//! validated (instantiated, and its examples run when it has any), then
//! swapped in for every worker at once. Messages already running finish on
//! the old version; the next message uses the new one. A file that does not
//! load or fails an example leaves the old version running and the reason
//! in the product's `error`. A removed file unloads its product after a
//! grace period; its messages are then dead-lettered with the reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;

use super::fixture::Fixtures;
use super::registry::{Product, ScriptRegistry, load_product};
use super::{Script, ScriptEngine};
use crate::config::{Config, check_name};
use crate::supervisor::Supervisor;

/// What a file's metadata says, to tell when it stops changing.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// The product a changed file belongs to: `<product>.wasm` or
/// `<product>.examples.json`; temporary and hidden files are ignored.
fn product_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let stem = name
        .strip_suffix(".wasm")
        .or_else(|| name.strip_suffix(".examples.json"))?;
    check_name(stem).ok()?;
    Some(stem.to_owned())
}

struct Dirty {
    last_event: Instant,
    stamp: Stamp,
}

/// Whether an event can mean new content: creation, removal, a rename, a
/// write. Opening, reading and metadata changes cannot.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other | EventKind::Any => false,
    }
}

/// The content hashes of a product's script and examples files, as last
/// validated (`None` for a missing file).
type Contents = (Option<String>, Option<String>);

fn contents(config: &Config, product: &str) -> Contents {
    let hash = |path: &Path| {
        std::fs::read(path)
            .ok()
            .map(|b| hex::encode(Sha256::digest(b)))
    };
    let script = config.script_path(product);
    (hash(&script), hash(&Fixtures::path_for(&script)))
}

/// Starts watching the scripts directory (the watch is in place when this
/// returns) and reloads changed scripts until `shutdown`, supervised.
pub fn spawn_reloader(
    engine: ScriptEngine,
    config: Arc<Config>,
    registry: Arc<ScriptRegistry>,
    tasks: &Arc<Supervisor>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    let dir = config.scripts.dir.clone();
    // Unbounded, but fed only by the file system's events for one
    // directory, never by devices or clients.
    let (tx, changes) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && may_change_content(&event.kind)
        {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), settle = ?config.scripts.settle, "watching scripts for changes");
    // What is running now, so an event that changes nothing is ignored.
    let known: HashMap<String, Contents> = registry
        .list()
        .iter()
        .map(|p| (p.name.clone(), contents(&config, &p.name)))
        .collect();
    let watcher = Arc::new(std::sync::Mutex::new(watcher));
    let changes = Arc::new(Mutex::new(changes));
    let known = Arc::new(Mutex::new(known));
    let stop = shutdown.clone();
    Ok(tasks.spawn("script reload", shutdown, move || {
        // The watcher lives as long as the task can be restarted.
        let _watcher = watcher.clone();
        follow(
            engine.clone(),
            config.clone(),
            registry.clone(),
            changes.clone(),
            known.clone(),
            stop.clone(),
        )
    }))
}

async fn follow(
    engine: ScriptEngine,
    config: Arc<Config>,
    registry: Arc<ScriptRegistry>,
    changes: Arc<Mutex<mpsc::UnboundedReceiver<PathBuf>>>,
    known: Arc<Mutex<HashMap<String, Contents>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = changes.lock().await;
    let mut known = known.lock().await;
    let settle = config.scripts.settle;
    let grace = config.scripts.unload_grace;
    let mut dirty: HashMap<String, Dirty> = HashMap::new();
    let mut removals: HashMap<String, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval((settle / 4).max(Duration::from_millis(20)));
    loop {
        tokio::select! {
            changed = changes.recv() => {
                let Some(path) = changed else { return };
                if let Some(product) = product_of(&path) {
                    let stamp = stamp(&config.script_path(&product));
                    dirty.insert(product, Dirty { last_event: Instant::now(), stamp });
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let quiet: Vec<String> = dirty
                    .iter()
                    .filter(|(_, d)| now.duration_since(d.last_event) >= settle)
                    .map(|(p, _)| p.clone())
                    .collect();
                for product in quiet {
                    let Some(before) = dirty.remove(&product) else { continue };
                    let path = config.script_path(&product);
                    let current = stamp(&path);
                    if current != before.stamp {
                        // Still being written: wait another settle period.
                        dirty.insert(product, Dirty { last_event: now, stamp: current });
                        continue;
                    }
                    if current.is_none() {
                        known.remove(&product);
                        if registry.get(&product).is_some() {
                            tracing::info!(product, ?grace, "script removed; unloading after the grace period unless it comes back");
                            removals.insert(product, now + grace);
                        }
                        continue;
                    }
                    removals.remove(&product);
                    let now_contents = contents(&config, &product);
                    if known.get(&product) == Some(&now_contents) {
                        // Touched, read or rewritten with the same bytes.
                        continue;
                    }
                    reload(&engine, &config, &registry, &product).await;
                    known.insert(product, now_contents);
                }
                let due: Vec<String> = removals
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                for product in due {
                    removals.remove(&product);
                    if !config.script_path(&product).exists() {
                        unload(&registry, &config, &product);
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Loads and validates the current file of `product`, and swaps it in if
/// it passes.
pub async fn reload(
    engine: &ScriptEngine,
    config: &Arc<Config>,
    registry: &ScriptRegistry,
    product: &str,
) {
    let started = std::time::Instant::now();
    let validated = {
        let (engine, config, name) = (engine.clone(), config.clone(), product.to_owned());
        tokio::task::spawn_blocking(move || validate(&engine, &config, &name))
            .await
            .unwrap_or_else(|e| Err(format!("the validation task failed: {e}")))
    };
    let validations = registry.get(product).map_or(0, |p| p.validations) + 1;
    match (validated, registry.get(product)) {
        (Ok(script), current) => {
            if current
                .as_ref()
                .and_then(|p| p.script.as_ref())
                .is_some_and(|s| {
                    s.id() == script.id() && current.as_ref().is_some_and(|p| p.error.is_none())
                })
            {
                // The examples changed and the running version passes them.
                if let Some(current) = &current {
                    let mut same = Product::clone(current);
                    same.validations = validations;
                    registry.put(same);
                }
                return;
            }
            tracing::info!(product, version = %script.id().version, took = ?started.elapsed(), "script reloaded");
            metrics::counter!("sluice_script_reloads_total", "product" => product.to_owned(), "result" => "ok").increment(1);
            let mut next = Product::configured(config, product);
            next.script = Some(script);
            next.validations = validations;
            if let Some(current) = &current {
                next.reloads = current.reloads + 1;
                next.rejected = current.rejected;
            }
            registry.put(next);
        }
        (Err(reason), current) => {
            tracing::error!(product, %reason, "script change rejected; the previous version keeps running");
            metrics::counter!("sluice_script_reloads_total", "product" => product.to_owned(), "result" => "rejected").increment(1);
            let mut next = Product::configured(config, product);
            next.validations = validations;
            if let Some(current) = &current {
                next.script = current.script.clone();
                next.reloads = current.reloads;
                next.rejected = current.rejected + 1;
            }
            next.error = Some(reason);
            registry.put(next);
        }
    }
}

fn unload(registry: &ScriptRegistry, config: &Config, product: &str) {
    tracing::warn!(
        product,
        "script file removed; product unloaded, its messages go to dead letters"
    );
    metrics::counter!("sluice_script_reloads_total", "product" => product.to_owned(), "result" => "unloaded").increment(1);
    let mut next = Product::configured(config, product);
    if let Some(current) = registry.get(product) {
        next.reloads = current.reloads;
        next.rejected = current.rejected;
        next.validations = current.validations;
    }
    next.error = Some(format!(
        "the script file {} was removed",
        next.path.display()
    ));
    registry.put(next);
}

/// Compiles `product`'s file, instantiates it and runs its examples.
fn validate(engine: &ScriptEngine, config: &Config, product: &str) -> Result<Script, String> {
    let loaded = load_product(engine, config, product);
    let script = match (loaded.script, loaded.error) {
        (Some(script), _) => script,
        (None, error) => return Err(error.unwrap_or_else(|| "the script did not load".into())),
    };
    let fixtures = Fixtures::path_for(&loaded.path);
    if fixtures.exists() {
        let fixtures = Fixtures::load(&fixtures).map_err(|e| e.to_string())?;
        let mut instance = script.instantiate().map_err(|e| e.to_string())?;
        let failed: Vec<String> = fixtures
            .run(&mut instance, product)
            .into_iter()
            .filter(|case| !case.passed())
            .map(|case| format!("{}: {}", case.name, case.failures.join("; ")))
            .collect();
        if !failed.is_empty() {
            return Err(format!(
                "version {} fails {} of its examples: {}",
                script.id().version,
                failed.len(),
                failed.join(" | ")
            ));
        }
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_metadata_are_not_changes() {
        use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};
        assert!(may_change_content(&EventKind::Create(CreateKind::File)));
        assert!(may_change_content(&EventKind::Remove(RemoveKind::File)));
        assert!(may_change_content(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!may_change_content(&EventKind::Modify(
            ModifyKind::Metadata(MetadataKind::AccessTime)
        )));
    }

    #[test]
    fn only_scripts_and_their_examples_count() {
        assert_eq!(
            product_of(Path::new("/s/json-sensor.wasm")).as_deref(),
            Some("json-sensor")
        );
        assert_eq!(
            product_of(Path::new("/s/lht65.examples.json")).as_deref(),
            Some("lht65")
        );
        assert_eq!(product_of(Path::new("/s/.lht65.wasm.partial")), None);
        assert_eq!(product_of(Path::new("/s/notes.txt")), None);
    }
}
