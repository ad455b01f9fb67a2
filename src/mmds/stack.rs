//! The guest's way to MMDS: a NIC's backend wrapped so that the frames the guest sends to the
//! MMDS address (ARP for it, IPv4 to it) go to a small TCP/IP stack in lkvm (smoltcp) instead of
//! the host's network, and that stack's answers come back to the guest ahead of the backend's
//! frames. HTTP on port 80 is answered by `Mmds::answer`.
//!
//! The guest is hostile: every frame is parsed by smoltcp, which drops what it cannot use;
//! connections are at most `MAX_CONNECTIONS` with bounded buffers, a request at most
//! `MAX_REQUEST` bytes, and frames waiting for the guest at most `MAX_QUEUED`.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::ArpPacket;
use smoltcp::wire::{EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr, Ipv4Packet};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::http;
use crate::net::{NetBackend, HEADER_LEN};

/// The MAC address MMDS answers from (locally administered).
const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const HTTP_PORT: u16 = 80;
const MAX_CONNECTIONS: usize = 8;
const SOCKET_BUFFER: usize = 16 * 1024;
/// The largest request: MMDS reads carry no body.
const MAX_REQUEST: usize = 8 * 1024;
const MAX_QUEUED: usize = 256;
const MTU: usize = 1500;
/// A connection nobody speaks on is dropped after this.
const IDLE: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);

/// smoltcp's side of the wire: frames from the guest in, frames for the guest out.
#[derive(Default)]
struct Wire {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        if self.0.len() < MAX_QUEUED {
            self.0.push_back(frame);
        }
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        // The guest may leave checksums to an offload that never happens here: accept its
        // frames as they are, and checksum what goes back.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// One connection's socket and the request bytes it has brought so far.
struct Connection {
    socket: SocketHandle,
    request: Vec<u8>,
}

/// MMDS's TCP/IP endpoint on one NIC.
struct Stack {
    address: Ipv4Addr,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<Connection>,
    wire: Wire,
}

impl Stack {
    fn new(address: Ipv4Addr) -> Stack {
        let mut wire = Wire::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        let mut iface = Interface::new(config, &mut wire, Instant::now());
        // Every guest address is on the link: MMDS answers whatever address the guest has.
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(address.into(), 0));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let connections = (0..MAX_CONNECTIONS)
            .map(|_| {
                let buffer = || tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]);
                let socket = sockets.add(tcp::Socket::new(buffer(), buffer()));
                Connection { socket, request: Vec::new() }
            })
            .collect();
        let mut stack = Stack { address, iface, sockets, connections, wire };
        stack.listen();
        stack
    }

    /// Every socket that is closed listens again.
    fn listen(&mut self) {
        for connection in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(connection.socket);
            if !socket.is_open() {
                connection.request.clear();
                socket.set_timeout(Some(IDLE));
                let _ = socket.listen(HTTP_PORT);
            }
        }
    }

    /// Whether `frame` (Ethernet, no virtio header) is MMDS's: ARP for its address (a request,
    /// or the guest's reply to MMDS's own), or IPv4 to it.
    fn is_for_mmds(&self, frame: &[u8]) -> bool {
        let Ok(ethernet) = EthernetFrame::new_checked(frame) else { return false };
        match ethernet.ethertype() {
            EthernetProtocol::Arp => ArpPacket::new_checked(ethernet.payload())
                .is_ok_and(|arp| arp.target_protocol_addr() == self.address.octets()),
            EthernetProtocol::Ipv4 => {
                Ipv4Packet::new_checked(ethernet.payload()).is_ok_and(|ip| ip.dst_addr() == self.address)
            }
            _ => false,
        }
    }

    /// Takes a frame for MMDS and answers what it completes.
    fn input(&mut self, frame: &[u8]) {
        let mut frame = frame.to_vec();
        // Sent through a gateway, the frame names the gateway's MAC; MMDS answers it anyway.
        frame[..6].copy_from_slice(&MMDS_MAC);
        self.wire.from_guest.push_back(frame);
        self.poll();
    }

    fn poll(&mut self) {
        self.iface.poll(Instant::now(), &mut self.wire, &mut self.sockets);
        for connection in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(connection.socket);
            let mut chunk = [0u8; 4096];
            while socket.can_recv() {
                let room = (MAX_REQUEST - connection.request.len()).min(chunk.len());
                match socket.recv_slice(&mut chunk[..room]) {
                    Ok(n) if n > 0 => connection.request.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
                if connection.request.len() >= MAX_REQUEST {
                    break;
                }
            }
            loop {
                let response = match http::parse_request(&connection.request, 0) {
                    Ok(Some((request, used))) => {
                        connection.request.drain(..used);
                        let keep_alive = request.keep_alive;
                        Some((super::store().answer(&request), keep_alive))
                    }
                    Ok(None) if connection.request.len() >= MAX_REQUEST => {
                        Some((http::Response::fault(413, "the request is too large"), false))
                    }
                    Ok(None) => None,
                    Err(e) => Some((http::Response::with_body(400, super::TEXT, e.to_string()), false)),
                };
                let Some((response, keep_alive)) = response else { break };
                let mut bytes = Vec::new();
                let _ = response.write(&mut bytes, !keep_alive);
                // A response larger than the socket's room is cut: the guest's reads are small.
                let _ = socket.send_slice(&bytes);
                if !keep_alive {
                    socket.close();
                    connection.request.clear();
                    break;
                }
            }
        }
        self.iface.poll(Instant::now(), &mut self.wire, &mut self.sockets);
        self.listen();
    }
}

/// A NIC's backend with MMDS in front of it.
pub struct MmdsBackend {
    inner: Box<dyn NetBackend>,
    stack: Stack,
    vnet_header: bool,
    /// Readable while MMDS has frames for the guest; with the backend's own descriptor in
    /// `readable`, which the device's worker watches.
    pending: EventFd,
    readable: Epoll,
}

impl MmdsBackend {
    pub fn new(inner: Box<dyn NetBackend>, address: Ipv4Addr) -> io::Result<MmdsBackend> {
        let pending = crate::host::eventfd()?;
        let readable = Epoll::new()?;
        readable.ctl(ControlOperation::Add, inner.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
        readable.ctl(ControlOperation::Add, pending.as_raw_fd(), EpollEvent::new(EventSet::IN, 1))?;
        let vnet_header = inner.has_vnet_header();
        Ok(MmdsBackend { inner, stack: Stack::new(address), vnet_header, pending, readable })
    }

    fn skip(&self) -> usize {
        if self.vnet_header {
            HEADER_LEN
        } else {
            0
        }
    }
}

impl AsRawFd for MmdsBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

impl NetBackend for MmdsBackend {
    fn has_vnet_header(&self) -> bool {
        self.vnet_header
    }

    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()> {
        self.inner.set_offloads(guest_features)
    }

    fn set_active(&mut self, active: bool) -> io::Result<()> {
        self.inner.set_active(active)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let ethernet = frame.get(self.skip()..).unwrap_or_default();
        if !self.stack.is_for_mmds(ethernet) {
            return self.inner.send(frame);
        }
        self.stack.input(ethernet);
        if !self.stack.wire.to_guest.is_empty() {
            self.pending.write(1)?;
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let skip = self.skip();
        while let Some(frame) = self.stack.wire.to_guest.pop_front() {
            let len = skip + frame.len();
            if len > buf.len() {
                continue;
            }
            buf[..skip].fill(0);
            buf[skip..len].copy_from_slice(&frame);
            return Ok(Some(len));
        }
        let _ = self.pending.read(); // drained: not readable until MMDS has more
        self.inner.recv(buf)
    }
}
