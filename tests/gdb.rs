//! End-to-end: Debian's gdb debugs the real test guest through lkvm's gdb stub, in one boot.
//! The guest kernel is stripped, so breakpoints and reads use System.map's addresses.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn symbols(names: &[&str]) -> HashMap<String, u64> {
    let map = std::fs::read_to_string(guest().vmlinux.with_file_name("System.map")).expect("guest/out/System.map");
    let found: HashMap<String, u64> = map
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (addr, _, name) = (fields.next()?, fields.next()?, fields.next()?);
            names.contains(&name).then(|| (name.to_string(), u64::from_str_radix(addr, 16).unwrap()))
        })
        .collect();
    assert_eq!(found.len(), names.len(), "System.map lacks one of {names:?}");
    found
}

/// Every value gdb's `info registers NAME` printed, in order.
fn register_values(gdb_out: &str, name: &str) -> Vec<u64> {
    gdb_out
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == name).then_some(())?;
            u64::from_str_radix(fields.next()?.strip_prefix("0x")?, 16).ok()
        })
        .collect()
}

/// Runs gdb in batch mode on `commands`; with `interrupt_after`, sends it SIGINT (Ctrl-C) then.
fn gdb(port: u16, commands: &[String], interrupt_after: Option<Duration>) -> String {
    let mut args = vec!["-batch".to_string(), "-nx".into(), "-ex".into(), "set pagination off".into()];
    args.extend(["-ex".to_string(), format!("target remote 127.0.0.1:{port}")]);
    for command in commands {
        args.extend(["-ex".to_string(), command.clone()]);
    }
    let mut child =
        Command::new("gdb").args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run gdb");
    let started = Instant::now();
    let mut interrupt = interrupt_after;
    while child.try_wait().unwrap().is_none() {
        if interrupt.is_some_and(|after| started.elapsed() >= after) {
            // SAFETY: the child is ours and has not been reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            interrupt = None;
        }
        assert!(started.elapsed() < boot_timeout(), "gdb did not finish: {commands:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

/// The guest waits for gdb before its first instruction; gdb reads registers of both vCPUs,
/// stops at a hardware breakpoint on start_kernel, reads the kernel banner by its virtual
/// address, stops at a software breakpoint on setup_arch, single-steps and detaches, and the
/// guest boots on. A second gdb attaches to the running guest, which stops; Ctrl-C stops it
/// again after a continue, and after the detach the guest finishes its boot and powers off.
#[test]
fn gdb_debugs_a_booting_guest_and_attaches_again_later() {
    if !kvm_available("gdb_debugs_a_booting_guest_and_attaches_again_later") {
        return;
    }
    let _one_at_a_time = multi_vcpu_boot_lock();
    let guest = guest();
    let sym = symbols(&["start_kernel", "setup_arch", "linux_banner"]);
    let dir = temp_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut lkvm = Command::new(lkvm())
        .args(["run", "-k", guest.vmlinux.to_str().unwrap(), "-i", guest.initramfs.to_str().unwrap()])
        // Two vCPUs for gdb, one brought up by the guest: with both running, this nested host
        // sometimes loses a guest's memory writes (see README), which can kill its init.
        .args([
            "-m",
            "128",
            "-c",
            "2",
            "-n",
            "mode=none",
            "--name",
            "gdb-test",
            "-p",
            &format!("{HOST_GUEST_PARAMS} maxcpus=1"),
        ])
        .args(["--gdb", &port.to_string()])
        .env("HOME", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = Arc::new(Mutex::new(String::new()));
    let (mut stdout, seen) = (lkvm.stdout.take().unwrap(), console.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    // The line may come in several writes (stderr is unbuffered): read it whole.
    let mut stderr = std::io::BufReader::new(lkvm.stderr.take().unwrap());
    let mut waiting = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut waiting).unwrap();
    assert!(waiting.contains(&format!("waits for gdb on 127.0.0.1:{port}")), "{waiting}");

    let (start_kernel, setup_arch, banner) = (sym["start_kernel"], sym["setup_arch"], sym["linux_banner"]);
    let first = gdb(
        port,
        &[
            "info registers rip cr0 cr3 efer fs_base gs_base k_gs_base".into(),
            "info threads".into(),
            format!("hbreak *{start_kernel:#x}"),
            "continue".into(),
            "info registers rip".into(),
            format!("x/s {banner:#x}"),
            "delete".into(),
            format!("break *{setup_arch:#x}"),
            "continue".into(),
            "info registers rip".into(),
            "stepi".into(),
            "info registers rip".into(),
            "delete".into(),
            "detach".into(),
        ],
        None,
    );
    let rips = register_values(&first, "rip");
    assert_eq!(rips.len(), 4, "{first}");
    assert!(rips[0] < 1 << 32, "the guest waited at its 32-bit PVH entry: {first}");
    assert_eq!(register_values(&first, "cr0").len(), 1, "control registers: {first}");
    assert_eq!(register_values(&first, "k_gs_base").len(), 1, "{first}");
    assert!(first.contains("Thread 1.2"), "both vCPUs are threads: {first}");
    assert_eq!(rips[1], start_kernel, "hardware breakpoint: {first}");
    assert!(first.contains("\"Linux version 6."), "the banner through the page tables: {first}");
    assert_eq!(rips[2], setup_arch, "software breakpoint: {first}");
    assert!((setup_arch + 1..setup_arch + 16).contains(&rips[3]), "one instruction stepped: {first}");
    assert!(first.contains("[Inferior 1 (process 1) detached]"), "{first}");
    assert!(!console.lock().unwrap().contains("LKVM-DONE"), "the guest cannot have finished yet");

    // gdb again, on the running guest: attaching stops it, and so does Ctrl-C.
    let second = gdb(
        port,
        &["info registers rip".into(), "continue".into(), "info registers rip".into(), "detach".into()],
        Some(Duration::from_secs(3)),
    );
    assert_eq!(register_values(&second, "rip").len(), 2, "{second}");
    assert!(second.contains("Thread 1 received signal SIGINT"), "Ctrl-C stops the guest: {second}");
    assert!(second.contains("[Inferior 1 (process 1) detached]"), "{second}");

    let deadline = Instant::now() + boot_timeout();
    let status = loop {
        if let Some(status) = lkvm.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the guest did not finish after gdb detached");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    let console = console.lock().unwrap().clone();
    assert!(status.success(), "{status}: {rest}\n{console}");
    assert!(console.contains("LKVM-DONE"), "the guest booted on after detach: {console}");
    assert_eq!(console.matches("LKVM-RESULT cpus=1").count(), 1, "{console}");
    std::fs::remove_dir_all(dir).unwrap();
}
