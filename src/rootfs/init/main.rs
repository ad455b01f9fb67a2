//! PID 1 of lkvm's 9p root filesystem (`lkvm setup`, `lkvm run` with no disk, `lkvm sandbox`).
//!
//! build.rs compiles this file alone, with no crates, into a static binary that lkvm embeds and
//! writes to ROOTFS/virt/init: the host's programs live under /host, which is not mounted yet
//! when the kernel starts init, so init cannot need the host's dynamic loader.
//!
//! It mounts the pseudo filesystems and the host's / (tag `hostfs`, read-only) at /host, brings
//! up loopback (the kernel's `ip=dhcp` configures the NIC), starts the `lkvm exec` server on
//! vsock (`exec_server`, when the kernel has vsock) and runs the host's /bin/sh on the console.
//! With `lkvm.sandbox=NONCE` on the kernel command line it runs no shell: once listening it
//! removes /virt/sandbox/ready-NONCE (lkvm may snapshot the guest there, waiting for a job) and
//! serves one request, lkvm sandbox's command. Then it syncs and reboots, which ends the VM.

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
}

const MS_RDONLY: c_ulong = 1;
const MS_NOSUID: c_ulong = 2;
const MS_NODEV: c_ulong = 4;
const MS_NOEXEC: c_ulong = 8;
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

/// The value of `lkvm.sandbox=`, if this guest runs a sandbox job.
fn sandbox_param() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline.split_whitespace().find_map(|p| p.strip_prefix("lkvm.sandbox=")).map(str::to_string)
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
    // Removing the file is one 9P request, which leaves no file open in a snapshot.
    let ready = format!("/virt/sandbox/ready-{nonce}");
    if let Err(e) = std::fs::remove_file(&ready) {
        eprintln!("lkvm init: cannot signal readiness by removing {ready}: {e}");
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
    mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "");
    // The kernel may have mounted devtmpfs already (DEVTMPFS_MOUNT): then this is a no-op.
    mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "");
    mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mount_fs("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    if !mount_fs("hostfs", "/host", "9p", MS_RDONLY, "trans=virtio,version=9p2000.L") {
        eprintln!("lkvm init: cannot mount the host's / at /host: {}", std::io::Error::last_os_error());
    }
    loopback_up();
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    std::env::set_var("HOME", "/root");
    std::env::set_var("TERM", "linux");
    match sandbox_param() {
        Some(nonce) => sandbox(&nonce),
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
