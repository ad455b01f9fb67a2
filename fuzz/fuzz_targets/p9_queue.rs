//! Fuzzed virtio-9p request rings (descriptors, chains, buffers anywhere in a small guest
//! memory) served by the device's queue handler against a share after version and attach, as
//! a hostile guest's driver would lay them out. The replies land in guest memory: none may hold
//! the secret beside the share, nothing outside it may change, and any panic is a crash.
#![no_main]

mod common;
mod p9_world;

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use lkvm::config::ShareSpec;
use lkvm::devices::virtio::p9::process_queue;
use lkvm::share::Share;
use p9_world::*;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|input: &[u8]| {
    let Some((config, data)) = input.split_first_chunk::<8>() else { return };
    // The fuzzer may learn the secret from the check itself: it must come from the share.
    if leaks_secret(data) {
        return;
    }
    let dirs = dirs();
    let spec = ShareSpec { read_only: config[7] & 1 == 1, ..ShareSpec::new(&dirs.share, "fuzz").unwrap() };
    let mut share = Share::open(&spec).unwrap();
    let mut sink = Vec::new();
    let mut version = message(100, &[0, 0, 1, 0, 8, 0, b'9', b'P', b'2', b'0', b'0', b'0', b'.', b'L']);
    share.handle(&mut version, &mut sink).unwrap();
    let mut attach = message(104, &[0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0]);
    share.handle(&mut attach, &mut sink).unwrap();
    let Some((mem, mut queue)) = common::setup(config, data) else { return };
    let share = Mutex::new(share);
    // Twice: the second pass sees what the first wrote, as a guest reusing its buffers would.
    for _ in 0..2 {
        process_queue(&mut queue, &mem, &common::NoInterrupt, &share);
    }
    let mut memory = vec![0u8; common::MEM_SIZE];
    mem.read_slice(&mut memory, GuestAddress(0)).unwrap();
    assert!(!leaks_secret(&memory), "a reply in guest memory carried the outside file's bytes");
    check_outside(dirs);
});
