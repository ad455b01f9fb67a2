//! Fast KVM integration tests with tiny real-mode payloads: console output, guest exits, crash
//! reports, and vCPU start/stop.

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

fn run_payload(code: &[u8], extra: &[&str], stdin: Option<&[u8]>) -> Outcome {
    let dir = temp_dir();
    let payload = write_file(&dir, "payload.bin", code);
    let mut args = vec!["run", "-k", payload.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_lkvm(&args, stdin, TIMEOUT)
}

#[test]
fn serial_output_reaches_stdout_and_i8042_reset_exits_zero() {
    if !kvm_available("serial_output_reaches_stdout_and_i8042_reset_exits_zero") {
        return;
    }
    let code = [x86::print("hello from the guest\n"), x86::i8042_reset(), x86::SPIN.to_vec()].concat();
    let out = run_payload(&code, &["-m", "16", "-c", "1"], None);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("hello from the guest"), "{}", out.describe());
}

#[test]
fn triple_fault_exits_nonzero_and_says_so() {
    if !kvm_available("triple_fault_exits_nonzero_and_says_so") {
        return;
    }
    let code = [x86_64::print("before\n"), x86_64::UD2.to_vec()].concat();
    let out = run_payload(&elf64_kernel(&code), &["-m", "16", "-c", "1"], None);
    assert_eq!(out.code, Some(3), "{}", out.describe());
    assert!(out.stdout.contains("before"));
    let last = out.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("triple fault") && last.contains("vCPU 0"), "{}", out.describe());
}

#[test]
fn unemulatable_instruction_exits_nonzero_with_rip_and_code() {
    if !kvm_available("unemulatable_instruction_exits_nonzero_with_rip_and_code") {
        return;
    }
    let code = [x86::unemulatable_mmio_access(), x86::SPIN.to_vec()].concat();
    let out = run_payload(&code, &["-m", "1", "-c", "1"], None);
    assert_eq!(out.code, Some(3), "{}", out.describe());
    let last = out.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("KVM internal error"), "{}", out.describe());
    // The popcnt sits at offset 5 of the payload, CS base 0x10000.
    assert!(last.contains("RIP 0x5"), "{}", out.describe());
    assert!(last.contains("26 f3 0f b8 06 10 00"), "{}", out.describe());
}

#[test]
fn boot_marker_and_the_exit_report_at_loglevel_info() {
    if !kvm_available("boot_marker_and_the_exit_report_at_loglevel_info") {
        return;
    }
    let code = [x86::print("abc"), x86::out8(0x440, 123), x86::i8042_reset(), x86::SPIN.to_vec()].concat();
    let out = run_payload(&code, &["-m", "16", "-c", "1", "--loglevel", "info"], None);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("boot marker 1 (value 0x7b) at "), "{}", out.describe());
    // One line when the VM ends: lkvm's start-up, the boot marker, and the exits by kind.
    let report = out.stderr.lines().find(|l| l.contains("start-up ")).unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(report.contains(" ms to the first KVM_RUN; boot marker at 0."), "{report}");
    let count = |kind: &str| -> u64 {
        let after = report.split(&format!("{kind} ")).nth(1).unwrap_or_else(|| panic!("no {kind}: {report}"));
        after.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    // Three characters, the marker and the reset are port writes at least.
    assert!(count("io-out") >= 5, "{report}");
    for kind in ["io-in", "mmio-read", "mmio-write", "interrupted", "debug", "other"] {
        count(kind);
    }
}

#[test]
fn console_input_reaches_the_guest_with_ctrl_a_escaped() {
    if !kvm_available("console_input_reaches_the_guest_with_ctrl_a_escaped") {
        return;
    }
    // Poll COM1's line status until a byte arrives, echo it as "<byte>!", then spin.
    let code = [
        vec![0xba, 0xfd, 0x03],             // mov dx, 0x3fd (LSR)
        vec![0xec, 0xa8, 0x01, 0x74, 0xfb], // in al, dx; test al, 1; jz -5
        vec![0xba, 0xf8, 0x03, 0xec, 0xee], // mov dx, 0x3f8; in al, dx; out dx, al
        x86::print("!\n"),
    ]
    .concat();
    // Ctrl-A Ctrl-A is how a Ctrl-A reaches the guest; the guest then echoes it.
    let code = [code, x86::i8042_reset()].concat();
    let out = run_payload(&code, &["-m", "16", "-c", "1"], Some(b"\x01\x01"));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("\x01!"), "{}", out.describe());
}

#[test]
fn four_vcpus_start_and_stop_100_times_without_hanging() {
    if !kvm_available("four_vcpus_start_and_stop_100_times_without_hanging") {
        return;
    }
    let dir = temp_dir();
    let payload = write_file(&dir, "spin.bin", &x86::SPIN);
    for round in 0..100 {
        // Ctrl-A x asks lkvm to stop while vCPU 0 spins and the others wait for a SIPI in KVM_RUN.
        let out = run_lkvm(
            &["run", "-k", payload.to_str().unwrap(), "-m", "16", "-c", "4"],
            Some(b"\x01x"),
            Duration::from_secs(20),
        );
        assert!(!out.timed_out && out.code == Some(0), "round {round}: {}", out.describe());
    }
}

/// Without -k, lkvm searches as kvmtool does, and in a kernel build tree boots the tree's own
/// uncompressed vmlinux before arch/x86/boot/bzImage; `./bzImage` still comes first.
#[test]
fn without_a_kernel_a_build_tree_boots_its_vmlinux() {
    if !kvm_available("without_a_kernel_a_build_tree_boots_its_vmlinux") {
        return;
    }
    let tree = temp_dir();
    let reset = [x86::i8042_reset(), x86::SPIN.to_vec()].concat();
    write_file(&tree, "vmlinux", &elf64_kernel(&[x86_64::print("from vmlinux\n"), reset.clone()].concat()));
    std::fs::create_dir_all(tree.join("arch/x86/boot")).unwrap();
    write_file(
        &tree.join("arch/x86/boot"),
        "bzImage",
        &[x86::print("from the tree's bzImage\n"), reset.clone()].concat(),
    );
    let run = || {
        let out = std::process::Command::new(lkvm())
            .args(["run", "-m", "16", "-c", "1", "--name", "tree"])
            .current_dir(&tree)
            .env("HOME", &tree)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (stdout, stderr) = run();
    assert!(stdout.contains("from vmlinux") && stderr.contains("using ./vmlinux"), "{stdout}\n{stderr}");
    write_file(&tree, "bzImage", &[x86::print("from ./bzImage\n"), reset].concat());
    let (stdout, stderr) = run();
    assert!(stdout.contains("from ./bzImage") && stderr.contains("using ./bzImage"), "{stdout}\n{stderr}");
}
