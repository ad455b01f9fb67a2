//! The gdb stub (`--gdb PORT|unix:PATH`): gdb's remote protocol (the `gdbstub` crate) on a
//! socket, every vCPU a gdb thread. Attaching stops the guest; detaching resumes it and the
//! stub waits for the next gdb. vCPU state is read and written by the vCPU threads themselves
//! while they are parked (`VcpuControl::on_vcpus`); breakpoints and single steps are KVM's
//! guest debugging (KVM_SET_GUEST_DEBUG), whose exits pause the guest and reach the stub.

mod target;
mod vcpus;

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::{DisconnectReason, GdbStub};
use vm_memory::GuestMemoryMmap;

use crate::config::GdbAddress;
use crate::vmm::vcpu::VcpuControl;
pub use target::{GdbEventLoop, GuestDebugger};
pub use vcpus::DebuggedVcpus;

/// How often a waiting stub looks whether the VM has ended.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The stub's socket, bound while the VM is built so that a taken port fails `lkvm run` at once.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(address: &GdbAddress) -> io::Result<Listener> {
        let listener = match address {
            GdbAddress::Tcp(port) => Listener::Tcp(TcpListener::bind((Ipv4Addr::LOCALHOST, *port))?),
            // Only its owner may connect: gdb can read and write the guest, and run it.
            GdbAddress::Unix(path) => Listener::Unix(crate::host::bind_replacing_stale(path)?, path.clone()),
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        Ok(listener)
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            Listener::Unix(_, path) => path.display().to_string(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Tcp(l) => {
                let (stream, _) = l.accept()?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
        };
        match &stream {
            Stream::Tcp(s) => s.set_nonblocking(false)?,
            Stream::Unix(s) => s.set_nonblocking(false)?,
        }
        Ok(stream)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One gdb connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn inner(&mut self) -> &mut dyn ConnectionExt<Error = io::Error> {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Connection for Stream {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.inner().write(byte)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner().flush()
    }
}

impl ConnectionExt for Stream {
    fn read(&mut self) -> io::Result<u8> {
        self.inner().read()
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        self.inner().peek()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; which of them are.
fn readable(fds: &[BorrowedFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `polled` is a valid array of pollfd for its length; the fds outlive the call.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout.as_millis() as i32) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::Interrupted { Ok(vec![false; fds.len()]) } else { Err(error) };
    }
    Ok(polled.iter().map(|p| p.revents != 0).collect())
}

/// The stub's thread: serves one gdb at a time until the VM ends. `kill` ends the VM (gdb's
/// `kill`).
pub fn serve(listener: Listener, vcpus: Arc<VcpuControl>, mem: GuestMemoryMmap, kill: impl Fn()) {
    let mut debugger = match GuestDebugger::new(vcpus.clone(), mem) {
        Ok(debugger) => debugger,
        Err(e) => {
            tracing::error!("gdb stub: {e}");
            return;
        }
    };
    while !vcpus.stopped() {
        match readable(&[listener.fd()], POLL_INTERVAL) {
            Ok(ready) if ready[0] => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::error!("gdb stub: waiting for gdb: {e}");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("gdb stub: accepting a connection: {e}");
                continue;
            }
        };
        tracing::info!("gdb attached on {}", listener.describe());
        if let Err(e) = debugger.attach() {
            tracing::error!("gdb stub: stopping the guest for gdb: {e}");
            continue;
        }
        let ending = GdbStub::new(stream).run_blocking::<GdbEventLoop<VcpuControl>>(&mut debugger);
        let killed = matches!(ending, Ok(DisconnectReason::Kill));
        match ending {
            Ok(reason) => tracing::info!("gdb detached ({reason:?})"),
            Err(e) => tracing::warn!("gdb stub: the session ended: {e}"),
        }
        if let Err(e) = debugger.detach() {
            tracing::error!("gdb stub: resuming the guest after gdb: {e}");
        }
        if killed {
            kill();
            return;
        }
    }
}
