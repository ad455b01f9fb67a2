//! Where a user-mode guest's frames may go. With `lan=off` (`lkvm sandbox`'s default) a frame
//! for the host's network neighbours never reaches libslirp: private (RFC 1918), shared
//! (RFC 6598), link-local (169.254.0.0/16, cloud metadata among them), loopback and multicast
//! addresses, and the host's own addresses; the guest's own virtual network (gateway, DNS,
//! DHCP) stays reachable. A refused TCP connection is reset at once, so the guest's program
//! fails fast instead of waiting out its timeouts; other refused frames are dropped.

use std::net::Ipv4Addr;

const ETHERNET_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const PROTOCOL_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What to do with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Refused: dropped, after answering the guest with this frame if there is one (a TCP
    /// reset), and logged as this destination and port.
    Refuse {
        reply: Option<Vec<u8>>,
        to: Ipv4Addr,
        port: u16,
    },
}

pub struct Egress {
    network: Ipv4Addr,
    netmask: Ipv4Addr,
    host: Vec<Ipv4Addr>,
}

impl Egress {
    /// The guest's own network is `network`/`netmask`; `host` are the host's own addresses.
    pub fn new(network: Ipv4Addr, netmask: Ipv4Addr, host: Vec<Ipv4Addr>) -> Egress {
        Egress { network, netmask, host }
    }

    /// The host's IPv4 addresses, as its interfaces have them now.
    pub fn host_addresses() -> Vec<Ipv4Addr> {
        let mut found = Vec::new();
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list`, which is walked read-only and freed once.
        unsafe {
            if libc::getifaddrs(&mut list) != 0 {
                return found;
            }
            let mut entry = list;
            while let Some(ifa) = entry.as_ref() {
                if let Some(addr) = ifa.ifa_addr.as_ref().filter(|a| i32::from(a.sa_family) == libc::AF_INET) {
                    let addr = &*(addr as *const libc::sockaddr).cast::<libc::sockaddr_in>();
                    found.push(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)));
                }
                entry = ifa.ifa_next;
            }
            libc::freeifaddrs(list);
        }
        found
    }

    fn refused(&self, to: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask);
        if u32::from(to) & mask == u32::from(self.network) & mask || to.is_broadcast() {
            return false;
        }
        let shared = u32::from(to) & 0xffc0_0000 == u32::from(Ipv4Addr::new(100, 64, 0, 0));
        to.is_private()
            || to.is_link_local()
            || to.is_loopback()
            || to.is_multicast()
            || to.is_unspecified()
            || shared
            || self.host.contains(&to)
    }

    pub fn check(&self, frame: &[u8]) -> Verdict {
        if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
            return Verdict::Pass; // ARP; IPv6 is off in the user-mode network
        }
        let Some(ip) = frame.get(ETHERNET_LEN..ETHERNET_LEN + 20) else { return Verdict::Pass };
        let to = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        if !self.refused(to) {
            return Verdict::Pass;
        }
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        let transport = frame.get(ETHERNET_LEN + header_len..).unwrap_or_default();
        let port = transport.get(2..4).map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
        let reply = (ip[9] == PROTOCOL_TCP && header_len >= 20).then(|| reset(frame, header_len)).flatten();
        Verdict::Refuse { reply, to, port }
    }
}

/// The TCP reset that answers a connection attempt (a SYN) in `frame`; None for any other
/// segment (a reset never answers a reset, and only a SYN starts a connection).
fn reset(frame: &[u8], header_len: usize) -> Option<Vec<u8>> {
    let ip = &frame[ETHERNET_LEN..];
    let tcp = frame.get(ETHERNET_LEN + header_len..ETHERNET_LEN + header_len + 20)?;
    if tcp[13] & (TCP_SYN | TCP_RST | TCP_ACK) != TCP_SYN {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let payload = total_len.saturating_sub(header_len + usize::from(tcp[12] >> 4) * 4);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = seq.wrapping_add(payload as u32).wrapping_add(1);
    let mut reply = Vec::with_capacity(ETHERNET_LEN + 40);
    reply.extend_from_slice(&frame[6..12]); // to the guest's MAC
    reply.extend_from_slice(&frame[0..6]); // from the address it sent to
    reply.extend_from_slice(&ETHERTYPE_IPV4);
    let mut ip_header = [0u8; 20];
    ip_header[0] = 0x45;
    ip_header[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip_header[6] = 0x40; // don't fragment
    ip_header[8] = 64; // TTL
    ip_header[9] = PROTOCOL_TCP;
    ip_header[12..16].copy_from_slice(&ip[16..20]);
    ip_header[16..20].copy_from_slice(&ip[12..16]);
    let sum = checksum(0, &ip_header);
    ip_header[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&tcp[2..4]);
    segment[2..4].copy_from_slice(&tcp[0..2]);
    segment[8..12].copy_from_slice(&ack.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = TCP_RST | TCP_ACK;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&ip_header[12..16]);
    pseudo[4..8].copy_from_slice(&ip_header[16..20]);
    pseudo[9] = PROTOCOL_TCP;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let sum = checksum(sum_words(0, &pseudo), &segment);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    reply.extend_from_slice(&ip_header);
    reply.extend_from_slice(&segment);
    Some(reply)
}

fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    sum
}

/// The Internet checksum of `bytes`, continuing a partial sum.
fn checksum(partial: u32, bytes: &[u8]) -> u16 {
    let mut sum = sum_words(partial, bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [2, 0x15, 0x15, 0x15, 0x15, 0x15];
    const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0xc0, 0xa8, 0x21, 0x01];

    /// A frame from the guest (192.168.33.15) to `to`: a TCP SYN to `port`, or a UDP datagram.
    fn frame(to: Ipv4Addr, port: u16, tcp: bool) -> Vec<u8> {
        let mut f = GATEWAY_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETHERTYPE_IPV4);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(if tcp { 40u16 } else { 28 }).to_be_bytes());
        ip[8] = 64;
        ip[9] = if tcp { PROTOCOL_TCP } else { 17 };
        ip[12..16].copy_from_slice(&[192, 168, 33, 15]);
        ip[16..20].copy_from_slice(&to.octets());
        f.extend_from_slice(&ip);
        let mut l4 = vec![0u8; if tcp { 20 } else { 8 }];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&port.to_be_bytes());
        if tcp {
            l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
            l4[12] = 5 << 4;
            l4[13] = TCP_SYN;
        }
        f.extend_from_slice(&l4);
        f
    }

    fn egress() -> Egress {
        let host = vec![Ipv4Addr::new(203, 0, 113, 7)];
        Egress::new(Ipv4Addr::new(192, 168, 33, 0), Ipv4Addr::new(255, 255, 255, 0), host)
    }

    #[test]
    fn the_internet_and_the_guests_own_network_pass_the_neighbourhood_does_not() {
        let egress = egress();
        for open in ["93.184.216.34", "192.168.33.1", "192.168.33.3", "255.255.255.255"] {
            assert_eq!(egress.check(&frame(open.parse().unwrap(), 80, true)), Verdict::Pass, "{open}");
        }
        for closed in
            ["10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "127.0.0.1", "100.64.0.1", "203.0.113.7"]
        {
            let to: Ipv4Addr = closed.parse().unwrap();
            match egress.check(&frame(to, 80, false)) {
                Verdict::Refuse { reply: None, to: refused, port: 80 } => assert_eq!(refused, to),
                other => panic!("{closed} over UDP: {other:?}"),
            }
        }
        let mut arp = frame(Ipv4Addr::new(10, 0, 0, 1), 0, false);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(egress.check(&arp), Verdict::Pass);
        assert_eq!(egress.check(&[0u8; 5]), Verdict::Pass, "too short to say: slirp drops it");
    }

    #[test]
    fn a_refused_connection_is_reset_at_once() {
        let to = Ipv4Addr::new(169, 254, 169, 254);
        let Verdict::Refuse { reply: Some(reset), port: 80, .. } = egress().check(&frame(to, 80, true)) else {
            panic!("a SYN to the metadata address is reset");
        };
        assert_eq!(&reset[0..6], &GUEST_MAC);
        let (ip, tcp) = (&reset[14..34], &reset[34..54]);
        assert_eq!((&ip[12..16], &ip[16..20]), (&to.octets()[..], &[192, 168, 33, 15][..]));
        assert_eq!(checksum(0, ip), 0, "a valid IP checksum");
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&ip[12..16]);
        pseudo[4..8].copy_from_slice(&ip[16..20]);
        pseudo[9] = PROTOCOL_TCP;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(sum_words(0, &pseudo), tcp), 0, "a valid TCP checksum");
        assert_eq!((u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]])), (80, 40000));
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001, "acks the SYN");
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        // A reset is never answered with one.
        let mut rst = frame(to, 80, true);
        rst[14 + 20 + 13] = TCP_RST;
        assert!(matches!(egress().check(&rst), Verdict::Refuse { reply: None, .. }));
    }
}
