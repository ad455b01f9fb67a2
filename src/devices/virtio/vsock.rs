//! virtio-vsock: stream sockets between the guest and host programs, with the host side on UNIX
//! sockets (`crate::vsock`). Packets are parsed by rust-vmm's `virtio-vsock`; a malformed
//! one is returned unused.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::worker::{Lifecycle, Watch, Worker};
use super::*;
use crate::thread::DeviceIo;
use crate::vsock::{Header, Muxer, MAX_PAYLOAD};

pub const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
const QUEUE_SIZES: &[u16] = &[256, 256, 16];
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
const HOST_EVENTS: usize = 3;
/// virtio_vsock_event: the guest drops its connections (after a snapshot is restored).
const EVENT_TRANSPORT_RESET: u32 = 0;

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    worker: Option<Worker<VsockPort>>,
    /// Restored from a snapshot: the guest's connections are gone, and it must be told.
    announce_reset: bool,
}

impl Vsock {
    /// A device for guest `guest_cid` whose host programs connect at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> std::io::Result<Self> {
        let listener = crate::vsock::listen(&uds_path)?;
        Ok(Vsock { guest_cid, uds_path, listener, worker: None, announce_reset: false })
    }
}

pub struct VsockPort {
    rx: Queue,
    tx: Queue,
    events: Queue,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    muxer: Muxer,
    announce_reset: bool,
    /// The reset event is out but the guest has not given its buffer back, which it does after
    /// resetting its sockets: a connection delivered before that would be reset with them.
    reset_unseen: bool,
    payload: Vec<u8>,
}

impl VsockPort {
    pub fn new(
        rx: Queue,
        tx: Queue,
        events: Queue,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        muxer: Muxer,
    ) -> Self {
        let payload = vec![0; MAX_PAYLOAD];
        VsockPort { rx, tx, events, mem, interrupt, muxer, announce_reset: false, reset_unseen: false, payload }
    }

    /// Hands every packet the guest queued to the muxer.
    pub fn transmit(&mut self) {
        let (mem, muxer, payload) = (&self.mem, &mut self.muxer, &mut self.payload);
        serve_queue(&mut self.tx, mem, &*self.interrupt, TX_QUEUE, |mut chain| {
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PAYLOAD as u32) {
                Ok(packet) => {
                    let len = packet.len() as usize;
                    if let Some(data) = packet.data_slice() {
                        data.copy_to(&mut payload[..len]);
                    }
                    let header = Header {
                        src_cid: packet.src_cid(),
                        dst_cid: packet.dst_cid(),
                        src_port: packet.src_port(),
                        dst_port: packet.dst_port(),
                        len: packet.len(),
                        type_: packet.type_(),
                        op: packet.op(),
                        flags: packet.flags(),
                        buf_alloc: packet.buf_alloc(),
                        fwd_cnt: packet.fwd_cnt(),
                    };
                    muxer.handle_guest_packet(&header, &payload[..len]);
                }
                Err(e) => tracing::debug!("virtio-vsock: bad packet from the guest: {e}"),
            }
            0
        });
    }

    /// Fills the guest's receive buffers with what the muxer has for it.
    pub fn receive(&mut self) {
        if self.announce_reset || self.reset_unseen {
            return;
        }
        let mut used = false;
        let mut stalled = false;
        loop {
            if self.rx.disable_notification(&self.mem).is_err() {
                return;
            }
            let mut progressed = false;
            while self.muxer.has_pending() {
                let Some(mut chain) = self.rx.pop_descriptor_chain(&self.mem) else { break };
                let head = chain.head_index();
                let len = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PAYLOAD as u32) {
                    Ok(mut packet) => {
                        let room = packet.data_slice().map_or(0, |d| d.len()).min(MAX_PAYLOAD);
                        let Some((header, n)) = self.muxer.next_packet(&mut self.payload[..room]) else {
                            if room > 0 {
                                // Not used: the next packet takes it.
                                self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                                break;
                            }
                            // No room for the data that waits: given back empty.
                            if self.rx.add_used(&self.mem, head, 0).is_err() {
                                return;
                            }
                            used = true;
                            progressed = true;
                            continue;
                        };
                        write_header(&mut packet, &header);
                        if let Some(data) = packet.data_slice() {
                            data.copy_from(&self.payload[..n]);
                        }
                        (PKT_HEADER_SIZE + n) as u32
                    }
                    Err(e) => {
                        tracing::debug!("virtio-vsock: bad receive buffer: {e}");
                        0
                    }
                };
                if self.rx.add_used(&self.mem, head, len).is_err() {
                    return;
                }
                used = true;
                progressed = true;
            }
            // Buffers the guest added meanwhile would otherwise wait for its next notification;
            // a ring that claims buffers it does not yield is not retried.
            if !self.muxer.has_pending() || !more_available(&mut self.rx, &self.mem, progressed, &mut stalled) {
                break;
            }
        }
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue(RX_QUEUE);
        }
    }

    /// Tells the guest its connections are gone, once it has given an event buffer. Its other
    /// event buffers go back unused, so that the next one it gives, which it does only after
    /// handling the event, is a notification that ends `reset_unseen`.
    fn send_reset_event(&mut self) {
        if !self.announce_reset {
            if self.reset_unseen && matches!(self.events.enable_notification(&self.mem), Ok(true)) {
                self.reset_unseen = false;
            }
            return;
        }
        let Some(chain) = self.events.pop_descriptor_chain(&self.mem) else { return };
        let head = chain.head_index();
        let written = chain
            .writable()
            .next()
            .filter(|d| d.len() >= 4)
            .is_some_and(|d| self.mem.write_obj(EVENT_TRANSPORT_RESET, d.addr()).is_ok());
        let _ = self.events.add_used(&self.mem, head, if written { 4 } else { 0 });
        while let Some(spare) = self.events.pop_descriptor_chain(&self.mem) {
            let _ = self.events.add_used(&self.mem, spare.head_index(), 0);
        }
        self.announce_reset = !written;
        self.reset_unseen = written;
        // With EVENT_IDX this publishes avail_event: the driver's next buffer notifies.
        let _ = self.events.enable_notification(&self.mem);
        self.interrupt.signal_used_queue(EVENT_QUEUE);
    }

    fn handle(&mut self, event: usize, _watch: &Watch) {
        match event {
            e if e == usize::from(TX_QUEUE) => self.transmit(),
            e if e == usize::from(EVENT_QUEUE) => self.send_reset_event(),
            HOST_EVENTS => self.muxer.process_host_events(),
            _ => {}
        }
        self.receive();
    }
}

fn write_header<B: vm_memory::bitmap::BitmapSlice>(packet: &mut VsockPacket<'_, B>, h: &Header) {
    packet
        .set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(h.type_)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [rx, tx, events] = expect_queues(queues)?;
        let muxer = Muxer::new(self.guest_cid, self.uds_path.clone(), self.listener.try_clone()?)?;
        let fd = muxer.as_raw_fd();
        let mut port = VsockPort::new(rx.queue, tx.queue, events.queue, mem, interrupt, muxer);
        port.announce_reset = std::mem::take(&mut self.announce_reset);
        port.send_reset_event();
        let kicks = vec![rx.kick, tx.kick, events.kick];
        self.worker =
            Some(Worker::spawn_with_fd(DeviceIo::Sockets, "virtio-vsock".into(), kicks, fd, port, VsockPort::handle)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }

    fn restore(&mut self, _state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        // Connections do not survive a snapshot: the restored guest hears that they are gone.
        self.announce_reset = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::CountingInterrupt;
    use crate::vsock::{HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    fn port(name: &str, mem: &GuestMemoryMmap, rx: Queue, tx: Queue, events: Queue) -> VsockPort {
        let dir = std::env::temp_dir().join(format!("lkvm-vsock-dev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let uds = dir.join("v");
        let muxer = Muxer::new(3, uds.clone(), crate::vsock::listen(&uds).unwrap()).unwrap();
        VsockPort::new(rx, tx, events, mem.clone(), Arc::new(CountingInterrupt::default()), muxer)
    }

    #[test]
    fn a_request_to_a_port_nobody_serves_comes_back_as_a_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tx_mock, rx_mock) =
            (MockSplitQueue::new(&mem, 16), MockSplitQueue::create(&mem, GuestAddress(0x8000), 16));
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 9,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 4096,
            ..Header::default()
        };
        // SAFETY: the header slice is a local buffer that outlives the packet.
        let mut raw = [0u8; PKT_HEADER_SIZE];
        let mut packet = unsafe { VsockPacket::new(&mut raw, None).unwrap() };
        write_header(&mut packet, &request);
        mem.write_slice(&raw, GuestAddress(0x10000)).unwrap();
        tx_mock.add_desc_chains(&[desc(0x10000, PKT_HEADER_SIZE as u32, 0, 0)], 0).unwrap();
        let rx_chain = [
            desc(0x20000, PKT_HEADER_SIZE as u32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x21000, 4096, VRING_DESC_F_WRITE, 0),
        ];
        rx_mock.add_desc_chains(&rx_chain, 0).unwrap();
        let mut port = port(
            "rst",
            &mem,
            rx_mock.create_queue().unwrap(),
            tx_mock.create_queue().unwrap(),
            Queue::new(16).unwrap(),
        );
        port.transmit();
        port.receive();
        assert_eq!(tx_mock.used().idx().load(), 1);
        assert_eq!(rx_mock.used().idx().load(), 1);
        assert_eq!(rx_mock.used().ring().ref_at(0).unwrap().load().len(), PKT_HEADER_SIZE as u32);
        let mut reply = [0u8; PKT_HEADER_SIZE];
        mem.read_slice(&mut reply, GuestAddress(0x20000)).unwrap();
        // SAFETY: as above.
        let mut reply_raw = reply;
        let mut parsed = unsafe { VsockPacket::new(&mut reply_raw, None).unwrap() };
        parsed.set_header_from_raw(&reply).unwrap();
        assert_eq!((parsed.op(), parsed.src_port(), parsed.dst_port(), parsed.dst_cid()), (OP_RST, 9, 1234, 3));
    }

    #[test]
    fn a_receive_ring_whose_index_runs_ahead_does_not_hold_the_worker() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rx_mock = MockSplitQueue::new(&mem, 16);
        let mut port =
            port("ahead", &mem, rx_mock.create_queue().unwrap(), Queue::new(16).unwrap(), Queue::new(16).unwrap());
        // A reply is owed (a request to a port nobody serves), and the ring claims 100 buffers.
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            dst_port: 9,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Header::default()
        };
        port.muxer.handle_guest_packet(&request, &[]);
        rx_mock.avail().idx().store(100);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            port.receive();
            let _ = done.send(());
        });
        assert!(finished.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "receive() spun");
    }

    #[test]
    fn a_restored_device_tells_the_guest_its_connections_are_gone() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let events_mock = MockSplitQueue::new(&mem, 16);
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x30000)).unwrap();
        events_mock.add_desc_chains(&[desc(0x30000, 4, VRING_DESC_F_WRITE, 0)], 0).unwrap();
        let events = events_mock.create_queue().unwrap();
        let mut port = port("event", &mem, Queue::new(16).unwrap(), Queue::new(16).unwrap(), events);
        port.announce_reset = true;
        port.send_reset_event();
        assert_eq!(events_mock.used().idx().load(), 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x30000)).unwrap(), EVENT_TRANSPORT_RESET);
        assert!(!port.announce_reset, "said once");
        // Until the guest gives a buffer back (it resets its sockets first), a host program's
        // connection would be reset with them: it waits.
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1234,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Header::default()
        };
        port.muxer.handle_guest_packet(&request, &[]); // a reset to send
        port.receive();
        assert!(port.reset_unseen && port.muxer.has_pending(), "held");
        events_mock.add_desc_chains(&[desc(0x30000, 4, VRING_DESC_F_WRITE, 0)], 1).unwrap();
        port.send_reset_event();
        assert!(!port.reset_unseen, "the guest has seen the event");
        assert_eq!(events_mock.used().idx().load(), 1, "and its new buffer is kept for the next one");
    }
}
