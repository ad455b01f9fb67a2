//! The per-thread seccomp filters: a forbidden system call from any kind of thread stops lkvm
//! with one line naming the thread and the call, and each kind is held to its own calls.
//! Each case runs in a child process (this test binary again), since a filter cannot be
//! removed and the stop ends the process.

use std::ffi::CString;
use std::process::Command;

use lkvm::thread::{self, DeviceIo, Seccomp, ThreadKind};

const KIND: &str = "LKVM_SECCOMP_TEST_KIND";
const CALL: &str = "LKVM_SECCOMP_TEST_CALL";
const MODE: &str = "LKVM_SECCOMP_TEST_MODE";

fn kind(name: &str) -> ThreadKind {
    match name {
        "vcpu" => ThreadKind::Vcpu,
        "disk" => ThreadKind::Device(DeviceIo::Disk),
        "files" => ThreadKind::Device(DeviceIo::Files),
        "memory" => ThreadKind::Device(DeviceIo::Memory),
        "network" => ThreadKind::Device(DeviceIo::Network),
        "vsock" => ThreadKind::Device(DeviceIo::Sockets),
        "backend" => ThreadKind::NetBackend,
        "api" => ThreadKind::Api,
        "console" => ThreadKind::Console,
        "metrics" => ThreadKind::Metrics,
        "exec" => ThreadKind::Exec,
        "gdb" => ThreadKind::Gdb,
        "vmm" => ThreadKind::Vmm,
        other => panic!("unknown kind {other}"),
    }
}

/// Makes `call` and returns what it returned (or the errno) for the parent to see.
fn make(call: &str) -> String {
    // SAFETY: plain system calls on descriptors and paths this function owns.
    let result = unsafe {
        match call {
            "execve" => {
                let sh = CString::new("/bin/true").unwrap();
                let argv = [sh.as_ptr(), std::ptr::null()];
                libc::execve(sh.as_ptr(), argv.as_ptr(), std::ptr::null())
            }
            "openat" => libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC),
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
            "ioctl-terminal" => {
                let mut size: libc::winsize = std::mem::zeroed();
                libc::ioctl(0, libc::TIOCGWINSZ, &mut size)
            }
            "ioctl-kvm" => libc::ioctl(-1, 0xae01), // KVM_CREATE_VM's number, on no descriptor
            other => panic!("unknown call {other}"),
        }
    };
    format!("{call} returned {result}")
}

/// Run by the parent with the environment set: confines a thread of the kind, which makes the
/// call.
#[test]
#[ignore = "a child of forbidden_calls_stop_lkvm_naming_the_thread"]
fn child_makes_call() {
    let (kind_name, call) = (std::env::var(KIND).unwrap(), std::env::var(CALL).unwrap());
    let mode = std::env::var(MODE).unwrap().parse::<Seccomp>().unwrap();
    thread::confine_with(mode).unwrap();
    let made = thread::spawn(kind(&kind_name), format!("{kind_name}-test"), move || make(&call)).unwrap();
    println!("survived: {}", made.join().unwrap());
}

struct Outcome {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_child(kind: &str, call: &str, mode: &str) -> Outcome {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_makes_call", "--ignored", "--nocapture", "--test-threads=1"])
        .env(KIND, kind)
        .env(CALL, call)
        .env(MODE, mode)
        .output()
        .unwrap();
    Outcome {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn forbidden_calls_stop_lkvm_naming_the_thread() {
    // No thread may start a program; each kind is also held to its own resources.
    let forbidden = [
        ("vcpu", "execve", "vCPU thread vcpu-test", "execve (59)"),
        ("vcpu", "openat", "vCPU thread vcpu-test", "openat (257)"),
        ("disk", "socket", "disk worker thread disk-test", "socket (41)"),
        ("disk", "ioctl-kvm", "disk worker thread disk-test", "ioctl (16)"),
        ("files", "socket", "shared-directory worker thread files-test", "socket (41)"),
        ("memory", "openat", "device worker thread memory-test", "openat (257)"),
        ("network", "openat", "network worker thread network-test", "openat (257)"),
        ("vsock", "openat", "vsock worker thread vsock-test", "openat (257)"),
        ("backend", "execve", "network backend thread backend-test", "execve (59)"),
        ("api", "execve", "API thread api-test", "execve (59)"),
        ("console", "socket", "console thread console-test", "socket (41)"),
        ("console", "ioctl-kvm", "console thread console-test", "ioctl (16)"),
        ("metrics", "socket", "metrics thread metrics-test", "socket (41)"),
        ("exec", "openat", "exec thread exec-test", "openat (257)"),
        ("gdb", "openat", "gdb thread gdb-test", "openat (257)"),
        ("vmm", "execve", "VMM thread vmm-test", "execve (59)"),
    ];
    for (kind, call, thread, named) in forbidden {
        let outcome = run_child(kind, call, "on");
        let expected = format!("lkvm: error: seccomp: the {thread} made a forbidden system call, {named}");
        assert_eq!(outcome.status, Some(148), "{kind} {call}: {}{}", outcome.stdout, outcome.stderr);
        assert!(outcome.stderr.contains(&expected), "{kind} {call}: {}", outcome.stderr);
        assert!(!outcome.stdout.contains("survived"), "{kind} {call}: {}", outcome.stdout);
    }
}

#[test]
fn each_kind_may_make_its_own_calls_and_log_mode_only_logs() {
    // Calls a kind needs pass its filter (their results do not matter here: no descriptor).
    let allowed = [
        ("vcpu", "ioctl-kvm"),
        ("files", "openat"),
        ("console", "ioctl-terminal"),
        ("vsock", "socket"),
        ("vmm", "openat"),
    ];
    for (kind, call) in allowed {
        let outcome = run_child(kind, call, "on");
        assert_eq!(outcome.status, Some(0), "{kind} {call}: {}{}", outcome.stdout, outcome.stderr);
        assert!(outcome.stdout.contains(&format!("survived: {call} returned")), "{}", outcome.stdout);
    }
    // Logged, not stopped: the call is made.
    let outcome = run_child("vcpu", "openat", "log");
    assert_eq!(outcome.status, Some(0), "{}{}", outcome.stdout, outcome.stderr);
    assert!(outcome.stdout.contains("survived: openat returned"), "{}", outcome.stdout);
    assert!(!outcome.stdout.contains("returned -1"), "{}", outcome.stdout);
}
