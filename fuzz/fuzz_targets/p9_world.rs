//! A world for the 9p targets: a share over a temporary directory with a deep tree and links
//! out of it, a secret beside it the fuzzer cannot guess, and the checks that nothing outside
//! changed and nothing carried the secret.
#![allow(dead_code)] // each target uses what it needs

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Bytes the fuzzer cannot guess: if a reply holds them, the share leaked the outside file.
pub const SECRET: &[u8] = b"outside-the-share:7c1e0f9a4b2d8e6135a9f0c4d7b2e8a1";

pub struct Dirs {
    pub share: PathBuf,
    pub outside: PathBuf,
    pub secret: Vec<(u32, u32, u32, i64, i64)>,
}

/// What a guest must not change outside its share (or in a read-only one): every entry's
/// path, then its mode, owner, group and mtime (and its size, as the mtime's partner).
pub fn fingerprint(root: &Path) -> Vec<(PathBuf, u32, u32, u32, i64, i64)> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            }
            out.push((entry.path(), meta.mode(), meta.uid(), meta.gid(), meta.mtime(), meta.size() as i64));
        }
    }
    out.sort();
    out
}

/// Whether `reply` holds 15 or more consecutive bytes of the secret (then it holds one of its
/// 8-byte chunks). Compared as words: a byte-slice comparison per window would make the
/// check, instrumented, cost more than what it checks.
pub fn leaks_secret(reply: &[u8]) -> bool {
    let chunks: Vec<u64> = SECRET.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    reply.windows(8).any(|w| chunks.contains(&u64::from_le_bytes(w.try_into().unwrap())))
}

pub fn secret_metadata(outside: &Path) -> Vec<(u32, u32, u32, i64, i64)> {
    let meta = std::fs::metadata(outside.join("secret")).unwrap();
    vec![(meta.mode(), meta.uid(), meta.gid(), meta.mtime(), meta.mtime_nsec())]
}

pub fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("lkvm-fuzz-9p-{}", std::process::id()));
        let (share, outside) = (base.join("share"), base.join("outside"));
        std::fs::create_dir_all(share.join("dir")).unwrap();
        // Deep enough that fids cloned along it copy long paths.
        std::fs::create_dir_all(share.join("d/e/e/p/t/r/e/e/s/a/r/e/d/e/e/p")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), SECRET).unwrap();
        std::fs::write(share.join("file"), b"file contents").unwrap();
        let _ = std::os::unix::fs::symlink("../outside", share.join("up"));
        let _ = std::os::unix::fs::symlink(outside.join("secret"), share.join("abs"));
        // From the bottom of the tree, 17 levels up is the share's parent, beside `outside`.
        let _ = std::os::unix::fs::symlink("../".repeat(17), share.join("d/e/e/p/t/r/e/e/s/a/r/e/d/e/e/p/up"));
        let secret = secret_metadata(&outside);
        Dirs { share, outside, secret }
    })
}

pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = ((body.len() + 7) as u32).to_le_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(body);
    m
}

/// Nothing outside the share changed: no new entry, the secret's bytes and metadata as made.
pub fn check_outside(dirs: &Dirs) {
    let outside: Vec<_> = std::fs::read_dir(&dirs.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside.len(), 1, "something appeared outside the share: {outside:?}");
    assert_eq!(std::fs::read(dirs.outside.join("secret")).unwrap(), SECRET);
    assert_eq!(secret_metadata(&dirs.outside), dirs.secret, "the outside file's mode, owner or mtime changed");
    let beside = std::fs::read_dir(dirs.share.parent().unwrap()).unwrap().count();
    assert_eq!(beside, 2, "something appeared beside the share");
}
