//! Feeds fuzzed rings to the queues of the devices whose requests are small: virtio-balloon
//! (page frame numbers to give back, deflates, statistics and the host asking for fresh ones),
//! virtio-console (output, and input waiting for the guest's buffers), virtio-rng (rate
//! limited), and virtio-net's control queue (queue pairs switched on mock backends). Events
//! arrive in the order the fuzzer picks, as a guest and host would interleave them.
#![no_main]

mod common;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use lkvm::config::{BucketConfig, RateLimit};
use lkvm::devices::rate_limiter::RateLimiter;
use lkvm::devices::virtio::{balloon, console, net, rng};
use lkvm::net::NetBackend;
use vmm_sys_util::eventfd::EventFd;

/// Console output goes nowhere, but must come in bounded chunks.
struct Sink;
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(buf.len() <= 64 * 1024, "one output chunk of {} bytes", buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A backend whose queue pair can be switched on and off.
struct Switchable(EventFd);
impl AsRawFd for Switchable {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
impl NetBackend for Switchable {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((header, data)) = input.split_first_chunk::<33>() else { return };
    let (device, configs, events) = (header[0] % 4, &header[1..25], &header[25..33]);
    let config = |i: usize| -> &[u8; 8] { configs[i * 8..i * 8 + 8].try_into().unwrap() };
    let Some((mem, first)) = common::setup(config(0), data) else { return };
    let interrupt: Arc<dyn lkvm::devices::virtio::Interrupt> = Arc::new(common::NoInterrupt);
    match device {
        0 => {
            let (Some(deflate), Some(stats)) = (common::queue(config(1), &mem), common::queue(config(2), &mem)) else {
                return;
            };
            let device = balloon::Balloon::new(0, false).unwrap();
            let mut queues = balloon::Queues::new([first, deflate, stats], mem, interrupt, device.control());
            events.iter().for_each(|&event| queues.handle(usize::from(event % 4)));
        }
        1 => {
            let Some(tx) = common::queue(config(1), &mem) else { return };
            let device = console::Console::new(Box::new(Sink)).unwrap();
            device.inbox().push(&data[..data.len().min(4096)]);
            let mut port = console::Port::new(&device, [first, tx], mem, interrupt);
            events.iter().for_each(|&event| port.handle(usize::from(event % 3)));
        }
        2 => {
            // Bandwidth buckets small enough that some requests wait.
            let bucket = BucketConfig { size: u64::from(events[0]) * 64, one_time_burst: None, refill_time: 1000 };
            let limit = RateLimit { bandwidth: Some(bucket).filter(|b| b.size > 0), ops: None };
            let mut limiter = RateLimiter::new(&limit).unwrap();
            let mut queue = first;
            for _ in events {
                rng::process_queue(&mut queue, &mem, &*interrupt, &mut limiter);
            }
        }
        _ => {
            let pairs = usize::from(events[0] % 4) + 1;
            let backends: Vec<net::SharedBackend> = (0..pairs)
                .map(|_| Arc::new(Mutex::new(Box::new(Switchable(EventFd::new(0).unwrap())) as Box<dyn NetBackend>)))
                .collect();
            let mut queue = first;
            net::process_control_queue(&mut queue, 2 * pairs as u16, &mem, &*interrupt, &backends);
        }
    }
});
