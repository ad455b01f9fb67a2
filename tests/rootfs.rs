//! End-to-end: kvmtool's zero-setup guest. `lkvm run` with no disk boots ~/.lkvm/default with
//! the host's / at /host, both read-only under overlays in guest memory (virtio-fs, or 9p for
//! `lkvm sandbox`), and `--rw` directories writable; `lkvm setup` makes such a root directory and
//! `lkvm sandbox` runs a host command in a fresh guest, returning the command's exit status.

mod common;

use std::time::Duration;

use common::*;

/// Each thread of the lkvm running the guest `name`: its name, `Seccomp:` and `NoNewPrivs:`.
fn thread_confinement(name: &str) -> Vec<(String, String, String)> {
    let wanted = format!("--name\0{name}\0");
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&wanted)))
        .expect("the running lkvm");
    let mut threads = Vec::new();
    for task in std::fs::read_dir(pid.path().join("task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("?").trim().to_string();
        if !comm.starts_with("kvm-") {
            threads.push((comm, field("Seccomp:"), field("NoNewPrivs:")));
        }
    }
    threads
}

fn home_env(home: &std::path::Path) -> Vec<(&'static str, String)> {
    // The warm sandbox cache follows XDG_CACHE_HOME when it is set: keep it under HOME here.
    vec![("HOME", home.to_str().unwrap().to_string()), ("XDG_CACHE_HOME", String::new())]
}

/// Run in the guest over two virtio-fs shares: a writable one with links out (and a device
/// node the host made), and a read-only one. One line per check. One perl process does it all:
/// each program started costs seconds where guest kernel code is emulated.
/// Unbinds the guest's virtio-rng driver (the device is reset), binds it again (set up and
/// activated anew) and reads the rng.
const RNG_REBIND: &str = "drivers=/sys/bus/virtio/drivers/virtio_rng; \
    device=$(basename $(readlink -f $drivers/virtio*)); \
    echo $device > $drivers/unbind && echo $device > $drivers/bind && \
    echo rng-after-reset $(timeout 60 head -c 16 /dev/hwrng | wc -c)";

const VIRTIO_FS_SCRIPT: &str = r#"
use strict;
my ($SYS_MKNOD, $SYS_MOUNT, $SYS_UMOUNT2) = (133, 165, 166);
# syscall() hands strings over by pointer, so they must be copies, not literals.
sub sys { my ($number, @args) = @_; syscall($number, @args) }
mkdir "/tmp/fs"; mkdir "/tmp/ro";
sys($SYS_MOUNT, "hostdir", "/tmp/fs", "virtiofs", 0, 0) == 0 or die "mount hostdir: $!";
sys($SYS_MOUNT, "rodir", "/tmp/ro", "virtiofs", 0, 0) == 0 or die "mount rodir: $!";
chdir "/tmp/fs" or die;
sub put { my ($name, $text) = @_; open(my $f, ">", $name) or die "$name: $!"; print $f $text; close $f }
sub names { my ($dir) = @_; opendir(my $d, $dir) or die; join(" ", sort grep { !/^\./ } readdir $d) }
put("new.txt", "created\n");
rename("new.txt", "renamed.txt") or die;
link("renamed.txt", "linked.txt") or die;
my @s = stat "renamed.txt";
print "links=$s[3] size=$s[7]\n";
truncate("linked.txt", 4) or die;
unlink("linked.txt") or die;
mkdir "sub" or die;
put("sub/f", "deep\n");
print "sub: ", names("sub"), "\n";
put("setid", "");
chmod(04755, "setid") or die;
printf "setid-mode=%o\n", (stat "setid")[2] & 07777;
open(my $g, "+>", "gone.txt") or die;
unlink("gone.txt") or die;
syswrite($g, "still-here\n");
print "unlinked-size=", (stat $g)[7], "\n";
sysseek($g, 0, 0);
sysread($g, my $back, 100);
chomp $back;
print "read-back: $back\n";
close $g;
print "listing: ", names("."), "\n";
print sys($SYS_MKNOD, "newdev", 020644, 259) == 0 ? "mknod-made\n" : "mknod-refused\n";
for my $link ("abs-link", "rel-link") {
    my $text = "";
    if (open(my $f, "<", $link)) { local $/; $text = <$f> // "" }
    print $text =~ /outside-secret/ ? "$link-leaked\n" : "$link-refused\n";
}
open(my $kept, "<", "/tmp/ro/kept.txt") or die;
print "ro: ", <$kept>, "\n";
print open(my $new, ">", "/tmp/ro/new") ? "ro-write-allowed\n" : "ro-write-refused\n";
print unlink("/tmp/ro/kept.txt") ? "ro-unlink-allowed\n" : "ro-unlink-refused\n";
chdir "/";
sys($SYS_UMOUNT2, "/tmp/fs", 0);
sys($SYS_UMOUNT2, "/tmp/ro", 0);
"#;

/// One boot of the zero-setup guest (a boot costs a minute or more where guest kernel code is
/// emulated): the console's shell over the host's files, `lkvm exec` beside it, and virtio-fs
/// shares: a writable one with links out of it (and a device node the host made) and a read-only
/// one; the guest's file operations, what the host sees of them, and what the guest was refused.
#[test]
fn run_without_a_disk_gives_a_shell_over_the_hosts_files_lkvm_exec_and_virtio_fs_shares() {
    if !kvm_available("run_without_a_disk_gives_a_shell_over_the_hosts_files_lkvm_exec_and_virtio_fs_shares") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let home = temp_dir();
    let env = home_env(&home);
    let host_file = write_file(&home, "note.txt", b"written-by-the-host-4711");
    let planted = format!("/tmp/lkvm-planted-{}", std::process::id());
    let (build_tree, fs_dir, ro_dir, outside) =
        (home.join("build"), home.join("fs"), home.join("ro"), home.join("outside"));
    for dir in [&build_tree, &fs_dir, &ro_dir, &outside] {
        std::fs::create_dir(dir).unwrap();
    }
    write_file(&ro_dir, "kept.txt", b"read-only-content");
    write_file(&outside, "secret", b"outside-secret");
    std::os::unix::fs::symlink(outside.join("secret"), fs_dir.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", fs_dir.join("rel-link")).unwrap();
    // A device node in the share (root only can make one): the guest sees it, and opening it
    // opens the guest's own device, as on any network filesystem.
    let dev = std::ffi::CString::new(fs_dir.join("devnode").to_str().unwrap()).unwrap();
    // SAFETY: mknod with a valid path; 1:3 is /dev/null, harmless if the check failed.
    let has_dev = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;
    // The guest writes anywhere, in an overlay in its memory; the --rw directory writes through.
    let input = format!(
        "echo shell-$((6*7)) mounts=$(grep -cE '^overlay /(host)? overlay ' /proc/mounts) \
         rw=$(grep ' /host{build} ' /proc/mounts | cut -d' ' -f3); cat /host{note}; \
         echo guest-etc > /etc/x; echo guest-usr > /usr/x; touch /host{planted}; mkdir /root/new; \
         echo wrote-$(cat /etc/x /usr/x | tr '\\n' -); ls /host{planted} && echo planted-in-the-overlay; \
         echo through > /host{build}/made; exit\n",
        build = build_tree.display(),
        note = host_file.display(),
    );
    let vmlinux = guest().vmlinux.to_str().unwrap();
    let rw = build_tree.to_str().unwrap();
    let fs_arg = format!("{},hostdir", fs_dir.display());
    let ro_arg = format!("{},rodir,ro", ro_dir.display());
    let args = [
        "run",
        "-k",
        vmlinux,
        "-m",
        "256",
        "-c",
        "1",
        "--name",
        "ex1",
        "--rw",
        rw,
        "-p",
        HOST_GUEST_PARAMS,
        "--fs",
        &fs_arg,
        "--fs",
        &ro_arg,
        "--rng",
        "--balloon",
    ];
    // While the console's shell waits, `lkvm exec` runs commands beside it.
    let exec_env = env.clone();
    let execs = std::sync::Mutex::new(Vec::new());
    let script = std::sync::Mutex::new(None);
    let threads = std::sync::Mutex::new(Vec::new());
    let out = run_interactive_with(
        &args,
        &env,
        "# ",
        || {
            let exec = |stdin: &[u8], command: &[&str]| {
                let args: Vec<&str> = ["exec", "-n", "ex1", "--"].iter().chain(command).copied().collect();
                run_with_input(lkvm(), &args, &exec_env, stdin, Duration::from_secs(600))
            };
            let mut results = execs.lock().unwrap();
            results.push(exec(b"", &["/bin/sh", "-c", "echo out-$((6*7)); echo err-line >&2; exit 42"]));
            results.push(exec(b"piped\ninput\n", &["/bin/sh", "-c", "tr a-z A-Z"]));
            // Two at once: the slower one started first and finished last.
            std::thread::scope(|scope| {
                let slow = scope.spawn(|| exec(b"", &["/bin/sh", "-c", "sleep 2; echo slow"]));
                std::thread::sleep(Duration::from_millis(200));
                let fast = exec(b"", &["/bin/sh", "-c", "echo fast"]);
                results.push(fast);
                results.push(slow.join().unwrap());
            });
            results.push(exec(b"", &["/no/such/program"]));
            let tty: Vec<&str> = vec!["exec", "-n", "ex1", "-t", "--", "/bin/sh", "-c", "tty; stty size"];
            results.push(run_with_input(lkvm(), &tty, &exec_env, b"", Duration::from_secs(600)));
            let perl = ["exec", "-n", "ex1", "--", "/usr/bin/perl"];
            let run = run_with_input(lkvm(), &perl, &exec_env, VIRTIO_FS_SCRIPT.as_bytes(), Duration::from_secs(900));
            *script.lock().unwrap() = Some(run);
            // The guest resets its rng (unbinding the driver) and sets it up again: the VMM
            // thread stops the device and starts it anew, and the new worker is confined too.
            results.push(exec(b"", &["/bin/sh", "-c", RNG_REBIND]));
            *threads.lock().unwrap() = thread_confinement("ex1");
            input
        },
        boot_timeout(),
    );

    assert_eq!(out.code, Some(0), "the VM ends with the shell: {}", out.describe());
    // / and /host are overlays, the root and the host's / under them came over virtio-fs (the
    // --rw directory's transport is theirs).
    let expected = ["shell-42 mounts=2 rw=virtiofs", "written-by-the-host-4711", "wrote-guest-etc-guest-usr-"];
    for expected in expected.into_iter().chain(["planted-in-the-overlay"]) {
        assert!(out.stdout.contains(expected), "want {expected:?}: {}", out.describe());
    }
    assert!(!std::path::Path::new(&planted).exists(), "the guest wrote to the host's /");
    for (path, what) in [("/usr/x", "the host's /usr"), ("/etc/x", "the host's /etc")] {
        assert!(!std::path::Path::new(path).exists(), "the guest wrote to {what}");
    }
    let rootfs = home.join(".lkvm/default");
    assert!(!rootfs.join("etc/x").exists() && !rootfs.join("root/new").exists(), "the guest wrote to its rootfs");
    assert!(rootfs.join("etc/passwd").is_file());
    assert_eq!(std::fs::read_link(rootfs.join("bin")).unwrap(), std::path::Path::new("/host/bin"));
    assert_eq!(std::fs::read_to_string(build_tree.join("made")).unwrap(), "through\n", "--rw writes through");

    // Every thread of the running VM, its device workers too, runs under a seccomp filter and
    // cannot gain privileges (KVM's own workers, `kvm-*`, are the kernel's).
    let threads = threads.into_inner().unwrap();
    for (name, seccomp, no_new_privs) in &threads {
        assert_eq!((seccomp.as_str(), no_new_privs.as_str()), ("2", "1"), "thread {name}: {threads:?}");
    }
    for expected in ["lkvm", "spawner", "vcpu0", "slirp", "virtio-fs", "virtio-rng", "virtio-balloon"] {
        assert!(threads.iter().any(|(name, ..)| name.starts_with(expected)), "no {expected} thread: {threads:?}");
    }

    let execs = execs.into_inner().unwrap();
    let [status, piped, fast, slow, missing, tty, rebound] = &execs[..] else { panic!("{} execs ran", execs.len()) };
    assert_eq!(rebound.code, Some(0), "{}", rebound.describe());
    assert!(rebound.stdout.contains("rng-after-reset 16"), "{}", rebound.describe());
    assert_eq!(status.code, Some(42), "exec returns the command's status: {}", status.describe());
    assert_eq!(status.stdout, "out-42\n", "{}", status.describe());
    assert_eq!(status.stderr, "err-line\n", "stderr kept apart: {}", status.describe());
    assert_eq!((piped.code, piped.stdout.as_str()), (Some(0), "PIPED\nINPUT\n"), "{}", piped.describe());
    assert_eq!((fast.code, fast.stdout.as_str()), (Some(0), "fast\n"), "{}", fast.describe());
    assert_eq!((slow.code, slow.stdout.as_str()), (Some(0), "slow\n"), "{}", slow.describe());
    assert!(slow.elapsed > fast.elapsed, "the two ran side by side");
    assert_eq!(missing.code, Some(127), "{}", missing.describe());
    assert!(missing.stderr.contains("cannot run /no/such/program"), "{}", missing.describe());
    assert_eq!(tty.code, Some(0), "{}", tty.describe());
    assert!(tty.stdout.contains("/dev/pts/") && tty.stdout.contains("24 80"), "a pty of 24x80: {}", tty.describe());

    // virtio-fs: the guest's file operations, as the host sees them, and what it was refused.
    let fs = script.into_inner().unwrap().expect("the script ran");
    assert_eq!(fs.code, Some(0), "{}", fs.describe());
    let lines: Vec<&str> = fs.stdout.lines().collect();
    for expected in [
        "links=2 size=8",
        "sub: f",
        "unlinked-size=11",
        "read-back: still-here",
        "setid-mode=755",
        "mknod-refused",
        "abs-link-refused",
        "rel-link-refused",
        "ro: read-only-content",
        "ro-write-refused",
        "ro-unlink-refused",
    ] {
        assert!(lines.contains(&expected), "virtio-fs: want the line {expected:?}: {}", fs.describe());
    }
    let listing = if has_dev { "devnode " } else { "" };
    let listing = format!("listing: abs-link {listing}rel-link renamed.txt setid sub");
    assert!(lines.contains(&listing.as_str()), "want {listing:?}: {}", fs.describe());
    assert!(!fs.stdout.contains("outside-secret"), "{}", fs.describe());
    assert_eq!(std::fs::read(fs_dir.join("renamed.txt")).unwrap(), b"crea", "truncated through the link");
    assert_eq!(std::fs::read(fs_dir.join("sub/f")).unwrap(), b"deep\n");
    for gone in ["new.txt", "linked.txt", "gone.txt", "newdev"] {
        assert!(!fs_dir.join(gone).exists(), "{gone} should not exist on the host");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(fs_dir.join("setid")).unwrap().permissions().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read_dir(&ro_dir).unwrap().count(), 1, "the read-only share is unchanged");
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"outside-secret");

    // Gone with the guest.
    let gone = run_with_input(lkvm(), &["exec", "-n", "ex1", "--", "true"], &env, b"", Duration::from_secs(30));
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.contains("ex1: no such running guest"), "{}", gone.describe());
    std::fs::remove_dir_all(home).unwrap();
}

#[test]
fn sandbox_runs_a_host_command_and_returns_its_status() {
    if !kvm_available("sandbox_runs_a_host_command_and_returns_its_status") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let home = temp_dir();
    let env = home_env(&home);
    let setup = run_command_env(lkvm(), &["setup", "sbx"], &env, Duration::from_secs(30), |_| {});
    assert_eq!(setup.code, Some(0), "{}", setup.describe());
    assert!(setup.stdout.contains("lkvm run -d sbx"), "{}", setup.describe());
    let again = run_command_env(lkvm(), &["setup", "sbx"], &env, Duration::from_secs(30), |_| {});
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("already exists"), "{}", again.describe());

    // The command runs in the host's current directory, seen under /host.
    let work = temp_dir();
    write_file(&work, "data.txt", b"data-in-the-cwd\n");
    // Writes stay in the guest's overlay, but for the --rw directory's; the root and the host's /
    // came over 9p, which a snapshot can hold. Under --landlock, lkvm still serves them, writes
    // through to --rw and writes the warm snapshot.
    // A sandbox does not reach services on the host's loopback unless asked.
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let probe = format!(
        "bash -c \"echo hi > /dev/tcp/192.168.33.1/{}\" 2>/dev/null && echo loopback-reached || echo loopback-blocked",
        host_service.local_addr().unwrap().port()
    );
    // It sees the host's programs, the current and --rw directories, not the rest of the host:
    // no /proc (other processes' environments, lkvm's memory), no home directory, no LAN or
    // cloud metadata address.
    write_file(&home, "secret", b"home-secret\n");
    let hidden = format!(
        "cat /host/proc/self/environ >/dev/null 2>&1 && echo proc-read || echo proc-hidden; \
         cat /host{}/secret 2>/dev/null || echo home-hidden; \
         bash -c \"echo hi > /dev/tcp/169.254.169.254/80\" 2>/dev/null && echo lan-reached || echo lan-blocked",
        home.display()
    );
    let script = format!(
        "cat data.txt; echo out-$((2*3)) args=$#; echo err-line >&2; echo made > /root/made; \
         echo made > /usr/lkvm-made; echo built > built.txt; echo nine-p=$(grep -c \" 9p \" /proc/mounts); \
         {probe}; {hidden}; read line; echo got-$line; exit 7"
    );
    let shell = format!(
        "cd {} && exec {} sandbox -d sbx --rw . --landlock -k {} -m 256 -c 1 -p '{HOST_GUEST_PARAMS}' -- /bin/sh -c '{script}' zero ''",
        work.display(),
        lkvm(),
        guest().vmlinux.display()
    );
    let out = run_with_input("/bin/sh", &["-c", &shell], &env, b"typed-in\n", boot_timeout());

    assert_eq!(out.code, Some(7), "lkvm returns the command's status: {}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().collect();
    // `zero ''`: $0, and one empty argument that must arrive.
    let expected_lines = [
        "data-in-the-cwd",
        "out-6 args=1",
        "nine-p=1",
        "loopback-blocked",
        "proc-hidden",
        "home-hidden",
        "lan-blocked",
    ];
    for expected in expected_lines.into_iter().chain(["got-typed-in"]) {
        assert!(lines.contains(&expected), "want the line {expected:?} as printed (no \\r): {}", out.describe());
    }
    assert!(out.stderr.contains("err-line") && !out.stdout.contains("err-line"), "stderr apart: {}", out.describe());
    assert!(!out.stdout.contains("home-secret"), "{}", out.describe());
    let rootfs = home.join(".lkvm/sbx");
    assert!(!rootfs.join("root/made").exists() && !std::path::Path::new("/usr/lkvm-made").exists(), "in the overlay");
    assert_eq!(std::fs::read_to_string(work.join("built.txt")).unwrap(), "built\n", "--rw . writes through");

    // The first sandbox left a snapshot of a guest ready for a job; the next one starts from it
    // and still returns its command's output and status. (`host_loopback=on` reaching host
    // services is tests/net.rs's.)
    let cache = home.join(".cache/lkvm/sandbox");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1, "one warm snapshot");
    let warm_script = "cat data.txt; rm data.txt; echo warm-$((2+3)) >&2; echo warm > warm.txt; exit 5";
    let shell = format!(
        "cd {} && exec {} sandbox --rw . --loglevel info -d sbx -k {} -m 256 -c 1 -p '{HOST_GUEST_PARAMS}' -- /bin/sh -c '{warm_script}'",
        work.display(),
        lkvm(),
        guest().vmlinux.display()
    );
    let warm = run_command_env("/bin/sh", &["-c", &shell], &env, boot_timeout(), |_| {});
    assert_eq!(warm.code, Some(5), "{}", warm.describe());
    assert!(warm.stdout.contains("data-in-the-cwd") && warm.stderr.contains("warm-5"), "{}", warm.describe());
    assert!(warm.stderr.contains("restored the snapshot"), "no boot: {}", warm.describe());
    assert_eq!(std::fs::read_to_string(work.join("warm.txt")).unwrap(), "warm\n", "--rw after a restore");
    assert!(!work.join("data.txt").exists(), "--rw: the guest deletes host files too");
    assert!(host_service.accept().is_err(), "the sandbox reached the host's loopback");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1, "a restore adds no snapshot");
    let mut leftovers: Vec<_> =
        std::fs::read_dir(home.join(".lkvm")).unwrap().flatten().map(|e| e.file_name()).collect();
    leftovers.sort();
    assert_eq!(leftovers, ["sbx", "warm-sandbox.key"].map(std::ffi::OsString::from), "no sockets left");
    std::fs::remove_dir_all(home).unwrap();
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn a_directory_boots_as_the_9p_root_filesystem() {
    if !kvm_available("a_directory_boots_as_the_9p_root_filesystem") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let root = temp_dir();
    for dir in ["dev", "proc", "sys", "tmp", "sbin"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(&guest().init, root.join("sbin/init")).unwrap();
    write_file(&root, "written", &[0u8; 4096]);
    let params = format!("{HOST_GUEST_PARAMS} lkvm.write=/written:4096:6");
    let vmlinux = guest().vmlinux.to_str().unwrap();
    let args =
        ["run", "-k", vmlinux, "-d", root.to_str().unwrap(), "-m", "128", "-c", "1", "-n", "mode=none", "-p", &params];
    let out = run_lkvm(&args, None, boot_timeout());

    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("LKVM-DONE"), "its own /sbin/init ran: {}", out.describe());
    let cmdline = out.result("cmdline").unwrap();
    assert!(cmdline.contains("root=root rw") && cmdline.contains("rootfstype=9p"), "{cmdline}");
    assert_eq!(out.result("write:/written").as_deref(), Some("ok"), "{}", out.describe());
    assert_eq!(std::fs::read(root.join("written")).unwrap(), pattern(4096, 6), "the guest's write is in the host file");
    assert!(!root.join("virt").exists(), "lkvm left the directory as it was");
    std::fs::remove_dir_all(root).unwrap();
}
