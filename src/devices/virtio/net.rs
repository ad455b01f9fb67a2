//! virtio-net: one queue pair between the guest and a host backend (libslirp or tap). Frames are
//! bounded (64 KiB), and at most one received frame waits for a guest buffer, so neither a
//! flooding guest nor a flooding peer can grow host memory.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::worker::{Watch, Worker};
use super::*;
use crate::net::NetBackend;

const QUEUE_SIZES: &[u16] = &[256, 256];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const BACKEND_READY: usize = 2;
/// struct virtio_net_hdr_v1: with VERSION_1 it always includes num_buffers.
pub const HEADER_LEN: usize = 12;
pub const MAX_FRAME: usize = 65536;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

pub type SharedBackend = Arc<Mutex<Box<dyn NetBackend>>>;

pub struct Net {
    config: Vec<u8>,
    backend: SharedBackend,
    worker: Option<Worker>,
}

impl Net {
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        let mut config = mac.to_vec();
        config.extend_from_slice(&LINK_UP.to_le_bytes());
        config.extend_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Net { config, backend: Arc::new(Mutex::new(backend)), worker: None }
    }
}

pub struct NetPort {
    rx: Queue,
    tx: Queue,
    mem: GuestMemoryMmap,
    backend: SharedBackend,
    interrupt: Arc<dyn Interrupt>,
    frame: Vec<u8>,
    /// Length of a received frame still waiting for a guest buffer.
    pending: Option<usize>,
    backend_failed: bool,
}

impl NetPort {
    pub fn new(rx: Queue, tx: Queue, mem: GuestMemoryMmap, backend: SharedBackend, interrupt: Arc<dyn Interrupt>) -> Self {
        NetPort { rx, tx, mem, backend, interrupt, frame: vec![0; MAX_FRAME], pending: None, backend_failed: false }
    }

    /// Sends every frame the guest queued; malformed ones (shorter than the header, longer
    /// than a frame) are dropped.
    pub fn transmit(&mut self) {
        let (mem, backend, frame) = (&self.mem, &self.backend, &mut self.frame);
        serve_queue(&mut self.tx, mem, &*self.interrupt, TX_QUEUE as u16, |chain| {
            let Ok(mut reader) = chain.reader(mem) else { return 0 };
            let len = reader.available_bytes();
            if !(HEADER_LEN..=HEADER_LEN + MAX_FRAME).contains(&len) {
                return 0;
            }
            let mut header = [0u8; HEADER_LEN];
            let payload = len - HEADER_LEN;
            if reader.read_exact(&mut header).is_ok() && reader.read_exact(&mut frame[..payload]).is_ok() {
                if let Err(e) = backend.lock().unwrap().send(&frame[..payload]) {
                    tracing::debug!("virtio-net: frame dropped: {e}");
                }
            }
            0
        });
    }

    /// Moves frames from the backend into the guest's receive buffers until either runs out.
    /// Returns whether the backend should still be watched (false while the guest has no
    /// buffer, so a waiting frame does not wake the worker over and over).
    pub fn receive(&mut self) -> bool {
        let mut used = false;
        let mut stalled = false;
        let watch = loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.backend.lock().unwrap().recv(&mut self.frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => break true,
                    Err(e) => {
                        if !self.backend_failed {
                            tracing::warn!("virtio-net backend: {e}; no more frames for the guest");
                            self.backend_failed = true;
                        }
                        break false;
                    }
                },
            };
            self.pending = Some(len);
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                if more_available(&mut self.rx, &self.mem, false, &mut stalled) {
                    continue;
                }
                break false;
            };
            stalled = false;
            self.pending = None;
            let head = chain.head_index();
            let mut written = 0;
            if let Ok(mut writer) = chain.writer(&self.mem) {
                if writer.available_bytes() >= HEADER_LEN + len {
                    let mut header = [0u8; HEADER_LEN];
                    header[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
                    if writer.write_all(&header).is_ok() && writer.write_all(&self.frame[..len]).is_ok() {
                        written = HEADER_LEN + len;
                    }
                }
            }
            if self.rx.add_used(&self.mem, head, written as u32).is_err() {
                break false;
            }
            used = true;
        };
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue(RX_QUEUE as u16);
        }
        watch && !self.backend_failed
    }

    fn handle(&mut self, event: usize, watch: &Watch) {
        match event {
            TX_QUEUE => self.transmit(),
            RX_QUEUE | BACKEND_READY => {
                let keep_watching = self.receive();
                watch.host_fd(keep_watching);
            }
            _ => {}
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = expect_queues(queues)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&**self.backend.lock().unwrap());
        let mut port = NetPort::new(rx.queue, tx.queue, mem, self.backend.clone(), interrupt);
        self.worker = Some(Worker::spawn_with_fd("virtio-net".into(), vec![rx.kick, tx.kick], fd, move |event, watch| {
            port.handle(event, watch)
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}
