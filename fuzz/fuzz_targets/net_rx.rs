//! Feeds fuzzed receive queues (buffers of any size and number, over any descriptors) to
//! lkvm's virtio-net device model while a backend offers frames of fuzzed lengths, with and
//! without mergeable buffers; a crash or hang is a finding.
#![no_main]

mod common;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use lkvm::config::RateLimit;
use lkvm::devices::virtio::net::{NetPort, PairLimiters, VIRTIO_NET_F_MRG_RXBUF};
use lkvm::net::{NetBackend, MAX_FRAME};
use virtio_queue::{Queue, QueueT};

struct Source(VecDeque<usize>);

impl NetBackend for Source {
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.0.pop_front().map(|len| {
            let len = len.min(buf.len());
            buf[..len].fill(0x5a);
            len
        }))
    }
}

impl AsRawFd for Source {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((config, data)) = input.split_first_chunk::<8>() else { return };
    let Some((mem, rx)) = common::setup(config, data) else { return };
    // Frame lengths from the config bytes: up to a whole 64 KiB frame.
    let lens = [config[5], config[6], config[7]].map(|b| usize::from(b) * MAX_FRAME / 255);
    let backend: Box<dyn NetBackend> = Box::new(Source(lens.into_iter().collect()));
    let features = if config[4] & 2 != 0 { VIRTIO_NET_F_MRG_RXBUF } else { 0 };
    let tx = Queue::new(256).unwrap();
    let limiters = PairLimiters::new(&RateLimit::default(), &RateLimit::default()).unwrap();
    let (backend, interrupt) = (Arc::new(Mutex::new(backend)), Arc::new(common::NoInterrupt));
    let mut port = NetPort::new((rx, tx), 0, mem, backend, interrupt, limiters, features);
    port.receive();
    port.receive();
});
