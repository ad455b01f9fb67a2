//! seccomp filters per thread kind: each kind may make only the system calls its work needs.
//! A forbidden call stops lkvm with one line naming the thread and the call.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use syscalls::Sysno;

use super::{DeviceIo, ThreadKind};

/// lkvm's exit status when a thread made a forbidden system call (Firecracker's too).
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 148;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// A forbidden call stops lkvm.
    #[default]
    On,
    /// A forbidden call is allowed and logged by the kernel (`dmesg`, audit): for finding what
    /// a filter lacks.
    Log,
    Off,
}

impl FromStr for Seccomp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Seccomp::On),
            "log" => Ok(Seccomp::Log),
            "off" => Ok(Seccomp::Off),
            _ => Err(format!("--seccomp {s}: use on, log or off")),
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(Seccomp::Off as u8);

pub(super) fn set_mode(mode: Seccomp) -> io::Result<()> {
    if mode != Seccomp::Off {
        // One malloc arena for every thread: a thread arena's heap, when it shrinks, makes glibc
        // read /proc/sys/vm/overcommit_memory (once), an open confined threads may not make.
        // The main arena never does.
        // SAFETY: mallopt with integer arguments.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
    if mode == Seccomp::On {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, forbidden_call)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    MODE.store(mode as u8, Ordering::Relaxed);
    Ok(())
}

fn mode() -> Seccomp {
    match MODE.load(Ordering::Relaxed) {
        m if m == Seccomp::On as u8 => Seccomp::On,
        m if m == Seccomp::Log as u8 => Seccomp::Log,
        _ => Seccomp::Off,
    }
}

/// The compiled filter for `kind`, or `None` when threads run unconfined.
pub(super) fn filter(kind: ThreadKind) -> io::Result<Option<BpfProgram>> {
    let mismatch = match mode() {
        Seccomp::On => SeccompAction::Trap,
        Seccomp::Log => SeccompAction::Log,
        Seccomp::Off => return Ok(None),
    };
    let arch = std::env::consts::ARCH.try_into().map_err(io::Error::other)?;
    let filter = SeccompFilter::new(rules(kind), mismatch, SeccompAction::Allow, arch).map_err(io::Error::other)?;
    BpfProgram::try_from(filter).map(Some).map_err(io::Error::other)
}

thread_local! {
    /// This thread's kind and name, for the SIGSYS handler (a plain TLS read).
    static CONFINED: Cell<Option<(ThreadKind, [u8; 16])>> = const { Cell::new(None) };
}

/// Installs `filter` on the calling thread. A thread that cannot be confined must not run
/// unconfined: lkvm stops.
pub(super) fn confine(kind: ThreadKind, name: &str, filter: &BpfProgram) {
    let mut short = [0u8; 16];
    let len = name.len().min(short.len());
    short[..len].copy_from_slice(&name.as_bytes()[..len]);
    CONFINED.set(Some((kind, short)));
    if let Err(e) = seccompiler::apply_filter(filter) {
        eprintln!("lkvm: error: cannot install the seccomp filter of the {} thread {name}: {e}", kind.describe());
        std::process::exit(1);
    }
}

/// SIGSYS from a filter: says which thread made which call, and ends lkvm. Runs on the
/// offending thread under its filter, so it only writes and exits.
extern "C" fn forbidden_call(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo: after the 16-byte header, the call's address (8 bytes) and its number.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let number = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let call = usize::try_from(number).ok().and_then(Sysno::new).map_or("unknown", |s| s.name());
    let mut line = Line::default();
    let _ = match CONFINED.get() {
        Some((kind, name)) => {
            let name = std::str::from_utf8(&name).unwrap_or("?").trim_end_matches('\0');
            write!(line, "lkvm: error: seccomp: the {} thread {name} made a forbidden system call", kind.describe())
        }
        None => write!(line, "lkvm: error: seccomp: a thread made a forbidden system call"),
    };
    let _ = writeln!(line, ", {call} ({number}); lkvm stops (--seccomp off runs without filters)");
    // SAFETY: write and _exit are async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.bytes.as_ptr().cast(), line.len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

/// A message formatted without allocating (the handler runs in a signal).
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line { bytes: [0; 256], len: 0 }
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Every thread: memory, its eventfds and epoll, time, signals, and ending (or aborting).
const BASE: &[Sysno] = &[
    Sysno::read,
    Sysno::write,
    Sysno::readv,
    Sysno::writev,
    Sysno::close,
    Sysno::futex,
    Sysno::mmap,
    Sysno::munmap,
    Sysno::mprotect,
    Sysno::madvise,
    Sysno::mremap,
    Sysno::brk,
    Sysno::rt_sigreturn,
    Sysno::rt_sigprocmask,
    Sysno::sigaltstack,
    Sysno::exit,
    Sysno::exit_group,
    Sysno::clock_gettime,
    Sysno::clock_nanosleep,
    Sysno::nanosleep,
    Sysno::sched_yield,
    Sysno::getrandom,
    Sysno::gettid,
    Sysno::getpid,
    Sysno::fstat,
    Sysno::newfstatat,
    Sysno::statx,
    Sysno::fcntl,
    Sysno::lseek,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::epoll_pwait,
    Sysno::eventfd2,
    Sysno::timerfd_settime,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::restart_syscall,
    Sysno::sched_getaffinity,
    // When lkvm drops root (`crate::jail`), glibc has every thread repeat the change. Once
    // dropped, these can only set the ids the thread already has.
    Sysno::setgroups,
    Sysno::setresuid,
    Sysno::setresgid,
];

/// Host sockets: accepted, connected, or made.
const SOCKETS: &[Sysno] = &[
    Sysno::socket,
    Sysno::socketpair,
    Sysno::connect,
    Sysno::bind,
    Sysno::listen,
    Sysno::accept,
    Sysno::accept4,
    Sysno::sendto,
    Sysno::recvfrom,
    Sysno::sendmsg,
    Sysno::recvmsg,
    Sysno::shutdown,
    Sysno::getsockname,
    Sysno::getpeername,
    Sysno::getsockopt,
    Sysno::setsockopt,
];

/// Reading and writing disk images.
const DISK: &[Sysno] = &[
    Sysno::pread64,
    Sysno::pwrite64,
    Sysno::preadv,
    Sysno::pwritev,
    Sysno::preadv2,
    Sysno::pwritev2,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::fallocate,
    Sysno::ftruncate,
    Sysno::io_uring_enter,
];

/// Files by path, under a directory descriptor: shares, and the VMM's own files (snapshots,
/// core dumps, sockets).
const FILES: &[Sysno] = &[
    Sysno::openat,
    Sysno::getdents64,
    Sysno::mkdirat,
    Sysno::mknodat,
    Sysno::unlinkat,
    Sysno::renameat,
    Sysno::renameat2,
    Sysno::linkat,
    Sysno::symlinkat,
    Sysno::readlinkat,
    Sysno::fchmod,
    Sysno::fchmodat,
    Sysno::fchown,
    Sysno::fchownat,
    Sysno::utimensat,
    Sysno::statfs,
    Sysno::fstatfs,
    Sysno::faccessat,
    Sysno::faccessat2,
    Sysno::flock,
    Sysno::dup,
    Sysno::dup3,
    Sysno::fgetxattr,
    Sysno::fsetxattr,
    Sysno::flistxattr,
    Sysno::fremovexattr,
    Sysno::lgetxattr,
    Sysno::llistxattr,
    Sysno::copy_file_range,
    // The path-only forms the C library uses on x86_64 (std's rename, remove_file, ...).
    Sysno::rename,
    Sysno::unlink,
    Sysno::mkdir,
    Sysno::rmdir,
    Sysno::access,
    Sysno::readlink,
    Sysno::symlink,
    Sysno::link,
    Sysno::chmod,
    Sysno::umask,
];

/// The file-system server acts with the guest user's ids (when lkvm runs as root).
const CREDENTIALS: &[Sysno] = &[Sysno::setfsuid, Sysno::setfsgid, Sysno::capget, Sysno::capset];

/// The ioctls a thread may make, by request number.
#[derive(Clone, Copy)]
enum Ioctls {
    /// Every KVM ioctl (type 0xAE): system, VM and vCPU.
    Kvm,
    /// The terminal's size and mode.
    Terminal,
    /// Non-blocking mode and bytes waiting, on sockets.
    Sockets,
    /// A tap's offloads, header size and queue attachment.
    Tap,
    /// A block device's size and sector size (opening a drive swapped in).
    BlockDevice,
}

impl Ioctls {
    fn rules(self) -> Vec<SeccompRule> {
        let request =
            |op, value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value).expect("valid ioctl rule");
        let exact = |value| SeccompRule::new(vec![request(SeccompCmpOp::Eq, value)]).expect("valid ioctl rule");
        match self {
            Ioctls::Kvm => {
                vec![SeccompRule::new(vec![request(SeccompCmpOp::MaskedEq(0xff00), 0xae00)]).expect("valid ioctl rule")]
            }
            Ioctls::Terminal => {
                [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TIOCGWINSZ, libc::TIOCSWINSZ].map(exact).to_vec()
            }
            Ioctls::Sockets => [libc::FIONBIO, libc::FIONREAD].map(exact).to_vec(),
            // BLKGETSIZE64 is _IOR(0x12, 114, u64); libc does not name it for x86_64.
            Ioctls::BlockDevice => [0x8008_1272, libc::BLKSSZGET].map(exact).to_vec(),
            Ioctls::Tap => [libc::TUNSETOFFLOAD, libc::TUNSETVNETHDRSZ, libc::TUNSETQUEUE].map(exact).to_vec(),
        }
    }
}

/// Every kind the spawner creates.
const SPAWNED: &[ThreadKind] = &[
    ThreadKind::Vcpu,
    ThreadKind::Device(DeviceIo::Memory),
    ThreadKind::Device(DeviceIo::Disk),
    ThreadKind::Device(DeviceIo::Network),
    ThreadKind::Device(DeviceIo::Files),
    ThreadKind::Device(DeviceIo::Sockets),
    ThreadKind::NetBackend,
    ThreadKind::Api,
    ThreadKind::Console,
    ThreadKind::Metrics,
    ThreadKind::Exec,
    ThreadKind::Gdb,
];

/// Creating a thread, and what the new thread does before its own filter is in place: glibc's
/// and std's thread start, entering the Landlock domain, installing the filter.
const SPAWNING: &[Sysno] = &[
    Sysno::clone,
    Sysno::clone3,
    Sysno::set_robust_list,
    Sysno::rseq,
    Sysno::prctl,
    Sysno::seccomp,
    Sysno::landlock_restrict_self,
];

/// The spawner's rules: creating threads, and what any kind it creates may call (a new thread
/// runs under its creator's filter as well as its own).
fn spawner_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    // None: any arguments.
    let mut union: BTreeMap<i64, Option<Vec<SeccompRule>>> =
        SPAWNING.iter().map(|call| (i64::from(call.id()), None)).collect();
    for &kind in SPAWNED {
        for (call, rules) in self::rules(kind) {
            let entry = union.entry(call).or_insert_with(|| Some(Vec::new()));
            match entry {
                None => {}
                Some(_) if rules.is_empty() => *entry = None,
                Some(list) => list.extend(rules),
            }
        }
    }
    union.into_iter().map(|(call, rules)| (call, rules.unwrap_or_default())).collect()
}

/// What `kind` may call: system call number -> the rules one of which its arguments must
/// match (none: any arguments).
fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    use ThreadKind::*;
    let (calls, ioctls): (Vec<&[Sysno]>, &[Ioctls]) = match kind {
        // A vCPU only records a device's activation or reset (a register write): the VMM
        // thread does it.
        Vcpu => (vec![], &[Ioctls::Kvm]),
        Device(DeviceIo::Memory) => (vec![], &[]),
        Device(DeviceIo::Disk) => (vec![DISK], &[]),
        Device(DeviceIo::Network) => (vec![SOCKETS], &[Ioctls::Sockets, Ioctls::Tap]),
        Device(DeviceIo::Files) => (vec![FILES, DISK, CREDENTIALS], &[]),
        Device(DeviceIo::Sockets) => (vec![SOCKETS], &[Ioctls::Sockets]),
        NetBackend => (vec![SOCKETS, &[Sysno::openat]], &[Ioctls::Sockets]),
        // It talks to its clients and checks the files they name; what changes the VM, the VMM
        // thread does (`vmm::action`), so no KVM here.
        Api => (vec![SOCKETS, FILES, DISK], &[Ioctls::Sockets]),
        Console => (vec![], &[Ioctls::Terminal]),
        Metrics => (vec![FILES], &[]),
        Exec => (vec![SOCKETS], &[Ioctls::Sockets, Ioctls::Terminal]),
        Gdb => (vec![SOCKETS], &[Ioctls::Kvm, Ioctls::Sockets]),
        // The main thread, once the VM runs: it waits for the VM's end, serves the control
        // socket and runs its and the API's actions (pause, snapshot, dump, drive swaps, ...),
        // activates and resets devices (a tap's queues, vsock's connection timer; a disk's
        // io_uring is made with the device, before any thread is confined),
        // takes the warm sandbox snapshot, shares its memory and state with a fork's children
        // (memfds), and tears the VM down (joins, closes, unlinks its
        // sockets, the terminal).
        Vmm => (
            vec![SOCKETS, FILES, DISK, &[Sysno::rt_sigaction, Sysno::timerfd_create, Sysno::memfd_create]],
            &[Ioctls::Kvm, Ioctls::Sockets, Ioctls::Terminal, Ioctls::BlockDevice, Ioctls::Tap],
        ),
        Spawner => return spawner_rules(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        BASE.iter().chain(calls.into_iter().flatten()).map(|call| (i64::from(call.id()), Vec::new())).collect();
    // Signals only to lkvm's own threads (kicking a vCPU; abort()).
    let own_process =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(std::process::id()))
            .expect("valid tgkill rule");
    rules.insert(i64::from(Sysno::tgkill.id()), vec![SeccompRule::new(vec![own_process]).expect("valid tgkill rule")]);
    if !ioctls.is_empty() {
        rules.insert(i64::from(Sysno::ioctl.id()), ioctls.iter().flat_map(|i| i.rules()).collect());
    }
    rules
}
