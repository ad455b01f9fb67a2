//! Tap devices: an existing or new tap interface (root or CAP_NET_ADMIN), optionally given the
//! host address, or set up by the user's script as kvmtool does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use super::NetBackend;
use crate::config::NetSpec;
use crate::host::TUN_DEVICE;
use crate::net::{
    HEADER_LEN, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
};

// From linux/if_tun.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// One queue of a tap interface. Frames carry a 12-byte virtio-net header (IFF_VNET_HDR).
pub struct Tap {
    file: File,
    pub name: String,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives the interface `ip`/24 and brings it up, as `ip addr add` and `ip link set up` would.
fn configure(name: &str, ip: Ipv4Addr) -> io::Result<()> {
    // SAFETY: a plain socket used only for interface ioctls, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let ioctl = |request: libc::c_ulong, req: &mut libc::ifreq| {
        // SAFETY: each request reads/writes the ifreq we pass.
        if unsafe { libc::ioctl(sock, request as _, req as *mut libc::ifreq) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let result = (|| {
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr(ip);
        ioctl(libc::SIOCSIFADDR, &mut req)?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::new(255, 255, 255, 0));
        ioctl(libc::SIOCSIFNETMASK, &mut req)?;
        let mut req = ifreq(name);
        ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(libc::SIOCSIFFLAGS, &mut req)
    })();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    result
}

/// An ioctl on the tap descriptor that takes a pointer (`arg`) or an int.
fn tap_ioctl<T>(file: &File, request: libc::c_ulong, arg: T) -> io::Result<()> {
    // SAFETY: each request reads (or fills) the argument type the kernel defines for it.
    if unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Attaches `spec.queue_pairs` queues of the tap interface (an existing one, or new), then
    /// configures it once.
    pub fn open(spec: &NetSpec, id: usize) -> Result<Vec<Tap>, String> {
        let name = spec.tapif.clone().unwrap_or_else(|| format!("lkvmtap{id}"));
        let fail = |what: &str, e: io::Error| {
            let hint = if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                " (tap needs root or CAP_NET_ADMIN; user-mode networking does not)"
            } else {
                ""
            };
            format!("tap {name}: {what}: {e}{hint}")
        };
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if spec.queue_pairs > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut queues = Vec::new();
        for _ in 0..spec.queue_pairs {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(TUN_DEVICE)
                .map_err(|e| fail("opening /dev/net/tun", e))?;
            let mut req = ifreq(&name);
            req.ifr_ifru.ifru_flags = flags;
            tap_ioctl(&file, TUNSETIFF, &mut req as *mut libc::ifreq).map_err(|e| fail("attaching", e))?;
            let header_len = HEADER_LEN as libc::c_int;
            tap_ioctl(&file, TUNSETVNETHDRSZ, &header_len as *const libc::c_int)
                .map_err(|e| fail("setting the vnet header size", e))?;
            queues.push(Tap { file, name: name.clone() });
        }
        match &spec.script {
            Some(script) => {
                let status = Command::new(script)
                    .arg(&name)
                    .status()
                    .map_err(|e| fail(&format!("running {}", script.display()), e))?;
                if !status.success() {
                    return Err(format!("tap {name}: {} {name} failed ({status})", script.display()));
                }
            }
            None if spec.tap_as_given => {}
            None => configure(&name, spec.host_ip).map_err(|e| fail("configuring the host address", e))?,
        }
        Ok(queues)
    }
}

impl NetBackend for Tap {
    fn has_vnet_header(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()> {
        let mut offloads = 0;
        for (feature, flag) in [
            (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
        ] {
            if guest_features & feature != 0 {
                offloads |= flag;
            }
        }
        // Segmentation offloads need checksum offload: the kernel refuses them alone.
        if offloads & TUN_F_CSUM == 0 {
            offloads = 0;
        }
        tap_ioctl(&self.file, TUNSETOFFLOAD, offloads as libc::c_ulong)
    }

    fn set_active(&mut self, active: bool) -> io::Result<()> {
        let mut req = ifreq("");
        req.ifr_ifru.ifru_flags = if active { IFF_ATTACH_QUEUE } else { IFF_DETACH_QUEUE };
        match tap_ioctl(&self.file, TUNSETQUEUE, &mut req as *mut libc::ifreq) {
            // A single-queue tap has no queues to switch; nor does a queue already so.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // A full tap queue drops the frame, as a busy NIC would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
