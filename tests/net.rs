//! End-to-end networking: a Linux guest with user-mode networking (libslirp) reaching services on
//! the host loopback and served through a port forward, and with a tap device inside a network
//! namespace this test creates. Only loopback and the test's own namespace are addressed.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::mpsc::{channel, Receiver};
use std::thread;
use std::time::Duration;

use common::*;

const BODY_LEN: usize = 200_000;

/// An HTTP server answering every GET with `body`.
fn http_server(listener: TcpListener, body: Vec<u8>) {
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            // Read the whole request: closing with unread bytes would reset the connection.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(&body);
        }
    });
}

/// A TCP server that hands over everything the first client sends.
fn sink_server(listener: TcpListener) -> Receiver<Vec<u8>> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut data = Vec::new();
            let _ = stream.read_to_end(&mut data);
            let _ = tx.send(data);
        }
    });
    rx
}

fn udp_echo(socket: UdpSocket) {
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
}

fn local_listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

#[test]
fn user_mode_networking_reaches_host_services_and_forwards_a_port() {
    if !kvm_available("user_mode_networking_reaches_host_services_and_forwards_a_port") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let guest = guest();
    let body = pattern(BODY_LEN, 11);
    let (http, http_port) = local_listener();
    http_server(http, body.clone());
    let (sink, sink_port) = local_listener();
    let received = sink_server(sink);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    udp_echo(udp);
    let forward_port = local_listener().1; // free now; lkvm binds it for the forward

    let params = format!(
        "{HOST_GUEST_PARAMS} ip=dhcp lkvm.ifaddr=eth0 lkvm.fetch=192.168.33.1:{http_port}:/blob \
         lkvm.send=192.168.33.1:{sink_port}:65536:3 lkvm.udp=192.168.33.1:{udp_port} lkvm.serve=8000:65536:4 \
         lkvm.ping=192.168.33.1"
    );
    let net = format!("mode=user,host_loopback=on,hostfwd=tcp:{forward_port}:8000");
    let args = [
        "run",
        "-k",
        guest.vmlinux.to_str().unwrap(),
        "-i",
        guest.initramfs.to_str().unwrap(),
        "-c",
        "1",
        "-m",
        "128",
        "-n",
        &net,
        "-p",
        &params,
    ];
    // When the guest listens, a host client connects through the forward. The forward listens on
    // loopback only: from the host's other address the port is closed (the guest serves one
    // connection, so a forward open to the network would also fail the loopback client).
    let outside = non_loopback_ipv4();
    let (fwd_tx, fwd_rx) = channel();
    let out = run_command(lkvm(), &args, None, boot_timeout(), move |line| {
        if line.contains("LKVM-RESULT listening=8000") {
            let tx = fwd_tx.clone();
            thread::spawn(move || {
                let from_outside = outside.map(|ip| {
                    let addr = std::net::SocketAddr::from((ip, forward_port));
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok()
                });
                let got = std::net::TcpStream::connect(("127.0.0.1", forward_port)).and_then(|mut s| {
                    let mut data = Vec::new();
                    s.read_to_end(&mut data).map(|_| data)
                });
                let _ = tx.send((from_outside, got.map_err(|e| e.to_string())));
            });
        }
    });
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("LKVM-DONE"), "{}", out.describe());
    assert_eq!(out.result("ifaddr:eth0").as_deref(), Some("192.168.33.15"), "DHCP lease: {}", out.describe());
    assert_eq!(out.result("fetch"), Some(format!("{BODY_LEN}:{:016x}", fnv1a(&body))), "{}", out.describe());
    assert_eq!(out.result("send").as_deref(), Some("ok"), "{}", out.describe());
    assert_eq!(received.recv_timeout(Duration::from_secs(10)).unwrap(), pattern(65536, 3));
    assert_eq!(out.result("udp").as_deref(), Some("ok"), "{}", out.describe());
    assert_eq!(out.result("serve").as_deref(), Some("ok"), "{}", out.describe());
    assert_eq!(out.result("ping").as_deref(), Some("ok"), "ICMP echo to the host address: {}", out.describe());
    let (from_outside, forwarded) = fwd_rx.recv_timeout(Duration::from_secs(10)).expect("host client ran");
    assert_ne!(from_outside, Some(true), "the forward is open on {outside:?}");
    let forwarded = forwarded.expect("host client connected");
    assert_eq!(forwarded, pattern(65536, 4), "bytes through the port forward");
}

/// Runs `f` in the network namespace `ns`, on a thread of its own (namespaces are per thread).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: setns on a namespace file we opened, affecting only this thread.
        assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .unwrap()
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Bytes the guest sends over the tap: enough for TCP to build offloaded segments.
const SENT: usize = 262144;

/// The address this host would send from to the world, if it has one besides loopback.
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?; // TEST-NET-1: a route lookup, nothing is sent
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

#[test]
fn tap_networking_in_a_private_namespace() {
    if !kvm_available("tap_networking_in_a_private_namespace") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ns = format!("lkvm-test-{}", std::process::id());
    if !root || !std::process::Command::new("ip").args(["netns", "add", &ns]).status().is_ok_and(|s| s.success()) {
        eprintln!("!!! SKIPPED tap_networking_in_a_private_namespace: needs root and iproute2 (ip netns) !!!");
        return;
    }
    let _cleanup = Netns(ns.clone());
    let _one_at_a_time = boot_lock();
    let guest = guest();
    let body = pattern(BODY_LEN, 12);
    // Servers inside the namespace, on every address, so they are up before the tap exists.
    let (http, sink) =
        in_netns(&ns, || (TcpListener::bind("0.0.0.0:0").unwrap(), TcpListener::bind("0.0.0.0:0").unwrap()));
    let (http_port, sink_port) = (http.local_addr().unwrap().port(), sink.local_addr().unwrap().port());
    http_server(http, body.clone());
    let received = sink_server(sink);

    let params = format!(
        "{HOST_GUEST_PARAMS} ip=10.33.0.2::10.33.0.1:255.255.255.0::eth0:off lkvm.ifaddr=eth0 lkvm.channels=eth0:2 lkvm.ping=10.33.0.1 \
         lkvm.fetch=10.33.0.1:{http_port}:/blob lkvm.fetch=10.33.0.1:{http_port}:/blob \
         lkvm.fetch=10.33.0.1:{http_port}:/blob lkvm.netstats=eth0 \
         lkvm.send=10.33.0.1:{sink_port}:{SENT}:5 lkvm.netstats=eth0 lkvm.netstats=eth1"
    );
    let args = [
        "netns",
        "exec",
        &ns,
        lkvm(),
        "run",
        "-k",
        guest.vmlinux.to_str().unwrap(),
        "-i",
        guest.initramfs.to_str().unwrap(),
        "-c",
        "1",
        "-m",
        "128",
        "-n",
        "mode=tap,tapif=lkvmtap0,host_ip=10.33.0.1,mq=2",
        // Root opens the tap; the guest runs with lkvm as nobody, and the guest's switching
        // queue pairs on (TUNSETQUEUE) needs no privilege.
        "--uid",
        "65534",
        "--gid",
        "65534",
        "-n",
        "mode=user",
        "-p",
        &params,
    ];
    let out = run_command("ip", &args, None, boot_timeout(), |_| {});
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.result("ifaddr:eth0").as_deref(), Some("10.33.0.2"), "{}", out.describe());
    // One vCPU: with 2, guests on these nested hosts (QEMU's too) sometimes lose memory writes
    // (see the README). The guest asks for the second queue pair itself, through the control queue.
    assert_eq!(out.result("channels:eth0").as_deref(), Some("2"), "{}", out.describe());
    assert_eq!(out.result("ping").as_deref(), Some("ok"), "{}", out.describe());
    // The body is fetched three times. Over a tap the guest trusts the host's checksums, so a
    // block the host loses (the README's known host problem) is not retransmitted. Every fetch
    // must come back whole in length, and at least one byte for byte; corrupted ones are reported.
    let expected = format!("{BODY_LEN}:{:016x}", fnv1a(&body));
    let response_len = BODY_LEN + format!("HTTP/1.0 200 OK\r\nContent-Length: {BODY_LEN}\r\n\r\n").len();
    let garbled_header = format!("err:no header end in {response_len} bytes");
    let fetches: Vec<&str> =
        out.stdout.lines().filter_map(|l| l.trim_end().strip_prefix("LKVM-RESULT fetch=")).collect();
    assert_eq!(fetches.len(), 3, "{}", out.describe());
    for fetch in &fetches {
        assert!(fetch.starts_with(&format!("{BODY_LEN}:")) || *fetch == garbled_header, "{}", out.describe());
        if *fetch != expected {
            eprintln!("!!! tap fetch lost bytes in the guest ({fetch}, expected {expected}) !!!");
        }
    }
    assert!(fetches.contains(&expected.as_str()), "no fetch came back intact: {}", out.describe());
    assert_eq!(out.result("send").as_deref(), Some("ok"), "{}", out.describe());
    assert_eq!(received.recv_timeout(Duration::from_secs(10)).unwrap(), pattern(SENT, 5));

    // Two queue pairs in use, and the offloads negotiated and used: TCP moved the data both
    // ways in fewer frames than MSS-sized segments would need (TSO through the tap's virtio-net
    // header; the guest counts a segmentation-offload frame once).
    let features = out.result("netfeatures:eth0").unwrap();
    for (bit, name) in
        [(0, "CSUM"), (7, "GUEST_TSO4"), (11, "HOST_TSO4"), (15, "MRG_RXBUF"), (17, "CTRL_VQ"), (22, "MQ")]
    {
        assert_eq!(features.as_bytes().get(bit), Some(&b'1'), "{name} not negotiated: {features}");
    }
    // rxq:rx_packets:rx_bytes:tx_packets:tx_bytes after the fetch, then after the send.
    let stats: Vec<Vec<usize>> = out
        .stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("LKVM-RESULT netstats:eth0="))
        .map(|v| v.split(':').map(|n| n.parse().unwrap()).collect())
        .collect();
    let [after_fetch, after_send] = &stats[..] else { panic!("netstats: {}", out.describe()) };
    assert_eq!(after_send[0], 2, "mq=2 and 2 channels: the guest uses both queue pairs");
    const MSS: usize = 1448;
    let fetched = after_fetch[1];
    assert!(
        fetched < 3 * BODY_LEN / MSS,
        "host-to-guest: {fetched} frames for 3 x {BODY_LEN} bytes: {}",
        out.describe()
    );
    let sent = after_send[3] - after_fetch[3];
    assert!(sent < SENT / MSS, "guest-to-host: {sent} frames for {SENT} bytes: {}", out.describe());
    // The second -n is a second NIC, with the next MAC.
    assert_eq!(out.result("mac:eth0").as_deref(), Some("02:15:15:15:15:15"));
    assert_eq!(out.result("mac:eth1").as_deref(), Some("02:15:15:15:15:16"), "{}", out.describe());
}
