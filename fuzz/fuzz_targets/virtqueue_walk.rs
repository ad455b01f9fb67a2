//! Walks every chain a fuzzed virtqueue offers, through the same path every lkvm device uses
//! (serve_queue, DescriptorChain reader/writer), reading and writing all of each chain.
#![no_main]

mod common;

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use lkvm::devices::virtio::serve_queue;

fuzz_target!(|input: &[u8]| {
    let Some((config, data)) = input.split_first_chunk::<8>() else { return };
    let Some((mem, mut queue)) = common::setup(config, data) else { return };
    let mut sink = vec![0u8; common::MEM_SIZE];
    serve_queue(&mut queue, &mem, &common::NoInterrupt, 0, |chain| {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(&mem), chain.writer(&mem)) else { return 0 };
        let n = reader.available_bytes().min(sink.len());
        let _ = reader.read_exact(&mut sink[..n]);
        let m = writer.available_bytes().min(sink.len());
        let _ = writer.write_all(&sink[..m]);
        writer.bytes_written() as u32
    });
});
