//! virtio-rng: entropy for the guest's /dev/hwrng, from the host's getrandom(2).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::worker::{Lifecycle, Worker};
use super::*;
use crate::config::RateLimit;
use crate::devices::rate_limiter::RateLimiter;
use crate::thread::DeviceIo;

const QUEUE_SIZES: &[u16] = &[256];
/// Bytes served per request at most, so one request cannot keep the worker busy for long.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    /// Kept across resets, so a guest cannot refill its buckets by resetting the device.
    limiter: Arc<Mutex<RateLimiter>>,
    worker: Option<Worker<RequestQueue>>,
}

impl Rng {
    /// Bytes and requests held to `limit`.
    pub fn new(limit: &RateLimit) -> std::io::Result<Rng> {
        Ok(Rng { limiter: Arc::new(Mutex::new(RateLimiter::new(limit)?)), worker: None })
    }
}

type RequestQueue = (Queue, GuestMemoryMmap, Arc<dyn Interrupt>, Arc<Mutex<RateLimiter>>);

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Fills every available request with random bytes, while `limiter` allows.
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, limiter: &mut RateLimiter) {
    let mut buf = vec![0u8; MAX_REQUEST];
    serve_queue_limited(queue, mem, interrupt, 0, |chain| {
        // The descriptors are read once: the limiter charges for the buffers that are filled.
        let buffers: Vec<(GuestAddress, usize)> = chain.writable().map(|d| (d.addr(), d.len() as usize)).collect();
        let wanted: usize = buffers.iter().map(|&(_, len)| len).sum();
        if !limiter.consume(wanted.min(MAX_REQUEST) as u64) {
            return None;
        }
        let mut written = 0usize;
        for (addr, len) in buffers {
            let len = len.min(MAX_REQUEST - written);
            if len == 0 || !fill_random(&mut buf[..len]) || mem.write_slice(&buf[..len], addr).is_err() {
                break;
            }
            written += len;
        }
        Some(written as u32)
    });
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [ActiveQueue { queue, kick }] = expect_queues(queues)?;
        let limiter = self.limiter.clone();
        let timer = vec![limiter.lock().unwrap().as_raw_fd()];
        // Events: the queue's kick (0) and the limiter's timer (1).
        self.worker = Some(Worker::spawn_with_fds(
            DeviceIo::Memory,
            "virtio-rng".into(),
            vec![kick],
            timer,
            (queue, mem, interrupt, limiter),
            |(queue, mem, interrupt, limiter), event, _| {
                let mut limiter = limiter.lock().unwrap();
                if event == 1 {
                    limiter.timer_fired();
                }
                process_queue(queue, mem, &**interrupt, &mut limiter)
            },
            None,
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::CountingInterrupt;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x10000, 64, write, 0))], 0).unwrap();
        // A buffer the guest wrongly marked device-readable: completed with nothing written.
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x20000, 64, 0, 0))], 1).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let interrupt = CountingInterrupt::default();
        let mut unlimited = RateLimiter::new(&RateLimit::default()).unwrap();
        process_queue(&mut queue, &mem, &interrupt, &mut unlimited);
        assert_eq!(mock.used().idx().load(), 2);
        assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 64);
        assert_eq!(mock.used().ring().ref_at(1).unwrap().load().len(), 0);
        let mut bytes = [0u8; 64];
        mem.read_slice(&mut bytes, GuestAddress(0x10000)).unwrap();
        assert!(bytes.iter().collect::<std::collections::HashSet<_>>().len() > 16, "{bytes:?}");
        assert_eq!(Rng::new(&RateLimit::default()).unwrap().features() & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);

        // Rate-limited to 64 bytes a minute: the next request waits in the ring.
        let mock = MockSplitQueue::new(&mem, 16);
        for i in 0..2u16 {
            let buffer = Descriptor::new(0x10000 + 0x100 * u64::from(i), 64, write, 0);
            mock.add_desc_chains(&[RawDescriptor::from(buffer)], i).unwrap();
        }
        let mut queue: Queue = mock.create_queue().unwrap();
        let bucket = crate::config::BucketConfig { size: 64, one_time_burst: None, refill_time: 60_000 };
        let mut limited = RateLimiter::new(&RateLimit { bandwidth: Some(bucket), ops: None }).unwrap();
        process_queue(&mut queue, &mem, &interrupt, &mut limited);
        assert_eq!(mock.used().idx().load(), 1);
    }
}
