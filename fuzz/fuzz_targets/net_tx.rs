//! Feeds fuzzed transmit queues (frames of any length, split over any descriptors) to lkvm's
//! virtio-net device model; frames go to a backend that counts them.
#![no_main]

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use lkvm::config::RateLimit;
use lkvm::devices::virtio::net::{NetPort, PairLimiters};
use lkvm::net::{NetBackend, MAX_FRAME};
use virtio_queue::{Queue, QueueT};

struct Sink;

impl NetBackend for Sink {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        assert!(frame.len() <= MAX_FRAME, "oversized frame reached the backend");
        Ok(())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
}

impl AsRawFd for Sink {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((config, data)) = input.split_first_chunk::<8>() else { return };
    let Some((mem, tx)) = common::setup(config, data) else { return };
    let rx = Queue::new(256).unwrap();
    let backend: Box<dyn NetBackend> = Box::new(Sink);
    let limiters = PairLimiters::new(&RateLimit::default(), &RateLimit::default()).unwrap();
    let (backend, interrupt) = (Arc::new(Mutex::new(backend)), Arc::new(common::NoInterrupt));
    let mut port = NetPort::new((rx, tx), 0, mem, backend, interrupt, limiters, 0);
    port.transmit();
});
