//! User-mode networking through passt: lkvm starts `passt` for the VM and exchanges frames with
//! it over a UNIX stream socket, each prefixed by its length (32-bit big-endian), the protocol
//! QEMU's `-netdev stream` speaks. passt answers DHCP and maps guest connections onto host
//! sockets; traffic to the gateway address reaches the host's loopback.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{NetBackend, NetSpec, Protocol};

/// MTU passt advertises by DHCP: one frame fits a receive buffer without mergeable buffers.
const MTU: u32 = 1500;
const NETMASK_BITS: u32 = 24;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a send waits for passt to drain its socket before the frame is dropped.
const SEND_TIMEOUT_MS: i32 = 1000;
const MAX_FRAME: usize = 65536;

pub struct Passt {
    socket: UnixStream,
    child: Child,
    path: PathBuf,
    /// Bytes read from the stream that do not yet form a whole frame.
    pending: Vec<u8>,
}

impl Passt {
    pub fn start(spec: &NetSpec, id: usize) -> Result<Passt, String> {
        let dir = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("lkvm-passt-{}-{id}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut cmd = Command::new("passt");
        cmd.args(["--foreground", "--one-off", "--ipv4-only", "--quiet"])
            .arg("--socket")
            .arg(&path)
            .args(["--address", &spec.guest_ip.to_string(), "--netmask", &NETMASK_BITS.to_string()])
            .args(["--gateway", &spec.host_ip.to_string(), "--mtu", &MTU.to_string()]);
        for fwd in &spec.forwards {
            let flag = if fwd.protocol == Protocol::Tcp { "--tcp-ports" } else { "--udp-ports" };
            cmd.arg(flag).arg(format!("{}:{}", fwd.host_port, fwd.guest_port));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: prctl in the forked child before exec; it only sets a process attribute.
        unsafe {
            cmd.pre_exec(|| {
                // passt must not outlive lkvm, even after a SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                "user-mode networking needs passt: apt-get install passt (or use -n mode=none or mode=tap)".to_string()
            }
            _ => format!("starting passt: {e}"),
        })?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let socket = loop {
            if let Ok(socket) = UnixStream::connect(&path) {
                break socket;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                return Err(format!("passt exited ({status}): {}", err.lines().next().unwrap_or("no message")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("passt did not open its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        socket.set_nonblocking(true).map_err(|e| format!("passt socket: {e}"))?;
        Ok(Passt { socket, child, path, pending: Vec::new() })
    }

    fn wait_writable(&self) -> io::Result<()> {
        let mut pfd = libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, SEND_TIMEOUT_MS) } {
            n if n > 0 => Ok(()),
            0 => Err(io::Error::new(io::ErrorKind::TimedOut, "passt is not reading")),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Takes the first whole frame out of `pending`, if there is one.
    fn next_frame(&mut self, buf: &mut [u8]) -> Option<Option<usize>> {
        let header: [u8; 4] = self.pending.get(..4)?.try_into().unwrap();
        let len = u32::from_be_bytes(header) as usize;
        if self.pending.len() < 4 + len {
            return None;
        }
        let frame: Vec<u8> = self.pending.drain(..4 + len).skip(4).collect();
        if frame.len() > buf.len() {
            return Some(None); // too large for the guest: dropped
        }
        buf[..frame.len()].copy_from_slice(&frame);
        Some(Some(frame.len()))
    }
}

impl NetBackend for Passt {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut message = Vec::with_capacity(4 + frame.len());
        message.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        message.extend_from_slice(frame);
        let mut sent = 0;
        while sent < message.len() {
            match self.socket.write(&message[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_writable()?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.next_frame(buf) {
                Some(Some(len)) => return Ok(Some(len)),
                Some(None) => continue,
                None => {}
            }
            // Read at most one frame's worth ahead: a fast peer cannot grow this buffer.
            let mut chunk = [0u8; MAX_FRAME];
            let room = (4 + MAX_FRAME).saturating_sub(self.pending.len()).min(chunk.len());
            match self.socket.read(&mut chunk[..room]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "passt closed the connection")),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            // A length prefix beyond any Ethernet frame means the stream is corrupt.
            if let Some(header) = self.pending.get(..4) {
                if u32::from_be_bytes(header.try_into().unwrap()) as usize > MAX_FRAME {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "passt sent an oversized frame"));
                }
            }
        }
    }
}

impl AsRawFd for Passt {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}
