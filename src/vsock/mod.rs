//! The host side of virtio-vsock, as Firecracker does it: stream connections between the guest
//! and programs on UNIX sockets. A host program connects to `uds_path` and writes
//! `CONNECT <port>\n` (answered `OK <host port>\n`) to reach a guest listener on that port; a
//! guest connecting to the host (CID 2) port P reaches a program listening on `<uds_path>_P`.
//!
//! Flow control is virtio-vsock's credit: the guest may send a connection at most `CONN_BUF`
//! bytes that its host socket has not taken yet, and lkvm sends the guest no more than the room
//! it advertised. Host memory per connection is bounded; a guest that oversteps is reset.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
/// Guest data per connection that its host socket has not taken yet, at most.
pub const CONN_BUF: u32 = 256 * 1024;
/// The largest payload of one packet either way.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// With CONN_BUF each, at most 128 MiB of guest data held, and descriptors well under a 1024 limit.
const MAX_CONNECTIONS: usize = 512;
/// Host programs connected to `uds_path` that have not sent their CONNECT line yet.
const MAX_ACCEPTING: usize = 64;
const MAX_CONNECT_LINE: usize = 32;
/// Replies owed to the guest (resets for unknown connections, say) beyond this are dropped:
/// a guest flooding requests cannot grow host memory.
const MAX_CONTROL_BACKLOG: usize = 4096;
/// Host-side ports of host-initiated connections, as Firecracker numbers them.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Where this process starts numbering host-initiated connections: anywhere in Firecracker's
/// range. A restored or forked guest may still send packets of its parent's connections; those
/// must not match the new ones.
fn first_host_port() -> u32 {
    let mut bytes = [0u8; 4];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    FIRST_HOST_PORT + u32::from_le_bytes(bytes) % (1 << 29)
}

/// How long a host program waits for the guest to accept, and for its own CONNECT line (as in
/// Firecracker).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;

/// A packet header (struct virtio_vsock_hdr), apart from the guest memory it came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// A connection: (host port, guest port).
type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A host program asked for it; the guest has not answered.
    Connecting,
    Established,
    /// The host program sends no more (SHUTDOWN told the guest); it may still take data.
    HostDone,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// For a host-initiated connection: when to give up on the guest's answer.
    deadline: Option<Instant>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host socket, and the count the guest last heard.
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_sent: Wrapping<u32>,
    to_host: VecDeque<u8>,
    host_readable: bool,
    /// The host program closed its socket, not only its sending side.
    host_hung_up: bool,
    credit_update_due: bool,
    guest_stopped_sending: bool,
    guest_stopped_receiving: bool,
    queued: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State, peer: &Header) -> Self {
        Conn {
            stream,
            token,
            state,
            deadline: None,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            to_host: VecDeque::new(),
            host_readable: false,
            host_hung_up: false,
            credit_update_due: false,
            guest_stopped_sending: false,
            guest_stopped_receiving: false,
            queued: false,
        }
    }

    /// Bytes the guest has room for.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    /// What the host socket is watched for: input only while there is none pending (it is
    /// read when the guest has buffers and room), output while guest data waits for it.
    fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state == State::Established && !self.host_readable && !self.guest_stopped_receiving {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Writes what the guest sent until the host socket would block.
    fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.to_host.is_empty() && self.guest_stopped_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        // The guest stops when it thinks the buffer is full; tell it well before.
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= CONN_BUF / 4 {
            self.credit_update_due = true;
        }
        Ok(())
    }
}

/// A host program that connected to `uds_path` and is still writing its CONNECT line.
struct Accepting {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Fires when a host program's CONNECT may have timed out.
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    accepting: HashMap<u64, Accepting>,
    next_token: u64,
    next_host_port: u32,
    /// Headers without data owed to the guest, in order.
    control: VecDeque<Header>,
    /// Connections that may have something for the guest (data, a credit update).
    ready: VecDeque<Key>,
}

/// The socket bound ahead of the device (Firecracker's `PUT /vsock`): clients wait for its file
/// before they start the VM.
static BOUND_AHEAD: std::sync::Mutex<Option<(PathBuf, UnixListener)>> = std::sync::Mutex::new(None);

/// Binds the socket of the vsock device to come at `path` now; it replaces one bound earlier.
pub fn bind_ahead(path: &Path) -> io::Result<()> {
    let mut bound = BOUND_AHEAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((earlier, _)) = bound.take().filter(|(earlier, _)| earlier != path) {
        let _ = std::fs::remove_file(earlier);
    }
    *bound = Some((path.to_path_buf(), bind(path)?));
    Ok(())
}

/// Listens on `path` for host programs: the socket bound ahead there, or a new one.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    let mut bound = BOUND_AHEAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match bound.take() {
        Some((ahead, listener)) if ahead == path => Ok(listener),
        other => {
            *bound = other;
            bind(path)
        }
    }
}

/// A new socket at `path`, only the user's (mode 0600). A leftover socket nobody answers on is
/// replaced; anything else at the path is an error.
fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let listener = crate::host::bind_replacing_stale(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))?;
        let timer = TimerFd::new()?;
        epoll.ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, TIMER_TOKEN))?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            accepting: HashMap::new(),
            next_token: TIMER_TOKEN + 1,
            next_host_port: first_host_port(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
        })
    }

    /// Whether a packet may be waiting for the guest (`next_packet` can still find nothing).
    pub fn has_pending(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// Takes one packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.reply_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
            // Any packet can carry the credit a waiting connection needs.
            if conn.host_readable && conn.peer_credit() > 0 {
                self.mark_ready(key);
            }
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (hdr.op, state) {
            (OP_RST, _) => self.remove(key),
            (OP_REQUEST, None) => self.connect_to_host(hdr),
            (OP_RESPONSE, Some(State::Connecting)) => {
                let conn = self.conns.get_mut(&key).expect("state found");
                conn.state = State::Established;
                conn.deadline = None;
                // A fresh socket's buffer takes a short line.
                if conn.stream.write_all(format!("OK {}\n", key.0).as_bytes()).is_err() {
                    self.reset(key);
                } else {
                    self.update_interest(key);
                }
            }
            (OP_SHUTDOWN, Some(_)) => {
                let conn = self.conns.get_mut(&key).expect("state found");
                conn.guest_stopped_receiving |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.guest_stopped_sending |= hdr.flags & SHUTDOWN_SEND != 0;
                self.flush(key);
            }
            (OP_RW, Some(State::Established | State::HostDone)) => {
                let conn = self.conns.get_mut(&key).expect("state found");
                let room = CONN_BUF as usize - conn.to_host.len();
                if data.len() > room || conn.guest_stopped_sending {
                    tracing::debug!("vsock: guest port {} overran its credit; reset", key.1);
                    self.reset(key);
                    return;
                }
                conn.to_host.extend(data);
                self.flush(key);
            }
            (OP_CREDIT_UPDATE, Some(_)) => self.mark_ready(key),
            (OP_CREDIT_REQUEST, Some(_)) => {
                self.conns.get_mut(&key).expect("state found").credit_update_due = true;
                self.mark_ready(key);
            }
            // A request for a connection that exists, or anything for one that does not.
            (_, Some(_)) => self.reset(key),
            (_, None) => self.reply_rst(hdr),
        }
    }

    /// The next packet for the guest, its payload written to `data` (the room the guest's
    /// buffer has); `None` when nothing is ready.
    pub fn next_packet(&mut self, data: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(mut hdr) = self.control.pop_front() {
            if let Some(conn) = self.conns.get_mut(&(hdr.src_port, hdr.dst_port)) {
                hdr.fwd_cnt = conn.fwd_cnt.0;
                conn.fwd_cnt_sent = conn.fwd_cnt;
            }
            return Some((hdr, 0));
        }
        // A buffer without room for data carries only the headers above.
        let skip = if data.is_empty() { self.ready.len() } else { 0 };
        for _ in 0..skip {
            let key = self.ready.pop_front().expect("counted");
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            if conn.credit_update_due {
                conn.credit_update_due = false;
                self.ready.push_back(key);
                return Some((self.outgoing(key, OP_CREDIT_UPDATE, 0, 0), 0));
            }
            self.ready.push_back(key);
        }
        if data.is_empty() {
            return None;
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.queued = false;
            if conn.credit_update_due {
                conn.credit_update_due = false;
                let hdr = self.outgoing(key, OP_CREDIT_UPDATE, 0, 0);
                self.mark_ready(key);
                return Some((hdr, 0));
            }
            let room = (conn.peer_credit() as usize).min(data.len()).min(MAX_PAYLOAD);
            if conn.state != State::Established || !conn.host_readable || conn.guest_stopped_receiving || room == 0 {
                continue; // a credit update from the guest marks it ready again
            }
            match conn.stream.read(&mut data[..room]) {
                Ok(0) => {
                    // A half-close (shutdown of its sending side) still takes the guest's data.
                    conn.state = State::HostDone;
                    conn.host_readable = false;
                    let gone = conn.host_hung_up || hung_up(&conn.stream);
                    let flags = if gone { SHUTDOWN_RCV | SHUTDOWN_SEND } else { SHUTDOWN_SEND };
                    return Some((self.outgoing(key, OP_SHUTDOWN, flags, 0), 0));
                }
                Ok(n) => {
                    conn.rx_cnt += n as u32;
                    self.mark_ready(key);
                    return Some((self.outgoing(key, OP_RW, 0, n as u32), n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    conn.host_readable = false;
                    self.update_interest(key);
                }
                Err(_) => {
                    self.remove(key);
                    return Some((self.header(key, OP_RST, 0, 0), 0));
                }
            }
        }
        None
    }

    /// Serves the host sockets that are ready: new host programs, their CONNECT lines,
    /// connections with input or room for output.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let Ok(n) = self.epoll.wait(0, &mut events) else { return };
        for event in &events[..n] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                self.accept();
            } else if token == TIMER_TOKEN {
                self.expire_connects();
            } else if self.accepting.contains_key(&token) {
                self.read_connect_line(token);
            } else if let Some(&key) = self.by_token.get(&token) {
                self.host_event(key, event.event_set());
            }
        }
    }

    fn host_event(&mut self, key: Key, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Reported whatever the interest: stop watching, and let the read see the end.
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
            if conn.state == State::Established && !conn.guest_stopped_receiving {
                conn.host_readable = true;
                conn.host_hung_up = true;
                self.mark_ready(key);
            } else {
                self.reset(key);
            }
            return;
        }
        if set.contains(EventSet::IN) {
            conn.host_readable = true;
            self.mark_ready(key);
        }
        if set.contains(EventSet::OUT) {
            self.flush(key);
        }
        self.update_interest(key);
    }

    /// Takes new host programs; beyond MAX_ACCEPTING waiting for their CONNECT line (after the
    /// ones past their deadline are dropped) they are closed at once. If accept fails (out of
    /// descriptors, say) the listener is not watched until a connection ends.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: {}: accept: {e}", self.uds_path.display());
                    self.watch_listener(false);
                    return;
                }
            };
            if self.accepting.len() >= MAX_ACCEPTING {
                let now = Instant::now();
                let expired: Vec<u64> =
                    self.accepting.iter().filter(|(_, a)| a.deadline <= now).map(|(t, _)| *t).collect();
                for token in expired {
                    self.drop_accepting(token);
                }
                if self.accepting.len() >= MAX_ACCEPTING {
                    continue; // closes it
                }
            }
            let token = self.token();
            if stream.set_nonblocking(true).is_err()
                || self
                    .epoll
                    .ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
                    .is_err()
            {
                continue;
            }
            self.accepting
                .insert(token, Accepting { stream, line: Vec::new(), deadline: Instant::now() + CONNECT_TIMEOUT });
        }
    }

    fn drop_accepting(&mut self, token: u64) {
        if let Some(accepting) = self.accepting.remove(&token) {
            let _ = self.epoll.ctl(ControlOperation::Delete, accepting.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    fn watch_listener(&self, on: bool) {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            self.listener.as_raw_fd(),
            EpollEvent::new(events, LISTENER_TOKEN),
        );
    }

    /// Resets host-initiated connections the guest did not accept in time.
    fn expire_connects(&mut self) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        let now = Instant::now();
        let expired: Vec<Key> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(k, _)| *k).collect();
        for key in expired {
            self.reset(key);
        }
        self.arm_timer();
    }

    /// Arms the timer for the earliest CONNECT deadline, if any.
    fn arm_timer(&mut self) {
        let Some(next) = self.conns.values().filter_map(|c| c.deadline).min() else { return };
        if !self.timer_armed {
            let wait = next.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.timer_armed = self.timer.reset(wait, None).is_ok();
        }
    }

    /// Reads a CONNECT line byte by byte, so the program's first data stays in its socket.
    fn read_connect_line(&mut self, token: u64) {
        let accepting = self.accepting.get_mut(&token).expect("checked");
        let mut byte = [0u8; 1];
        let port = loop {
            match accepting.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&accepting.line),
                Ok(1) if accepting.line.len() < MAX_CONNECT_LINE => accepting.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break None,
            }
        };
        let accepting = self.accepting.remove(&token).expect("checked");
        let _ = self.epoll.ctl(ControlOperation::Delete, accepting.stream.as_raw_fd(), EpollEvent::default());
        let Some(guest_port) = port else { return };
        if self.conns.len() >= MAX_CONNECTIONS || self.control.len() >= MAX_CONTROL_BACKLOG {
            return;
        }
        let host_port = self.free_host_port(guest_port);
        let key = (host_port, guest_port);
        // Not watched until the guest accepts: its data waits in the socket.
        if self
            .epoll
            .ctl(ControlOperation::Add, accepting.stream.as_raw_fd(), EpollEvent::new(EventSet::empty(), token))
            .is_err()
        {
            return;
        }
        let mut conn = Conn::new(accepting.stream, token, State::Connecting, &Header::default());
        conn.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        self.conns.insert(key, conn);
        self.by_token.insert(token, key);
        self.push_control(self.header(key, OP_REQUEST, 0, 0));
        self.arm_timer();
    }

    fn free_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    /// The guest connects to a host port: a program must listen on `<uds_path>_<port>`.
    fn connect_to_host(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) if self.conns.len() < MAX_CONNECTIONS => stream,
            _ => return self.reply_rst(hdr),
        };
        let token = self.token();
        if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token)).is_err() {
            return self.reply_rst(hdr);
        }
        self.conns.insert(key, Conn::new(stream, token, State::Established, hdr));
        self.by_token.insert(token, key);
        self.push_control(self.header(key, OP_RESPONSE, 0, 0));
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    /// A header going to the guest now: it carries the count of bytes forwarded so far.
    fn outgoing(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let hdr = self.header(key, op, flags, len);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.fwd_cnt_sent = conn.fwd_cnt;
        }
        hdr
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() < MAX_CONTROL_BACKLOG {
            self.control.push_back(hdr);
        }
    }

    fn reply_rst(&mut self, to: &Header) {
        if to.op != OP_RST {
            let mut rst = self.header((to.dst_port, to.src_port), OP_RST, 0, 0);
            rst.type_ = to.type_;
            self.push_control(rst);
        }
    }

    /// Ends a connection and tells the guest.
    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.push_control(self.header(key, OP_RST, 0, 0));
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
            self.by_token.remove(&conn.token);
            if conn.queued {
                self.ready.retain(|k| *k != key);
            }
            // A descriptor is free again: new host programs can be taken.
            self.watch_listener(true);
        }
    }

    fn flush(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        match conn.flush() {
            // The guest closed: what it sent reached the host program; the RST completes it.
            Ok(()) if conn.guest_stopped_sending && conn.guest_stopped_receiving && conn.to_host.is_empty() => {
                self.reset(key)
            }
            Ok(()) => {
                if conn.credit_update_due {
                    self.mark_ready(key);
                }
                self.update_interest(key);
            }
            Err(_) => self.reset(key),
        }
    }

    fn mark_ready(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued {
                conn.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn update_interest(&mut self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            let event = EpollEvent::new(conn.interest(), conn.token);
            let _ = self.epoll.ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), event);
        }
    }
}

impl AsRawFd for Muxer {
    /// Readable while a host socket needs serving.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// Whether the peer closed the socket entirely (not only its sending side).
fn hung_up(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd { fd: stream.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one pollfd for a descriptor we own, no waiting.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 && poll.revents & libc::POLLHUP != 0 }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Connects without waiting: a program whose listen backlog is full refuses the guest rather
/// than stalling the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests;
