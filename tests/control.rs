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
    start_with(home, &["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "2", "-n", "mode=none", "--name", name])
}

/// Starts lkvm with `args` and waits until its guest prints.
fn start_with(home: &Path, args: &[&str]) -> CountingProcess {
    start_with_env(home, args, &[])
}

fn start_with_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> CountingProcess {
    let guest = spawn_counting_with_env(Path::new(lkvm()), args, home, env);
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

/// SIGTERM (how Kata and service managers stop a VMM) ends the VM as `lkvm stop` does: the
/// teardown runs (drives flushed, sockets removed), and lkvm exits 143 as a killed process would.
#[test]
fn sigterm_ends_the_vm_as_lkvm_stop_does() {
    if !kvm_available("sigterm_ends_the_vm_as_lkvm_stop_does") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let mut guest = start(&home, "term", &kernel);
    assert!(home.join(".lkvm/term.sock").exists());
    // SAFETY: a signal to the lkvm this test started.
    assert_eq!(unsafe { libc::kill(guest.child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(guest.child.wait().unwrap().code(), Some(143));
    assert!(!home.join(".lkvm/term.sock").exists(), "the teardown did not run");
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
/// stack; nothing is left under HOME when it ends. Its input is /dev/null, which needs no
/// console thread.
#[test]
fn a_flat_binary_gets_no_rootfs_and_no_network_thread() {
    if !kvm_available("a_flat_binary_gets_no_rootfs_and_no_network_thread") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let mut guest =
        start_with(&home, &["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "1", "--name", "flat"]);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", guest.child.id()))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    assert!(threads.iter().any(|t| t.starts_with("vcpu")), "{threads:?}");
    assert!(!threads.iter().any(|t| t == "slirp"), "a network thread: {threads:?}");
    assert!(!threads.iter().any(|t| t == "console"), "a console thread for /dev/null: {threads:?}");
    assert!(!home.join(".lkvm/default").exists(), "a root filesystem for a flat binary");
    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "flat"]).0, 0);
    exits_zero(&mut guest);
    let left: Vec<_> = std::fs::read_dir(home.join(".lkvm")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left under ~/.lkvm: {left:?}");
}

/// Containment a user cannot see until it matters: lkvm never gains privileges through what it
/// runs (no_new_privs), gives up root under sudo, confines its threads (seccomp), keeps its
/// descriptors out of children (a tap script, helpers), and keeps guest memory out of its core
/// dumps.
#[test]
fn no_new_privs_root_dropped_seccomp_cloexec_descriptors_and_guest_memory_out_of_core_dumps() {
    if !kvm_available("no_new_privs_root_dropped_seccomp_cloexec_descriptors_and_guest_memory_out_of_core_dumps") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let args = [
        "run",
        "-k",
        kernel.to_str().unwrap(),
        "-m",
        "16",
        "-c",
        "1",
        "--rng",
        "-n",
        "mode=user",
        "--name",
        "contained",
    ];
    // As if run by `sudo`: lkvm, as root, becomes the invoking user before the guest runs.
    let mut guest = start_with_env(&home, &args, &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")]);
    let proc_dir = format!("/proc/{}", guest.child.id());
    let status = std::fs::read_to_string(format!("{proc_dir}/status")).unwrap();
    assert!(status.lines().any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])), "{status}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        for task in std::fs::read_dir(format!("{proc_dir}/task")).unwrap().flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let field = |name: &str| {
                status.lines().find_map(|l| l.strip_prefix(name)).unwrap().split_whitespace().collect::<Vec<_>>()
            };
            assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
            assert_eq!(field("Gid:"), ["65534"; 4], "{status}");
            assert!(field("Groups:").is_empty(), "{status}");
            assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
            assert_eq!(field("CapPrm:"), ["0000000000000000"], "{status}");
        }
    }

    // Every thread runs under a seccomp filter, the main thread too once the VM is built, and
    // the spawner that creates the others (KVM's own workers, `kvm-*`, are the kernel's).
    let mut confined = Vec::new();
    for task in std::fs::read_dir(format!("{proc_dir}/task")).unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap().trim().to_string();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).unwrap().trim().to_string();
        if !name.starts_with("kvm-") {
            assert_eq!(field("Seccomp:"), "2", "thread {name} runs without a seccomp filter");
            assert_eq!(field("NoNewPrivs:"), "1", "thread {name}");
            confined.push(name);
        }
    }
    for expected in ["lkvm", "vcpu0", "slirp", "spawner"] {
        assert!(confined.iter().any(|name| name == expected), "{expected} not among {confined:?}");
    }
    // The VMM thread (`lkvm`) answers the control socket: no thread of its own.
    assert!(!confined.iter().any(|name| name == "control"), "{confined:?}");

    let mut checked = Vec::new();
    for fd in std::fs::read_dir(format!("{proc_dir}/fd")).unwrap().flatten() {
        let number: u32 = fd.file_name().to_str().unwrap().parse().unwrap();
        let Ok(target) = std::fs::read_link(fd.path()) else { continue };
        let inherited = std::fs::read_link(format!("/proc/self/fd/{number}")).is_ok_and(|ours| ours == target);
        if number <= 2 || inherited {
            continue; // stdin, stdout, stderr, and what the test itself was given: not lkvm's
        }
        let info = std::fs::read_to_string(format!("{proc_dir}/fdinfo/{number}")).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert!(flags & libc::O_CLOEXEC as u32 != 0, "fd {number} ({}) is inherited by children", target.display());
        checked.push(target.display().to_string());
    }
    assert!(checked.iter().any(|t| t.contains("eventfd")) && checked.iter().any(|t| t.contains("kvm")), "{checked:?}");

    // The 16 MiB of guest RAM (below the 4 GiB hole: one mapping) is marked "dd".
    let smaps = std::fs::read_to_string(format!("{proc_dir}/smaps")).unwrap();
    let mut size_kib = 0;
    let mut guest_ram_flags = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => size_kib = words.next().unwrap().parse::<u64>().unwrap(),
            Some("VmFlags:") if size_kib == 16 * 1024 => guest_ram_flags = Some(words.collect::<Vec<_>>()),
            _ => {}
        }
    }
    let flags = guest_ram_flags.unwrap_or_else(|| panic!("no 16 MiB mapping: {smaps}"));
    assert!(flags.contains(&"dd"), "guest RAM would be dumped: {flags:?}");

    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "contained"]).0, 0);
    exits_zero(&mut guest);
}

/// With --landlock, lkvm's threads open only what the VM uses and the paths --landlock-rules
/// adds: a core dump (the VMM thread writes it) is refused elsewhere, with one line saying
/// how to allow it, and written where allowed.
#[test]
fn landlock_keeps_lkvm_to_the_paths_it_was_given() {
    if !kvm_available("landlock_keeps_lkvm_to_the_paths_it_was_given") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let (allowed, elsewhere) = (home.join("allowed"), home.join("elsewhere"));
    std::fs::create_dir(&allowed).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let rule = format!("path={},access=rw", allowed.display());
    let args = ["run", "-k", kernel.to_str().unwrap(), "-m", "16", "-c", "1", "-n", "mode=none", "--name", "fenced"];
    let args = [&args[..], &["--landlock", "--landlock-rules", &rule]].concat();
    // SAFETY: landlock_create_ruleset with LANDLOCK_CREATE_RULESET_VERSION reads no memory.
    let abi = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) };
    if abi < 1 {
        let (code, _, stderr) = lkvm_ctl(&home, &args);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("this kernel has no Landlock"), "{stderr}");
        return;
    }
    let mut guest = start_with(&home, &args);
    let refused = elsewhere.join("core");
    let (code, _, stderr) = lkvm_ctl(&home, &["debug", "-n", "fenced", "--dump", refused.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Permission denied") && stderr.contains("--landlock-rules path=DIR,access=rw"), "{stderr}");
    assert!(!refused.exists());
    let core = allowed.join("core");
    let (code, stdout, stderr) = lkvm_ctl(&home, &["debug", "-n", "fenced", "--dump", core.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(&std::fs::read(&core).unwrap()[..4], b"\x7fELF");
    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "fenced"]).0, 0);
    exits_zero(&mut guest);
}

/// With --jail, lkvm runs in mount, PID, IPC and UTS namespaces of its own, its root a tmpfs
/// holding only what the VM uses: the host's other files are out of its reach, what it only
/// reads is read-only, it dumps no core, and the host still controls it by name.
#[test]
fn a_jailed_lkvm_holds_only_what_the_vm_uses() {
    if !kvm_available("a_jailed_lkvm_holds_only_what_the_vm_uses") {
        return;
    }
    let home = temp_dir();
    let kernel = write_file(&home, "ticker.bin", &ticker());
    let disk = write_file(&home, "disk.img", &[0u8; 65536]);
    let secret = write_file(&home, "secret", b"the host's");
    let jail = home.join("jail");
    std::fs::create_dir(&jail).unwrap();
    // Root in a jail runs as the unprivileged user named; a share of that user's takes dumps.
    let dumps = home.join("dumps");
    std::fs::create_dir(&dumps).unwrap();
    let share = format!("{},dumps", dumps.display());
    let args = [
        "run",
        "-k",
        kernel.to_str().unwrap(),
        "-d",
        disk.to_str().unwrap(),
        "-m",
        "16",
        "-c",
        "1",
        "-n",
        "mode=none",
        "--name",
        "jailed",
        "--9p",
        &share,
        "--jail",
        jail.to_str().unwrap(),
        "--uid",
        "65534",
        "--gid",
        "65534",
    ];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let (code, _, stderr) = lkvm_ctl(&home, &args);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("root"), "{stderr}");
        return;
    }
    std::os::unix::fs::chown(&dumps, Some(65534), Some(65534)).unwrap();
    let mut guest = start_with(&home, &args);
    // The process started stays outside and waits; the jailed lkvm is its child.
    let outside = guest.child.id();
    let children = std::fs::read_to_string(format!("/proc/{outside}/task/{outside}/children")).unwrap();
    let jailed: u32 = children.split_whitespace().next().expect("a jailed lkvm").parse().unwrap();
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{jailed}/ns/{ns}")).unwrap();
        assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "{ns} namespace shared");
    }
    let root = Path::new("/proc").join(jailed.to_string()).join("root");
    let seen = |path: &Path| root.join(path.strip_prefix("/").unwrap()).exists();
    for held in [kernel.as_path(), disk.as_path(), Path::new("/dev/kvm"), &home.join(".lkvm")] {
        assert!(seen(held), "{} is not in the jail", held.display());
    }
    for hidden in ["/etc/passwd", "/usr", "/dev/null", "/proc/sys", "/proc/kcore"] {
        assert!(!seen(Path::new(hidden)), "{hidden} is in the jail");
    }
    // Its /proc shows the jail's processes only: lkvm, pid 1 there.
    let pids: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|name| name.parse::<u32>().is_ok())
        .collect();
    assert_eq!(pids, ["1"]);
    assert!(!seen(&secret), "the home directory is in the jail whole");
    // The kernel is only read: bound read-only. The disk is written: bound read-write.
    let open_rw =
        |path: &Path| std::fs::OpenOptions::new().write(true).open(root.join(path.strip_prefix("/").unwrap()));
    assert_eq!(open_rw(&kernel).unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert!(open_rw(&disk).is_ok());
    let limits = std::fs::read_to_string(format!("/proc/{jailed}/limits")).unwrap();
    assert!(limits.lines().any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")), "{limits}");
    // Nothing of the jail is left in DIR on the host.
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
    // `lkvm list` names it by its pid on the host, not the 1 it has in its namespace.
    let (code, listed, _) = lkvm_ctl(&home, &["list"]);
    assert_eq!(code, 0);
    let row = listed.lines().find(|l| l.contains("jailed")).unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(row.split_whitespace().next(), Some(jailed.to_string().as_str()), "{listed}");

    // A dump goes only where the jail has a directory its user may write: a writable share,
    // not the home directory.
    let outside_jail = home.join("core");
    let (code, _, stderr) = lkvm_ctl(&home, &["debug", "-n", "jailed", "--dump", outside_jail.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(!outside_jail.exists());
    let core = dumps.join("core");
    let (code, stdout, stderr) = lkvm_ctl(&home, &["debug", "-n", "jailed", "--dump", core.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(&std::fs::read(&core).unwrap()[..4], b"\x7fELF");

    assert_eq!(lkvm_ctl(&home, &["stop", "-n", "jailed"]).0, 0);
    exits_zero(&mut guest);
}
