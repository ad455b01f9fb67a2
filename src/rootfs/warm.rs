//! Warm sandboxes: the first `lkvm sandbox` for a given kernel, root filesystem, options and
//! lkvm binary boots, waits until the guest's init is ready for a job and snapshots it into a
//! cache; later ones restore that snapshot and hand it their command over vsock.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::VmConfig;
use crate::snapshot::{MemoryBackend, MEMORY_FILE, STATE_FILE};
use crate::vmm::RestoreSpec;

/// One cache entry: a directory holding a snapshot's state and memory files.
pub struct WarmCache {
    dir: PathBuf,
}

/// `$XDG_CACHE_HOME/lkvm/sandbox`, or `~/.cache/lkvm/sandbox` (never under /tmp, where another
/// user could plant a snapshot).
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| crate::control::user_home().join(".cache"));
    base.join("lkvm/sandbox")
}

/// What identifies a file for the cache: its path, size and modification time.
fn hash_file(path: &Path, hasher: &mut DefaultHasher) -> io::Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    (path, meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()).hash(hasher);
    Ok(())
}

impl WarmCache {
    /// The entry for `config` (its name aside): a changed kernel, initrd, option or lkvm binary
    /// is another entry.
    pub fn for_config(config: &VmConfig) -> io::Result<WarmCache> {
        let mut keyed = config.clone();
        keyed.name = String::new();
        if let Some(vsock) = &mut keyed.vsock {
            vsock.uds_path = PathBuf::new(); // follows the name
        }
        let mut hasher = DefaultHasher::new();
        serde_json::to_string(&keyed).map_err(io::Error::other)?.hash(&mut hasher);
        hash_file(&config.boot.kernel, &mut hasher)?;
        if let Some(initrd) = &config.boot.initrd {
            hash_file(initrd, &mut hasher)?;
        }
        hash_file(&std::env::current_exe()?, &mut hasher)?;
        Ok(WarmCache { dir: cache_root().join(format!("{:016x}", hasher.finish())) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_filled(&self) -> bool {
        self.dir.join(STATE_FILE).is_file() && self.dir.join(MEMORY_FILE).is_file()
    }

    /// Restores as `config`'s guest: its name and vsock socket.
    pub fn restore_spec(&self, config: &VmConfig) -> RestoreSpec {
        let vsock = config.vsock.iter().map(|v| (v.id.clone(), v.uds_path.to_string_lossy().into_owned()));
        RestoreSpec {
            state: self.dir.join(STATE_FILE),
            memory: MemoryBackend::File(self.dir.join(MEMORY_FILE)),
            name: config.name.clone(),
            overrides: vsock.collect(),
        }
    }

    /// A private directory to write the snapshot into; `publish` moves it into place, so a
    /// concurrent sandbox never sees half a snapshot.
    pub fn staging(&self) -> io::Result<PathBuf> {
        let staging = self.dir.with_extension(format!("partial-{}", std::process::id()));
        std::fs::create_dir_all(&staging)?;
        Ok(staging)
    }

    pub fn publish(&self, staging: &Path) -> io::Result<()> {
        if std::fs::rename(staging, &self.dir).is_err() {
            // Another sandbox filled the entry first: keep that one.
            std::fs::remove_dir_all(staging)?;
        }
        Ok(())
    }

    /// Drops an entry that could not be restored (say, written by an lkvm that crashed).
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_options_and_files_but_not_the_name() {
        let dir = std::env::temp_dir().join(format!("lkvm-warm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut config = crate::config::cmdline::tests::base(crate::config::CmdlinePolicy::Kvmtool, None);
        config.boot.kernel = kernel.clone();
        let key = |c: &VmConfig| WarmCache::for_config(c).unwrap().dir;
        let first = key(&config);
        config.name = "another".into();
        config.vsock =
            Some(crate::config::VsockConfig { id: "vsock".into(), guest_cid: 3, uds_path: "/a.vsock".into() });
        let with_vsock = key(&config);
        assert_ne!(with_vsock, first, "a device is part of the key");
        config.vsock.as_mut().unwrap().uds_path = "/b.vsock".into();
        assert_eq!(key(&config), with_vsock, "the guest name and the socket named after it are not");
        config.vsock = None;
        config.machine.mem_size_mib = 256;
        assert_ne!(key(&config), first, "an option is");
        config.machine.mem_size_mib = 128;
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&kernel, b"rebuilt").unwrap();
        assert_ne!(key(&config), first, "a rebuilt kernel is");
        config.boot.kernel = dir.join("missing");
        assert!(WarmCache::for_config(&config).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
