//! PID 1 of lkvm's root filesystem guests (`lkvm setup`, `lkvm run` with no disk, `lkvm sandbox`).
//!
//! build.rs compiles this file alone, with no crates, into a static binary that lkvm embeds and
//! boots as /init of an initramfs it makes: the host's programs live under /host, which is not
//! mounted yet when the kernel starts init, so init cannot need the host's dynamic loader.
//!
//! From the initramfs it mounts the root directory (tag `root`) and the host's / (tag `hostfs`)
//! read-only, over virtio-fs where the kernel has it and 9p otherwise, puts an overlay over each
//! whose writes stay in guest memory, mounts the `lkvm.rw=DIR` directories (tags `rw0`, `rw1`...)
//! writable at /host/DIR and makes the overlay the root. Then it mounts the pseudo filesystems,
//! brings up loopback (the kernel's `ip=dhcp` configures the NIC), starts the `lkvm exec` server
//! on vsock (`exec_server`, when the kernel has vsock) and runs the host's /bin/sh on the
//! console, or the user's `init=`. With `lkvm.sandbox=NONCE` on the kernel command line it runs
//! no shell: once listening it tells the host it is ready (lkvm may snapshot the guest there,
//! waiting for a job) and serves one request, lkvm sandbox's command. Then it syncs and
//! reboots, which ends the VM.

#[path = "../../exec/protocol.rs"]
#[allow(dead_code)] // the host's half is unused here
mod protocol;
mod exec_server;

use std::ffi::{c_char, c_int, c_ulong, c_void, CString};
use std::os::unix::process::CommandExt;
use std::process::Command;

extern "C" {
    fn mount(source: *const c_char, target: *const c_char, fstype: *const c_char, flags: c_ulong, data: *const c_void) -> c_int;
    fn reboot(cmd: c_int) -> c_int;
    fn sync();
    fn setsid() -> c_int;
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn fork() -> c_int;
    fn _exit(status: c_int) -> !;
    fn chdir(path: *const c_char) -> c_int;
    fn chroot(path: *const c_char) -> c_int;
    fn umount2(target: *const c_char, flags: c_int) -> c_int;
}

const MS_RDONLY: c_ulong = 1;
const MS_NOSUID: c_ulong = 2;
const MS_NODEV: c_ulong = 4;
const MS_NOEXEC: c_ulong = 8;
const MS_BIND: c_ulong = 4096;
const MS_MOVE: c_ulong = 8192;
const RB_AUTOBOOT: c_int = 0x0123_4567;
const TIOCSCTTY: c_ulong = 0x540E;
const SIOCGIFFLAGS: c_ulong = 0x8913;
const SIOCSIFFLAGS: c_ulong = 0x8914;
const IFF_UP: i16 = 1;
const AF_INET: c_int = 2;
const SOCK_DGRAM: c_int = 2;
/// struct ifreq: a name and, for the flag requests, a short.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    pad: [u8; 22],
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a constant")
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: c_ulong, data: &str) -> bool {
    let _ = std::fs::create_dir_all(target);
    let (source, target, fstype, data) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    unsafe { mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) == 0 }
}

fn loopback_up() {
    // SAFETY: plain syscalls on a socket this function owns and a fully initialised ifreq.
    unsafe {
        let fd = socket(AF_INET, SOCK_DGRAM, 0);
        if fd < 0 {
            return;
        }
        let mut request = IfReq { name: [0; 16], flags: 0, pad: [0; 22] };
        request.name[..2].copy_from_slice(b"lo");
        if ioctl(fd, SIOCGIFFLAGS, &mut request as *mut IfReq) == 0 {
            request.flags |= IFF_UP;
            ioctl(fd, SIOCSIFFLAGS, &mut request as *mut IfReq);
        }
        close(fd);
    }
}

/// The values of the kernel parameter `key` (`lkvm.rw=`), in order.
fn params<'a>(cmdline: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    cmdline.split_whitespace().filter_map(move |p| p.strip_prefix(key))
}

/// The shared filesystem the root directory came over; the other shares use the same.
#[derive(Clone, Copy)]
enum Transport {
    VirtioFs,
    NineP,
}

impl Transport {
    fn mount(self, tag: &str, target: &str, read_only: bool) -> bool {
        let flags = if read_only { MS_RDONLY } else { 0 };
        match self {
            Transport::VirtioFs => mount_fs(tag, target, "virtiofs", flags, ""),
            // The root directory changes seldom: cache it.
            Transport::NineP if tag == "root" => {
                mount_fs(tag, target, "9p", flags, "trans=virtio,version=9p2000.L,msize=512000,cache=loose")
            }
            Transport::NineP => mount_fs(tag, target, "9p", flags, "trans=virtio,version=9p2000.L,msize=512000"),
        }
    }
}

/// The read-only `lower` under `target`, with its writes in /lkvm (guest memory).
fn overlay(lower: &str, target: &str, name: &str) -> bool {
    let (upper, work) = (format!("/lkvm/upper/{name}"), format!("/lkvm/work/{name}"));
    std::fs::create_dir_all(&upper).is_ok()
        && std::fs::create_dir_all(&work).is_ok()
        && mount_fs("overlay", target, "overlay", 0, &format!("lowerdir={lower},upperdir={upper},workdir={work}"))
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Builds the root from the initramfs (see the top of this file) and moves into it.
fn switch_to_shared_root(cmdline: &str) -> Result<(), String> {
    mount_fs("tmpfs", "/lkvm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700");
    let transport = [Transport::VirtioFs, Transport::NineP]
        .into_iter()
        .find(|t| t.mount("root", "/lkvm/root", true))
        .ok_or_else(|| format!("cannot mount the root directory (tag root) over virtio-fs or 9p: {}", last_error()))?;
    if !transport.mount("hostfs", "/lkvm/host", true) {
        eprintln!("lkvm init: cannot mount the host's / (tag hostfs): {}", last_error());
    }
    if !(overlay("/lkvm/root", "/newroot", "root") && overlay("/lkvm/host", "/newroot/host", "host")) {
        eprintln!("lkvm init: no overlayfs ({}): / and /host are read-only", last_error());
        let _ = umount2_path("/newroot");
        mount_fs("/lkvm/root", "/newroot", "", MS_BIND, "");
        mount_fs("/lkvm/host", "/newroot/host", "", MS_BIND, "");
    }
    for (index, dir) in params(cmdline, "lkvm.rw=").enumerate() {
        if !transport.mount(&format!("rw{index}"), &format!("/newroot/host{dir}"), false) {
            eprintln!("lkvm init: cannot mount {dir} writable (tag rw{index}): {}", last_error());
        }
    }
    let (root, dot) = (cstr("/newroot"), cstr("."));
    // SAFETY: NUL-terminated paths that outlive the calls. The initramfs stays beneath, unused:
    // the usual switch_root, without deleting its one file.
    let moved = unsafe {
        chdir(root.as_ptr()) == 0
            && mount(dot.as_ptr(), cstr("/").as_ptr(), std::ptr::null(), MS_MOVE, std::ptr::null()) == 0
            && chroot(dot.as_ptr()) == 0
            && chdir(cstr("/").as_ptr()) == 0
    };
    moved.then_some(()).ok_or_else(|| format!("cannot make the overlay the root: {}", last_error()))
}

fn umount2_path(path: &str) -> bool {
    let path = cstr(path);
    // SAFETY: a NUL-terminated path that outlives the call.
    unsafe { umount2(path.as_ptr(), 0) == 0 }
}

/// Runs `command` as the console's session leader (so Ctrl-C reaches it), reaps every
/// orphan meanwhile, and returns its exit status as a shell reports it.
fn run_in_foreground(mut command: Command) -> i32 {
    // SAFETY: setsid and ioctl are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            setsid();
            ioctl(0, TIOCSCTTY, 0);
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(child) => child.id() as c_int,
        Err(e) => {
            eprintln!("lkvm init: cannot run {:?}: {e}", command.get_program());
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only the status integer.
        let pid = unsafe { waitpid(-1, &mut status, 0) };
        if pid == child {
            return if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) };
        }
        if pid < 0 {
            return 126;
        }
    }
}

/// Serves lkvm sandbox's one request, once it has said it is ready.
fn sandbox(nonce: &str) {
    let listener = match exec_server::listen_vsock() {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("lkvm init: lkvm sandbox needs vsock in the guest kernel (CONFIG_VIRTIO_VSOCKETS): {e}");
            return;
        }
    };
    if let Err(e) = exec_server::announce_ready(nonce) {
        eprintln!("lkvm init: cannot tell the host the sandbox is ready: {e}");
        return;
    }
    exec_server::serve(listener, true);
}

/// Serves `lkvm exec` from a process of its own, so that the shell's reaping of every orphan
/// (`run_in_foreground`) does not take the server's children. Quiet without vsock.
fn start_exec_server() {
    let Ok(listener) = exec_server::listen_vsock() else { return };
    // SAFETY: init has no other thread yet, so the child may run Rust code; it never returns.
    unsafe {
        if fork() == 0 {
            exec_server::serve(listener, false);
            _exit(0);
        }
    }
}

fn sync_filesystems() {
    // SAFETY: sync takes no arguments.
    unsafe { sync() };
}

fn main() {
    mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    umount2_path("/proc");
    if let Err(e) = switch_to_shared_root(&cmdline) {
        eprintln!("lkvm init: {e}");
        sync_filesystems();
        // SAFETY: reboot takes no pointers; it ends this VM.
        unsafe { reboot(RB_AUTOBOOT) };
    }
    mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
    mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
    // The kernel may have mounted devtmpfs already (DEVTMPFS_MOUNT): then this is a no-op.
    mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "");
    mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mount_fs("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    loopback_up();
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    std::env::set_var("HOME", "/root");
    std::env::set_var("TERM", "linux");
    let sandbox_nonce = params(&cmdline, "lkvm.sandbox=").next();
    if let Some(init) = params(&cmdline, "init=").next().filter(|_| sandbox_nonce.is_none()) {
        let e = Command::new(init).exec();
        eprintln!("lkvm init: cannot run init={init}: {e}");
    }
    match sandbox_nonce {
        Some(nonce) => sandbox(nonce),
        None => {
            start_exec_server();
            let mut shell = Command::new("/bin/sh");
            shell.current_dir("/root");
            run_in_foreground(shell);
        }
    }
    sync_filesystems();
    // SAFETY: reboot takes no pointers; it ends this VM.
    unsafe { reboot(RB_AUTOBOOT) };
}
