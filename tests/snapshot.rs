//! Snapshots of a real Linux guest with the kvmtool-style commands: `lkvm snapshot` of a running
//! guest whose state lives in memory, then `lkvm run --restore` in new processes (two clones at
//! once) that carry on from there; bad snapshots are refused with one clear line.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A running lkvm whose console we type into and whose output we collect.
struct Console {
    child: Child,
    input: ChildStdin,
    output: Arc<Mutex<String>>,
}

impl Console {
    fn start(home: &Path, args: &[&str]) -> Console {
        let mut child = Command::new(lkvm())
            .args(args)
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let sink = output.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut chunk) {
                    sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
        }
        Console { input: child.stdin.take().unwrap(), child, output }
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn type_line(&mut self, line: &str) {
        self.input.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// The `LKVM-WORK n token ms tsc` lines so far, as (n, token, ms since the workload began).
    fn work(&self) -> Vec<(u64, String, u64)> {
        self.text()
            .lines()
            .filter_map(|l| {
                let mut words = l.trim().strip_prefix("LKVM-WORK ")?.split_whitespace();
                Some((words.next()?.parse().ok()?, words.next()?.to_string(), words.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Waits until the output shows `what`; fails with the output if lkvm ends first.
    fn wait_for(&mut self, what: &str, timeout: Duration, condition: impl Fn(&Console) -> bool) {
        wait_for(what, timeout, || {
            if !condition(self) && self.child.try_wait().unwrap().is_some() {
                panic!("lkvm ended before {what}:\n{}", self.text());
            }
            condition(self)
        });
    }

    fn finish(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + timeout;
        while self.child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("lkvm did not end:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100)); // the readers drain the pipes
        (self.child.wait().unwrap().code(), self.text())
    }
}

fn restore_args(dir: &Path, name: &str) -> Vec<String> {
    ["run", "--restore", dir.to_str().unwrap(), "--name", name].map(str::to_string).to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn restore_fails(home: &Path, args: &[&str]) -> String {
    let (code, _, err) = lkvm_ctl(home, args);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn a_snapshotted_linux_guest_carries_on_in_two_clones() {
    if !kvm_available("a_snapshotted_linux_guest_carries_on_in_two_clones") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let guest = guest();
    let home = temp_dir();
    let disk = write_file(&home, "disk.img", &vec![0u8; 1 << 20]);
    let snap = home.join("snap");
    let params = format!("{HOST_GUEST_PARAMS} lkvm.write=/dev/vda:65536:7 lkvm.snapwork=1200");
    let boot = [
        "run",
        "-k",
        guest.bzimage.to_str().unwrap(),
        "-i",
        guest.initramfs.to_str().unwrap(),
        "-m",
        "192",
        "-c",
        "1",
        "--virtio-transport",
        "mmio",
        "--name",
        "snap-orig",
        "-d",
        disk.to_str().unwrap(),
        "-p",
        &params,
    ];
    let mut original = Console::start(&home, &boot);
    original.wait_for("the workload", boot_timeout(), |c| c.work().len() >= 3);
    let token = original.work()[0].1.clone();

    // Snapshot while it runs: it pauses, writes, and carries on.
    let (code, out, err) = lkvm_ctl(&home, &["snapshot", "-n", "snap-orig", snap.to_str().unwrap()]);
    assert!(code == 0 && out.contains("snapshot in"), "{out}{err}");
    let (last_before, _, last_before_ms) = original.work().last().unwrap().clone();
    original
        .wait_for("work after the snapshot", Duration::from_secs(60), |c| c.work().last().unwrap().0 > last_before + 2);
    // The disk write the guest synced before the snapshot is in the image.
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(fnv1a(&image[..65536]), fnv1a(&pattern(65536, 7)), "the guest's write reached the image");
    // An ELF core of the running guest: gdb reads the kernel's banner through the kernel's own
    // virtual addresses (the guest's vmlinux is stripped here, so by address, not by symbol).
    let core = home.join("guest.core");
    let (code, out, err) = lkvm_ctl(&home, &["debug", "-n", "snap-orig", "--dump", core.to_str().unwrap()]);
    assert!(code == 0 && out.contains("core in"), "{out}{err}");
    let banner =
        kernel_address_of(&std::fs::read(&core).unwrap(), b"Linux version ").expect("the banner in kernel text");
    let gdb = std::process::Command::new("gdb")
        .args(["-batch", "-nx", guest.vmlinux.to_str().unwrap(), core.to_str().unwrap()])
        .args(["-ex", &format!("x/s {banner:#x}"), "-ex", "info threads"])
        .output()
        .expect("gdb is installed");
    let gdb_out = String::from_utf8_lossy(&gdb.stdout);
    assert!(gdb_out.contains("\"Linux version 6."), "gdb reads the banner: {gdb_out}");
    original.wait_for("work after the dump", Duration::from_secs(60), |c| c.work().len() > 5);
    original.type_line("done");
    let (code, text) = original.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{text}");

    // Damaged snapshots are refused with one line, before anything runs.
    let fails = |dir: &Path| restore_fails(&home, &strs(&restore_args(dir, "bad")));
    assert!(fails(&home.join("nowhere")).contains("no such snapshot file"));
    let bad = home.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let mut state = std::fs::read(snap.join("state")).unwrap();
    let last = state.len() - 1;
    state[last] ^= 0x55;
    std::fs::write(bad.join("state"), &state).unwrap();
    std::os::unix::fs::symlink(snap.join("memory"), bad.join("memory")).unwrap();
    assert!(fails(&bad).contains("corrupt"));
    std::fs::copy(snap.join("state"), bad.join("state")).unwrap();
    std::fs::remove_file(bad.join("memory")).unwrap();
    write_file(&bad, "memory", &[0u8; 4096]);
    assert!(fails(&bad).contains("memory file"));
    // A state file is data: one edited to share the host's / read-write, or to run a tap
    // script, is refused before anything runs, its checksum notwithstanding.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(snap.clone(), 0o700), (snap.join("state"), 0o600), (snap.join("memory"), 0o600)] {
        let found = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(found, mode, "{} is {found:o}", path.display());
    }
    let edited_state = |edit: &dyn Fn(&mut lkvm::snapshot::VmState)| {
        let mut state = lkvm::snapshot::read_state(&snap.join("state")).unwrap();
        edit(&mut state);
        lkvm::snapshot::write_state(&bad.join("state"), &state).unwrap();
        fails(&bad)
    };
    let edited = |edit: &dyn Fn(&mut lkvm::config::VmConfig)| edited_state(&|state| edit(&mut state.config));
    std::fs::remove_file(bad.join("memory")).unwrap();
    std::os::unix::fs::symlink(snap.join("memory"), bad.join("memory")).unwrap();
    let slash = edited(&|config| {
        let spec =
            lkvm::config::ShareSpec { read_only: false, ..lkvm::config::ShareSpec::new("/", "hostroot").unwrap() };
        config.shares.push(lkvm::config::ShareConfig { id: "hostroot".into(), spec });
    });
    assert!(slash.contains("share 'hostroot'") && slash.contains("stays read-only"), "{slash}");
    let ran = home.join("script-ran");
    let script = write_file(
        &home,
        "script.sh",
        format!(
            "#!/bin/sh
touch {}
",
            ran.display()
        )
        .as_bytes(),
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tap = edited(&|config| {
        let spec = lkvm::config::NetSpec {
            mode: lkvm::config::NetMode::Tap,
            script: Some(script.clone()),
            ..lkvm::config::NetSpec::default()
        };
        config.nets.push(lkvm::config::NetConfig { id: "planted".into(), spec });
    });
    assert!(tap.contains("may not run a host script"), "{tap}");
    assert!(!ran.exists(), "the snapshot's script ran");
    // Each device's state carries its own format version: an lkvm whose CMOS state changed
    // refuses an older one by name.
    let old_cmos = edited_state(&|state| {
        let (_, cmos) = state.devices.iter_mut().find(|(id, _)| id.ends_with("cmos")).expect("a CMOS state");
        cmos[..2].copy_from_slice(&0u16.to_le_bytes());
    });
    assert!(old_cmos.contains("CMOS state format version 0, this lkvm reads version 1"), "{old_cmos}");
    let mut with_machine_options = restore_args(&snap, "bad");
    with_machine_options.extend(["-m".to_string(), "64".to_string()]);
    let (code, _, err) = lkvm_ctl(&home, &strs(&with_machine_options));
    assert_eq!(code, 2, "--restore takes no machine options: {err}");

    // Two clones at once, each carrying on from the snapshot with the same token. The snapshot
    // is a few seconds old at least, so a guest clock that jumped would show it.
    std::thread::sleep(Duration::from_secs(5));
    let mut a = Console::start(&home, &strs(&restore_args(&snap, "clone-a")));
    let mut b = Console::start(&home, &strs(&restore_args(&snap, "clone-b")));
    for clone in [&mut a, &mut b] {
        clone.wait_for("restored work", Duration::from_secs(120), |c| c.work().len() >= 3);
        let work = clone.work();
        assert!(work.iter().all(|(_, t, _)| *t == token), "another guest's token: {work:?}");
        assert!(
            work[0].0 > 0 && work[0].0 <= last_before + 1,
            "continued from the snapshot: {work:?} vs {last_before}"
        );
        assert!(work[0].2 <= last_before_ms + 2000, "the guest's clock jumped: {work:?} vs {last_before_ms} ms");
    }
    // The clones are independent: console input reaches only the one typed into; pausing one
    // stops only it.
    a.type_line("hello-a");
    a.wait_for("the echo", Duration::from_secs(60), |c| c.text().contains("LKVM-RESULT echo=hello-a"));
    assert_eq!(lkvm_ctl(&home, &["pause", "-n", "clone-a"]).0, 0);
    let (paused_a, running_b) = (a.work().len(), b.work().len());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(a.work().len(), paused_a, "a paused clone ran");
    assert!(b.work().len() > running_b, "the other clone stopped too");
    assert_eq!(lkvm_ctl(&home, &["resume", "-n", "clone-a"]).0, 0);
    a.wait_for("work after resume", Duration::from_secs(60), |c| c.work().len() > paused_a);
    assert!(!b.text().contains("hello-a"));
    for mut clone in [a, b] {
        clone.type_line("done");
        let (code, text) = clone.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("LKVM-DONE"), "{text}");
    }
    // Restoring reads the image; it does not write it.
    assert_eq!(std::fs::read(&disk).unwrap(), image);
    std::fs::remove_dir_all(home).unwrap();
}

/// The kernel-text virtual address (0xffffffff8...) at which an ELF core maps the first copy of
/// `needle` that a PT_LOAD segment of that range covers.
fn kernel_address_of(core: &[u8], needle: &[u8]) -> Option<u64> {
    let u64_at = |at: usize| u64::from_le_bytes(core[at..at + 8].try_into().unwrap());
    let phoff = u64_at(32) as usize;
    let phnum = u16::from_le_bytes([core[56], core[57]]) as usize;
    let segments: Vec<(u64, u64, u64)> = (0..phnum)
        .map(|i| phoff + i * 56)
        .filter(|&p| u32::from_le_bytes(core[p..p + 4].try_into().unwrap()) == 1)
        .map(|p| (u64_at(p + 8), u64_at(p + 16), u64_at(p + 32)))
        .filter(|&(_, vaddr, _)| vaddr >= 0xffff_ffff_8000_0000)
        .collect();
    let mut from = 0;
    while let Some(found) = core[from..].windows(needle.len()).position(|w| w == needle) {
        let at = (from + found) as u64;
        if let Some((offset, vaddr, _)) = segments.iter().find(|&&(offset, _, len)| at >= offset && at < offset + len) {
            return Some(vaddr + (at - offset));
        }
        from += found + 1;
    }
    None
}
