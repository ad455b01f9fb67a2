//! End-to-end: boot the real Linux test guest (guest/build.sh) and check what it sees.
//! Each boot takes about a minute on hosts that emulate guest kernel code, so boots run one
//! at a time and each checks several things at once.

mod common;

use common::*;

const MIB: u64 = 1024;

fn boot(kernel: &std::path::Path, cpus: &str, mem_mib: &str, params: &str) -> Outcome {
    let guest = guest();
    let params = format!("{HOST_GUEST_PARAMS} {params}");
    let args = [
        "run", "-k", kernel.to_str().unwrap(), "-i", guest.initramfs.to_str().unwrap(),
        "-c", cpus, "-m", mem_mib, "--name", "e2e", "--loglevel", "info", "-p", &params,
    ];
    run_lkvm(&args, None, BOOT_TIMEOUT)
}

fn check_guest_view(out: &Outcome, cpus: u32, mem_mib: u64, marker: &str) {
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("LKVM-DONE"), "init did not finish: {}", out.describe());
    assert_eq!(out.result("cpus"), Some(cpus.to_string()), "{}", out.describe());
    let mem_kb: u64 = out.result("memtotal_kb").and_then(|v| v.parse().ok()).expect("memtotal_kb");
    // MemTotal is RAM less what the kernel reserves for itself: expect 80-100% of -m.
    assert!(mem_kb <= mem_mib * MIB && mem_kb >= mem_mib * MIB * 8 / 10, "MemTotal {mem_kb} kB for -m {mem_mib}");
    let cmdline = out.result("cmdline").expect("cmdline");
    assert!(cmdline.contains(marker), "user params missing from /proc/cmdline: {cmdline}");
    assert!(cmdline.starts_with("console=ttyS0 reboot=k"), "generated params missing: {cmdline}");
    assert!(out.stderr.contains("boot marker 1 (value 0x7b)"), "{}", out.describe());
    let marker_line = out.stderr.lines().find(|l| l.contains("boot marker 1")).unwrap();
    eprintln!("{marker_line}");
}

#[test]
fn elf_vmlinux_boots_via_pvh_with_two_cpus() {
    if !kvm_available("elf_vmlinux_boots_via_pvh_with_two_cpus") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let out = boot(&guest().vmlinux, "2", "128", "lkvm.test=pvh-marker");
    check_guest_view(&out, 2, 128, "lkvm.test=pvh-marker");
}

#[test]
fn bzimage_boots_via_the_64_bit_protocol() {
    if !kvm_available("bzimage_boots_via_the_64_bit_protocol") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let out = boot(&guest().bzimage, "1", "96", "lkvm.test=bzimage-marker");
    check_guest_view(&out, 1, 96, "lkvm.test=bzimage-marker");
}
