//! Compiled scripts on disk, keyed by the script's content hash and the
//! engine's configuration, so a restart loads instead of recompiling.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// How many compiled scripts the directory keeps; the least recently
/// written go first.
const KEEP_ENTRIES: usize = 256;

/// Whether a script came from the cache or was compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from a compiled artifact on disk.
    Hit,
    /// Compiled (and written to the cache when one is configured).
    Compiled,
}

/// A directory of compiled artifacts (`<sha256>-<engine>.cwasm`).
///
/// The directory must be writable only by sluice's user: an artifact is
/// native code that is loaded without re-validation.
#[derive(Debug, Clone)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
}

impl ArtifactCache {
    /// Opens (creating if needed) the cache in `dir` for `engine`.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    fn path_for(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The component for `wasm` (whose SHA-256 is `sha256`), from disk when
    /// present, else compiled and stored.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        sha256: &str,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.path_for(sha256);
        // Read into memory rather than map the file: another process may
        // replace or trim the cache while this one runs.
        if let Ok(artifact) = std::fs::read(&path) {
            // SAFETY: files named `<sha256>-<engine key>.cwasm` in this
            // directory are written only below, from
            // `Engine::precompile_component` of an engine with the same
            // compatibility hash; the directory is documented as trusted.
            // wasmtime still checks the artifact's header, version and
            // settings and fails cleanly on a mismatch or a truncated file.
            match unsafe { Component::deserialize(engine, &artifact) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "compiled script in the cache does not load; recompiling");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let artifact = engine.precompile_component(wasm)?;
        if let Err(error) = self.store(&path, &artifact) {
            tracing::warn!(path = %path.display(), %error, "cannot write the compiled script to the cache");
        }
        // SAFETY: `artifact` was produced just above by
        // `precompile_component` of this same engine.
        let component = unsafe { Component::deserialize(engine, &artifact)? };
        Ok((component, CacheOutcome::Compiled))
    }

    /// Writes atomically (temporary file, then rename), then trims the directory.
    fn store(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, artifact)?;
        std::fs::rename(&tmp, path)?;
        self.trim()
    }

    fn trim(&self) -> std::io::Result<()> {
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= KEEP_ENTRIES {
            return Ok(());
        }
        entries.sort();
        for (_, old) in &entries[..entries.len() - KEEP_ENTRIES] {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/sluice/compiled`, else
/// `~/.cache/sluice/compiled`, else one under the system temporary directory.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("sluice")
        .join("compiled")
}
