//! Firecracker's interface end to end, driven with a real HTTP client (curl) over the API's
//! UNIX socket: errors and pause/resume on a tiny payload guest, then one Linux boot configured
//! and driven entirely through the API.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// `firecracker`: a link to lkvm under Firecracker's name, as tools start it.
fn firecracker_link(dir: &Path) -> PathBuf {
    let link = dir.join("firecracker");
    if !link.exists() {
        std::os::unix::fs::symlink(lkvm(), &link).unwrap();
    }
    link
}

fn fault(reply: (u16, String), status: u16) -> String {
    assert_eq!(reply.0, status, "{}", reply.1);
    let value: serde_json::Value = serde_json::from_str(&reply.1).unwrap_or_else(|_| panic!("not JSON: {}", reply.1));
    value["fault_message"].as_str().unwrap_or_else(|| panic!("no fault_message: {}", reply.1)).to_string()
}

#[test]
fn command_line_errors_are_one_clear_line() {
    let dir = temp_dir();
    let fc = firecracker_link(&dir);
    let run = |args: &[&str]| Command::new(&fc).args(args).env("HOME", &dir).output().unwrap();
    let bogus = run(&["--bogus"]);
    let err = String::from_utf8_lossy(&bogus.stderr);
    assert_eq!(bogus.status.code(), Some(2), "{err}");
    assert!(err.contains("--bogus") && err.lines().count() == 1, "{err}");
    let no_api = run(&["--no-api"]);
    assert_eq!(no_api.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_api.stderr).contains("--no-api needs --config-file"));
    let bad_json = write_file(&dir, "bad.json", b"{\"boot-source\": ");
    let out = run(&["--no-api", "--config-file", bad_json.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("bad.json") && err.lines().count() == 1, "{err}");
    let unknown = write_file(&dir, "unknown.json", br#"{"boot-source": {"kernel_image_path": "/k"}, "gpus": []}"#);
    let err =
        String::from_utf8_lossy(&run(&["--no-api", "--config-file", unknown.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("unknown field `gpus`"), "{err}");
    let missing =
        write_file(&dir, "missing.json", br#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#);
    let err =
        String::from_utf8_lossy(&run(&["--no-api", "--config-file", missing.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    let filter = run(&["--seccomp-filter", "/tmp/filter.bpf"]);
    let err = String::from_utf8_lossy(&filter.stderr);
    assert!(filter.status.code() == Some(1) && err.contains("built in") && err.lines().count() == 1, "{err}");
    let version = run(&["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("Firecracker v"));
}

#[test]
fn api_errors_pause_resume_and_stop_on_a_payload_guest() {
    if !kvm_available("api_errors_pause_resume_and_stop_on_a_payload_guest") {
        return;
    }
    let dir = temp_dir();
    let sock = dir.join("fc.sock");
    let kernel = write_file(&dir, "ticker.bin", &ticker());
    // The log goes to a file: on stdout (Firecracker's default) it would mix with the guest's.
    let log = dir.join("fc.log");
    let args = [
        "--api-sock",
        sock.to_str().unwrap(),
        "--id",
        "fc-payload",
        "--show-level",
        "--log-path",
        log.to_str().unwrap(),
    ];
    let mut fc = spawn_counting(&firecracker_link(&dir), &args, &dir);
    wait_for("the API socket", Duration::from_secs(10), || sock.exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only its owner may drive the VM");
    // A client that connects and says nothing does not hold up the others.
    let idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();

    let (status, info) = curl(&sock, "GET", "/", None);
    assert!(status == 200 && info.contains("\"state\":\"Not started\"") && info.contains("fc-payload"), "{info}");
    assert!(curl(&sock, "GET", "/version", None).1.contains("firecracker_version"));
    // Wrong order, bad bodies, unknown paths and fields: 4xx with a reason, nothing started.
    assert!(fault(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), 400)
        .contains("without kernel configuration"));
    assert!(fault(curl(&sock, "PUT", "/boot-source", Some("{\"kernel_image_path\": ")), 400)
        .contains("deserializing the json body"));
    assert!(fault(curl(&sock, "PUT", "/boot-source", Some(r#"{"kernel": "/k"}"#)), 400).contains("unknown field"));
    assert!(fault(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1}"#)), 400).contains("mem_size_mib"));
    assert!(fault(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 99, "mem_size_mib": 32}"#)), 400)
        .contains("number of vCPUs"));
    assert!(fault(curl(&sock, "GET", "/no/such/thing", None), 400).contains("Invalid request"));
    assert!(fault(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)), 400)
        .contains("not supported before starting"));
    let big = format!("{{\"kernel_image_path\": \"{}\"}}", "x".repeat(60_000));
    assert!(fault(curl(&sock, "PUT", "/boot-source", Some(&big)), 400)
        .starts_with("Request payload with size 60025 is larger than the limit of 51200"));
    // As Firecracker, a drive whose file cannot be opened is refused when it is put.
    let drive = r#"{"drive_id": "d", "path_on_host": "/nonexistent/disk.img", "is_root_device": false}"#;
    assert!(fault(curl(&sock, "PUT", "/drives/d", Some(drive)), 400).contains("/nonexistent/disk.img"));
    // So is a kernel; one that opens but cannot be loaded (a directory) fails the start.
    assert!(fault(curl(&sock, "PUT", "/boot-source", Some(r#"{"kernel_image_path": "/nonexistent/kernel"}"#)), 400)
        .starts_with("Boot source error: The kernel file cannot be opened"));
    let unloadable = format!(r#"{{"kernel_image_path": "{}"}}"#, dir.display());
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&unloadable)).0, 204);
    assert!(fault(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), 400)
        .contains(dir.to_str().unwrap()));
    // The process survives a failed start; fix the config and start.
    let empty = write_file(&dir, "empty.img", &vec![0u8; 65536]);
    let limiter = r#"{"bandwidth": {"size": 1048576, "one_time_burst": 4096, "refill_time": 100}}"#;
    let drive = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false, "rate_limiter": {limiter}}}"#,
        empty.display()
    );
    let bad_limiter = drive.replace("refill_time", "refill_ms");
    assert!(fault(curl(&sock, "PUT", "/drives/d", Some(&bad_limiter)), 400).contains("unknown field"));
    assert_eq!(curl(&sock, "PUT", "/drives/d", Some(&drive)).0, 204);
    assert!(fault(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), 400)
        .contains(dir.to_str().unwrap()));
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 32}"#)).0, 204);
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    wait_for("guest output", Duration::from_secs(20), || fc.output.load(Ordering::SeqCst) > 0);

    // Started: pre-boot requests and a second start are refused, the VM is unaffected.
    assert!(fault(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), 400)
        .contains("not supported after starting"));
    assert!(fault(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#)), 400)
        .contains("not supported after starting"));
    assert!(fault(curl(&sock, "PUT", "/boot-source", Some(&boot)), 400).contains("not supported after starting"));
    assert!(fault(curl(&sock, "PATCH", "/drives/nope", Some(r#"{"drive_id": "nope", "path_on_host": "/x"}"#)), 400)
        .contains("Device not found"));
    // Firecracker's words, the path last: clients take it from there.
    let missing = r#"{"drive_id": "d", "path_on_host": "/nonexistent/new.img"}"#;
    assert!(fault(curl(&sock, "PATCH", "/drives/d", Some(missing)), 400).starts_with(
        "Drive config error: Unable to patch the block device: Block: Virtio backend error: Error manipulating the \
         backing file: No such file or directory (os error 2) /nonexistent/new.img"
    ));
    let config: serde_json::Value = serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["drives"][0]["path_on_host"], empty.to_str().unwrap(), "a failed swap keeps the old image");
    assert_eq!(config["drives"][0]["rate_limiter"]["bandwidth"]["one_time_burst"], 4096);
    // New limits while it runs.
    let ops_only = r#"{"drive_id": "d", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#;
    assert_eq!(curl(&sock, "PATCH", "/drives/d", Some(ops_only)).0, 204);
    let config: serde_json::Value = serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["drives"][0]["rate_limiter"]["ops"]["size"], 100, "{config}");
    assert_eq!(config["drives"][0]["rate_limiter"]["bandwidth"]["size"], 1048576, "kept: {config}");
    assert!(fault(curl(&sock, "PATCH", "/drives/d", Some(r#"{"drive_id": "d"}"#)), 400).contains("nothing to update"));

    // Pause stops the guest's output, resume continues it.
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert!(curl(&sock, "GET", "/", None).1.contains("\"state\":\"Paused\""));
    let paused_at = fc.output.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fc.output.load(Ordering::SeqCst), paused_at, "the guest printed while paused");
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    wait_for("output after resume", Duration::from_secs(20), || fc.output.load(Ordering::SeqCst) > paused_at);
    assert!(fault(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Sleeping"}"#)), 400)
        .contains("unknown variant `Sleeping`"));

    // One owner for the running VM: API pauses and resumes racing control-socket snapshots
    // are each answered (the VMM thread takes them one at a time), and the guest runs on.
    let racer = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let state = |i: usize| if i.is_multiple_of(2) { "Paused" } else { "Resumed" };
            (0..10)
                .map(|i| curl(&sock, "PATCH", "/vm", Some(&format!(r#"{{"state": "{}"}}"#, state(i)))).0)
                .collect::<Vec<u16>>()
        })
    };
    for i in 0..3 {
        let snapshot_dir = dir.join(format!("race-{i}"));
        let (code, _, err) = lkvm_ctl(&dir, &["snapshot", "-n", "fc-payload", snapshot_dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(racer.join().unwrap(), vec![204u16; 10]);
    let before = fc.output.load(Ordering::SeqCst);
    wait_for("output after the race", Duration::from_secs(20), || fc.output.load(Ordering::SeqCst) > before);

    // The control socket sees the API-started VM too.
    let (code, list, _) = lkvm_ctl(&dir, &["list"]);
    assert!(code == 0 && list.contains("fc-payload") && list.contains("running"), "{list}");
    assert_eq!(lkvm_ctl(&dir, &["stop", "-n", "fc-payload"]).0, 0);
    drop(idle);
    let status = fc.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "the API socket is removed when lkvm ends");
    // Firecracker's line format, `TIME [ID:THREAD:LEVEL] message`, and its words for a refusal.
    let log = std::fs::read_to_string(&log).unwrap();
    let refused = log.lines().find(|line| line.contains("not supported before starting")).expect(&log);
    let (time, rest) = refused.split_once(' ').unwrap();
    assert!(time.len() == 29 && time.as_bytes()[10] == b'T' && time.as_bytes()[19] == b'.', "{refused}");
    assert!(rest.starts_with("[fc-payload:fc_api:ERROR] Received Error. Status code: 400 Bad Request."), "{refused}");
    assert!(log.contains(":INFO] "), "Firecracker's default level is Info: {log}");
}

/// Firecracker's snapshot API on a payload guest: its rules and errors, and loads that carry on
/// (two at once, one resumed, one left paused until told).
#[test]
fn api_snapshot_create_and_load_follow_firecrackers_rules() {
    if !kvm_available("api_snapshot_create_and_load_follow_firecrackers_rules") {
        return;
    }
    let dir = temp_dir();
    let kernel = write_file(&dir, "ticker.bin", &ticker());
    let fc = firecracker_link(&dir);
    let start = |name: &str| {
        let (sock, log) = (dir.join(format!("{name}.sock")), dir.join(format!("{name}.log")));
        // Only the guest's output on stdout, where Firecracker also logs by default.
        let args = ["--api-sock", sock.to_str().unwrap(), "--id", name, "--log-path", log.to_str().unwrap()];
        let process = spawn_counting(&fc, &args, &dir);
        wait_for("the API socket", Duration::from_secs(10), || sock.exists());
        (sock, process)
    };
    let (sock, mut original) = start("original");
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#)).0, 204);
    let (state, memory) = (dir.join("vm.state"), dir.join("vm.mem"));
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": memory}).to_string();
    assert!(fault(curl(&sock, "PUT", "/snapshot/create", Some(&create)), 400).contains("not supported before starting"));
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    wait_for("guest output", Duration::from_secs(20), || original.output.load(Ordering::SeqCst) > 0);
    assert!(fault(curl(&sock, "PUT", "/snapshot/create", Some(&create)), 400).contains("unavailable while running"));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let diff = serde_json::json!({"snapshot_path": state, "mem_file_path": memory, "snapshot_type": "Diff"});
    assert!(fault(curl(&sock, "PUT", "/snapshot/create", Some(&diff.to_string())), 400).contains("Diff"));
    assert_eq!(curl(&sock, "PUT", "/snapshot/create", Some(&create)).0, 204);
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), 32 << 20);
    assert_eq!(lkvm_ctl(&dir, &["stop", "-n", "original"]).0, 0);
    assert_eq!(original.child.wait().unwrap().code(), Some(0));

    let load = |resume: bool| {
        serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": memory}, "resume_vm": resume})
            .to_string()
    };
    // Load only on a fresh process, and only what lkvm can load.
    let (sock, mut refused) = start("refused");
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#)).0, 204);
    assert!(fault(curl(&sock, "PUT", "/snapshot/load", Some(&load(true))), 400)
        .contains("after configuring boot-specific resources"));
    refused.child.kill().unwrap();
    let uffd = |path: &Path| {
        let backend = serde_json::json!({"backend_type": "Uffd", "backend_path": path});
        serde_json::json!({"snapshot_path": state, "mem_backend": backend, "resume_vm": true}).to_string()
    };
    let truncated = write_file(&dir, "truncated.state", &std::fs::read(&state).unwrap()[..100]);
    let short_memory = write_file(&dir, "short.mem", &[0u8; 4096]);
    let damaged_loads = [
        (uffd(Path::new("/x.sock")), "no page-fault handler listening"),
        (serde_json::json!({"snapshot_path": truncated, "mem_file_path": memory}).to_string(), "truncated"),
        (serde_json::json!({"snapshot_path": state, "mem_file_path": short_memory}).to_string(), "memory file"),
    ];
    // As Firecracker, a failed load answers, then ends the process: it is too dirty to go on.
    for (body, reason) in damaged_loads {
        let (sock, mut failed) = start("failed");
        let message = fault(curl(&sock, "PUT", "/snapshot/load", Some(&body)), 400);
        assert!(
            message.starts_with("Load snapshot error: Failed to restore from snapshot") && message.contains(reason)
        );
        assert_eq!(failed.child.wait().unwrap().code(), Some(1), "{message}");
        assert!(!sock.exists());
    }
    let (sock, damaged) = start("damaged");
    assert_eq!(curl(&sock, "PUT", "/snapshot/load", Some(&load(true))).0, 204);
    wait_for("the restored guest's output", Duration::from_secs(20), || damaged.output.load(Ordering::SeqCst) > 0);
    assert!(curl(&sock, "GET", "/", None).1.contains("\"state\":\"Running\""));
    let config: serde_json::Value = serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 32);
    assert!(
        fault(curl(&sock, "PUT", "/snapshot/load", Some(&load(true))), 400).contains("not supported after starting")
    );

    // A second clone at the same time, loaded paused: silent until resumed.
    let (paused_sock, paused) = start("paused");
    assert_eq!(curl(&paused_sock, "PUT", "/snapshot/load", Some(&load(false))).0, 204);
    assert!(curl(&paused_sock, "GET", "/", None).1.contains("\"state\":\"Paused\""));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(paused.output.load(Ordering::SeqCst), 0, "a clone loaded paused ran");
    assert_eq!(curl(&paused_sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    wait_for("output after resume", Duration::from_secs(20), || paused.output.load(Ordering::SeqCst) > 0);
    let running = damaged.output.load(Ordering::SeqCst);
    wait_for("the first clone still running", Duration::from_secs(20), || {
        damaged.output.load(Ordering::SeqCst) > running
    });
    // The Uffd backend: a page-fault handler (here, in this test) gets the userfaultfd and the
    // layout, as Firecracker's handlers do, and fills each page the guest or KVM touches.
    let handler_sock = dir.join("uffd.sock");
    let handler = PageFaultHandler::start(&handler_sock, &memory);
    let (uffd_sock, lazy) = start("lazy");
    assert_eq!(curl(&uffd_sock, "PUT", "/snapshot/load", Some(&uffd(&handler_sock))).0, 204);
    wait_for("the Uffd-restored guest's output", Duration::from_secs(20), || lazy.output.load(Ordering::SeqCst) > 0);
    assert!(handler.pages_served() > 0);
    for (name, mut clone) in [("damaged", damaged), ("paused", paused), ("lazy", lazy)] {
        assert_eq!(lkvm_ctl(&dir, &["stop", "-n", name]).0, 0);
        assert_eq!(clone.child.wait().unwrap().code(), Some(0));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A page-fault handler speaking Firecracker's Uffd protocol: it accepts one VMM, takes the
/// userfaultfd and the regions' layout (JSON) it sends, and copies each faulting page in from the
/// snapshot's memory file.
struct PageFaultHandler {
    served: Arc<std::sync::atomic::AtomicUsize>,
}

impl PageFaultHandler {
    fn start(socket: &Path, memory: &Path) -> PageFaultHandler {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        let memory = std::fs::read(memory).unwrap();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut layout = vec![0u8; 4096];
            let (len, uffd) = stream.recv_with_fd(&mut layout).unwrap();
            let uffd = uffd.expect("a userfaultfd");
            let regions: Vec<serde_json::Value> = serde_json::from_slice(&layout[..len]).unwrap();
            let region_of = |address: u64| {
                regions.iter().find_map(|r| {
                    let (base, size) = (r["base_host_virt_addr"].as_u64()?, r["size"].as_u64()?);
                    (base..base + size).contains(&address).then(|| (base, r["offset"].as_u64().unwrap()))
                })
            };
            loop {
                let mut poll = libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one pollfd that lives across the call.
                if unsafe { libc::poll(&mut poll, 1, -1) } < 0 || poll.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    return;
                }
                // struct uffd_msg: event (u8) at 0; for page faults, the address at 16.
                let mut message = [0u8; 32];
                // SAFETY: reads at most 32 bytes into the buffer.
                let n = unsafe { libc::read(uffd.as_raw_fd(), message.as_mut_ptr().cast(), message.len()) };
                if n <= 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                    return; // the VMM is gone
                }
                if n != 32 || u32::from(message[0]) != linux_raw_sys::general::UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let address = u64::from_le_bytes(message[16..24].try_into().unwrap()) & !4095;
                let Some((base, offset)) = region_of(address) else { continue };
                let source = &memory[(offset + address - base) as usize..][..4096];
                let mut copy = linux_raw_sys::general::uffdio_copy {
                    dst: address,
                    src: source.as_ptr() as u64,
                    len: 4096,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY of one page from our buffer into the registered range.
                unsafe { libc::ioctl(uffd.as_raw_fd(), linux_raw_sys::ioctl::UFFDIO_COPY as _, &mut copy) };
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        PageFaultHandler { served }
    }

    fn pages_served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// One Linux boot configured and driven through the API: what the guest sees (vCPUs, memory,
/// drives, cmdline), pause/resume, a drive swap the guest notices, the balloon through the API
/// and the control socket, NMI and SysRq, metrics and the log file, and SendCtrlAltDel ending
/// it.
#[test]
fn api_boots_linux_and_drives_it() {
    if !kvm_available("api_boots_linux_and_drives_it") {
        return;
    }
    let _one_at_a_time = multi_vcpu_boot_lock();
    // Guest user processes sometimes crash where guest kernel code is emulated (shared/GUEST.md);
    // a boot whose init died is tried once more, loudly. Any other failure fails at once.
    let first = std::panic::catch_unwind(drive_linux_through_the_api);
    if let Err(panic) = first {
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        if !message.contains("Attempted to kill init") {
            std::panic::resume_unwind(panic);
        }
        eprintln!("!!! RETRIED api_boots_linux_and_drives_it: the guest's init crashed on the first boot !!!");
        drive_linux_through_the_api();
    }
}

/// A tap set up as Firecracker's clients set theirs up: made, addressed and up; removed on drop.
struct ClientTap {
    name: &'static str,
}

impl ClientTap {
    fn new(name: &'static str, address: &str) -> ClientTap {
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip").args(args).status().expect("ip (iproute2) is installed");
            assert!(status.success(), "ip {args:?}");
        };
        let _ = std::process::Command::new("ip").args(["link", "del", name]).output();
        ip(&["tuntap", "add", name, "mode", "tap"]);
        ip(&["addr", "add", address, "dev", name]);
        ip(&["link", "set", name, "up"]);
        ClientTap { name }
    }

    /// Its IPv4 addresses, as `ip` shows them.
    fn addresses(&self) -> Vec<String> {
        let out =
            std::process::Command::new("ip").args(["-4", "-o", "addr", "show", "dev", self.name]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for ClientTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", self.name]).output();
    }
}

fn drive_linux_through_the_api() {
    let guest = guest();
    let dir = temp_dir();
    let sock = dir.join("fc.sock");
    let data = pattern(1 << 20, 1);
    let data_img = write_file(&dir, "data.img", &data);
    let old_media = write_file(&dir, "old.img", &pattern(1 << 20, 2));
    let new_data = pattern(2 << 20, 3);
    let new_media = write_file(&dir, "new.img", &new_data);
    let (metrics, log) = (dir.join("metrics.json"), dir.join("lkvm.log"));

    let fc = firecracker_link(&dir);
    let sock_arg = sock.to_str().unwrap().to_string();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = lines.clone();
    let home = dir.clone();
    let runner = std::thread::spawn(move || {
        let env = [("HOME", home.to_str().unwrap().to_string())];
        let args = ["--api-sock", &sock_arg, "--id", "fc-linux", "--enable-pci"];
        run_command_env(fc.to_str().unwrap(), &args, &env, boot_timeout(), move |line| {
            seen.lock().unwrap().push(line.to_string())
        })
    });
    wait_for("the API socket", Duration::from_secs(10), || sock.exists());
    // A tap the client set up with its own address: Firecracker leaves it as it is. Through it
    // the guest reads MMDS (V2), which answers in lkvm: nothing of it reaches the tap.
    // SAFETY: geteuid has no preconditions.
    let tap = (unsafe { libc::geteuid() } == 0).then(|| ClientTap::new("fcltap0", "10.77.0.1/24"));
    let mmds_args = match tap {
        Some(_) => "ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off lkvm.mmds=169.254.169.254",
        None => "",
    };
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd {HOST_GUEST_PARAMS} {mmds_args} \
         lkvm.read=/dev/vda:1048576 lkvm.balloon=600:16 lkvm.read=/dev/vdb:1048576 lkvm.swap=vdb:1048576:600 lkvm.cad=600"
    );
    let put = |path: &str, body: String| {
        let reply = curl(&sock, "PUT", path, Some(&body));
        assert_eq!(reply.0, 204, "PUT {path}: {}", reply.1);
    };
    put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": guest.vmlinux, "initrd_path": guest.initramfs, "boot_args": boot_args})
            .to_string(),
    );
    // One vCPU: Linux guests with two lose memory writes on nested hosts (../shared/GUEST.md).
    put("/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.into());
    put("/drives/data", serde_json::json!({"drive_id": "data", "path_on_host": data_img, "is_root_device": false, "is_read_only": true}).to_string());
    put("/drives/media", serde_json::json!({"drive_id": "media", "path_on_host": old_media, "is_root_device": false, "is_read_only": true}).to_string());
    put("/balloon", r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#.into());
    put("/entropy", "{}".into());
    if let Some(tap) = &tap {
        put("/network-interfaces/eth0", serde_json::json!({"iface_id": "eth0", "host_dev_name": tap.name}).to_string());
        put("/mmds/config", r#"{"version": "V2", "network_interfaces": ["eth0"]}"#.into());
        let document = r#"{"latest": {"meta-data": {"ami-id": "ami-0", "hostname": "vm1"}}}"#;
        put("/mmds", document.into());
        let patch = curl(&sock, "PATCH", "/mmds", Some(r#"{"latest": {"meta-data": {"ami-id": "ami-12345678"}}}"#));
        assert_eq!(patch.0, 204, "{}", patch.1);
        let (status, stored) = curl(&sock, "GET", "/mmds", None);
        assert!(status == 200 && stored.contains("ami-12345678") && stored.contains("vm1"), "{stored}");
    }
    put("/metrics", serde_json::json!({"metrics_path": metrics}).to_string());
    put("/logger", serde_json::json!({"log_path": log, "level": "Info"}).to_string());
    put("/actions", r#"{"action_type": "InstanceStart"}"#.into());

    let has = |key: &str| lines.lock().unwrap().iter().any(|l| l.contains(&format!("LKVM-RESULT {key}=")));
    let ticks = || lines.lock().unwrap().iter().filter(|l| l.starts_with("LKVM-TICK")).count();
    let phase = boot_timeout();
    // Waits for the guest, and says what happened if lkvm ended first.
    let wait_for = |what: &str, timeout: Duration, mut condition: Box<dyn FnMut() -> bool + '_>| {
        wait_for(what, timeout, || {
            if !condition() && runner.is_finished() {
                panic!("lkvm ended before {what}:\n{}", lines.lock().unwrap().join("\n"));
            }
            condition()
        })
    };

    // Balloon: through the API (statistics, target) and the control socket (stat), plus NMI
    // and SysRq on the API-started VM.
    wait_for("balloon_ready", phase, Box::new(|| has("balloon_ready")));
    if let Some(tap) = &tap {
        assert_eq!(tap.addresses(), ["10.77.0.1/24"], "lkvm changed the client's tap");
    }
    let pid: u32 = lkvm_ctl(&dir, &["list"])
        .1
        .lines()
        .find(|l| l.contains("fc-linux"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("listed");
    let rss_before = rss_kib(pid);
    let (status, stats) = curl(&sock, "GET", "/balloon/statistics", None);
    assert!(status == 200 && stats.contains("total_memory") && stats.contains("\"target_mib\":0"), "{stats}");
    assert_eq!(curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#)).0, 204);
    assert!(fault(curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 9999}"#)), 400).contains("larger than"));
    let stat = lkvm_ctl(&dir, &["stat", "-n", "fc-linux", "-m"]);
    assert!(stat.0 == 0 && stat.1.contains("free_memory"), "{}", stat.2);
    assert_eq!(lkvm_ctl(&dir, &["debug", "-n", "fc-linux", "-m", "0"]).0, 0);
    assert_eq!(lkvm_ctl(&dir, &["debug", "-n", "fc-linux", "-s", "h"]).0, 0);
    wait_for("memtotal_after_kb", phase, Box::new(|| has("memtotal_after_kb")));
    let rss_after = rss_kib(pid);

    // Pause stops the guest (no ticks), resume continues; then the drive swap.
    wait_for("swap_ready", phase, Box::new(|| has("swap_ready")));
    wait_for("ticks", phase, Box::new(|| ticks() > 0));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let paused_ticks = ticks();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ticks(), paused_ticks, "the guest ran while paused");
    assert!(curl(&sock, "GET", "/", None).1.contains("Paused"));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    wait_for("ticks after resume", phase, Box::new(|| ticks() > paused_ticks));
    let swap = serde_json::json!({"drive_id": "media", "path_on_host": new_media}).to_string();
    assert_eq!(curl(&sock, "PATCH", "/drives/media", Some(&swap)).0, 204);

    wait_for("cad_ready", phase, Box::new(|| has("cad_ready")));
    // A snapshot here (PCI, every device in use) is restored below, after this VM ends.
    let (state, memory) = (dir.join("vm.state"), dir.join("vm.mem"));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": memory}).to_string();
    assert_eq!(curl(&sock, "PUT", "/snapshot/create", Some(&create)).0, 204);
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#)).0, 204);
    let config: serde_json::Value = serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["drives"][1]["path_on_host"], new_media.to_str().unwrap());
    assert_eq!(config["balloon"]["amount_mib"], 16);
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);

    let out = runner.join().unwrap();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("LKVM-DONE"), "{}", out.describe());
    assert_eq!(out.result("cpus").as_deref(), Some("1"));
    let mem_kb: u64 = out.result("memtotal_kb").unwrap().parse().unwrap();
    assert!((128 * 1024 * 8 / 10..=128 * 1024).contains(&mem_kb), "MemTotal {mem_kb} kB for 128 MiB");
    let cmdline = out.result("cmdline").unwrap();
    assert!(cmdline.starts_with("console=ttyS0 reboot=k") && !cmdline.contains("root="), "{cmdline}");
    assert_eq!(out.result("read:/dev/vda"), Some(format!("{:016x}", fnv1a(&data))), "{}", out.describe());
    // The guest saw the swapped drive's size and contents.
    assert_eq!(out.result("swap_ready").as_deref(), Some("1048576"));
    assert_eq!(out.result("read:/dev/vdb"), Some(format!("{:016x}", fnv1a(&pattern(1 << 20, 2)))), "before the swap");
    assert_eq!(out.result("swap_size").as_deref(), Some("2097152"), "{}", out.describe());
    assert_eq!(out.result("swap_read"), Some(format!("{:016x}", fnv1a(&new_data[..1 << 20]))));
    // Ctrl+Alt+Del reached the guest's keyboard driver as interrupts, and it rebooted.
    assert!(out.result("keyboard").unwrap().contains("AT"), "{}", out.describe());
    let cad_irqs: u32 = out.result("cad_irqs").unwrap().parse().unwrap();
    assert!(cad_irqs >= 1, "{}", out.describe());
    // Balloon: the guest gave back what the API asked, and lkvm's memory shrank.
    let before: u64 = out.result("balloon_ready").unwrap().parse().unwrap();
    let after: u64 = out.result("memtotal_after_kb").unwrap().parse().unwrap();
    assert!(before - after >= 15 * 1024, "MemTotal {before} -> {after} kB after a 16 MiB balloon");
    assert!(rss_before.saturating_sub(rss_after) >= 8 * 1024, "lkvm RSS {rss_before} -> {rss_after} KiB");
    assert!(out.stdout.contains("NMI received"), "{}", out.describe());
    assert!(out.stdout.contains("sysrq: HELP"), "{}", out.describe());
    if tap.is_some() {
        // MMDS V2 from the guest: no token, no answer; with one, IMDS text and JSON.
        assert_eq!(out.result("mmds_no_token").as_deref(), Some("401"), "{}", out.describe());
        assert_eq!(out.result("mmds_token").as_deref(), Some("200"), "{}", out.describe());
        assert_eq!(out.result("mmds_keys").as_deref(), Some("ami-id,hostname"), "{}", out.describe());
        assert_eq!(out.result("mmds_json").as_deref(), Some("\"ami-12345678\""), "{}", out.describe());
    }
    // Metrics and the log went to their files.
    let metrics = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["api_server"]["requests"].as_u64().unwrap() > 10 && last["vmm"]["pause_count"] == 2, "{metrics}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("boot marker 1 (value 0x7b)"), "{log}");
    restore_the_snapshot_and_press_ctrl_alt_del(&dir, &state, &memory, &new_media);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Loads the Linux guest's snapshot in a fresh process: the guest carries on where it was
/// (waiting for Ctrl+Alt+Del, with the swapped drive and the balloon target it had).
fn restore_the_snapshot_and_press_ctrl_alt_del(dir: &Path, state: &Path, memory: &Path, media: &Path) {
    let sock = dir.join("restored.sock");
    let (fc, sock_arg, home) = (firecracker_link(dir), sock.to_str().unwrap().to_string(), dir.to_path_buf());
    let runner = std::thread::spawn(move || {
        let env = [("HOME", home.to_str().unwrap().to_string())];
        let args = ["--api-sock", &sock_arg, "--id", "fc-restored"];
        run_command_env(fc.to_str().unwrap(), &args, &env, boot_timeout(), |_| {})
    });
    wait_for("the API socket", Duration::from_secs(10), || sock.exists());
    let load = serde_json::json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true}).to_string();
    assert_eq!(curl(&sock, "PUT", "/snapshot/load", Some(&load)).0, 204);
    let config: serde_json::Value = serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["drives"][1]["path_on_host"], media.to_str().unwrap());
    assert_eq!(config["balloon"]["amount_mib"], 16);
    assert_eq!(config["machine-config"]["vcpu_count"], 1);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The MMDS configuration came back; its document, as in Firecracker, is the host's to
        // put again.
        assert_eq!(config["mmds-config"]["version"], "V2", "{config}");
    }
    let (status, stats) = curl(&sock, "GET", "/balloon/statistics", None);
    assert!(status == 200 && stats.contains("\"target_mib\":16"), "the balloon driver answers: {stats}");
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
    let out = runner.join().unwrap();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let cad_irqs: u32 = out.result("cad_irqs").unwrap_or_default().parse().unwrap_or(0);
    assert!(cad_irqs >= 1 && out.stdout.contains("LKVM-DONE"), "{}", out.describe());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `lkvm run --api-sock`: a VM the kvmtool command line started, driven through the API too.
#[test]
fn lkvm_run_serves_the_api_for_its_vm() {
    if !kvm_available("lkvm_run_serves_the_api_for_its_vm") {
        return;
    }
    let dir = temp_dir();
    let sock = dir.join("run.sock");
    let kernel = write_file(&dir, "ticker.bin", &ticker());
    let disk = write_file(&dir, "disk.img", &vec![0u8; 65536]);
    let args = [
        "run",
        "-k",
        kernel.to_str().unwrap(),
        "-m",
        "32",
        "-c",
        "1",
        "-n",
        "mode=none",
        "-d",
        disk.to_str().unwrap(),
        "--name",
        "kvmtool-api",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    let mut vm = spawn_counting(Path::new(lkvm()), &args, &dir);
    wait_for("guest output", Duration::from_secs(20), || vm.output.load(Ordering::SeqCst) > 0);
    assert!(curl(&sock, "GET", "/", None).1.contains("\"state\":\"Running\""));
    let config: serde_json::Value = serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["boot-source"]["kernel_image_path"], kernel.to_str().unwrap());
    assert_eq!(config["drives"][0]["drive_id"], "lkvm-disk0");
    assert!(fault(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 32}"#)), 400)
        .contains("not supported after starting"));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert!(lkvm_ctl(&dir, &["list"]).1.contains("paused"));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    let bigger = write_file(&dir, "bigger.img", &vec![0u8; 131072]);
    let swap = format!(r#"{{"drive_id": "lkvm-disk0", "path_on_host": "{}"}}"#, bigger.display());
    assert_eq!(curl(&sock, "PATCH", "/drives/lkvm-disk0", Some(&swap)).0, 204);
    assert_eq!(lkvm_ctl(&dir, &["stop", "-n", "kvmtool-api"]).0, 0);
    assert_eq!(vm.child.wait().unwrap().code(), Some(0));
    assert!(!sock.exists());
}
