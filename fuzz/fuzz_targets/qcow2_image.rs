//! Opens fuzzed bytes as a qcow2 image (header, L1/L2 and refcount tables, compressed
//! clusters: whatever the bytes say) through lkvm's disk layer and serves reads, writes,
//! discards and flushes at offsets the bytes pick. A hostile image must be refused or served
//! within its size; a panic or an allocation past the limit is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lkvm::config::DiskSpec;
use lkvm::disk::{qcow2, DiskImage};

fuzz_target!(|input: &[u8]| {
    let Some((ops, image)) = input.split_first_chunk::<16>() else { return };
    let path = std::env::temp_dir().join(format!("lkvm-fuzz-qcow2-{}", std::process::id()));
    let mut bytes = qcow2::MAGIC.to_vec();
    bytes.extend_from_slice(image);
    std::fs::write(&path, &bytes).unwrap();
    let Ok(disk) = DiskImage::open(&DiskSpec::new(&path)) else { return };
    let size = disk.size();
    if size == 0 {
        return;
    }
    let mut buf = vec![0u8; 4096];
    for op in ops.chunks(4) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) * 512 % size;
        let len = (buf.len() as u64).min(size - offset) as usize;
        let _ = match op[0] % 4 {
            0 => disk.read_at(&mut buf[..len], offset),
            1 => disk.write_at(&buf[..len], offset),
            2 => disk.punch_hole(offset, len as u64),
            _ => disk.flush(),
        };
    }
});
