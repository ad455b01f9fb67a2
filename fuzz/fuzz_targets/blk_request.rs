//! Feeds fuzzed virtio-blk requests (descriptors, headers, sectors, lengths, discard segments)
//! to lkvm's block device model over a small image file.
#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lkvm::devices::virtio::block::Block;
use lkvm::disk::{DiskImage, DiskSpec};

const IMAGE_SIZE: usize = 64 * 1024;

fn block() -> &'static Block {
    static BLOCK: OnceLock<Block> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("lkvm-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; IMAGE_SIZE]).unwrap();
        let disk = DiskImage::open(&DiskSpec::new(path)).unwrap();
        Block::new(disk, "fuzz")
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((config, data)) = input.split_first_chunk::<8>() else { return };
    let Some((mem, mut queue)) = common::setup(config, data) else { return };
    let mut handler = block().request_handler();
    handler.process_queue(&mut queue, &mem, &common::NoInterrupt);
});
