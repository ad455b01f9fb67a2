//! End-to-end: a real guest on qcow2 disks made by qemu-img: backing chains, a compressed image,
//! a throw-away overlay, and lkvm killed with SIGKILL right after the guest's fsync; then
//! `qemu-img check` and `qemu-img compare` judge the images.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img (qemu-utils) is installed");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn create(args: &[&str]) {
    let (ok, text) = qemu_img(args);
    assert!(ok, "qemu-img {args:?}: {text}");
}

/// Runs lkvm until its output has a line containing `marker`, then kills it with SIGKILL.
/// Returns its stdout and stderr.
fn run_until_then_kill(args: &[&str], marker: &str, timeout: Duration) -> (String, String) {
    let mut child = Command::new(lkvm())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() > deadline {
                    // SAFETY: kill takes no pointers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut stdout = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        stdout.push_str(&line);
        stdout.push('\n');
        if line.contains(marker) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (stdout, stderr)
}

fn result(stdout: &str, key: &str) -> Option<String> {
    let prefix = format!("LKVM-RESULT {key}=");
    stdout.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix).map(str::to_string))
}

#[test]
fn a_guest_reads_and_writes_qcow2_chains_and_a_kill_after_fsync_loses_nothing() {
    if !kvm_available("a_guest_reads_and_writes_qcow2_chains_and_a_kill_after_fsync_loses_nothing") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let dir = temp_dir();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    // vda: qcow2 on a raw backing file; vdb: qcow2 on a qcow2 on raw; vdc: compressed;
    // vdd: a raw image under a throw-away overlay.
    let base = pattern(4 * MIB, 1);
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    create(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &path("a.qcow2")]);
    create(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &path("mid.qcow2")]);
    create(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", &path("b.qcow2")]);
    let packed = pattern(2 * MIB, 2);
    std::fs::write(dir.join("packed.raw"), &packed).unwrap();
    create(&["convert", "-q", "-c", "-O", "qcow2", &path("packed.raw"), &path("c.qcow2")]);
    let scratch = pattern(MIB, 3);
    std::fs::write(dir.join("d.raw"), &scratch).unwrap();

    let params = format!(
        "{HOST_GUEST_PARAMS} lkvm.read=/dev/vda:1048576 lkvm.read=/dev/vdb:1048576 lkvm.read=/dev/vdc:2097152 \
         lkvm.write=/dev/vdd:65536:7 lkvm.write=/dev/vdb:65536:8 lkvm.write=/dev/vda:131072:9"
    );
    let guest = guest();
    let (vdd, vdc) = (format!("{},snapshot", path("d.raw")), format!("{},ro", path("c.qcow2")));
    let args = [
        "run",
        "-k",
        guest.vmlinux.to_str().unwrap(),
        "-i",
        guest.initramfs.to_str().unwrap(),
        "-c",
        "1",
        "-m",
        "128",
        "-n",
        "mode=none",
        "-d",
        &path("a.qcow2"),
        "-d",
        &path("b.qcow2"),
        "-d",
        &vdc,
        "-d",
        &vdd,
        "-p",
        &params,
    ];
    // SIGKILL as soon as the last fsync returned in the guest: what it synced must be there.
    let (stdout, stderr) = run_until_then_kill(&args, "LKVM-RESULT write:/dev/vda=", boot_timeout());
    let describe = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");

    let sum = |bytes: &[u8]| format!("{:016x}", fnv1a(bytes));
    assert_eq!(result(&stdout, "read:/dev/vda"), Some(sum(&base[..MIB])), "through the raw backing: {describe}");
    assert_eq!(result(&stdout, "read:/dev/vdb"), Some(sum(&base[..MIB])), "through two backing files: {describe}");
    assert_eq!(result(&stdout, "read:/dev/vdc"), Some(sum(&packed)), "compressed clusters: {describe}");
    for dev in ["vdd", "vdb", "vda"] {
        assert_eq!(result(&stdout, &format!("write:/dev/{dev}")).as_deref(), Some("ok"), "{dev}: {describe}");
    }

    // The images as QEMU sees them: consistent, and holding exactly the guest's writes.
    let expect = |name: &str, len: usize, seed: u64| {
        let mut want = base.clone();
        want[..len].copy_from_slice(&pattern(len, seed));
        std::fs::write(dir.join(name), want).unwrap();
    };
    expect("want-a.raw", 131072, 9);
    expect("want-b.raw", 65536, 8);
    for (image, want) in [("a.qcow2", "want-a.raw"), ("b.qcow2", "want-b.raw")] {
        let (ok, text) = qemu_img(&["check", &path(image)]);
        assert!(ok && text.contains("No errors"), "qemu-img check {image}: {text}\n{describe}");
        let (ok, text) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &path(image), &path(want)]);
        assert!(ok, "qemu-img compare {image}: {text}\n{describe}");
    }
    assert_eq!(std::fs::read(dir.join("base.raw")).unwrap(), base, "the backing file is unchanged");
    let (ok, text) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &path("mid.qcow2"), &path("base.raw")]);
    assert!(ok, "the middle image is unchanged: {text}");
    assert_eq!(std::fs::read(dir.join("d.raw")).unwrap(), scratch, "the ,snapshot image is unchanged");
    assert!(!Path::new(&path("d.raw")).with_extension("qcow2").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
