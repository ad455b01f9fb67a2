//! virtio-net: queue pairs between the guest and host backends (libslirp, or tap queues), and
//! with several pairs a control queue. Frames are bounded (64 KiB plus headers), and each pair
//! holds at most one received frame waiting for guest buffers, so neither a flooding guest nor
//! a flooding peer can grow host memory.
//!
//! With a backend that speaks the virtio-net header (tap with IFF_VNET_HDR), headers pass
//! through unchanged, so checksum and segmentation offloads (CSUM, TSO4/6, ECN, both ways) cost
//! the guest nothing; the host kernel validates them. MRG_RXBUF spreads a received frame over
//! as many guest buffers as it needs.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::worker::{Lifecycle, Watch, Worker};
use super::*;
use crate::config::RateLimit;
use crate::devices::rate_limiter::RateLimiter;
use crate::net::{
    NetBackend, HEADER_LEN, MAX_FRAME, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
};
use crate::thread::DeviceIo;

const QUEUE_SIZE: u16 = 256;
/// Worker events of a queue pair: its queues' notifications, the backend being readable, and
/// the rate limiters' timers.
const RX_EVENT: usize = 0;
const TX_EVENT: usize = 1;
const BACKEND_READY: usize = 2;
const RX_LIMIT_TIMER: usize = 3;
const TX_LIMIT_TIMER: usize = 4;
const NUM_BUFFERS_OFFSET: usize = 10;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// What a backend that carries virtio-net headers lets the guest offload.
const OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN;
const LINK_UP: u16 = 1;

// Control queue: class, command, data, then the device writes one status byte.
const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

pub type SharedBackend = Arc<Mutex<Box<dyn NetBackend>>>;

/// A queue pair's rate limiters: frames received and sent.
pub struct PairLimiters {
    rx: Mutex<RateLimiter>,
    tx: Mutex<RateLimiter>,
}

impl PairLimiters {
    pub fn new(rx: &RateLimit, tx: &RateLimit) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(PairLimiters { rx: Mutex::new(RateLimiter::new(rx)?), tx: Mutex::new(RateLimiter::new(tx)?) }))
    }
}

/// A NIC's rate limiters, one pair per queue pair (Firecracker's NICs have one), which the VMM
/// can change while the guest runs.
pub struct NicLimiters(Vec<Arc<PairLimiters>>);

impl NicLimiters {
    /// New limits for received and/or sent frames, from the next frame on.
    pub fn update(&self, rx: Option<&RateLimit>, tx: Option<&RateLimit>) {
        for pair in &self.0 {
            rx.inspect(|limit| pair.rx.lock().unwrap().update(limit));
            tx.inspect(|limit| pair.tx.lock().unwrap().update(limit));
        }
    }
}

/// What the control queue's worker owns: the queue, its index, and the backends it steers.
type ControlQueue = (Queue, u16, GuestMemoryMmap, Arc<dyn Interrupt>, Vec<SharedBackend>);

pub struct Net {
    config: Vec<u8>,
    /// One backend per queue pair (tap queues); a single one otherwise.
    backends: Vec<SharedBackend>,
    queue_sizes: Vec<u16>,
    workers: Vec<Worker<NetPort>>,
    control: Option<Worker<ControlQueue>>,
    limiters: Arc<NicLimiters>,
}

impl Net {
    pub fn new(
        mac: [u8; 6],
        backends: Vec<Box<dyn NetBackend>>,
        rx: &RateLimit,
        tx: &RateLimit,
    ) -> std::io::Result<Self> {
        assert!(!backends.is_empty(), "a NIC needs a backend");
        let pairs = backends.len() as u16;
        let mut config = mac.to_vec();
        config.extend_from_slice(&LINK_UP.to_le_bytes());
        config.extend_from_slice(&pairs.to_le_bytes()); // max_virtqueue_pairs
        let control_queue = usize::from(pairs > 1);
        let queue_sizes = vec![QUEUE_SIZE; 2 * backends.len() + control_queue];
        let limiters = (0..backends.len()).map(|_| PairLimiters::new(rx, tx)).collect::<std::io::Result<_>>()?;
        let backends = backends.into_iter().map(|b| Arc::new(Mutex::new(b))).collect();
        Ok(Net {
            config,
            backends,
            queue_sizes,
            workers: Vec::new(),
            control: None,
            limiters: Arc::new(NicLimiters(limiters)),
        })
    }

    pub fn limiters(&self) -> Arc<NicLimiters> {
        self.limiters.clone()
    }

    fn vnet_header(&self) -> bool {
        self.backends[0].lock().unwrap().has_vnet_header()
    }
}

pub struct NetPort {
    rx: Queue,
    tx: Queue,
    /// Queue indices, for interrupts.
    rx_index: u16,
    tx_index: u16,
    mem: GuestMemoryMmap,
    backend: SharedBackend,
    interrupt: Arc<dyn Interrupt>,
    limiters: Arc<PairLimiters>,
    /// The pending received packet got past the rx limiter already.
    pending_paid: bool,
    /// Frames pass to and from the backend with their virtio-net header.
    vnet_header: bool,
    mergeable: bool,
    /// A received packet: virtio-net header, then the frame. It may wait here for guest
    /// buffers, so transmit has its own.
    packet: Vec<u8>,
    tx_packet: Vec<u8>,
    /// Length of a received packet still waiting for guest buffers.
    pending: Option<usize>,
    /// Buffers taken for the pending packet, and their total size.
    held: Vec<RxBuffer>,
    held_room: usize,
    backend_failed: bool,
}

/// A receive buffer taken from the ring: its head and its writable regions.
struct RxBuffer {
    head: u16,
    regions: Vec<(GuestAddress, usize)>,
}

enum Delivery {
    Done,
    NoRoom,
    QueueBroken,
}

impl NetPort {
    /// Queue pair `pair` (its receive and transmit queues) of a device whose driver accepted
    /// `features`.
    pub fn new(
        (rx, tx): (Queue, Queue),
        pair: u16,
        mem: GuestMemoryMmap,
        backend: SharedBackend,
        interrupt: Arc<dyn Interrupt>,
        limiters: Arc<PairLimiters>,
        features: u64,
    ) -> Self {
        let vnet_header = backend.lock().unwrap().has_vnet_header();
        NetPort {
            rx,
            tx,
            rx_index: 2 * pair,
            tx_index: 2 * pair + 1,
            mem,
            backend,
            interrupt,
            limiters,
            pending_paid: false,
            vnet_header,
            mergeable: features & VIRTIO_NET_F_MRG_RXBUF != 0,
            packet: vec![0; HEADER_LEN + MAX_FRAME],
            tx_packet: vec![0; HEADER_LEN + MAX_FRAME],
            pending: None,
            held: Vec::new(),
            held_room: 0,
            backend_failed: false,
        }
    }

    /// Sends every frame the guest queued, while the tx limiter allows; malformed ones
    /// (shorter than the header, longer than a frame) are dropped.
    pub fn transmit(&mut self) {
        let (mem, backend, packet, vnet_header) = (&self.mem, &self.backend, &mut self.tx_packet, self.vnet_header);
        let limiter = &self.limiters.tx;
        serve_queue_limited(&mut self.tx, mem, &*self.interrupt, self.tx_index, |chain| {
            let Ok(mut reader) = chain.reader(mem) else { return Some(0) };
            let len = reader.available_bytes();
            if !(HEADER_LEN..=HEADER_LEN + MAX_FRAME).contains(&len) {
                return Some(0);
            }
            if !limiter.lock().unwrap().consume((len - HEADER_LEN) as u64) {
                return None;
            }
            if reader.read_exact(&mut packet[..len]).is_err() {
                return Some(0);
            }
            let start = if vnet_header { 0 } else { HEADER_LEN };
            if let Err(e) = backend.lock().unwrap().send(&packet[start..len]) {
                tracing::debug!("virtio-net: frame dropped: {e}");
            }
            Some(0)
        });
    }

    /// The next packet from the backend, header first; `None` when none is ready.
    fn read_packet(&mut self) -> std::io::Result<Option<usize>> {
        let mut backend = self.backend.lock().unwrap();
        if !self.vnet_header {
            self.packet[..HEADER_LEN].fill(0);
            return Ok(backend.recv(&mut self.packet[HEADER_LEN..])?.map(|len| HEADER_LEN + len));
        }
        loop {
            match backend.recv(&mut self.packet)? {
                Some(len) if len < HEADER_LEN => continue,
                other => return Ok(other),
            }
        }
    }

    /// Places the pending packet in the guest's receive buffers: one buffer, or with
    /// MRG_RXBUF as many as it takes. Buffers taken for a packet that does not fit yet are held
    /// for it, not given back: the ring's event index then asks the driver to notify when it
    /// adds more.
    fn deliver(&mut self, len: usize) -> Delivery {
        while self.held_room < len && (self.mergeable || self.held.is_empty()) {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else { return Delivery::NoRoom };
            let head = chain.head_index();
            // A chain the Writer rejects (bad address, overflowing length) offers no room; of
            // the others the packet takes the buffers it needs, not every descriptor offered.
            let mut needed = len - self.held_room;
            let regions: Vec<(GuestAddress, usize)> = match chain.clone().writer(&self.mem) {
                Ok(_) => chain
                    .writable()
                    .map(|d| (d.addr(), d.len() as usize))
                    .take_while(|&(_, size)| {
                        let more = needed > 0;
                        needed = needed.saturating_sub(size);
                        more
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            self.held_room += regions.iter().map(|(_, size)| size).sum::<usize>();
            self.held.push(RxBuffer { head, regions });
            if self.held.len() == usize::from(self.rx.size()) {
                break; // a whole ring of buffers too small: the packet is dropped below
            }
        }
        let fits = self.held_room >= len;
        let held = std::mem::take(&mut self.held);
        self.held_room = 0;
        self.packet[NUM_BUFFERS_OFFSET..HEADER_LEN].copy_from_slice(&(held.len() as u16).to_le_bytes());
        // All of the packet first, then its buffers back to back: the driver takes the first
        // one's num_buffers as a promise that the rest are already in the used ring.
        let mut offset = 0;
        let mut used = Vec::with_capacity(held.len());
        for buffer in held {
            let mut written = 0;
            for (addr, size) in buffer.regions {
                if !fits || offset == len {
                    break;
                }
                let n = size.min(len - offset);
                if self.mem.write_slice(&self.packet[offset..offset + n], addr).is_err() {
                    break;
                }
                offset += n;
                written += n;
            }
            used.push((buffer.head, written as u32));
        }
        for (head, written) in used {
            if self.rx.add_used(&self.mem, head, written).is_err() {
                return Delivery::QueueBroken;
            }
        }
        if !fits {
            tracing::debug!("virtio-net: a {len}-byte packet does not fit the guest's buffers; dropped");
        }
        Delivery::Done
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
                None => match self.read_packet() {
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
            if !self.pending_paid {
                // Over the rx limit: the frame waits here, and the backend is not read, until
                // the limiter's timer.
                if !self.limiters.rx.lock().unwrap().consume((len - HEADER_LEN) as u64) {
                    break false;
                }
                self.pending_paid = true;
            }
            match self.deliver(len) {
                Delivery::Done => {
                    self.pending = None;
                    self.pending_paid = false;
                    used = true;
                    stalled = false;
                }
                Delivery::NoRoom if more_available(&mut self.rx, &self.mem, false, &mut stalled) => {}
                Delivery::NoRoom | Delivery::QueueBroken => break false,
            }
        };
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue(self.rx_index);
        }
        watch && !self.backend_failed
    }

    fn handle(&mut self, event: usize, watch: &Watch) {
        match event {
            TX_EVENT => self.transmit(),
            TX_LIMIT_TIMER => {
                self.limiters.tx.lock().unwrap().timer_fired();
                self.transmit()
            }
            RX_EVENT | BACKEND_READY | RX_LIMIT_TIMER => {
                if event == RX_LIMIT_TIMER {
                    self.limiters.rx.lock().unwrap().timer_fired();
                }
                let keep_watching = self.receive();
                watch.host_fd(keep_watching);
            }
            _ => {}
        }
    }
}

/// Answers control-queue commands: only the number of queue pairs in use, which attaches
/// and detaches the backends' queues so that no frame goes to a pair the guest does not serve.
pub fn process_control_queue(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    interrupt: &dyn Interrupt,
    backends: &[SharedBackend],
) {
    serve_queue(queue, mem, interrupt, index, |chain| {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else { return 0 };
        let mut command = [0u8; 4];
        let status = match reader.read_exact(&mut command) {
            Ok(()) if command[..2] == [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET] => {
                let pairs = usize::from(u16::from_le_bytes([command[2], command[3]]));
                let switched = (1..=backends.len()).contains(&pairs)
                    && backends.iter().enumerate().all(|(i, backend)| {
                        let result = backend.lock().unwrap().set_active(i < pairs);
                        result.inspect_err(|e| crate::guest_warn!("virtio-net: using {pairs} queue pairs: {e}")).is_ok()
                    });
                if switched {
                    VIRTIO_NET_OK
                } else {
                    VIRTIO_NET_ERR
                }
            }
            _ => VIRTIO_NET_ERR,
        };
        u32::from(writer.write_all(&[status]).is_ok())
    });
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut features = COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF;
        if self.vnet_header() {
            features |= OFFLOADS;
        }
        if self.backends.len() > 1 {
            features |= VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        Activation { mem, interrupt, queues, acked_features }: Activation,
    ) -> Result<(), ActivateError> {
        // Without MQ the driver uses one pair (and the control queue, if it took CTRL_VQ).
        let pairs = if acked_features & VIRTIO_NET_F_MQ != 0 { self.backends.len() } else { 1 };
        let control = acked_features & VIRTIO_NET_F_CTRL_VQ != 0;
        let wanted = 2 * pairs + usize::from(control);
        if queues.len() != wanted {
            return Err(ActivateError::QueueCount(queues.len(), wanted));
        }
        let mut queues = queues.into_iter();
        let mut workers = Vec::new();
        // Only the first pair is served until the driver asks for more (and without MQ, ever):
        // frames the tap steers to another queue would wait there unread.
        for (pair, backend) in self.backends.iter().enumerate() {
            let mut backend = backend.lock().unwrap();
            backend.set_offloads(acked_features)?;
            backend.set_active(pair == 0)?;
        }
        for (pair, backend) in self.backends.iter().take(pairs).enumerate() {
            let (rx, tx) = (queues.next().expect("counted"), queues.next().expect("counted"));
            let limiters = self.limiters.0[pair].clone();
            let fds = vec![
                backend.lock().unwrap().as_raw_fd(),
                limiters.rx.lock().unwrap().as_raw_fd(),
                limiters.tx.lock().unwrap().as_raw_fd(),
            ];
            let port = NetPort::new(
                (rx.queue, tx.queue),
                pair as u16,
                mem.clone(),
                backend.clone(),
                interrupt.clone(),
                limiters,
                acked_features,
            );
            let name = format!("virtio-net-q{pair}");
            let serve: fn(&mut NetPort, usize, &Watch) = |port, event, watch| port.handle(event, watch);
            let events = vec![rx.kick, tx.kick];
            workers.push(Worker::spawn_with_fds(DeviceIo::Network, name, events, fds, port, serve, None)?);
        }
        if let Some(ActiveQueue { queue, kick }) = queues.next() {
            let state = (queue, (2 * pairs) as u16, mem.clone(), interrupt.clone(), self.backends.clone());
            self.control = Some(Worker::spawn(
                DeviceIo::Network,
                "virtio-net-ctrl".into(),
                vec![kick],
                state,
                |(queue, index, mem, interrupt, backends), _, _| {
                    process_control_queue(queue, *index, mem, &**interrupt, backends)
                },
            )?);
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        self.workers.clear();
        self.control = None;
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        let pairs = self.workers.iter_mut().map(|w| w as &mut dyn Lifecycle);
        pairs.chain(self.control.iter_mut().map(|w| w as &mut dyn Lifecycle)).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::fd::{AsRawFd, RawFd};

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::devices::virtio::block::tests::CountingInterrupt;

    #[derive(Default)]
    struct Wire {
        to_guest: VecDeque<Vec<u8>>,
        from_guest: Vec<Vec<u8>>,
        active: Option<bool>,
    }

    struct TestBackend {
        wire: Arc<Mutex<Wire>>,
        vnet: bool,
    }

    impl NetBackend for TestBackend {
        fn has_vnet_header(&self) -> bool {
            self.vnet
        }
        fn set_active(&mut self, active: bool) -> std::io::Result<()> {
            self.wire.lock().unwrap().active = Some(active);
            Ok(())
        }
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.wire.lock().unwrap().from_guest.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            Ok(self.wire.lock().unwrap().to_guest.pop_front().map(|frame| {
                buf[..frame.len()].copy_from_slice(&frame);
                frame.len()
            }))
        }
    }

    impl AsRawFd for TestBackend {
        fn as_raw_fd(&self) -> RawFd {
            -1
        }
    }

    fn limiters(rx: &RateLimit, tx: &RateLimit) -> Arc<PairLimiters> {
        PairLimiters::new(rx, tx).unwrap()
    }

    fn unlimited() -> Arc<PairLimiters> {
        limiters(&RateLimit::default(), &RateLimit::default())
    }

    /// A port that receives on `rx` from `backend`.
    fn rx_port(
        rx: Queue,
        mem: &GuestMemoryMmap,
        backend: SharedBackend,
        limits: Arc<PairLimiters>,
        features: u64,
    ) -> NetPort {
        let interrupt = Arc::new(CountingInterrupt::default());
        NetPort::new((rx, Queue::new(16).unwrap()), 0, mem.clone(), backend, interrupt, limits, features)
    }

    fn backend(vnet: bool) -> (SharedBackend, Arc<Mutex<Wire>>) {
        let wire = Arc::new(Mutex::new(Wire::default()));
        let backend: Box<dyn NetBackend> = Box::new(TestBackend { wire: wire.clone(), vnet });
        (Arc::new(Mutex::new(backend)), wire)
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    /// `count` receive buffers of `len` bytes each, at 0x10000, 0x20000, ...
    fn rx_buffers(mock: &MockSplitQueue<GuestMemoryMmap>, count: u16, len: u32, first: u16) {
        let descs: Vec<_> =
            (0..count).map(|i| desc(0x10000 * u64::from(first + i + 1), len, VRING_DESC_F_WRITE, 0)).collect();
        mock.add_desc_chains(&descs, first).unwrap();
    }

    #[test]
    fn transmit_hands_bare_frames_or_whole_packets_to_the_backend() {
        for vnet in [false, true] {
            let mem = memory();
            let mock = MockSplitQueue::new(&mem, 16);
            let mut header = [0u8; HEADER_LEN];
            header[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
            mem.write_slice(&header, GuestAddress(0x10000)).unwrap();
            mem.write_slice(b"an ethernet frame", GuestAddress(0x20000)).unwrap();
            let frame = [desc(0x10000, HEADER_LEN as u32, VRING_DESC_F_NEXT, 1), desc(0x20000, 17, 0, 0)];
            mock.add_desc_chains(&frame, 0).unwrap();
            // Shorter than a header, and longer than any frame: dropped.
            mock.add_desc_chains(&[desc(0x30000, 4, 0, 0)], 2).unwrap();
            mock.add_desc_chains(&[desc(0x40000, (HEADER_LEN + MAX_FRAME + 1) as u32, 0, 0)], 3).unwrap();
            let (shared, wire) = backend(vnet);
            let interrupt = Arc::new(CountingInterrupt::default());
            let mut port = NetPort::new(
                (Queue::new(16).unwrap(), mock.create_queue().unwrap()),
                0,
                mem.clone(),
                shared,
                interrupt,
                limiters(&RateLimit::default(), &RateLimit::default()),
                0,
            );
            port.transmit();
            assert_eq!(mock.used().idx().load(), 3, "every buffer is returned");
            let sent = &wire.lock().unwrap().from_guest;
            assert_eq!(sent.len(), 1);
            let expected =
                if vnet { [&header[..], b"an ethernet frame"].concat() } else { b"an ethernet frame".to_vec() };
            assert_eq!(sent[0], expected);
        }
    }

    #[test]
    fn mergeable_buffers_take_a_frame_too_large_for_one() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        rx_buffers(&mock, 4, 1500, 0);
        let (shared, wire) = backend(false);
        let frame: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        wire.lock().unwrap().to_guest.extend([frame.clone(), b"second".to_vec()]);
        let rx = mock.create_queue().unwrap();
        let mut port = rx_port(rx, &mem, shared, unlimited(), VIRTIO_NET_F_MRG_RXBUF);
        // The second frame finds one buffer left: enough for it.
        assert!(port.receive());
        let used = mock.used();
        assert_eq!(used.idx().load(), 4);
        let lens: Vec<u32> = (0..4).map(|i| used.ring().ref_at(i).unwrap().load().len()).collect();
        assert_eq!(lens, [1500, 1500, 1012, (HEADER_LEN + 6) as u32]);
        let mut first = vec![0u8; 4012];
        for (i, chunk) in first.chunks_mut(1500).enumerate() {
            mem.read_slice(chunk, GuestAddress(0x10000 * (i as u64 + 1))).unwrap();
        }
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3, "num_buffers");
        assert_eq!(&first[HEADER_LEN..], &frame[..]);
    }

    #[test]
    fn a_frame_waits_for_buffers_and_is_not_lost() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        rx_buffers(&mock, 1, 1500, 0);
        let (shared, wire) = backend(false);
        wire.lock().unwrap().to_guest.extend([vec![7u8; 3000], vec![8u8; 100]]);
        let rx = mock.create_queue().unwrap();
        let mut port = rx_port(rx, &mem, shared, unlimited(), VIRTIO_NET_F_MRG_RXBUF);
        assert!(!port.receive(), "no room: stop watching the backend");
        assert_eq!(mock.used().idx().load(), 0, "the lone buffer is held for the frame");
        // Every offered buffer was taken, so with EVENT_IDX the driver's next buffer notifies.
        assert_eq!(port.rx.next_avail(), mock.avail().idx().load());
        rx_buffers(&mock, 2, 1500, 1);
        assert!(!port.receive(), "the first frame fits now; the second waits for room");
        assert_eq!(mock.used().idx().load(), 3, "3000 bytes in three buffers");
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(0x10000 + HEADER_LEN as u64)).unwrap();
        assert_eq!(byte[0], 7);
        rx_buffers(&mock, 1, 1500, 3);
        assert!(port.receive());
        assert_eq!(mock.used().ring().ref_at(3).unwrap().load().len(), (HEADER_LEN + 100) as u32);
        assert!(wire.lock().unwrap().to_guest.is_empty());
    }

    #[test]
    fn rate_limits_hold_frames_back_without_losing_them() {
        let one_frame_a_minute = RateLimit {
            ops: Some(crate::config::BucketConfig { size: 1, one_time_burst: None, refill_time: 60_000 }),
            ..RateLimit::default()
        };
        // Received: one frame passes, the next waits (the backend is not watched meanwhile).
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        rx_buffers(&mock, 4, 1500, 0);
        let (shared, wire) = backend(false);
        wire.lock().unwrap().to_guest.extend([vec![1u8; 100], vec![2u8; 100]]);
        let limits = limiters(&one_frame_a_minute, &RateLimit::default());
        let rx = mock.create_queue().unwrap();
        let mut port = rx_port(rx, &mem, shared, limits.clone(), 0);
        assert!(!port.receive(), "over the limit: stop watching the backend");
        assert!(!port.receive(), "still over it");
        assert_eq!(mock.used().idx().load(), 1);
        let unlimited = crate::config::BucketConfig::default(); // size 0: no limit
        limits.rx.lock().unwrap().update(&RateLimit { ops: Some(unlimited), bandwidth: None });
        limits.rx.lock().unwrap().timer_fired();
        assert!(port.receive());
        assert_eq!(mock.used().idx().load(), 2, "the held frame, not lost");
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(0x20000 + HEADER_LEN as u64)).unwrap();
        assert_eq!(byte[0], 2);

        // Sent: one frame goes out, the next stays in the ring.
        let mock = MockSplitQueue::new(&mem, 16);
        for (i, at) in [0x30000u64, 0x40000].into_iter().enumerate() {
            mem.write_slice(&[0u8; HEADER_LEN + 60], GuestAddress(at)).unwrap();
            mock.add_desc_chains(&[desc(at, (HEADER_LEN + 60) as u32, 0, 0)], i as u16).unwrap();
        }
        let (shared, wire) = backend(false);
        let interrupt = Arc::new(CountingInterrupt::default());
        let limits = limiters(&RateLimit::default(), &one_frame_a_minute);
        let tx = mock.create_queue().unwrap();
        let mut port = NetPort::new((Queue::new(16).unwrap(), tx), 0, mem.clone(), shared, interrupt, limits, 0);
        port.transmit();
        assert_eq!((mock.used().idx().load(), wire.lock().unwrap().from_guest.len()), (1, 1));
        port.transmit();
        assert_eq!(mock.used().idx().load(), 1, "held in the ring until the limiter's timer");
    }

    #[test]
    fn without_mergeable_buffers_a_frame_too_large_is_dropped() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        rx_buffers(&mock, 2, 1500, 0);
        let (shared, wire) = backend(true);
        let mut small = vec![0u8; HEADER_LEN + 60];
        small[HEADER_LEN] = 0xab;
        wire.lock().unwrap().to_guest.extend([vec![1u8; 3000], small]);
        let rx = mock.create_queue().unwrap();
        let mut port = rx_port(rx, &mem, shared, unlimited(), 0);
        port.receive();
        let used = mock.used();
        assert_eq!(used.ring().ref_at(0).unwrap().load().len(), 0, "dropped");
        assert_eq!(used.ring().ref_at(1).unwrap().load().len(), (HEADER_LEN + 60) as u32, "header from the tap, as is");
        let mut packet = [0u8; HEADER_LEN + 1];
        mem.read_slice(&mut packet, GuestAddress(0x20000)).unwrap();
        assert_eq!((u16::from_le_bytes([packet[10], packet[11]]), packet[HEADER_LEN]), (1, 0xab));
    }

    #[test]
    fn the_control_queue_sets_the_queue_pairs_in_use() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let (backends, wires): (Vec<_>, Vec<_>) = (0..2).map(|_| backend(true)).unzip();
        let commands: [[u8; 4]; 3] = [[4, 0, 2, 0], [4, 0, 1, 0], [4, 0, 3, 0]];
        for (i, command) in commands.iter().enumerate() {
            let at = 0x10000 * (i as u64 + 1);
            mem.write_slice(command, GuestAddress(at)).unwrap();
            let chain = [desc(at, 4, VRING_DESC_F_NEXT, 2 * i as u16 + 1), desc(at + 0x100, 1, VRING_DESC_F_WRITE, 0)];
            mock.add_desc_chains(&chain, 2 * i as u16).unwrap();
        }
        let mut queue = mock.create_queue().unwrap();
        let interrupt = CountingInterrupt::default();
        let status = |i: u64| mem.read_obj::<u8>(GuestAddress(0x10000 * (i + 1) + 0x100)).unwrap();
        let active = || wires.iter().map(|w| w.lock().unwrap().active).collect::<Vec<_>>();
        process_control_queue(&mut queue, 4, &mem, &interrupt, &backends);
        assert_eq!(mock.used().idx().load(), 3);
        assert_eq!([status(0), status(1), status(2)], [VIRTIO_NET_OK, VIRTIO_NET_OK, VIRTIO_NET_ERR]);
        assert_eq!(active(), [Some(true), Some(false)], "after 2 pairs, then 1; 3 was refused");
    }
}
