//! Warm sandboxes: the first `lkvm sandbox` for a given kernel, root filesystem, options and
//! lkvm binary boots, waits until the guest's init is ready for a job and snapshots it into a
//! cache; later ones restore that snapshot and hand it their command over vsock.
//!
//! An entry is restored only if it is the user's own, nobody else can write it or the
//! directories above it, and it carries a MAC, under a key of the user's that no guest can
//! write, over its state file and its memory file's identity (inode, size, change time: a
//! memory file written, or replaced, since the entry was sealed no longer matches).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{MemoryBackend, VmConfig};
use crate::snapshot::{MEMORY_FILE, STATE_FILE};
use crate::vmm::RestoreSpec;

/// The file in an entry that holds its MAC.
const SEAL_FILE: &str = "seal";
const KEY_LEN: usize = 32;

/// One cache entry: a directory holding a snapshot's state and memory files, and its seal.
pub struct WarmCache {
    dir: PathBuf,
    key: [u8; KEY_LEN],
}

/// The user's key for sealing cache entries (made on first use): in ~/.lkvm (which `lkvm
/// sandbox` has made by then), which no guest is given to write, only the user's, readable by
/// nobody else.
fn user_key(path: &Path) -> io::Result<[u8; KEY_LEN]> {
    use std::os::unix::fs::OpenOptionsExt;
    let in_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut key = [0u8; KEY_LEN];
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut file) => {
            rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty()).map_err(io::Error::from)?;
            io::Write::write_all(&mut file, &key).map_err(in_path)?;
            return Ok(key);
        }
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(in_path(e)),
        Err(_) => {}
    }
    // SAFETY: geteuid has no preconditions.
    private(path, unsafe { libc::geteuid() }).map_err(|e| in_path(io::Error::other(e)))?;
    let bytes = std::fs::read(path).map_err(in_path)?;
    let meta = std::fs::metadata(path).map_err(in_path)?;
    if bytes.len() != KEY_LEN || meta.mode() & 0o077 != 0 {
        return Err(in_path(io::Error::other("not a key of lkvm's (32 bytes, mode 0600): remove it")));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Refuses `path` unless it is `owner`'s and nobody else may write it.
fn private(path: &Path, owner: u32) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.uid() != owner {
        return Err(format!("{} belongs to uid {}, not to you", path.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 || meta.file_type().is_symlink() {
        return Err(format!("{} may be written by others (mode {:o})", path.display(), meta.mode() & 0o777));
    }
    Ok(())
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
        // Restored with the sandbox's own view (its current directory): one entry for all.
        keyed.shares.iter_mut().for_each(|s| s.spec.view.clear());
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
        let key = user_key(&crate::host::lkvm_dir().join("warm-sandbox.key"))?;
        Ok(WarmCache { dir: crate::host::sandbox_cache_root().join(format!("{:016x}", hasher.finish())), key })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_filled(&self) -> bool {
        self.dir.join(STATE_FILE).is_file() && self.dir.join(MEMORY_FILE).is_file()
    }

    /// Whether the filled entry may be restored: why not, else Ok.
    pub fn check(&self) -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        private(&self.dir, me)?;
        let root = crate::host::sandbox_cache_root();
        let top = root.parent().unwrap_or(&root);
        let mut dir = self.dir.parent();
        while let Some(path) = dir.filter(|d| d.starts_with(top)) {
            private(path, me)?;
            dir = path.parent();
        }
        for file in [STATE_FILE, MEMORY_FILE, SEAL_FILE] {
            private(&self.dir.join(file), me)?;
        }
        let seal = std::fs::read(self.dir.join(SEAL_FILE)).map_err(|e| format!("its seal: {e}"))?;
        self.mac(&self.dir)?.verify_slice(&seal).map_err(|_| "its seal does not match its files".to_string())
    }

    /// Writes the seal of the snapshot in `staging` (before `publish`).
    pub fn seal(&self, staging: &Path) -> io::Result<()> {
        let mac = self.mac(staging).map_err(io::Error::other)?.finalize().into_bytes();
        let mut file = crate::snapshot::private_file(&staging.join(SEAL_FILE))?;
        io::Write::write_all(&mut file, &mac)
    }

    fn mac(&self, dir: &Path) -> Result<Hmac<Sha256>, String> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        let state = std::fs::read(dir.join(STATE_FILE)).map_err(|e| format!("its state file: {e}"))?;
        mac.update(&(state.len() as u64).to_le_bytes());
        mac.update(&state);
        let memory = std::fs::metadata(dir.join(MEMORY_FILE)).map_err(|e| format!("its memory file: {e}"))?;
        for word in [memory.dev(), memory.ino(), memory.len(), memory.ctime() as u64, memory.ctime_nsec() as u64] {
            mac.update(&word.to_le_bytes());
        }
        Ok(mac)
    }

    /// Restores as `config`'s guest: its name and vsock socket.
    pub fn restore_spec(&self, config: &VmConfig) -> RestoreSpec {
        let vsock = config.vsock.iter().map(|v| (v.id.clone(), v.uds_path.to_string_lossy().into_owned()));
        RestoreSpec {
            state: self.dir.join(STATE_FILE),
            memory: MemoryBackend::File(self.dir.join(MEMORY_FILE)),
            name: config.name.clone(),
            overrides: vsock.collect(),
            vsock_uds: None,
            share_views: config
                .shares
                .iter()
                .filter(|s| !s.spec.view.is_empty())
                .map(|s| (s.id.clone(), s.spec.view.clone()))
                .collect(),
        }
    }

    /// A private directory to write the snapshot into; `publish` moves it into place, so a
    /// concurrent sandbox never sees half a snapshot.
    pub fn staging(&self) -> io::Result<PathBuf> {
        let staging = self.dir.with_extension(format!("partial-{}", std::process::id()));
        crate::snapshot::create_private_dir(&staging)?;
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
    fn an_entry_is_restored_only_as_sealed_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("lkvm-warm-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::snapshot::create_private_dir(&dir).unwrap();
        crate::snapshot::create_private_dir(&dir.join("keys")).unwrap();
        let key = user_key(&dir.join("keys/user.key")).unwrap();
        assert_eq!(user_key(&dir.join("keys/user.key")).unwrap(), key, "made once, then read");
        let entry = dir.join("entry");
        crate::snapshot::create_private_dir(&entry).unwrap();
        let cache = WarmCache { dir: entry.clone(), key };
        let write = |name: &str, bytes: &[u8]| {
            let mut file = crate::snapshot::private_file(&entry.join(name)).unwrap();
            io::Write::write_all(&mut file, bytes).unwrap();
        };
        write(STATE_FILE, b"state");
        write(MEMORY_FILE, b"memory");
        cache.seal(&entry).unwrap();
        assert_eq!(cache.check(), Ok(()));

        let other = WarmCache { dir: entry.clone(), key: [7; KEY_LEN] };
        assert!(other.check().unwrap_err().contains("does not match"), "another key's seal");
        write(STATE_FILE, b"edited");
        assert!(cache.check().unwrap_err().contains("does not match"), "a rewritten state file");
        write(STATE_FILE, b"state");
        assert_eq!(cache.check(), Ok(()));
        std::thread::sleep(std::time::Duration::from_millis(10));
        write(MEMORY_FILE, b"memory");
        assert!(cache.check().unwrap_err().contains("does not match"), "a memory file written since");
        cache.seal(&entry).unwrap();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(cache.check().unwrap_err().contains("written by others"), "a directory others may write");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_key_follows_options_and_files_but_not_the_name() {
        let dir = std::env::temp_dir().join(format!("lkvm-warm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut config = crate::config::tests::base(crate::config::CmdlinePolicy::Kvmtool, None);
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
