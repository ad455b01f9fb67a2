//! Fuzzed image files opened as lkvm opens `-d IMAGE` (format probed, named raw, named qcow2,
//! read-only, `,snapshot`), with a fuzzed backing file beside them (qcow2 headers may name it,
//! or anything else), then fuzzed writes into the first sectors. A crash is a failure, and so
//! are: an image served raw whose reads hold the bytes of a host file the fuzzer cannot guess,
//! and a writable image probed as raw that the writes leave looking like another format.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lkvm::config::{DiskFormat, DiskSpec};
use lkvm::disk::DiskImage;

const SECRET: &[u8] = b"a-host-secret:0d9f3a7c1e5b8264f0a9c3e7d1b5";

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("lkvm-fuzz-disk-{}", std::process::id()));
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), SECRET.repeat(64)).unwrap();
        base.join("images")
    })
}

fn holds_secret(bytes: &[u8]) -> bool {
    bytes.windows(16).any(|w| SECRET.windows(16).any(|s| s == w))
}

fn exercise(disk: &DiskImage, raw: bool, writes: &[u8]) {
    let size = disk.size().min(64 << 10);
    let mut buf = vec![0u8; size as usize];
    if disk.read_at(&mut buf, 0).is_ok() {
        assert!(!raw || !holds_secret(&buf), "a raw image read the host file outside");
    }
    for op in writes.chunks(64) {
        let offset = u64::from(op[0] % 4) * 512;
        if offset + op.len() as u64 <= disk.size() {
            let _ = disk.write_at(op, offset);
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&[mode, split], rest)) = input.split_first_chunk::<2>() else { return };
    // The fuzzer may learn the secret from the check itself: it must come from the host file.
    if holds_secret(rest) {
        return;
    }
    let (image, rest) = rest.split_at(rest.len().min(usize::from(split) * 16));
    let (backing, writes) = rest.split_at(rest.len() / 2);
    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::write(&path, image).unwrap();
    // Beside it, for headers naming a backing file (relative names resolve here).
    std::fs::write(dir.join("base"), backing).unwrap();
    let format = match mode % 3 {
        0 => None,
        1 => Some(DiskFormat::Raw),
        _ => Some(DiskFormat::Qcow2),
    };
    let spec = DiskSpec { format, read_only: mode & 4 != 0, snapshot: mode & 8 != 0, ..DiskSpec::new(&path) };
    let Ok(disk) = DiskImage::open(&spec) else { return };
    // Probing opened it, so it had no other format's magic: served raw unless qcow2's.
    let raw = format == Some(DiskFormat::Raw) || (format.is_none() && !image.starts_with(MAGICS[0]));
    exercise(&disk, raw, writes);
    drop(disk);
    if raw && format.is_none() && !spec.read_only && !spec.snapshot {
        let head = std::fs::read(&path).unwrap();
        assert!(!MAGICS.iter().any(|m| head.starts_with(m)), "a probed raw image now probes as another format");
    }
});

/// qcow2's, then the formats probing names and refuses (QED, VMDK, VHDX).
const MAGICS: [&[u8]; 5] = [b"QFI\xfb", b"QED\0", b"KDMV", b"vhdxfile", b"# Disk DescriptorFile"];
