//! Feeds fuzzed virtio-blk requests (descriptors, headers, sectors, lengths, discard segments)
//! to lkvm's block device model over a small image file, through both I/O engines.
#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lkvm::config::{DiskSpec, IoEngine};
use lkvm::devices::virtio::block::Block;
use lkvm::disk::DiskImage;

const IMAGE_SIZE: usize = 64 * 1024;

/// The device over one image per engine: synchronous, and io_uring.
fn block(io_engine: IoEngine) -> &'static Block {
    static BLOCKS: OnceLock<[Block; 2]> = OnceLock::new();
    let blocks = BLOCKS.get_or_init(|| {
        [IoEngine::Sync, IoEngine::Async].map(|io_engine| {
            let path = std::env::temp_dir().join(format!("lkvm-fuzz-blk-{}-{io_engine:?}.img", std::process::id()));
            std::fs::write(&path, vec![0u8; IMAGE_SIZE]).unwrap();
            let disk = DiskImage::open(&DiskSpec { io_engine, ..DiskSpec::new(path) }).unwrap();
            Block::new(disk, "fuzz", &Default::default()).unwrap()
        })
    });
    &blocks[usize::from(io_engine == IoEngine::Async)]
}

fuzz_target!(|input: &[u8]| {
    let Some((config, data)) = input.split_first_chunk::<8>() else { return };
    let io_engine = if config[7] & 0x80 != 0 { IoEngine::Async } else { IoEngine::Sync };
    let Some((mem, mut queue)) = common::setup(config, data) else { return };
    let block = block(io_engine);
    let mut handler = block.request_handler(block.new_ring());
    handler.process_queue(&mut queue, &mem, &common::NoInterrupt);
    // Nothing may still be in flight into this input's memory when it is freed.
    handler.drain(&mut queue, &mem, &common::NoInterrupt);
});
