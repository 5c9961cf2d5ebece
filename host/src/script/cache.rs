//! Compiled scripts on disk, keyed by the script's content hash and the
//! engine's configuration, so a restart loads instead of recompiling.
//!
//! The files are native code that is loaded without re-validation, so the
//! directory must be sluice's alone: it is created `0700`, a directory
//! that is group- or world-writable or owned by another user is refused,
//! files are written create-new without following links and renamed into
//! place, and read without following links.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// Why a cache directory may not be used.
fn unsafe_directory(dir: &Path) -> std::io::Result<()> {
    let metadata = std::fs::metadata(dir)?;
    if !metadata.is_dir() {
        return Err(std::io::Error::other("it is not a directory"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me {
        return Err(std::io::Error::other(format!(
            "it belongs to user {}, not to sluice's user {me}: the files there are native code sluice runs",
            metadata.uid()
        )));
    }
    let mode = metadata.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "it is writable by its group or by everyone (mode {:o}); only sluice's user may write there: chmod 700 it",
            mode & 0o777
        )));
    }
    Ok(())
}

impl ArtifactCache {
    /// Opens (creating it `0700` if needed) the cache in `dir` for
    /// `engine`; refuses a directory others may write to.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        unsafe_directory(dir)?;
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
        if let Ok(artifact) = read_no_follow(&path) {
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

    /// Writes atomically (a new temporary file, created exclusively and
    /// without following links, then renamed), then trims the directory.
    fn store(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension(format!(
            "tmp{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut file| file.write_all(artifact).and_then(|()| file.sync_all()));
        if let Err(error) = written.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(error);
        }
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

/// A file's bytes, refusing a symbolic link.
fn read_no_follow(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The default cache directory: `$XDG_CACHE_HOME/sluice/compiled`, else
/// `~/.cache/sluice/compiled`; `None` when neither variable is set (never
/// a shared path such as the system temporary directory).
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })
        .map(|base| base.join("sluice").join("compiled"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::default()
    }

    #[test]
    fn the_directory_is_created_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b/compiled");
        ArtifactCache::open(&dir, &engine()).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let base = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o770, 0o722] {
            std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let error = ArtifactCache::open(base.path(), &engine()).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("writable by its group or by everyone"),
                "{error}"
            );
        }
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        ArtifactCache::open(base.path(), &engine()).unwrap();
    }

    #[test]
    fn a_linked_artifact_is_not_read() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("elsewhere");
        std::fs::write(&target, b"native code from someone else").unwrap();
        let link = base.path().join("x.cwasm");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(read_no_follow(&link).is_err());
        assert!(read_no_follow(&target).is_ok());
    }
}
