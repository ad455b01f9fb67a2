//! The control socket with tiny payload guests: list, pause (progress stops), resume, register
//! dumps, stop by name and stop -a, name clashes, unknown guests. Each test uses its own HOME,
//! so `-a` sees only its own guests. Balloon, stat, NMI and SysRq on a Linux guest are checked
//! in tests/api.rs, on a VM the API started.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

fn start(home: &Path, name: &str, kernel: &Path) -> CountingProcess {
    let args = ["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "2", "-n", "mode=none", "--name", name];
    let guest = spawn_counting(Path::new(lkvm()), &args, home);
    wait_for("the guest to print", Duration::from_secs(20), || guest.output.load(Ordering::SeqCst) > 0);
    guest
}

fn exits_zero(guest: &mut CountingProcess) {
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

    let (code, list, _) = lkvm_ctl(&home, &["list"]);
    assert_eq!(code, 0);
    let line = list.lines().find(|l| l.contains("ticker")).unwrap_or_else(|| panic!("not listed: {list}"));
    assert!(line.contains("running") && line.contains(&guest.child.id().to_string()), "{line}");

    assert_eq!(lkvm_ctl(&home, &["pause", "-n", "ticker"]).0, 0);
    let before = guest.output.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(guest.output.load(Ordering::SeqCst), before, "output went on while paused");
    assert!(lkvm_ctl(&home, &["list"]).1.lines().any(|l| l.contains("ticker") && l.contains("paused")));
    let (code, _, err) = lkvm_ctl(&home, &["pause", "-n", "ticker"]);
    assert!(code != 0 && err.contains("already paused"), "{err}");

    let (code, dump, _) = lkvm_ctl(&home, &["debug", "-n", "ticker", "-d"]);
    assert_eq!(code, 0);
    // vCPU 0 runs the payload at 0x1000:xxxx; vCPU 1 never started (waits for a SIPI).
    let vcpu0 = dump.lines().find(|l| l.contains("vCPU 0:")).unwrap_or_else(|| panic!("{dump}"));
    assert!(vcpu0.contains("cs=0x1000") && vcpu0.contains("rip=0x"), "{vcpu0}");
    assert!(dump.contains("vCPU 1:"), "{dump}");

    assert_eq!(lkvm_ctl(&home, &["resume", "-n", "ticker"]).0, 0);
    wait_for("output after resume", Duration::from_secs(20), || guest.output.load(Ordering::SeqCst) > before);

    let (code, _, err) = lkvm_ctl(&home, &["debug", "-n", "ticker", "-m", "7"]);
    assert!(code != 0 && err.contains("no vCPU 7"), "{err}");
    let (code, _, err) = lkvm_ctl(&home, &["stop", "-n", "nosuch"]);
    assert!(code != 0 && err.contains("no such running guest"), "{err}");
    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "ticker"]).0, 0);
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

    let (code, list, _) = lkvm_ctl(&home, &["list"]);
    assert_eq!(code, 0);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    assert_eq!(lkvm_ctl(&home, &["stop", "-a"]).0, 0);
    exits_zero(&mut first);
    exits_zero(&mut second);
    assert!(!lkvm_ctl(&home, &["list"]).1.contains("running"));
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
    let (code, _, err) = lkvm_ctl(&home, &["stat", "-n", "plain", "-m"]);
    assert!(code != 0 && err.contains("no balloon device"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "stat hung");
    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "plain"]).0, 0);
    exits_zero(&mut guest);
}

/// A flat binary is not Linux: lkvm makes no root filesystem for it and starts no network
/// stack; nothing is left under HOME when it ends.
#[test]
fn a_flat_binary_gets_no_rootfs_and_no_network_thread() {
    if !kvm_available("a_flat_binary_gets_no_rootfs_and_no_network_thread") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let args = ["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "1", "--name", "flat"];
    let mut guest = spawn_counting(Path::new(lkvm()), &args, &home);
    wait_for("the guest to print", Duration::from_secs(20), || guest.output.load(Ordering::SeqCst) > 0);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", guest.child.id()))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    assert!(threads.iter().any(|t| t.starts_with("vcpu")), "{threads:?}");
    assert!(!threads.iter().any(|t| t == "slirp"), "a network thread: {threads:?}");
    assert!(!home.join(".lkvm/default").exists(), "a root filesystem for a flat binary");
    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "flat"]).0, 0);
    exits_zero(&mut guest);
    let left: Vec<_> = std::fs::read_dir(home.join(".lkvm")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left under ~/.lkvm: {left:?}");
}
