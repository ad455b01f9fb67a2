//! End-to-end: boot the real Linux test guest (guest/build.sh) and check what it sees.
//! Each boot takes about a minute on hosts that emulate guest kernel code, so boots run one
//! at a time and each checks several things at once.

mod common;

use common::*;

const MIB: u64 = 1024;

/// The bzImage through the 64-bit boot protocol, configured by a Firecracker config file
/// (`firecracker --no-api --config-file`): virtio-mmio devices, the root drive on the command
/// line, the drive id as the disk's serial, entropy, and the boot timer.
#[test]
fn bzimage_boots_from_a_firecracker_config_file() {
    if !kvm_available("bzimage_boots_from_a_firecracker_config_file") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let guest = guest();
    let dir = temp_dir();
    let link = dir.join("firecracker");
    std::os::unix::fs::symlink(lkvm(), &link).unwrap();
    let root = pattern(1 << 20, 4);
    let root_img = write_file(&dir, "root.img", &root);
    // A drive holding a planted qcow2 header is served as the raw image Firecracker's drives
    // are: the guest reads the header, never the host file it names.
    let secret = write_file(&dir, "secret", &pattern(1 << 20, 11));
    let planted = planted_image(&dir, &secret);
    let boot_args = format!("console=ttyS0 reboot=k panic=1 pci=off {HOST_GUEST_PARAMS} lkvm.read=/dev/vda:1048576 lkvm.read=/dev/vdb:1048576 lkvm.serial=vda lkvm.hwrng=64");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": guest.bzimage, "initrd_path": guest.initramfs, "boot_args": boot_args},
        "drives": [{"drive_id": "rootfs", "path_on_host": root_img, "is_root_device": true, "is_read_only": true},
                   {"drive_id": "planted", "path_on_host": planted, "is_root_device": false, "is_read_only": false}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 96},
        "entropy": {},
    });
    let file = write_file(&dir, "vm.json", config.to_string().as_bytes());
    let args = ["--no-api", "--boot-timer", "--config-file", file.to_str().unwrap()];
    let env = [("HOME", dir.to_str().unwrap().to_string())];
    let out = run_command_env(link.to_str().unwrap(), &args, &env, boot_timeout(), |_| {});
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("LKVM-DONE"), "init did not finish: {}", out.describe());
    assert_eq!(out.result("cpus").as_deref(), Some("1"));
    let mem_kb: u64 = out.result("memtotal_kb").and_then(|v| v.parse().ok()).expect("memtotal_kb");
    assert!((96 * MIB * 8 / 10..=96 * MIB).contains(&mem_kb), "MemTotal {mem_kb} kB for 96 MiB");
    let cmdline = out.result("cmdline").unwrap();
    assert!(cmdline.starts_with("console=ttyS0 reboot=k panic=1 pci=off"), "{cmdline}");
    assert!(
        cmdline.contains("root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{cmdline}"
    );
    assert_eq!(out.result("read:/dev/vda"), Some(format!("{:016x}", fnv1a(&root))), "{}", out.describe());
    let planted_bytes = std::fs::read(&planted).unwrap();
    assert_eq!(out.result("read:/dev/vdb"), Some(format!("{:016x}", fnv1a(&planted_bytes))), "{}", out.describe());
    assert_eq!(out.result("serial:vda").as_deref(), Some("rootfs"));
    let distinct: u32 = out.result("hwrng").and_then(|v| v.split_once(':')?.1.parse().ok()).expect("hwrng");
    assert!(distinct > 16, "64 random bytes with {distinct} distinct values");
    // Firecracker logs to stdout (beside the serial console) unless given a log file.
    assert!(out.stdout.contains("boot marker 1 (value 0x7b)"), "{}", out.describe());
    std::fs::remove_dir_all(dir).unwrap();
}

/// One boot exercising disks (read, write+sync, read-only), GET_ID, and the rng, over
/// `transport`; with `console` "virtio", the only console is hvc0.
fn disks_boot(transport: &str, console: &str) {
    let guest = guest();
    let dir = temp_dir();
    let source = pattern(1 << 20, 5);
    let vda = write_file(&dir, "vda.img", &source);
    let vdb = write_file(&dir, "vdb.img", &vec![0u8; 1 << 20]);
    let vdc = write_file(&dir, "vdc.img", &vec![0x55u8; 1 << 20]);
    let vdd = write_file(&dir, "vdd.img", &source);
    // vda and vdb through the io_uring engine (the default), vdc through the synchronous one.
    let (vda, vdb, vdc_ro) =
        (format!("{},async", vda.display()), vdb.to_str().unwrap().to_string(), format!("{},ro,sync", vdc.display()));
    // vdd is held to 256 KiB/s (128 KiB buckets refilled every 500 ms), through either engine.
    let engine = if transport == "pci" { "async" } else { "sync" };
    let vdd_limited = format!("{},ro,{engine},bw=128K/500,ops=1000/1000", vdd.display());
    // vde, named raw, holds a qcow2 header naming a host file; the guest tries to plant it on
    // vdb, whose format lkvm probed as raw, and is refused.
    let secret = write_file(&dir, "secret", &pattern(1 << 20, 11));
    let vde = format!("{},format=raw,ro", planted_image(&dir, &secret).display());
    let (shared, shared_ro) = (dir.join("shared"), dir.join("shared-ro"));
    let host_file = pattern(300_000, 8);
    for share in [&shared, &shared_ro] {
        std::fs::create_dir(share).unwrap();
        std::fs::write(share.join("hostfile"), &host_file).unwrap();
    }
    std::fs::write(shared.join("torename"), b"rename me").unwrap();
    std::fs::write(shared.join("todelete"), b"delete me").unwrap();
    let (share_arg, share_ro_arg) =
        (format!("{},hostdir", shared.display()), format!("{},hostro,ro", shared_ro.display()));
    let params = format!(
        "{HOST_GUEST_PARAMS} lkvm.read=/dev/vda:1048576 lkvm.write=/dev/vdb:65536:9 \
         lkvm.copy=/dev/vde:/dev/vdb:512 lkvm.write=/dev/vdc:4096:1 lkvm.serial=vda lkvm.hwrng=64 lkvm.9p=hostdir:hostro \
         lkvm.timedread=/dev/vda:1048576 lkvm.timedread=/dev/vdd:1048576"
    );
    let mut args = vec![
        "run",
        "-k",
        guest.vmlinux.to_str().unwrap(),
        "-i",
        guest.initramfs.to_str().unwrap(),
        "-c",
        "1",
        "-m",
        "128",
        "--virtio-transport",
        transport,
        "--console",
        console,
        "--rng",
        "-d",
        &vda,
        "-d",
        &vdb,
        "-d",
        &vdc_ro,
        "-d",
        &vdd_limited,
        "-d",
        &vde,
        "--9p",
        &share_arg,
        "--9p",
        &share_ro_arg,
        "-p",
        &params,
    ];
    // One boot runs under Landlock: the 9p server, the disks and the rest work within the
    // paths the VM was given.
    if transport == "mmio" {
        args.push("--landlock");
    }
    // The other runs in a jail, when the test may make one (root): its root holds only the
    // kernel, initramfs, images, shares and what the NIC and KVM need.
    let jail = dir.join("jail");
    // SAFETY: geteuid has no preconditions.
    if transport == "pci" && unsafe { libc::geteuid() } == 0 {
        std::fs::create_dir(&jail).unwrap();
        // Jailed lkvm runs unprivileged: the writable share is that user's.
        for entry in [shared.clone()].into_iter().chain(std::fs::read_dir(&shared).unwrap().map(|e| e.unwrap().path()))
        {
            std::os::unix::fs::lchown(&entry, Some(65534), Some(65534)).unwrap();
        }
        args.extend(["--jail", jail.to_str().unwrap(), "--uid", "65534", "--gid", "65534"]);
    }
    let out = run_lkvm(&args, None, boot_timeout());
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("LKVM-DONE"), "{}", out.describe());
    let cmdline = out.result("cmdline").unwrap();
    assert!(cmdline.contains("root=/dev/vda rw"), "{cmdline}");
    assert!(cmdline.starts_with(&format!("console={}", if console == "virtio" { "hvc0" } else { "ttyS0" })));

    assert_eq!(out.result("read:/dev/vda"), Some(format!("{:016x}", fnv1a(&source))), "{}", out.describe());
    assert_eq!(out.result("write:/dev/vdb").as_deref(), Some("ok"));
    let planted = out.result("copy:/dev/vdb").unwrap();
    assert!(planted.starts_with("err:"), "a qcow2 header planted on a probed raw disk: {planted}");
    assert!(out.stderr.contains("probed as raw"), "a warning names the format to give: {}", out.describe());
    let written = std::fs::read(dir.join("vdb.img")).unwrap();
    assert_eq!(&written[..65536], &pattern(65536, 9)[..], "the guest's synced write is in the host file");
    assert!(written[65536..].iter().all(|b| *b == 0));
    let refused = out.result("write:/dev/vdc").unwrap();
    assert!(refused.starts_with("err:"), "read-only disk accepted a write: {refused}");
    assert!(std::fs::read(dir.join("vdc.img")).unwrap().iter().all(|b| *b == 0x55), "read-only image changed");
    assert_eq!(out.result("serial:vda").as_deref(), Some("lkvm-disk0"));

    // The rate-limited disk: after the full bucket (128 KiB), 896 KiB at 256 KiB/s take 3.5 s.
    // Never faster than the limit; slower by no more than 10% plus what the same read of an
    // unlimited disk took (the guest's own cost, large where its kernel is emulated).
    let micros = |dev: &str| {
        let value = out.result(&format!("timedread:{dev}")).unwrap_or_else(|| panic!("{}", out.describe()));
        let (len, micros) = value.split_once(':').unwrap_or_else(|| panic!("{dev}: {value}"));
        assert_eq!(len, "1048576");
        micros.parse::<f64>().unwrap()
    };
    let (unlimited, limited, expected) = (micros("/dev/vda"), micros("/dev/vdd"), 3.5e6);
    eprintln!("{engine}: 1 MiB from the 256 KiB/s disk in {limited} us (the limit: 3.5 s), unlimited {unlimited} us");
    assert!(limited >= expected * 0.9, "{engine}: 1 MiB in {limited} us, faster than 256 KiB/s allows");
    assert!(
        limited <= expected * 1.1 + unlimited,
        "{engine}: 1 MiB in {limited} us; the limit allows 3.5 s, the unlimited disk took {unlimited} us"
    );

    // The 9p shares: the guest reads the host's file, and its changes are the host's.
    let host_sum = format!("{:016x}", fnv1a(&host_file));
    assert_eq!(out.result("9p_msize").as_deref(), Some("512000"), "large messages: {}", out.describe());
    assert_eq!(out.result("9p_read"), Some(host_sum.clone()), "{}", out.describe());
    for op in ["9p_write", "9p_rename", "9p_unlink", "9p_mkdir", "9p_symlink"] {
        assert_eq!(out.result(op).as_deref(), Some("ok"), "{op}: {}", out.describe());
    }
    assert_eq!(std::fs::read(shared.join("guestfile")).unwrap(), pattern(100000, 3));
    assert_eq!(std::fs::read(shared.join("renamed")).unwrap(), b"rename me");
    assert!(!shared.join("torename").exists() && !shared.join("todelete").exists());
    assert!(shared.join("newdir").is_dir());
    assert_eq!(std::fs::read_link(shared.join("newdir/link")).unwrap(), std::path::Path::new("renamed"));
    assert_eq!(out.result("9p_ro_read"), Some(host_sum));
    let refused = out.result("9p_ro_write").unwrap();
    assert!(refused.contains("Read-only file system"), "read-only share accepted a write: {refused}");
    assert_eq!(std::fs::read_dir(&shared_ro).unwrap().count(), 1, "the read-only share changed");

    let (n, distinct) =
        out.result("hwrng").and_then(|v| v.split_once(':').map(|(a, b)| (a.to_string(), b.to_string()))).unwrap();
    assert_eq!(n, "64");
    assert!(distinct.parse::<u32>().unwrap() > 16, "64 random bytes with {distinct} distinct values");

    let irqs: u32 = out.result("virtio_irqs").unwrap().parse().unwrap();
    let msi: u32 = out.result("virtio_msi_irqs").unwrap().parse().unwrap();
    if transport == "pci" {
        assert!(msi > 0 && msi == irqs, "virtio-pci should use MSI-X only: {irqs} irqs, {msi} MSI");
    } else {
        assert!(irqs > 0 && msi == 0, "virtio-mmio uses IOAPIC lines: {irqs} irqs, {msi} MSI");
        assert!(cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"), "{cmdline}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn virtio_pci_disks_rng_and_hvc0_console() {
    if !kvm_available("virtio_pci_disks_rng_and_hvc0_console") {
        return;
    }
    let _one_at_a_time = boot_lock();
    disks_boot("pci", "virtio");
}

#[test]
fn virtio_mmio_disks_and_rng() {
    if !kvm_available("virtio_mmio_disks_and_rng") {
        return;
    }
    let _one_at_a_time = boot_lock();
    disks_boot("mmio", "serial");
}
