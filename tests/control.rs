//! The control socket with tiny payload guests: list, pause (progress stops), resume, register
//! dumps, stop by name and stop -a, name clashes, unknown guests. Each test uses its own HOME,
//! so `-a` sees only its own guests.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Prints 'x' on COM1 forever, with a delay loop between characters.
fn ticker() -> Vec<u8> {
    vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x', // loop: mov al, 'x'
        0xee, // out dx, al
        0xb9, 0xff, 0xff, // mov cx, 0xffff
        0xe2, 0xfe, // loop $
        0xeb, 0xf6, // jmp loop
    ]
}

struct Guest {
    child: Child,
    output: Arc<AtomicUsize>,
}

fn start(home: &Path, name: &str, kernel: &Path) -> Guest {
    let mut child = Command::new(lkvm())
        .args(["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "2", "-n", "mode=none", "--name", name])
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let output = Arc::new(AtomicUsize::new(0));
    let (mut stdout, counter) = (child.stdout.take().unwrap(), output.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            counter.fetch_add(n, Ordering::SeqCst);
        }
    });
    let guest = Guest { child, output };
    wait_for(|| guest.output.load(Ordering::SeqCst) > 0, "the guest to print");
    guest
}

fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctl(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(lkvm()).args(args).env("HOME", home).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn exits_zero(guest: &mut Guest) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = guest.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            return;
        }
        assert!(Instant::now() < deadline, "lkvm did not exit after stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn list_pause_resume_debug_and_stop() {
    if !kvm_available("list_pause_resume_debug_and_stop") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let mut guest = start(&home, "ticker", &kernel);

    let (code, list, _) = ctl(&home, &["list"]);
    assert_eq!(code, 0);
    let line = list.lines().find(|l| l.contains("ticker")).unwrap_or_else(|| panic!("not listed: {list}"));
    assert!(line.contains("running") && line.contains(&guest.child.id().to_string()), "{line}");

    assert_eq!(ctl(&home, &["pause", "-n", "ticker"]).0, 0);
    let before = guest.output.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(guest.output.load(Ordering::SeqCst), before, "output went on while paused");
    assert!(ctl(&home, &["list"]).1.lines().any(|l| l.contains("ticker") && l.contains("paused")));
    let (code, _, err) = ctl(&home, &["pause", "-n", "ticker"]);
    assert!(code != 0 && err.contains("already paused"), "{err}");

    let (code, dump, _) = ctl(&home, &["debug", "-n", "ticker", "-d"]);
    assert_eq!(code, 0);
    // vCPU 0 runs the payload at 0x1000:xxxx; vCPU 1 never started (waits for a SIPI).
    let vcpu0 = dump.lines().find(|l| l.contains("vCPU 0:")).unwrap_or_else(|| panic!("{dump}"));
    assert!(vcpu0.contains("cs=0x1000") && vcpu0.contains("rip=0x"), "{vcpu0}");
    assert!(dump.contains("vCPU 1:"), "{dump}");

    assert_eq!(ctl(&home, &["resume", "-n", "ticker"]).0, 0);
    wait_for(|| guest.output.load(Ordering::SeqCst) > before, "output after resume");

    let (code, _, err) = ctl(&home, &["debug", "-n", "ticker", "-m", "7"]);
    assert!(code != 0 && err.contains("no vCPU 7"), "{err}");
    let (code, _, err) = ctl(&home, &["stop", "-n", "nosuch"]);
    assert!(code != 0 && err.contains("no such running guest"), "{err}");
    assert_eq!(ctl(&home, &["stop", "-n", "ticker"]).0, 0);
    exits_zero(&mut guest);
    assert!(!home.join(".lkvm/ticker.sock").exists(), "socket left behind");
}

#[test]
fn names_are_unique_and_stop_all_ends_every_guest() {
    if !kvm_available("names_are_unique_and_stop_all_ends_every_guest") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let mut first = start(&home, "one", &kernel);
    let mut second = start(&home, "two", &kernel);

    let clash = Command::new(lkvm())
        .args(["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "1", "-n", "mode=none", "--name", "one"])
        .env("HOME", &home)
        .output()
        .unwrap();
    assert_ne!(clash.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&clash.stderr).contains("already running"));

    let (code, list, _) = ctl(&home, &["list"]);
    assert_eq!(code, 0);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    assert_eq!(ctl(&home, &["stop", "-a"]).0, 0);
    exits_zero(&mut first);
    exits_zero(&mut second);
    assert!(!ctl(&home, &["list"]).1.contains("running"));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[test]
fn balloon_returns_memory_and_stat_reports_numbers() {
    if !kvm_available("balloon_returns_memory_and_stat_reports_numbers") {
        return;
    }
    let home = temp_dir();
    let guest = guest();
    let params = format!("{HOST_GUEST_PARAMS} lkvm.balloon=150:32");
    let args = [
        "run", "-k", guest.vmlinux.to_str().unwrap(), "-i", guest.initramfs.to_str().unwrap(), "-c", "1", "-m", "256",
        "-n", "mode=none", "--balloon", "--name", "ballooned", "-p", &params,
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    let (shrunk_tx, shrunk_rx) = std::sync::mpsc::channel::<()>();
    let home_for_host = home.clone();
    let lkvm_env = [("HOME", home.to_str().unwrap().to_string())];
    // The host acts when the guest has touched its memory, and measures again once the guest
    // reports the smaller MemTotal (it stays up for 8 s after that).
    let mut shrunk_rx = Some(shrunk_rx);
    let out = run_command_env(lkvm(), &args, &lkvm_env, boot_timeout(), move |line| {
        if line.contains("LKVM-RESULT balloon_ready=") {
            let (tx, home, shrunk) = (tx.clone(), home_for_host.clone(), shrunk_rx.take().unwrap());
            std::thread::spawn(move || {
                let pid: u32 = ctl(&home, &["list"]).1.lines().find(|l| l.contains("ballooned")).and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0);
                let rss_before = rss_kib(pid);
                let stat = ctl(&home, &["stat", "-n", "ballooned", "-m"]);
                let inflate = ctl(&home, &["balloon", "-n", "ballooned", "-i", "32"]);
                let nmi = ctl(&home, &["debug", "-n", "ballooned", "-m", "0"]);
                let sysrq = ctl(&home, &["debug", "-n", "ballooned", "-s", "h"]);
                let _ = shrunk.recv_timeout(boot_timeout());
                let rss_after = rss_kib(pid);
                let _ = tx.send((stat, inflate, nmi, sysrq, rss_before, rss_after));
            });
        } else if line.contains("LKVM-RESULT memtotal_after_kb=") {
            let _ = shrunk_tx.send(());
        }
    });
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let (stat, inflate, nmi, sysrq, rss_before, rss_after) = rx.recv_timeout(Duration::from_secs(10)).expect("host side ran");
    assert_eq!(nmi.0, 0, "debug -m failed: {}", nmi.2);
    assert_eq!(sysrq.0, 0, "debug -s failed: {}", sysrq.2);
    assert_eq!(stat.0, 0, "stat failed: {}", stat.2);
    assert!(stat.1.contains("total_memory") && stat.1.contains("free_memory"), "{}", stat.1);
    assert_eq!(inflate.0, 0, "balloon failed: {}", inflate.2);
    assert!(inflate.1.contains("balloon target 32 MiB"), "{}", inflate.1);
    let before: u64 = out.result("balloon_ready").unwrap().parse().unwrap();
    let after: u64 = out.result("memtotal_after_kb").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(before - after >= 30 * 1024, "MemTotal {before} -> {after} kB after inflating 32 MiB");
    assert!(rss_after > 0, "lkvm was gone before its RSS could be measured");
    // The kernel reports the NMI we injected: nothing in this VM raises one by itself.
    assert!(out.stdout.contains("NMI received"), "no NMI in the guest log: {}", out.describe());
    // SysRq h prints the help line on the console.
    assert!(out.stdout.contains("sysrq: HELP"), "no SysRq in the guest log: {}", out.describe());
    assert!(rss_before.saturating_sub(rss_after) >= 16 * 1024, "lkvm RSS {rss_before} -> {rss_after} KiB after inflating 32 MiB");
}

#[test]
fn stat_without_a_balloon_answers_at_once() {
    if !kvm_available("stat_without_a_balloon_answers_at_once") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let mut guest = start(&home, "plain", &kernel);
    let started = Instant::now();
    let (code, _, err) = ctl(&home, &["stat", "-n", "plain", "-m"]);
    assert!(code != 0 && err.contains("no balloon device"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "stat hung");
    assert_eq!(ctl(&home, &["stop", "-n", "plain"]).0, 0);
    exits_zero(&mut guest);
}
