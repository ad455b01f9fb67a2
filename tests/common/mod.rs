//! Shared helpers for the integration tests: running lkvm with a deadline, tiny guest payloads,
//! and the test guest built by guest/build.sh.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn lkvm() -> &'static str {
    env!("CARGO_BIN_EXE_lkvm")
}

/// KVM tests run only where /dev/kvm exists; elsewhere they say loudly that they were skipped.
pub fn kvm_available(test: &str) -> bool {
    let ok = Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("!!! SKIPPED {test}: /dev/kvm is absent on this machine: no KVM test ran !!!");
    }
    ok
}

pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}{} after {:.1}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            if self.timed_out { " (TIMED OUT, killed)" } else { "" },
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// Values of `LKVM-RESULT key=value` lines printed by the test guest's init.
    pub fn result(&self, key: &str) -> Option<String> {
        let prefix = format!("LKVM-RESULT {key}=");
        self.stdout.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix).map(str::to_string))
    }
}

/// Runs lkvm with `args`, feeding `stdin`, and kills it after `timeout`.
pub fn run_lkvm(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Outcome {
    run_command(lkvm(), args, stdin, timeout, |_| {})
}

/// Runs `program`, calling `on_line` with each line of its stdout as it arrives.
pub fn run_command(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
    on_line: impl FnMut(&str) + Send + 'static,
) -> Outcome {
    run_full(program, args, &[], stdin.map_or(Input::None, Input::KeptOpen), None, timeout, on_line)
}

/// `run_command` with extra environment variables and no stdin.
pub fn run_command_env(
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
    timeout: Duration,
    on_line: impl FnMut(&str) + Send + 'static,
) -> Outcome {
    run_full(program, args, env, Input::None, None, timeout, on_line)
}

/// What a program reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input<'a> {
    None,
    /// These bytes, and no end of input until the program exits.
    KeptOpen(&'a [u8]),
    /// These bytes, then the end of input.
    Whole(&'a [u8]),
}

/// Text to type once the program's output shows a prompt.
struct Typing<'a> {
    prompt: &'a str,
    at_prompt: Box<dyn FnOnce() -> String + 'a>,
}

fn run_full(
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
    stdin: Input,
    typing: Option<Typing>,
    timeout: Duration,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> Outcome {
    let start = Instant::now();
    let mut child = Command::new(program)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .stdin(if stdin != Input::None || typing.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lkvm");
    // Kept open to the end: a closed stdin must not be mistaken for input.
    let mut pipe = child.stdin.take();
    if let (Input::KeptOpen(input) | Input::Whole(input), Some(pipe)) = (stdin, pipe.as_mut()) {
        pipe.write_all(input).unwrap();
    }
    if let Input::Whole(_) = stdin {
        pipe = None;
    }
    // Output as it arrives (a prompt has no newline), and each whole line to `on_line`.
    let output = std::sync::Arc::new(Mutex::new(Vec::new()));
    let mut out = child.stdout.take().unwrap();
    let sink = output.clone();
    let out_reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        let mut line = Vec::new();
        while let Ok(n @ 1..) = out.read(&mut chunk) {
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            for &byte in &chunk[..n] {
                if byte == b'\n' {
                    on_line(String::from_utf8_lossy(&line).trim_end_matches('\r'));
                    line.clear();
                } else {
                    line.push(byte);
                }
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let mut typing = typing;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        if let (Some(t), Some(pipe)) = (&typing, pipe.as_mut()) {
            if String::from_utf8_lossy(&output.lock().unwrap()).contains(t.prompt) {
                let input = (typing.take().unwrap().at_prompt)();
                pipe.write_all(input.as_bytes()).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    out_reader.join().unwrap();
    let stdout = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    Outcome { code: status.code(), stdout, stderr: err_reader.join().unwrap(), timed_out, elapsed: start.elapsed() }
}

pub fn temp_dir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("lkvm-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// 16-bit real-mode code fragments for flat payloads (loaded at 0x1000:0000).
pub mod x86 {
    /// Prints `text` on COM1.
    pub fn print(text: &str) -> Vec<u8> {
        let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
        for b in text.bytes() {
            code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
        }
        code
    }
    /// Writes `value` to the 8-bit I/O port `port`.
    pub fn out8(port: u16, value: u8) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        vec![0xba, lo, hi, 0xb0, value, 0xee] // mov dx, port; mov al, value; out dx, al
    }
    /// Pulses the CPU reset line through the i8042, the way `reboot=k` guests leave.
    pub fn i8042_reset() -> Vec<u8> {
        vec![0xb0, 0xfe, 0xe6, 0x64] // mov al, 0xfe; out 0x64, al
    }
    pub const SPIN: [u8; 2] = [0xeb, 0xfe]; // jmp $
    /// POPCNT with a memory operand at 0xffff:0x0010 = 1 MiB: with only 1 MiB of guest RAM that
    /// is MMIO, which KVM must emulate, and its instruction emulator has no POPCNT.
    pub fn unemulatable_mmio_access() -> Vec<u8> {
        vec![
            0xb8, 0xff, 0xff, // mov ax, 0xffff
            0x8e, 0xc0, // mov es, ax
            0x26, 0xf3, 0x0f, 0xb8, 0x06, 0x10, 0x00, // popcnt ax, es:[0x0010]
        ]
    }
}

/// A minimal ELF64 kernel without a PVH note: lkvm enters it in long mode through the 64-bit
/// boot protocol, with its boot IDT that holds no usable gate.
pub fn elf64_kernel(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const HEADERS: u64 = 64 + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [HEADERS, LOAD, LOAD, code.len() as u64, code.len() as u64, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    elf.extend_from_slice(code);
    elf
}

/// 64-bit code fragments for `elf64_kernel`.
pub mod x86_64 {
    /// Prints `text` on COM1.
    pub fn print(text: &str) -> Vec<u8> {
        let mut code = vec![0xba, 0xf8, 0x03, 0, 0]; // mov edx, 0x3f8
        for b in text.bytes() {
            code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
        }
        code
    }
    /// An invalid opcode with no IDT to handle it: #UD, #GP, #DF, then a triple fault.
    pub const UD2: [u8; 2] = [0x0f, 0x0b];
}

/// The test guest (kernel and initramfs), built once per test run by guest/build.sh.
pub struct Guest {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    /// The initramfs's /init on its own (static).
    pub init: PathBuf,
}

pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new(root.join("guest/build.sh")).status().expect("run guest/build.sh");
        assert!(status.success(), "guest/build.sh failed: see its output above");
        let out = root.join("guest/out");
        Guest {
            vmlinux: out.join("vmlinux"),
            bzimage: out.join("bzImage"),
            initramfs: out.join("initramfs.cpio"),
            init: out.join("init"),
        }
    })
}

/// FNV-1a 64, as the test guest's init computes it.
/// A 1 MiB raw image whose first bytes are a qcow2 header naming `secret` as its backing file:
/// what a guest with a writable raw disk would plant to read a host file on a later run.
pub fn planted_image(dir: &Path, secret: &Path) -> PathBuf {
    let path = dir.join("planted.img");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", secret.to_str().unwrap(), "-F", "raw"])
        .arg(&path)
        .arg("1M")
        .status()
        .expect("qemu-img (qemu-utils) is installed");
    assert!(made.success());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
    path
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// The test pattern for `seed`, as the test guest's init generates it.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(17) ^ (i >> 9)) as u8).collect()
}

/// Guest parameters this kind of host needs (see shared/GUEST.md): its nested KVM emulates
/// guest kernel code and ignores CPUID, so features the emulator cannot run are hidden here;
/// and the guest's TSC reads the host's whatever offset KVM is given, so a restored guest's
/// TSC jumps by the time it was away: kvm-clock, which KVM_SET_CLOCK restores, keeps time.
pub const HOST_GUEST_PARAMS: &str =
    "noxsave clearcpuid=popcnt,fsgsbase,smap,rdrand,rdseed,rdpid,invpcid,pcid,cx16 clocksource=kvm-clock quiet";

/// A Linux boot's claim on the machine, held for the boot: one boot per test binary at a time
/// (they would slow each other down), and across the binaries scripts/test.sh runs side by
/// side, one guest per core.
pub struct BootLock {
    _in_process: std::sync::MutexGuard<'static, ()>,
    _across_processes: std::fs::File,
}

/// For a guest with one vCPU: another binary's may run beside it.
pub fn boot_lock() -> BootLock {
    boot_lock_as(libc::LOCK_SH)
}

/// For a guest with several vCPUs: it runs alone. Where guest kernel code is emulated, a vCPU
/// waiting on a descheduled one (an IPI, a TLB shootdown) spins out its time slice, and with
/// more vCPUs than free cores such a boot slowed from minutes to a timeout.
pub fn multi_vcpu_boot_lock() -> BootLock {
    boot_lock_as(libc::LOCK_EX)
}

fn boot_lock_as(mode: libc::c_int) -> BootLock {
    use std::os::fd::AsRawFd;
    static LOCK: Mutex<()> = Mutex::new(());
    let in_process = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir();
    // A guest waiting to run alone goes next: boots of one vCPU do not start while it waits
    // (flock alone would let the other binary's boots, one after another, keep it waiting).
    let waiting = dir.join(format!("lkvm-test-boots.waiting-{}", std::process::id()));
    // By a test process still alive: a killed one's file is left behind.
    let someone_waits = || {
        std::fs::read_dir(&dir).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("lkvm-test-boots.waiting-").unwrap_or_default();
            !pid.is_empty() && e.path() != waiting && Path::new("/proc").join(pid).exists()
        })
    };
    if mode == libc::LOCK_EX {
        std::fs::write(&waiting, b"").unwrap();
    } else {
        while someone_waits() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let file = std::fs::File::create(dir.join("lkvm-test-boots.lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; it waits until the lock is granted.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), mode) }, 0, "flock");
    let _ = std::fs::remove_file(&waiting);
    BootLock { _in_process: in_process, _across_processes: file }
}

/// Deadline for one Linux boot and its checks. A boot to init measured 16 s on a fast machine
/// of this kind and about 2 minutes on a slow one, and a boot with many checks several times
/// that; only a hang should reach this. `LKVM_TEST_BOOT_TIMEOUT` (seconds) overrides it.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("LKVM_TEST_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(1500);
    Duration::from_secs(secs)
}

/// Runs lkvm with `env`, waits until its output shows `prompt`, then types `input`; kills it
/// after `timeout`. Input typed before the guest opens its console would be lost.
pub fn run_interactive(args: &[&str], env: &[(&str, String)], prompt: &str, input: &str, timeout: Duration) -> Outcome {
    run_interactive_with(args, env, prompt, || input.to_string(), timeout)
}

/// Like `run_interactive`, calling `at_prompt` when the prompt shows; it returns the input.
pub fn run_interactive_with(
    args: &[&str],
    env: &[(&str, String)],
    prompt: &str,
    at_prompt: impl FnOnce() -> String,
    timeout: Duration,
) -> Outcome {
    run_full(lkvm(), args, env, Input::None, Some(Typing { prompt, at_prompt: Box::new(at_prompt) }), timeout, |_| {})
}

/// Runs `program` with extra environment variables and `stdin` as its whole input (then EOF).
pub fn run_with_input(
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
    stdin: &[u8],
    timeout: Duration,
) -> Outcome {
    run_full(program, args, env, Input::Whole(stdin), None, timeout, |_| {})
}

/// A program whose stdout bytes are counted as they arrive (a guest's progress).
pub struct CountingProcess {
    pub child: std::process::Child,
    pub output: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Starts `program` with `args` and HOME=`home`, counting its stdout bytes.
pub fn spawn_counting(program: &Path, args: &[&str], home: &Path) -> CountingProcess {
    spawn_counting_with_env(program, args, home, &[])
}

/// `spawn_counting` with more environment variables.
pub fn spawn_counting_with_env(program: &Path, args: &[&str], home: &Path, env: &[(&str, &str)]) -> CountingProcess {
    let mut child = Command::new(program)
        .args(args)
        .env("HOME", home)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let output = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (mut stdout, counter) = (child.stdout.take().unwrap(), output.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
    });
    CountingProcess { child, output }
}

/// A flat payload that prints 'x' on COM1 forever, with a delay loop between characters.
pub fn ticker() -> Vec<u8> {
    vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x', // loop: mov al, 'x'
        0xee, // out dx, al
        0xb9, 0xff, 0xff, // mov cx, 0xffff
        0xe2, 0xfe, // loop $
        0xeb, 0xf6, // jmp loop
    ]
}

/// Polls `condition` every 20 ms; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `lkvm args` with HOME=`home`: (exit code, stdout, stderr).
pub fn lkvm_ctl(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(lkvm()).args(args).env("HOME", home).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// One request with curl; returns the status code and the body.
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let url = format!("http://localhost{path}");
    let mut args =
        vec!["-s", "--max-time", "30", "--unix-socket", sock.to_str().unwrap(), "-X", method, "-w", "\n%{http_code}"];
    if let Some(body) = body {
        args.extend(["-H", "Content-Type: application/json", "--data-binary", body]);
    }
    args.push(&url);
    let out = Command::new("curl").args(&args).output().expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
