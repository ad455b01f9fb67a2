//! PID 1 of lkvm's 9p root filesystem (`lkvm setup`, `lkvm run` with no disk, `lkvm sandbox`).
//!
//! build.rs compiles this file alone, with no crates, into a static binary that lkvm embeds and
//! writes to ROOTFS/virt/init: the host's programs live under /host, which is not mounted yet
//! when the kernel starts init, so init cannot need the host's dynamic loader.
//!
//! It mounts the pseudo filesystems and the host's / (tag `hostfs`, read-only) at /host, brings
//! up loopback (the kernel's `ip=dhcp` configures the NIC), then runs the host's /bin/sh, or with
//! `lkvm.sandbox=ID` on the kernel command line the command lkvm left in /virt/sandbox/ID
//! (`argv`: NUL-separated; `cwd`; `raw`: present when lkvm's output is not a terminal), whose
//! exit status it writes to /virt/sandbox/ID/status. Then it syncs and reboots, which ends the VM.
//! With `lkvm.sandbox=warm:NONCE` it first gets ready, removes /virt/sandbox/ready-NONCE and
//! reads the job's ID as one line from the console (not echoed): lkvm snapshots the guest while
//! it waits there, and each later sandbox restores that snapshot and types its own job's ID.

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
    fn tcgetattr(fd: c_int, termios: *mut Termios) -> c_int;
    fn tcsetattr(fd: c_int, when: c_int, termios: *const Termios) -> c_int;
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
const OPOST: u32 = 1;
const ECHO: u32 = 0o10;
const TCSANOW: c_int = 0;

/// glibc's struct termios on x86_64.
#[repr(C)]
struct Termios {
    iflag: u32,
    oflag: u32,
    cflag: u32,
    lflag: u32,
    line: u8,
    cc: [u8; 32],
    ispeed: u32,
    ospeed: u32,
}

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

/// Stops the console from turning "\n" into "\r\n", for output that goes to a file or pipe.
fn raw_output() {
    // SAFETY: termios is plain data that tcgetattr fills before tcsetattr reads it.
    unsafe {
        let mut termios: Termios = std::mem::zeroed();
        if tcgetattr(1, &mut termios) == 0 {
            termios.oflag &= !OPOST;
            tcsetattr(1, TCSANOW, &termios);
        }
    }
}

/// The value of `lkvm.sandbox=`, if this guest runs a sandbox job.
fn sandbox_param() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline.split_whitespace().find_map(|p| p.strip_prefix("lkvm.sandbox=")).map(str::to_string)
}

/// The job's ID: given on the command line, or typed by lkvm once the guest is ready.
fn job_id(param: &str) -> Option<String> {
    match param.strip_prefix("warm:") {
        Some(nonce) => wait_for_job(nonce),
        None => Some(param.to_string()),
    }
}

/// Turns the console's echo off or on: a job ID typed by lkvm must not show in the output.
fn set_echo(on: bool) {
    // SAFETY: termios is plain data that tcgetattr fills before tcsetattr reads it.
    unsafe {
        let mut termios: Termios = std::mem::zeroed();
        if tcgetattr(0, &mut termios) == 0 {
            termios.lflag = if on { termios.lflag | ECHO } else { termios.lflag & !ECHO };
            tcsetattr(0, TCSANOW, &termios);
        }
    }
}

/// Says it is ready (by removing the file lkvm made for that: one 9P request, which leaves no
/// file open in the snapshot), then reads the job's ID from the console.
fn wait_for_job(nonce: &str) -> Option<String> {
    set_echo(false);
    let ready = format!("/virt/sandbox/ready-{nonce}");
    if let Err(e) = std::fs::remove_file(&ready) {
        eprintln!("lkvm init: cannot signal readiness by removing {ready}: {e}");
        return None;
    }
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    set_echo(true);
    read.ok()?;
    let id = line.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')).then(|| id.to_string())
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

fn sandbox(id: &str) -> i32 {
    let job = format!("/virt/sandbox/{id}");
    let Ok(argv) = std::fs::read(format!("{job}/argv")) else {
        eprintln!("lkvm init: no sandbox command in {job}");
        return 126;
    };
    // Each argument ends in a NUL; empty arguments are kept.
    let argv = argv.strip_suffix(&[0]).unwrap_or(&argv);
    let mut args = argv.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned());
    let Some(program) = args.next() else { return 126 };
    if std::path::Path::new(&format!("{job}/raw")).exists() {
        raw_output();
    }
    let mut command = Command::new(program);
    command.args(args);
    let cwd = std::fs::read_to_string(format!("{job}/cwd")).unwrap_or_default();
    command.current_dir(if std::path::Path::new(&cwd).is_dir() { cwd.as_str() } else { "/" });
    let status = run_in_foreground(command);
    if let Err(e) = std::fs::write(format!("{job}/status"), status.to_string()) {
        eprintln!("lkvm init: cannot record the exit status: {e}");
    }
    status
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
        Some(param) => match job_id(&param) {
            Some(id) => {
                sandbox(&id);
            }
            None => eprintln!("lkvm init: no sandbox job was handed over"),
        },
        None => {
            let mut shell = Command::new("/bin/sh");
            shell.current_dir("/root");
            run_in_foreground(shell);
        }
    }
    // SAFETY: sync and reboot take no pointers; reboot ends this VM.
    unsafe {
        sync();
        reboot(RB_AUTOBOOT);
    }
}
