//! Bad input: one clear line on stderr, a non-zero exit, and nothing written.

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

fn assert_one_line_error(out: &Outcome, expected: &str) {
    assert!(!out.timed_out);
    assert!(matches!(out.code, Some(c) if c != 0), "{}", out.describe());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line: {}", out.describe());
    assert!(lines[0].starts_with("lkvm: "), "{}", out.describe());
    assert!(lines[0].contains(expected), "want {expected:?}: {}", out.describe());
    assert!(!out.stderr.contains("panicked"));
}

fn flat_kernel() -> String {
    let dir = temp_dir();
    write_file(&dir, "k.bin", &x86::SPIN).to_str().unwrap().to_string()
}

#[test]
fn bad_seccomp_rate_limit_and_network_options() {
    let kernel = flat_kernel();
    let out = run_lkvm(&["run", "-k", &kernel, "--seccomp", "maybe"], None, TIMEOUT);
    assert_one_line_error(&out, "--seccomp");
    let out = run_lkvm(&["run", "-k", &kernel, "-d", "/nonexistent.img,bw=10M"], None, TIMEOUT);
    assert_one_line_error(&out, "bw=10M: use SIZE[+BURST]/MILLISECONDS");
    let out = run_lkvm(&["run", "-k", &kernel, "--rng=ops=5/0"], None, TIMEOUT);
    assert_one_line_error(&out, "--rng: ops=5/0");
    let out = run_lkvm(&["run", "-k", &kernel, "-n", "mode=tap,restrict=on"], None, TIMEOUT);
    assert_one_line_error(&out, "restrict, host_loopback and lan need mode=user");
    let out = run_lkvm(&["run", "-k", &kernel, "--landlock", "--landlock-rules", "path=/srv"], None, TIMEOUT);
    assert_one_line_error(&out, "--landlock-rules path=/srv: give path=PATH,access=r|rw");
    let out = run_lkvm(&["run", "-k", &kernel, "--uid", "1000"], None, TIMEOUT);
    assert_one_line_error(&out, "--gid");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Root in a jail could still act as root: the jailed lkvm runs as a user named for it.
        let out = run_lkvm(&["run", "-k", &kernel, "-m", "16", "--jail", "/tmp"], None, TIMEOUT);
        assert_one_line_error(&out, "--jail: give --uid and --gid");
    }
    let jailed = |extra: &[&str]| {
        let unprivileged: &[&str] = if root { &["--uid", "65534", "--gid", "65534"] } else { &[] };
        let args: Vec<&str> =
            ["run", "-k", &kernel, "-m", "16"].iter().chain(unprivileged).chain(extra).copied().collect();
        run_lkvm(&args, None, TIMEOUT)
    };
    let out = jailed(&["--jail", "/nonexistent"]);
    let refusal = if root { "--jail /nonexistent: not a directory" } else { "--jail needs root" };
    assert_one_line_error(&out, refusal);
    let tap = "mode=tap,tapif=lkvmtap9,script=/bin/true";
    let out = jailed(&["-n", tap, "--jail", "/tmp"]);
    assert_one_line_error(&out, "--jail: a tap's script= runs host programs");
    let out = jailed(&["--9p", "/,hostfs", "--jail", "/tmp"]);
    assert_one_line_error(&out, "--jail holds only what the VM uses, and lkvm's root filesystem is the host's /");
}

#[test]
fn missing_kernel_file() {
    let out = run_lkvm(&["run", "-k", "/nonexistent/vmlinux"], None, TIMEOUT);
    assert_one_line_error(&out, "kernel /nonexistent/vmlinux: No such file");
}

#[test]
fn kernel_that_is_a_directory() {
    let out = run_lkvm(&["run", "-k", "/tmp", "-m", "16", "-c", "1"], None, TIMEOUT);
    if kvm_available("kernel_that_is_a_directory") {
        assert_one_line_error(&out, "is a directory");
    }
}

#[test]
fn file_that_is_no_kernel() {
    if !kvm_available("file_that_is_no_kernel") {
        return;
    }
    let dir = temp_dir();
    let cpio = write_file(&dir, "initrd.cpio", b"070701000000000000000000");
    let out = run_lkvm(&["run", "-k", cpio.to_str().unwrap(), "-m", "16", "-c", "1"], None, TIMEOUT);
    assert_one_line_error(&out, "a cpio archive");
    let empty = write_file(&dir, "empty", b"");
    let out = run_lkvm(&["run", "-k", empty.to_str().unwrap(), "-m", "16", "-c", "1"], None, TIMEOUT);
    assert_one_line_error(&out, "empty");
}

#[test]
fn missing_initrd() {
    if !kvm_available("missing_initrd") {
        return;
    }
    let dir = temp_dir();
    let out = run_lkvm(
        &["run", "-k", &guest_or_flat(&dir), "-i", "/nonexistent/initrd", "-m", "64", "-c", "1"],
        None,
        TIMEOUT,
    );
    assert_one_line_error(&out, "initrd /nonexistent/initrd");
}

/// The real test kernel when it is built, so the initrd path is exercised as in a real boot.
fn guest_or_flat(dir: &std::path::Path) -> String {
    let vmlinux = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/out/vmlinux");
    if vmlinux.exists() {
        vmlinux.to_str().unwrap().to_string()
    } else {
        write_file(dir, "k.bin", &x86::SPIN).to_str().unwrap().to_string()
    }
}

#[test]
fn initrd_that_does_not_fit() {
    let vmlinux = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/out/vmlinux");
    if !kvm_available("initrd_that_does_not_fit") || !vmlinux.exists() {
        return;
    }
    let dir = temp_dir();
    let big = dir.join("big.cpio");
    std::fs::File::create(&big).unwrap().set_len(40 << 20).unwrap();
    let out = run_lkvm(
        &["run", "-k", vmlinux.to_str().unwrap(), "-i", big.to_str().unwrap(), "-m", "32", "-c", "1"],
        None,
        TIMEOUT,
    );
    assert_one_line_error(&out, "does not fit in guest memory");
}

#[test]
fn zero_memory_and_zero_cpus() {
    let k = flat_kernel();
    assert_one_line_error(&run_lkvm(&["run", "-k", &k, "-m", "0"], None, TIMEOUT), "less than 1 MiB");
    assert_one_line_error(&run_lkvm(&["run", "-k", &k, "-c", "0"], None, TIMEOUT), "at least one vCPU");
}

#[test]
fn more_memory_than_the_host_has() {
    let out = run_lkvm(&["run", "-k", &flat_kernel(), "-m", "64T", "-c", "1"], None, TIMEOUT);
    assert_one_line_error(&out, "more than this host's");
}

#[test]
fn more_vcpus_than_allowed() {
    let out = run_lkvm(&["run", "-k", &flat_kernel(), "-m", "16", "-c", "4096"], None, TIMEOUT);
    assert_one_line_error(&out, "at most");
}

#[test]
fn kvm_device_missing() {
    let out =
        run_lkvm(&["run", "-k", &flat_kernel(), "-m", "16", "-c", "1", "--dev", "/nonexistent/kvm"], None, TIMEOUT);
    assert_one_line_error(&out, "/nonexistent/kvm: not found");
}

#[test]
fn unknown_option() {
    let out = run_lkvm(&["run", "--frobnicate"], None, TIMEOUT);
    assert_one_line_error(&out, "--frobnicate");
    assert_eq!(out.code, Some(2));
}

#[test]
fn unknown_cpuid_feature() {
    let out = run_lkvm(&["run", "-k", &flat_kernel(), "--disable-cpuid", "warpdrive"], None, TIMEOUT);
    assert_one_line_error(&out, "unknown feature 'warpdrive'");
}

#[test]
fn bad_disks() {
    let k = flat_kernel();
    let dir = temp_dir();
    let image = write_file(&dir, "keep.img", &[7u8; 4096]);
    let run = |disk: &str| run_lkvm(&["run", "-k", &k, "-m", "16", "-c", "1", "-d", disk], None, TIMEOUT);
    assert_one_line_error(&run("/nonexistent/disk.img"), "disk /nonexistent/disk.img: No such file");
    assert_one_line_error(&run(&format!("{},sparse", image.display())), "unknown disk option 'sparse'");
    assert_eq!(std::fs::read(&image).unwrap(), vec![7u8; 4096], "nothing written");
}

#[test]
fn bad_writable_directories() {
    // An ELF kernel, so that lkvm would boot its root filesystem (a flat binary gets none).
    let dir = temp_dir();
    let k = write_file(&dir, "k.elf", &elf64_kernel(&x86_64::UD2)).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let all: Vec<&str> = ["run", "-k", &k, "-m", "16", "-c", "1"].iter().chain(args).copied().collect();
        run_lkvm(&all, None, TIMEOUT)
    };
    assert_one_line_error(&run(&["--rw", "/nonexistent/tree"]), "--rw /nonexistent/tree: No such file");
    assert_one_line_error(&run(&["--rw", "/"]), "the host's / stays read-only");
    assert_one_line_error(&run(&["--rw", "/tmp", "-i", &k]), "--rw works on lkvm's root filesystem");
    let flat = run_lkvm(&["run", "-k", &flat_kernel(), "-m", "16", "--rw", "/tmp"], None, TIMEOUT);
    assert_one_line_error(&flat, "--rw works on lkvm's root filesystem");
}

#[test]
fn lkvm_dir_that_others_can_write() {
    let home = temp_dir();
    let shared = home.join(".lkvm");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let env = [("HOME", home.to_str().unwrap().to_string())];
    let out = run_command_env(lkvm(), &["run", "-k", &flat_kernel(), "-m", "16"], &env, TIMEOUT, |_| {});
    assert_one_line_error(&out, "others can write it (mode 777)");
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0, "no socket made in it");
}

#[test]
fn disk_that_is_read_only_on_the_host() {
    let dir = temp_dir();
    let image = write_file(&dir, "ro.img", &[7u8; 4096]);
    // Unwritable even for root: immutable where the file system supports it, else mode 0444.
    let immutable = std::process::Command::new("chattr").arg("+i").arg(&image).status().is_ok_and(|s| s.success());
    if !immutable {
        let mut perms = std::fs::metadata(&image).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&image, perms).unwrap();
    }
    if std::fs::OpenOptions::new().write(true).open(&image).is_ok() {
        eprintln!("!!! SKIPPED disk_that_is_read_only_on_the_host: cannot make a file read-only here !!!");
        return;
    }
    let out =
        run_lkvm(&["run", "-k", &flat_kernel(), "-m", "16", "-c", "1", "-d", image.to_str().unwrap()], None, TIMEOUT);
    if immutable {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&image).status();
    }
    assert_one_line_error(&out, "add ',ro'");
}

#[test]
fn bad_network_options() {
    let k = flat_kernel();
    let run = |net: &str| run_lkvm(&["run", "-k", &k, "-m", "16", "-c", "1", "-n", net], None, TIMEOUT);
    assert_one_line_error(&run("mode=bridge"), "unknown mode 'bridge'");
    assert_one_line_error(&run("mode=user,guest_mac=02:00:00:00:00"), "bad MAC");
}

#[test]
fn tap_without_permission() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("!!! SKIPPED tap_without_permission: running as root, which may open any tap !!!");
        return;
    }
    let out = run_lkvm(
        &["run", "-k", &flat_kernel(), "-m", "16", "-c", "1", "-n", "mode=tap,tapif=lkvmtest0"],
        None,
        TIMEOUT,
    );
    assert_one_line_error(&out, "CAP_NET_ADMIN");
}

#[test]
fn bad_9p_shares() {
    let out = run_lkvm(&["run", "-k", "/nonexistent", "--9p", "/tmp"], None, TIMEOUT);
    assert_one_line_error(&out, "needs a mount tag");
    let out = run_lkvm(&["run", "-k", "/nonexistent", "--9p", "/tmp,t,rw"], None, TIMEOUT);
    assert_one_line_error(&out, "unknown option 'rw'");
    if !kvm_available("bad_9p_shares") {
        return;
    }
    let dir = temp_dir();
    let kernel = flat_kernel();
    let out = run_lkvm(&["run", "-k", &kernel, "-m", "16", "-c", "1", "--9p", "/nonexistent/dir,t"], None, TIMEOUT);
    assert_one_line_error(&out, "9p share /nonexistent/dir: No such file");
    let file = write_file(&dir, "file", b"x");
    let share = format!("{},t", file.display());
    let out = run_lkvm(&["run", "-k", &kernel, "-m", "16", "-c", "1", "--9p", &share], None, TIMEOUT);
    assert_one_line_error(&out, "is not a directory");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let out = run_lkvm(&["run", "-k", &kernel, "-d", a.to_str().unwrap(), "-d", b.to_str().unwrap()], None, TIMEOUT);
    assert_one_line_error(&out, "only one directory can be the root filesystem");
}

#[test]
fn bad_sandbox_and_setup() {
    let out = run_lkvm(&["sandbox", "-k", "/nonexistent"], None, TIMEOUT);
    assert_eq!(out.code, Some(2), "no command: {}", out.describe());
    let out = run_lkvm(&["sandbox", "-i", "/nonexistent", "--", "true"], None, TIMEOUT);
    assert_one_line_error(&out, "drop -i and --nodefaults");
    let dir = temp_dir();
    let image = write_file(&dir, "disk.img", &[0u8; 4096]);
    let out = run_lkvm(&["sandbox", "-k", "/nonexistent", "-d", image.to_str().unwrap(), "--", "true"], None, TIMEOUT);
    assert_one_line_error(&out, "needs lkvm's root filesystem");
    let out = run_lkvm(&["setup", "../escape"], None, TIMEOUT);
    assert_one_line_error(&out, "not a guest name");
}

#[test]
fn gdb_port_in_use_or_malformed() {
    let out = run_lkvm(&["run", "-k", &flat_kernel(), "--gdb", "http"], None, TIMEOUT);
    assert_one_line_error(&out, "--gdb http: expected a TCP port (1-65535) or unix:PATH");
    if !kvm_available("gdb_port_in_use_or_malformed") {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_lkvm(&["run", "-k", &flat_kernel(), "-m", "16", "-c", "1", "--gdb", &port], None, TIMEOUT);
    assert_one_line_error(&out, &format!("--gdb 127.0.0.1:{port}: Address already in use"));
}
