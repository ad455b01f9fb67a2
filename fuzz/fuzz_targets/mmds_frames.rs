//! Feeds a guest's frames to a NIC with MMDS in front of it (lkvm's smoltcp stack and the
//! metadata service's HTTP answers, V2 tokens included). Two kinds of input: raw frames of any
//! shape, with and without a virtio-net header; and a TCP connection the target opens properly
//! (handshake from the stack's own SYN-ACK) that then carries fuzzed bytes as HTTP, so the
//! request parser and `Mmds::answer` are reached. Checks: frames not for MMDS reach the backend
//! unchanged and those for it never do; what MMDS queues for the guest stays bounded; every
//! answer on the connection is HTTP.
#![no_main]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use lkvm::mmds::stack::MmdsBackend;
use lkvm::net::NetBackend;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};
use vmm_sys_util::eventfd::EventFd;

const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// The host side of the NIC: records what reaches it.
struct Backend {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    fd: EventFd,
}

impl NetBackend for Backend {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.sent.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Every frame MMDS has for the guest; at most its queue's bound.
fn drain(nic: &mut MmdsBackend) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0; 65536];
    while let Some(len) = nic.recv(&mut buf).unwrap() {
        frames.push(buf[..len].to_vec());
        assert!(frames.len() <= 256, "MMDS queued more than its bound");
    }
    frames
}

/// An Ethernet frame from the guest to MMDS carrying one TCP segment.
fn segment(control: TcpControl, seq: TcpSeqNumber, ack: Option<TcpSeqNumber>, payload: &[u8]) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: 40000,
        dst_port: 80,
        control,
        seq_number: seq,
        ack_number: ack,
        window_len: 65535,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: MMDS,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0; ethernet.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame);
    ethernet.emit(&mut eth);
    let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
    let checksums = ChecksumCapabilities::default();
    ip.emit(&mut packet, &checksums);
    let mut tcp_packet = TcpPacket::new_unchecked(packet.payload_mut());
    tcp.emit(&mut tcp_packet, &GUEST.into(), &MMDS.into(), &checksums);
    frame
}

/// The TCP segments in `frames` (MMDS's answers, ARP requests aside): (seq, len, payload).
fn segments(frames: &[Vec<u8>]) -> Vec<(TcpSeqNumber, Vec<u8>, bool)> {
    frames
        .iter()
        .filter_map(|frame| {
            let eth = EthernetFrame::new_checked(frame.as_slice()).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            Some((tcp.seq_number(), tcp.payload().to_vec(), tcp.syn()))
        })
        .collect()
}

/// The guest answers MMDS's ARP request for its address, as Linux would.
fn arp_reply() -> Vec<u8> {
    let mut frame = vec![0u8; 42];
    frame[..6].copy_from_slice(&[6, 1, 0x23, 0x45, 0x67, 1]);
    frame[6..12].copy_from_slice(&GUEST_MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    frame[22..28].copy_from_slice(&GUEST_MAC);
    frame[28..32].copy_from_slice(&GUEST.octets());
    frame[32..38].copy_from_slice(&[6, 1, 0x23, 0x45, 0x67, 1]);
    frame[38..42].copy_from_slice(&MMDS.octets());
    frame
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    let sent = Arc::new(Mutex::new(Vec::new()));
    let inner = Backend { sent: sent.clone(), fd: EventFd::new(0).unwrap() };
    lkvm::mmds::store().put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 1}}})).unwrap();
    let mut nic = MmdsBackend::new(Box::new(inner), MMDS).unwrap();
    if mode % 2 == 0 {
        // Raw frames: [len: u16][bytes] each.
        let mut rest = data;
        while let Some((len, tail)) = rest.split_first_chunk::<2>() {
            let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
            let (frame, tail) = tail.split_at(len);
            let before = sent.lock().unwrap().len();
            nic.send(frame).unwrap();
            let after = sent.lock().unwrap();
            if after.len() > before {
                assert_eq!(after.last().unwrap(), frame, "a frame reached the backend changed");
            }
            drop(after);
            drain(&mut nic);
            rest = tail;
        }
        return;
    }
    // A connection: SYN, the guest's ARP answer, ACK, then the fuzzed bytes as the request.
    let isn = TcpSeqNumber(1000);
    nic.send(&segment(TcpControl::Syn, isn, None, &[])).unwrap();
    let mut answer = drain(&mut nic);
    nic.send(&arp_reply()).unwrap();
    answer.extend(drain(&mut nic));
    let Some((server_isn, _, _)) = segments(&answer).into_iter().find(|(_, _, syn)| *syn) else {
        panic!("no SYN-ACK: {answer:?}");
    };
    let mut server_next = server_isn + 1;
    nic.send(&segment(TcpControl::None, isn + 1, Some(server_next), &[])).unwrap();
    let mut reply = Vec::new();
    let mut seq = isn + 1;
    for chunk in data.chunks(512).take(32) {
        nic.send(&segment(TcpControl::Psh, seq, Some(server_next), chunk)).unwrap();
        seq += chunk.len();
        for (at, payload, _) in segments(&drain(&mut nic)) {
            if at == server_next && !payload.is_empty() {
                server_next += payload.len();
                reply.extend_from_slice(&payload);
            }
        }
        nic.send(&segment(TcpControl::None, seq, Some(server_next), &[])).unwrap();
        drain(&mut nic);
    }
    assert!(reply.is_empty() || reply.starts_with(b"HTTP/1.1 "), "not HTTP: {:?}", String::from_utf8_lossy(&reply));
    assert!(sent.lock().unwrap().is_empty(), "a frame for MMDS reached the backend");
});
