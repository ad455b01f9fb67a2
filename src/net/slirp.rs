//! User-mode networking through libslirp (QEMU's user-mode network stack): no root, DHCP for
//! the guest, guest connections mapped onto host sockets, traffic to the host address reaching
//! the host's loopback, and host ports forwarded into the guest.
//!
//! libslirp is single-threaded, so it runs on a thread of its own. Frames cross between it and
//! the virtio-net worker over a SOCK_SEQPACKET socket pair: one frame per message, and the
//! kernel's socket buffers bound how much can queue up either way.

use crate::thread::ThreadKind;
use std::ffi::{c_char, c_int, c_void};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::egress::{Egress, Verdict};
use super::NetBackend;
use crate::config::{NetSpec, Protocol};

const MTU: usize = 1500;
const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The DNS address slirp answers on inside the guest network, as QEMU's default (x.x.x.3).
const DNS_HOST_PART: u8 = 3;
const MAX_FRAME: usize = 65536;
const SEND_TIMEOUT_MS: c_int = 1000;
const SLIRP_CONFIG_VERSION: u32 = 4;
const SLIRP_POLL_IN: c_int = 1;
const SLIRP_POLL_OUT: c_int = 2;
const SLIRP_POLL_PRI: c_int = 4;
const SLIRP_POLL_ERR: c_int = 8;
const SLIRP_POLL_HUP: c_int = 16;

#[repr(C)]
struct SlirpConfig {
    version: u32,
    restricted: c_int,
    in_enabled: bool,
    vnetwork: libc::in_addr,
    vnetmask: libc::in_addr,
    vhost: libc::in_addr,
    in6_enabled: bool,
    vprefix_addr6: libc::in6_addr,
    vprefix_len: u8,
    vhost6: libc::in6_addr,
    vhostname: *const c_char,
    tftp_server_name: *const c_char,
    tftp_path: *const c_char,
    bootfile: *const c_char,
    vdhcp_start: libc::in_addr,
    vnameserver: libc::in_addr,
    vnameserver6: libc::in6_addr,
    vdnssearch: *const *const c_char,
    vdomainname: *const c_char,
    if_mtu: usize,
    if_mru: usize,
    disable_host_loopback: bool,
    enable_emu: bool,
    outbound_addr: *const libc::sockaddr_in,
    outbound_addr6: *const libc::sockaddr_in6,
    disable_dns: bool,
    disable_dhcp: bool,
}

type TimerCb = extern "C" fn(*mut c_void);

#[repr(C)]
struct SlirpCb {
    send_packet: extern "C" fn(*const c_void, usize, *mut c_void) -> isize,
    guest_error: extern "C" fn(*const c_char, *mut c_void),
    clock_get_ns: extern "C" fn(*mut c_void) -> i64,
    timer_new: extern "C" fn(TimerCb, *mut c_void, *mut c_void) -> *mut c_void,
    timer_free: extern "C" fn(*mut c_void, *mut c_void),
    timer_mod: extern "C" fn(*mut c_void, i64, *mut c_void),
    register_poll_fd: extern "C" fn(c_int, *mut c_void),
    unregister_poll_fd: extern "C" fn(c_int, *mut c_void),
    notify: extern "C" fn(*mut c_void),
    init_completed: Option<extern "C" fn(*mut c_void, *mut c_void)>,
    timer_new_opaque: Option<extern "C" fn(c_int, *mut c_void, *mut c_void) -> *mut c_void>,
}

type AddPoll = extern "C" fn(c_int, c_int, *mut c_void) -> c_int;
type GetRevents = extern "C" fn(c_int, *mut c_void) -> c_int;

/// libslirp's entry points, loaded when the first user-mode NIC starts: a VM without one never
/// maps libslirp and GLib, which measurably slows every process start.
struct LibSlirp {
    new: unsafe extern "C" fn(*const SlirpConfig, *const SlirpCb, *mut c_void) -> *mut c_void,
    cleanup: unsafe extern "C" fn(*mut c_void),
    input: unsafe extern "C" fn(*mut c_void, *const u8, c_int),
    pollfds_fill: unsafe extern "C" fn(*mut c_void, *mut u32, AddPoll, *mut c_void),
    pollfds_poll: unsafe extern "C" fn(*mut c_void, c_int, GetRevents, *mut c_void),
    add_hostfwd: unsafe extern "C" fn(*mut c_void, c_int, libc::in_addr, c_int, libc::in_addr, c_int) -> c_int,
    /// Keeps the functions above mapped.
    _library: libloading::Library,
}

/// Loads libslirp now, while the host's libraries are in reach (`--jail` hides them).
pub fn load() -> Result<(), String> {
    libslirp().map(|_| ())
}

fn libslirp() -> Result<&'static LibSlirp, String> {
    static LIBSLIRP: OnceLock<Result<LibSlirp, String>> = OnceLock::new();
    LIBSLIRP.get_or_init(load_libslirp).as_ref().map_err(Clone::clone)
}

fn load_libslirp() -> Result<LibSlirp, String> {
    let missing =
        |e: libloading::Error| format!("user-mode networking needs libslirp (apt-get install libslirp0): {e}");
    // SAFETY: loading libslirp runs only its (GLib's) initialisers; each symbol is given the
    // type libslirp 4's header declares for it.
    unsafe {
        let library = libloading::Library::new("libslirp.so.0").map_err(missing)?;
        Ok(LibSlirp {
            new: *library.get(b"slirp_new\0").map_err(missing)?,
            cleanup: *library.get(b"slirp_cleanup\0").map_err(missing)?,
            input: *library.get(b"slirp_input\0").map_err(missing)?,
            pollfds_fill: *library.get(b"slirp_pollfds_fill\0").map_err(missing)?,
            pollfds_poll: *library.get(b"slirp_pollfds_poll\0").map_err(missing)?,
            add_hostfwd: *library.get(b"slirp_add_hostfwd\0").map_err(missing)?,
            _library: library,
        })
    }
}

struct Timer {
    cb: TimerCb,
    cb_opaque: *mut c_void,
    expire_ms: Option<i64>,
}

/// What the slirp thread's callbacks work on.
struct State {
    to_guest: RawFd,
    pollfds: Vec<libc::pollfd>,
    timers: Vec<*mut Timer>,
    start: Instant,
}

fn in_addr(ip: Ipv4Addr) -> libc::in_addr {
    libc::in_addr { s_addr: u32::from(ip).to_be() }
}

fn state<'a>(opaque: *mut c_void) -> &'a mut State {
    // SAFETY: slirp hands back the opaque pointer given to slirp_new: the thread's State,
    // which outlives the Slirp instance and is only touched on that thread.
    unsafe { &mut *opaque.cast::<State>() }
}

extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // A full socket drops the frame: slirp's TCP retransmits, as over a real link.
    // SAFETY: slirp passes a buffer of `len` bytes.
    unsafe { libc::send(state(opaque).to_guest, buf, len, libc::MSG_DONTWAIT) };
    len as isize
}

extern "C" fn guest_error(msg: *const c_char, _: *mut c_void) {
    // SAFETY: slirp passes a NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(msg) };
    tracing::debug!("slirp: guest error: {}", msg.to_string_lossy());
}

extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    state(opaque).start.elapsed().as_nanos() as i64
}

extern "C" fn timer_new(cb: TimerCb, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void {
    let timer = Box::into_raw(Box::new(Timer { cb, cb_opaque, expire_ms: None }));
    state(opaque).timers.push(timer);
    timer.cast()
}

extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    let timer = timer.cast::<Timer>();
    state(opaque).timers.retain(|t| *t != timer);
    // SAFETY: created by Box::into_raw in timer_new and freed once, here.
    drop(unsafe { Box::from_raw(timer) });
}

extern "C" fn timer_mod(timer: *mut c_void, expire_ms: i64, _: *mut c_void) {
    // SAFETY: a live timer from timer_new.
    unsafe { (*timer.cast::<Timer>()).expire_ms = Some(expire_ms) };
}

extern "C" fn ignore_fd(_: c_int, _: *mut c_void) {}
extern "C" fn notify(_: *mut c_void) {}

extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    let mut poll_events = 0;
    for (slirp, poll) in
        [(SLIRP_POLL_IN, libc::POLLIN), (SLIRP_POLL_OUT, libc::POLLOUT), (SLIRP_POLL_PRI, libc::POLLPRI)]
    {
        if events & slirp != 0 {
            poll_events |= poll;
        }
    }
    let pollfds = &mut state(opaque).pollfds;
    pollfds.push(libc::pollfd { fd, events: poll_events, revents: 0 });
    (pollfds.len() - 1) as c_int
}

extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    let Some(pfd) = state(opaque).pollfds.get(idx as usize) else { return 0 };
    let mut events = 0;
    for (poll, slirp) in [
        (libc::POLLIN, SLIRP_POLL_IN),
        (libc::POLLOUT, SLIRP_POLL_OUT),
        (libc::POLLPRI, SLIRP_POLL_PRI),
        (libc::POLLERR, SLIRP_POLL_ERR),
        (libc::POLLHUP, SLIRP_POLL_HUP),
    ] {
        if pfd.revents & poll != 0 {
            events |= slirp;
        }
    }
    events
}

const CALLBACKS: SlirpCb = SlirpCb {
    send_packet,
    guest_error,
    clock_get_ns,
    timer_new,
    timer_free,
    timer_mod,
    register_poll_fd: ignore_fd,
    unregister_poll_fd: ignore_fd,
    notify,
    init_completed: None,
    timer_new_opaque: None,
};

/// The virtio-net side of a slirp network.
pub struct Slirp {
    socket: OwnedFd,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two descriptors, owned from here on.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from socketpair.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl flag changes on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
}

impl Slirp {
    pub fn start(spec: &NetSpec) -> Result<Slirp, String> {
        let (ours, theirs) = seqpacket_pair().map_err(|e| format!("user-mode network: {e}"))?;
        set_nonblocking(ours.as_raw_fd());
        set_nonblocking(theirs.as_raw_fd());
        let stop = crate::host::eventfd().map_err(|e| format!("user-mode network: {e}"))?;
        let stop_fd = stop.try_clone().map_err(|e| format!("user-mode network: {e}"))?;
        let lib = libslirp()?;
        let network = Ipv4Addr::from(u32::from(spec.host_ip) & u32::from(NETMASK));
        let egress = (spec.lan == Some(false)).then(|| Egress::new(network, NETMASK, Egress::host_addresses()));
        let (spec, (ready_tx, ready_rx)) = (spec.clone(), std::sync::mpsc::channel());
        let thread = crate::thread::spawn(ThreadKind::NetBackend, "slirp".into(), move || {
            run(lib, spec, egress, theirs, stop_fd, ready_tx)
        })
        .map_err(|e| format!("user-mode network: {e}"))?;
        ready_rx.recv().unwrap_or_else(|_| Err("user-mode network thread died".into()))?;
        Ok(Slirp { socket: ours, stop, thread: Some(thread) })
    }
}

/// The slirp thread: builds the network, then polls slirp's sockets and the frames from the
/// guest until told to stop.
fn run(
    lib: &LibSlirp,
    spec: NetSpec,
    egress: Option<Egress>,
    to_guest: OwnedFd,
    stop: EventFd,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let network = Ipv4Addr::from(u32::from(spec.host_ip) & u32::from(NETMASK));
    let dns = Ipv4Addr::from(u32::from(network) | u32::from(DNS_HOST_PART));
    // SAFETY: in6_addr is plain data; zero is the unspecified address (IPv6 is off).
    let no_ipv6: libc::in6_addr = unsafe { std::mem::zeroed() };
    let config = SlirpConfig {
        version: SLIRP_CONFIG_VERSION,
        restricted: c_int::from(spec.restrict),
        in_enabled: true,
        vnetwork: in_addr(network),
        vnetmask: in_addr(NETMASK),
        vhost: in_addr(spec.host_ip),
        in6_enabled: false,
        vprefix_addr6: no_ipv6,
        vprefix_len: 0,
        vhost6: no_ipv6,
        vhostname: std::ptr::null(),
        tftp_server_name: std::ptr::null(),
        tftp_path: std::ptr::null(),
        bootfile: std::ptr::null(),
        vdhcp_start: in_addr(spec.guest_ip),
        vnameserver: in_addr(dns),
        vnameserver6: no_ipv6,
        vdnssearch: std::ptr::null(),
        vdomainname: std::ptr::null(),
        if_mtu: MTU,
        if_mru: MTU,
        // Unless disabled, traffic to the host address goes to the host's loopback.
        // The host's loopback services (a gdb stub, databases, agents) trust local users only.
        disable_host_loopback: spec.host_loopback != Some(true),
        enable_emu: false,
        outbound_addr: std::ptr::null(),
        outbound_addr6: std::ptr::null(),
        disable_dns: false,
        disable_dhcp: false,
    };
    let mut state =
        State { to_guest: to_guest.as_raw_fd(), pollfds: Vec::new(), timers: Vec::new(), start: Instant::now() };
    let opaque = (&mut state as *mut State).cast::<c_void>();
    // SAFETY: config and callbacks are valid for the call; `state` outlives the instance,
    // which is cleaned up before this function returns.
    let slirp = unsafe { (lib.new)(&config, &CALLBACKS, opaque) };
    if slirp.is_null() {
        let _ = ready.send(Err("user-mode network: libslirp could not start".into()));
        return;
    }
    for fwd in &spec.forwards {
        // SAFETY: a live slirp instance; plain values.
        let rc = unsafe {
            (lib.add_hostfwd)(
                slirp,
                c_int::from(fwd.protocol == Protocol::Udp),
                in_addr(fwd.host_addr),
                c_int::from(fwd.host_port),
                in_addr(spec.guest_ip),
                c_int::from(fwd.guest_port),
            )
        };
        if rc < 0 {
            // SAFETY: the instance is not used after this.
            unsafe { (lib.cleanup)(slirp) };
            let _ = ready.send(Err(format!("hostfwd: host port {} is not available", fwd.host_port)));
            return;
        }
    }
    let _ = ready.send(Ok(()));

    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        state.pollfds.clear();
        state.pollfds.push(libc::pollfd { fd: to_guest.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        state.pollfds.push(libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        let mut timeout_ms: u32 = 1000;
        // SAFETY: a live instance; add_poll appends to state.pollfds through `opaque`.
        unsafe { (lib.pollfds_fill)(slirp, &mut timeout_ms, add_poll, opaque) };
        let now_ms = state.start.elapsed().as_millis() as i64;
        for timer in &state.timers {
            // SAFETY: live timers registered through timer_new.
            if let Some(expire) = unsafe { (**timer).expire_ms } {
                timeout_ms = timeout_ms.min(expire.saturating_sub(now_ms).clamp(0, i64::from(u32::MAX)) as u32);
            }
        }
        // SAFETY: pollfds is a valid array of its length.
        let rc =
            unsafe { libc::poll(state.pollfds.as_mut_ptr(), state.pollfds.len() as libc::nfds_t, timeout_ms as c_int) };
        // SAFETY: as above; get_revents reads state.pollfds.
        unsafe { (lib.pollfds_poll)(slirp, c_int::from(rc < 0), get_revents, opaque) };
        if state.pollfds[1].revents != 0 {
            break;
        }
        if state.pollfds[0].revents & libc::POLLIN != 0 {
            loop {
                // SAFETY: receive into our buffer.
                let n = unsafe {
                    libc::recv(to_guest.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), libc::MSG_DONTWAIT)
                };
                if n <= 0 {
                    break;
                }
                if let Some(Verdict::Refuse { reply, to, port }) =
                    egress.as_ref().map(|e| e.check(&frame[..n as usize]))
                {
                    crate::guest_info!("user-mode network: refused {to} port {port} (lan=off)");
                    if let Some(reply) = reply {
                        // SAFETY: sending from a valid buffer.
                        unsafe {
                            libc::send(to_guest.as_raw_fd(), reply.as_ptr().cast(), reply.len(), libc::MSG_DONTWAIT)
                        };
                    }
                    continue;
                }
                // SAFETY: a live instance and n valid bytes.
                unsafe { (lib.input)(slirp, frame.as_ptr(), n as c_int) };
            }
        }
        let now_ms = state.start.elapsed().as_millis() as i64;
        let due: Vec<*mut Timer> = state
            .timers
            .iter()
            .copied()
            // SAFETY: live timers.
            .filter(|t| unsafe { (**t).expire_ms.is_some_and(|e| e <= now_ms) })
            .collect();
        for timer in due {
            // SAFETY: live timer; its callback may re-arm or free it, after we stop using it.
            let (cb, cb_opaque) = unsafe {
                (*timer).expire_ms = None;
                ((*timer).cb, (*timer).cb_opaque)
            };
            cb(cb_opaque);
        }
    }
    // SAFETY: the instance is live and not used after this; slirp frees its timers here.
    unsafe { (lib.cleanup)(slirp) };
}

impl NetBackend for Slirp {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: sending from a valid buffer.
            let n =
                unsafe { libc::send(self.socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            let mut pfd = libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, SEND_TIMEOUT_MS) } <= 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "user-mode network is not keeping up"));
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: receiving into a valid buffer; MSG_TRUNC reports the real length.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return if err.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(err) };
            }
            // A frame too large for the guest is dropped.
            if n as usize <= buf.len() {
                return Ok(Some(n as usize));
            }
        }
    }
}

impl AsRawFd for Slirp {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Drop for Slirp {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
