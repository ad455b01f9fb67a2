//! The guest end of `lkvm exec` and `lkvm sandbox`: listens on vsock port `EXEC_PORT` for the
//! host (CID 2 only: a guest process must not reach it through vsock loopback) and runs each
//! request's command with its stdin, stdout and stderr carried as frames (`protocol`).

use std::ffi::{c_int, c_uint, c_ulong, c_ushort};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::protocol::{self, Request, EXEC_PORT, READY_PORT};

extern "C" {
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn bind(fd: c_int, addr: *const SockaddrVm, len: c_uint) -> c_int;
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const SockaddrVm, len: c_uint) -> c_int;
    fn accept4(fd: c_int, addr: *mut SockaddrVm, len: *mut c_uint, flags: c_int) -> c_int;
    fn shutdown(fd: c_int, how: c_int) -> c_int;
    fn poll(fds: *mut PollFd, count: c_ulong, timeout_ms: c_int) -> c_int;
    fn kill(pid: c_int, signal: c_int) -> c_int;
    fn open(path: *const std::ffi::c_char, flags: c_int, ...) -> c_int;
}

const AF_VSOCK: c_int = 40;
const SOCK_STREAM: c_int = 1;
const SOCK_CLOEXEC: c_int = 0o2_000_000;
const VMADDR_CID_ANY: c_uint = u32::MAX;
const VMADDR_CID_HOST: c_uint = 2;
const SHUT_WR: c_int = 1;
const SHUT_RDWR: c_int = 2;
const POLLRDHUP: i16 = 0x2000;
/// How long a sandbox's init waits for the host to take the exit status before it reboots.
const HOST_CLOSE_TIMEOUT_MS: c_int = 30_000;
const SIGKILL: c_int = 9;
const O_RDWR: c_int = 2;
const O_NOCTTY: c_int = 0o400;
const O_CLOEXEC: c_int = 0o2_000_000;
const TIOCSPTLCK: c_ulong = 0x4004_5431;
const TIOCGPTN: c_ulong = 0x8004_5430;
const TIOCSWINSZ: c_ulong = 0x5414;

#[repr(C)]
struct SockaddrVm {
    family: c_ushort,
    reserved: c_ushort,
    port: c_uint,
    cid: c_uint,
    zero: [u8; 4],
}

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

#[repr(C)]
struct WinSize {
    rows: u16,
    cols: u16,
    xpixel: u16,
    ypixel: u16,
}

/// A listening socket on `EXEC_PORT`.
pub fn listen_vsock() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the address is fully initialised and outlives bind.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let addr = SockaddrVm { family: AF_VSOCK as c_ushort, reserved: 0, port: EXEC_PORT, cid: VMADDR_CID_ANY, zero: [0; 4] };
        if bind(fd, &addr, std::mem::size_of::<SockaddrVm>() as c_uint) != 0 || listen(fd, 16) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(owned)
    }
}

/// Tells lkvm sandbox that this guest listens for its command: `NONCE\n` to the host's
/// `READY_PORT`.
pub fn announce_ready(nonce: &str) -> std::io::Result<()> {
    // SAFETY: plain syscalls on a socket this function owns; the address is fully initialised.
    let socket = unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let addr = SockaddrVm { family: AF_VSOCK as c_ushort, reserved: 0, port: READY_PORT, cid: VMADDR_CID_HOST, zero: [0; 4] };
        if connect(fd, &addr, std::mem::size_of::<SockaddrVm>() as c_uint) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        owned
    };
    File::from(socket).write_all(format!("{nonce}\n").as_bytes())
}

/// Serves connections from the host: every one, each on its own thread, or with `one_shot`
/// only the first, syncing the filesystems before its exit status is sent (a sandbox ends
/// with it).
pub fn serve(listener: OwnedFd, one_shot: bool) {
    loop {
        let mut addr = SockaddrVm { family: 0, reserved: 0, port: 0, cid: 0, zero: [0; 4] };
        let mut len = std::mem::size_of::<SockaddrVm>() as c_uint;
        // SAFETY: accept4 writes at most `len` bytes into addr.
        let fd = unsafe { accept4(listener.as_raw_fd(), &mut addr, &mut len, SOCK_CLOEXEC) };
        if fd < 0 {
            continue;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let conn = unsafe { File::from_raw_fd(fd) };
        if addr.cid != VMADDR_CID_HOST {
            continue;
        }
        if one_shot {
            return serve_connection(conn, true);
        }
        std::thread::spawn(move || serve_connection(conn, false));
    }
}

/// Frames from several threads go out whole.
type Sender = Arc<Mutex<File>>;

fn send(out: &Sender, kind: u8, payload: &[u8]) -> bool {
    protocol::write_frame(&mut *out.lock().unwrap(), kind, payload).is_ok()
}

fn serve_connection(conn: File, sync_first: bool) {
    let Ok(Some((protocol::REQUEST, payload))) = protocol::read_frame(&mut &conn) else { return };
    let Ok(out) = conn.try_clone().map(|c| Arc::new(Mutex::new(c))) else { return };
    let status = match Request::decode(&payload) {
        Ok(request) => run(&request, &conn, &out),
        Err(e) => {
            send(&out, protocol::STDERR, format!("lkvm exec: bad request: {e}\n").as_bytes());
            126
        }
    };
    if sync_first {
        crate::sync_filesystems();
    }
    send(&out, protocol::EXIT, &status.to_le_bytes());
    if sync_first {
        wait_for_host_close(&conn);
    }
    // SAFETY: shutdown on a descriptor this function owns; it ends the input thread's read.
    unsafe { shutdown(conn.as_raw_fd(), SHUT_RDWR) };
}

/// A sandbox ends when init reboots, which resets the vsock device: the status frame may still
/// sit in the guest's queues then. The host closes the connection once it has the status.
fn wait_for_host_close(conn: &File) {
    // SAFETY: shutdown on a descriptor the caller owns; poll reads and writes one PollFd.
    unsafe {
        shutdown(conn.as_raw_fd(), SHUT_WR);
        let mut entry = PollFd { fd: conn.as_raw_fd(), events: POLLRDHUP, revents: 0 };
        while poll(&mut entry, 1, HOST_CLOSE_TIMEOUT_MS) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

/// Where the host's input goes: the command's stdin pipe, or the pty's master.
enum Input {
    Pipe(Option<std::process::ChildStdin>),
    Pty(File),
}

/// Runs the request's command to its end and returns its status as a shell reports it.
fn run(request: &Request, conn: &File, out: &Sender) -> i32 {
    let mut command = Command::new(&request.argv[0]);
    command.args(&request.argv[1..]);
    for entry in &request.env {
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    let cwd = std::path::Path::new(&request.cwd);
    command.current_dir(if cwd.is_absolute() && cwd.is_dir() { cwd } else { std::path::Path::new("/") });
    let pty = match request.tty {
        Some(size) => match open_pty(size) {
            Ok(pair) => Some(pair),
            Err(e) => {
                send(out, protocol::STDERR, format!("lkvm exec: no pty: {e}\n").as_bytes());
                return 126;
            }
        },
        None => None,
    };
    let with_tty = pty.is_some();
    let (master, slave) = match pty {
        Some((master, slave)) => (Some(master), Some(slave)),
        None => (None, None),
    };
    if let Some(slave) = &slave {
        let stdio = || slave.try_clone().map(Stdio::from);
        match (stdio(), stdio(), stdio()) {
            (Ok(i), Ok(o), Ok(e)) => command.stdin(i).stdout(o).stderr(e),
            _ => return 126,
        };
    } else {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    // SAFETY: setsid and ioctl are async-signal-safe. A session of its own lets a closed
    // connection kill the whole process group; with a pty it is the controlling terminal.
    unsafe {
        command.pre_exec(move || {
            crate::setsid();
            if with_tty {
                crate::ioctl(0, crate::TIOCSCTTY, 0);
            }
            Ok(())
        });
    }
    let spawned = command.spawn();
    drop(command); // closes the parent's copies of the pty's slave
    drop(slave);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            send(out, protocol::STDERR, format!("lkvm exec: cannot run {}: {e}\n", request.argv[0]).as_bytes());
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    let mut pumps = Vec::new();
    let input = match master {
        Some(master) => {
            if let Ok(reader) = master.try_clone() {
                pumps.push(pump_output(reader, protocol::STDOUT, out.clone()));
            }
            Input::Pty(master)
        }
        None => {
            pumps.extend(child.stdout.take().map(|o| pump_output(o, protocol::STDOUT, out.clone())));
            pumps.extend(child.stderr.take().map(|e| pump_output(e, protocol::STDERR, out.clone())));
            Input::Pipe(child.stdin.take())
        }
    };
    let finished = Arc::new(AtomicBool::new(false));
    let forward = match conn.try_clone() {
        Ok(conn) => forward_input(conn, input, child.id() as c_int, finished.clone()),
        Err(_) => return kill_and_wait(&mut child),
    };
    let status = child.wait().map_or(126, |s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)));
    finished.store(true, Ordering::SeqCst);
    for pump in pumps {
        let _ = pump.join();
    }
    drop(forward); // left blocked in read until the connection is shut down
    status
}

fn kill_and_wait(child: &mut Child) -> i32 {
    let _ = child.kill();
    let _ = child.wait();
    126
}

fn pump_output(mut from: impl Read + Send + 'static, kind: u8, out: Sender) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        // A pty's master reads EIO once every slave is closed: the end, like EOF.
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if !send(&out, kind, &buf[..n]) {
                return;
            }
        }
    })
}

/// Feeds the host's frames to the command; a connection that ends before the command does
/// kills its process group.
fn forward_input(mut conn: File, mut input: Input, pid: c_int, finished: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        loop {
            match protocol::read_frame(&mut conn) {
                Ok(Some((protocol::STDIN, data))) => match &mut input {
                    Input::Pipe(pipe) if data.is_empty() => drop(pipe.take()),
                    Input::Pipe(Some(pipe)) => {
                        let _ = pipe.write_all(&data);
                    }
                    Input::Pipe(None) => {}
                    Input::Pty(master) => {
                        let _ = master.write_all(&data);
                    }
                },
                Ok(Some((protocol::WINDOW, size))) if size.len() == 4 => {
                    if let Input::Pty(master) = &input {
                        let rows = u16::from_le_bytes([size[0], size[1]]);
                        let cols = u16::from_le_bytes([size[2], size[3]]);
                        set_window(master, (rows, cols));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if !finished.load(Ordering::SeqCst) {
            // SAFETY: kill takes no pointers; the group is the command's own session.
            unsafe { kill(-pid, SIGKILL) };
        }
    })
}

fn set_window(master: &File, (rows, cols): (u16, u16)) {
    let size = WinSize { rows, cols, xpixel: 0, ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one struct winsize.
    unsafe { crate::ioctl(master.as_raw_fd(), TIOCSWINSZ, &size as *const WinSize) };
}

/// A pty pair from devpts (mounted by init), the terminal set to `size`.
fn open_pty(size: (u16, u16)) -> std::io::Result<(File, File)> {
    let open_path = |path: &str| {
        let path = crate::cstr(path);
        // SAFETY: a NUL-terminated path; the descriptor returned is owned by the File.
        let fd = unsafe { open(path.as_ptr(), O_RDWR | O_NOCTTY | O_CLOEXEC) };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: a new descriptor nothing else owns.
            Ok(unsafe { File::from_raw_fd(fd) })
        }
    };
    let master = open_path("/dev/pts/ptmx")?;
    let (unlock, mut number): (c_int, c_uint) = (0, 0);
    // SAFETY: both ioctls read or write one int.
    unsafe {
        if crate::ioctl(master.as_raw_fd(), TIOCSPTLCK, &unlock as *const c_int) != 0
            || crate::ioctl(master.as_raw_fd(), TIOCGPTN, &mut number as *mut c_uint) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    set_window(&master, size);
    let slave = open_path(&format!("/dev/pts/{number}"))?;
    Ok((master, slave))
}
