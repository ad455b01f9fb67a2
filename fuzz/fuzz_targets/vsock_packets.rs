//! Feeds fuzzed virtio-vsock transmit and receive queues (headers of any op, type, length and
//! credit, split over any descriptors) to lkvm's vsock device and its connection muxer, whose
//! replies go back into the fuzzed receive queue.
#![no_main]

mod common;

use std::os::unix::net::UnixListener;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use lkvm::devices::virtio::vsock::VsockPort;
use lkvm::vsock::Muxer;
use virtio_queue::{Queue, QueueT};

fn listener() -> &'static (std::path::PathBuf, UnixListener) {
    static LISTENER: OnceLock<(std::path::PathBuf, UnixListener)> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("lkvm-fuzz-vsock-{}", std::process::id()));
        (path.clone(), lkvm::vsock::listen(&path).unwrap())
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((tx_config, rest)) = input.split_first_chunk::<8>() else { return };
    let Some((rx_config, data)) = rest.split_first_chunk::<8>() else { return };
    let Some((mem, tx)) = common::setup(tx_config, data) else { return };
    let Some(rx) = common::queue(rx_config, &mem) else { return };
    let (path, listener) = listener();
    let muxer = Muxer::new(3, path.clone(), listener.try_clone().unwrap()).unwrap();
    let events = Queue::new(16).unwrap();
    let mut port = VsockPort::new(rx, tx, events, mem, Arc::new(common::NoInterrupt), muxer);
    port.transmit();
    port.receive();
});
