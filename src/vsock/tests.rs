use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use super::*;

const GUEST_CID: u64 = 3;

struct Setup {
    muxer: Muxer,
    uds: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("lkvm-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let uds = dir.join("v.sock");
    let muxer = Muxer::new(GUEST_CID, uds.clone(), listen(&uds).unwrap()).unwrap();
    Setup { muxer, uds, _dir: TempDir(dir) }
}

fn from_guest(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Header::default()
    }
}

/// The next packet for the guest, serving host sockets until one comes (or 2 s pass).
fn next(muxer: &mut Muxer, room: usize) -> Option<(Header, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut data = vec![0u8; room];
    loop {
        if let Some((hdr, n)) = muxer.next_packet(&mut data) {
            return Some((hdr, data[..n].to_vec()));
        }
        if Instant::now() > deadline {
            return None;
        }
        muxer.process_host_events();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A host program connected to guest port 52 through `CONNECT`, once the guest accepted.
fn host_connection(s: &mut Setup) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (request, _) = next(&mut s.muxer, 0).expect("a request for the guest");
    assert_eq!((request.op, request.dst_port, request.dst_cid), (OP_REQUEST, 52, GUEST_CID));
    assert!(request.src_port >= FIRST_HOST_PORT);
    s.muxer.handle_guest_packet(&from_guest(OP_RESPONSE, 52, request.src_port), &[]);
    let mut line = String::new();
    BufReader::new(&host).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", request.src_port));
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (host, request.src_port)
}

#[test]
fn a_host_program_connects_talks_and_closes() {
    let mut s = setup("host");
    let (mut host, port) = host_connection(&mut s);
    host.write_all(b"hello").unwrap();
    let (rw, data) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!((rw.op, rw.len, &data[..]), (OP_RW, 5, &b"hello"[..]));
    let mut rw = from_guest(OP_RW, 52, port);
    rw.len = 5;
    s.muxer.handle_guest_packet(&rw, b"world");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    drop(host);
    let (shutdown, _) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    s.muxer.handle_guest_packet(&from_guest(OP_RST, 52, port), &[]);
    assert!(s.muxer.conns.is_empty());
}

#[test]
fn the_guest_reaches_a_host_listener_or_is_reset() {
    let mut s = setup("guest");
    s.muxer.handle_guest_packet(&from_guest(OP_REQUEST, 1000, 5000), &[]);
    let (rst, _) = next(&mut s.muxer, 0).unwrap();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 5000, 1000), "nobody listens on 5000");

    let listener = UnixListener::bind(format!("{}_5000", s.uds.display())).unwrap();
    s.muxer.handle_guest_packet(&from_guest(OP_REQUEST, 1001, 5000), &[]);
    let (response, _) = next(&mut s.muxer, 0).unwrap();
    assert_eq!((response.op, response.buf_alloc), (OP_RESPONSE, CONN_BUF));
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"hi").unwrap();
    let (rw, data) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!((rw.op, rw.dst_port, &data[..]), (OP_RW, 1001, &b"hi"[..]));
    // The guest stops sending: the host program sees the end of its input.
    let mut shutdown = from_guest(OP_SHUTDOWN, 1001, 5000);
    shutdown.flags = SHUTDOWN_SEND;
    s.muxer.handle_guest_packet(&shutdown, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn data_for_the_guest_respects_its_credit() {
    let mut s = setup("credit");
    let (mut host, port) = host_connection(&mut s);
    // The guest has room for 10 bytes.
    let mut update = from_guest(OP_CREDIT_UPDATE, 52, port);
    update.buf_alloc = 10;
    s.muxer.handle_guest_packet(&update, &[]);
    host.write_all(&[7u8; 100]).unwrap();
    let (rw, data) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!((rw.op, data.len()), (OP_RW, 10));
    assert!(next(&mut s.muxer, 4096).is_none(), "no room left in the guest");
    update.fwd_cnt = 10;
    s.muxer.handle_guest_packet(&update, &[]);
    let (_, data) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!(data.len(), 10, "the guest consumed 10: 10 more");
}

#[test]
fn a_guest_overrunning_its_credit_is_reset_and_host_memory_stays_bounded() {
    let mut s = setup("overrun");
    let (_host, port) = host_connection(&mut s);
    // The host program never reads: guest data piles up to CONN_BUF in lkvm, then more is refused.
    let chunk = vec![1u8; MAX_PAYLOAD];
    let mut rw = from_guest(OP_RW, 52, port);
    rw.len = chunk.len() as u32;
    for _ in 0..(2 * CONN_BUF as usize / MAX_PAYLOAD + 64) {
        s.muxer.handle_guest_packet(&rw, &chunk);
        if s.muxer.conns.is_empty() {
            break;
        }
        assert!(s.muxer.conns.values().all(|c| c.to_host.len() <= CONN_BUF as usize));
    }
    assert!(s.muxer.conns.is_empty(), "reset once past its credit");
    let rst = std::iter::from_fn(|| next(&mut s.muxer, 0)).find(|(h, _)| h.op == OP_RST);
    assert!(rst.is_some());
}

#[test]
fn stray_packets_get_resets_and_the_backlog_is_bounded() {
    let mut s = setup("stray");
    let mut rw = from_guest(OP_RW, 9, 9);
    rw.len = 1;
    s.muxer.handle_guest_packet(&rw, b"x");
    assert_eq!(next(&mut s.muxer, 16).unwrap().0.op, OP_RST);
    s.muxer.handle_guest_packet(&from_guest(OP_RST, 9, 9), &[]);
    assert!(next(&mut s.muxer, 16).is_none(), "a reset is not answered");
    let mut foreign = from_guest(OP_REQUEST, 9, 9);
    foreign.src_cid = 7;
    s.muxer.handle_guest_packet(&foreign, &[]);
    assert!(next(&mut s.muxer, 16).is_none(), "another CID's packet is dropped");
    for _ in 0..3 * MAX_CONTROL_BACKLOG {
        s.muxer.handle_guest_packet(&rw, b"x");
    }
    assert_eq!(s.muxer.control.len(), MAX_CONTROL_BACKLOG);
}

#[test]
fn a_bad_connect_line_closes_the_host_program() {
    let mut s = setup("badline");
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"HELLO 52\n").unwrap();
    assert!(next(&mut s.muxer, 0).is_none());
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "closed without an answer");
    // The guest refuses (no listener on its port): the host program is closed too.
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let (request, _) = next(&mut s.muxer, 0).unwrap();
    s.muxer.handle_guest_packet(&from_guest(OP_RST, 99, request.src_port), &[]);
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_path_in_use_is_refused_and_a_stale_socket_replaced() {
    let s = setup("inuse");
    assert_eq!(listen(&s.uds).unwrap_err().kind(), io::ErrorKind::AddrInUse);
    drop(s.muxer);
    assert!(listen(&s.uds).is_ok(), "nobody answers on the old socket any more");
    let file = s.uds.with_extension("txt");
    std::fs::write(&file, b"data").unwrap();
    assert!(listen(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"data", "a regular file is never removed");
}

#[test]
fn a_host_half_close_still_takes_the_guests_answer() {
    let mut s = setup("halfclose");
    let (mut host, port) = host_connection(&mut s);
    host.write_all(b"question").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (rw, _) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!(rw.op, OP_RW);
    let (shutdown, _) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_SEND), "only the host's sending side ended");
    let mut rw = from_guest(OP_RW, 52, port);
    rw.len = 6;
    s.muxer.handle_guest_packet(&rw, b"answer");
    let mut shutdown = from_guest(OP_SHUTDOWN, 52, port);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    s.muxer.handle_guest_packet(&shutdown, &[]);
    let mut answer = Vec::new();
    host.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"answer");
    assert!(s.muxer.conns.is_empty(), "both sides done: the connection is gone");
}

#[test]
fn data_the_guest_sent_before_closing_still_reaches_a_slow_host_program() {
    let mut s = setup("lingering");
    let (mut host, port) = host_connection(&mut s);
    // More than the host socket's buffer takes at once, then the guest closes.
    let data = pattern_bytes(CONN_BUF as usize);
    for chunk in data.chunks(MAX_PAYLOAD) {
        let mut rw = from_guest(OP_RW, 52, port);
        rw.len = chunk.len() as u32;
        s.muxer.handle_guest_packet(&rw, chunk);
    }
    let mut shutdown = from_guest(OP_SHUTDOWN, 52, port);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    s.muxer.handle_guest_packet(&shutdown, &[]);
    let reader = thread_read_to_end(host.try_clone().unwrap());
    let rst = std::iter::from_fn(|| next(&mut s.muxer, 4096)).find(|(h, _)| h.op == OP_RST);
    assert!(rst.is_some(), "the close completes once all is delivered");
    assert_eq!(reader.join().unwrap(), data);
    host.flush().unwrap();
}

fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn thread_read_to_end(mut stream: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut data = Vec::new();
        stream.read_to_end(&mut data).unwrap();
        data
    })
}

#[test]
fn credit_in_any_guest_packet_wakes_a_waiting_connection() {
    let mut s = setup("rwcredit");
    let (mut host, port) = host_connection(&mut s);
    let mut update = from_guest(OP_CREDIT_UPDATE, 52, port);
    update.buf_alloc = 10;
    s.muxer.handle_guest_packet(&update, &[]);
    host.write_all(&[7u8; 100]).unwrap();
    assert_eq!(next(&mut s.muxer, 4096).unwrap().1.len(), 10);
    assert!(next(&mut s.muxer, 4096).is_none(), "out of credit");
    // The guest consumed it and says so only in the header of its own data.
    let mut rw = from_guest(OP_RW, 52, port);
    (rw.buf_alloc, rw.fwd_cnt, rw.len) = (10, 10, 2);
    s.muxer.handle_guest_packet(&rw, b"ok");
    let (more, data) = next(&mut s.muxer, 4096).unwrap();
    assert_eq!((more.op, data.len()), (OP_RW, 10));
}

#[test]
fn connection_churn_leaves_nothing_queued() {
    let mut s = setup("churn");
    let listener = UnixListener::bind(format!("{}_5000", s.uds.display())).unwrap();
    for guest_port in 0..200 {
        s.muxer.handle_guest_packet(&from_guest(OP_REQUEST, guest_port, 5000), &[]);
        let _accepted = listener.accept().unwrap();
        s.muxer.handle_guest_packet(&from_guest(OP_CREDIT_REQUEST, guest_port, 5000), &[]);
        s.muxer.handle_guest_packet(&from_guest(OP_RST, guest_port, 5000), &[]);
    }
    assert!(s.muxer.conns.is_empty());
    assert!(s.muxer.ready.is_empty(), "{} stale entries", s.muxer.ready.len());
}

#[test]
fn a_guest_that_never_answers_a_connect_is_given_up_on() {
    let mut s = setup("timeout");
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (request, _) = next(&mut s.muxer, 0).unwrap();
    assert_eq!(request.op, OP_REQUEST);
    let deadline = Instant::now() + CONNECT_TIMEOUT * 3;
    let rst = loop {
        s.muxer.process_host_events();
        if let Some((hdr, _)) = s.muxer.next_packet(&mut []) {
            break Some(hdr);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(rst.map(|h| (h.op, h.dst_port)), Some((OP_RST, 52)));
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "the host program hears no OK");
}
