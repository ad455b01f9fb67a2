//! End-to-end: Kata Containers' Firecracker driver, replayed call by call against lkvm (as
//! shared/FLEETS.md reads it from Kata's fc.go): `--version`, the jailer (daemonized, as root,
//! in a network namespace with a tap) starting lkvm under Firecracker's name with a config file,
//! the pid file, `GET /` until Running, the vCPU threads by name, the logger and metrics FIFOs,
//! the agent reached with `CONNECT 1024` on the hybrid vsock socket, a drive swapped onto an
//! empty placeholder, SIGTERM. Daemonized, lkvm's console goes nowhere: the guest's results come
//! over vsock from its agent port. vsock itself is checked on the way: many connections each way
//! at once, with checksums, and ports nobody listens on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Bytes each vsock connection carries each way: little, as where guest kernel code is emulated
/// its network stacks move 0.1-0.5 MB/s; running out of credit both ways is covered by
/// src/vsock's tests.
const LEN: usize = 64 << 10;
const CONNECTIONS: usize = 8;
const AGENT_PORT: u32 = 1024;
const GUEST_PORT: u32 = 52;
const HOST_PORT: u32 = 5000;
/// Nobody listens on these.
const DEAD_GUEST_PORT: u32 = 53;
const DEAD_HOST_PORT: u32 = 5001;
/// What Kata puts on the guest's command line (shared/FLEETS.md).
const KATA_PARAMS: &str = "pci=off reboot=k panic=1 iommu=off net.ifnames=0 random.trust_cpu=on acpi=off \
                           8250.nr_uarts=0 agent.log_vport=1025";

/// Reads `stream` to its end: (length, FNV-1a).
fn drain(stream: &mut impl Read) -> (usize, u64) {
    let mut data = Vec::new();
    stream.read_to_end(&mut data).unwrap();
    (data.len(), fnv1a(&data))
}

/// Kata's agent dial: `CONNECT port` on the hybrid vsock socket, a reply line with `OK`.
fn connect(uds: &Path, port: u32) -> Option<(UnixStream, BufReader<UnixStream>)> {
    let mut stream = UnixStream::connect(uds).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    line.contains("OK").then_some((stream, reader))
}

/// The guest's results so far, from its agent port: `key=value` lines.
fn agent_results(uds: &Path) -> Option<Vec<String>> {
    let (_, mut reader) = connect(uds, AGENT_PORT)?;
    let mut text = String::new();
    reader.read_to_string(&mut text).ok()?;
    Some(text.lines().map(str::to_string).collect())
}

/// Asks the agent once a second (each ask is a connection the emulated guest kernel must
/// serve: asking faster slows the guest's other work) until its results have `key`.
fn wait_for_result(uds: &Path, key: &str, alive: impl Fn() -> bool) -> Vec<String> {
    let deadline = Instant::now() + boot_timeout();
    loop {
        if let Some(results) = agent_results(uds).filter(|r| value(r, key).is_some()) {
            return results;
        }
        assert!(alive(), "lkvm ended before the guest's {key}");
        assert!(Instant::now() < deadline, "timed out waiting for the guest's {key}");
        thread::sleep(Duration::from_secs(1));
    }
}

fn value<'a>(results: &'a [String], key: &str) -> Option<&'a str> {
    results.iter().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The host program the guest connects to: answers each connection with `LEN HASH` of what
/// came.
fn host_listener(path: PathBuf) {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let (len, hash) = drain(&mut stream);
                let _ = stream.write_all(format!("{len} {hash:016x}\n").as_bytes());
            });
        }
    });
}

/// CONNECTIONS at once to the guest's listener, each sending the pattern for its index and
/// checking the guest's answer: "ok" or what went wrong, per connection.
fn host_clients(uds: &Path) -> Vec<String> {
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let uds = uds.to_path_buf();
            thread::spawn(move || {
                let Some((mut stream, mut reader)) = connect(&uds, GUEST_PORT) else {
                    return "CONNECT not answered OK".to_string();
                };
                let data = pattern(LEN, 100 + i as u64);
                stream.write_all(&data).unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
                let mut summary = String::new();
                reader.read_line(&mut summary).unwrap();
                let expected = format!("{LEN} {:016x}\n", fnv1a(&data));
                if summary != expected {
                    return format!("guest saw {summary:?}, sent {expected:?}");
                }
                match drain(&mut reader) {
                    reply if reply == (LEN, fnv1a(&pattern(LEN, 7))) => "ok".to_string(),
                    reply => format!("guest's reply: {reply:?}"),
                }
            })
        })
        .collect();
    clients.into_iter().map(|c| c.join().unwrap()).collect()
}

/// A FIFO lkvm writes to (Kata's logger and metrics); its lines, as a reader collects them.
fn fifo_reader(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (path, collected) = (path.to_path_buf(), lines.clone());
    thread::spawn(move || {
        let fifo = std::fs::File::open(path).unwrap();
        for line in BufReader::new(fifo).lines().map_while(Result::ok) {
            collected.lock().unwrap().push(line);
        }
    });
    lines
}

/// A network namespace with a tap in it, as Kata's network setup leaves them; removed on drop.
struct Netns(String);

impl Netns {
    fn with_tap(name: String, tap: &str) -> Netns {
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip (iproute2) is installed");
            assert!(status.success(), "ip {args:?}");
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", &name, "link", "set", tap, "up"]);
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn kata_starts_lkvm_through_the_jailer_and_reaches_its_agent_over_vsock() {
    if !kvm_available("kata_starts_lkvm_through_the_jailer_and_reaches_its_agent_over_vsock") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED kata_starts_lkvm_through_the_jailer...: the jailer needs root !!!");
        return;
    }
    let _one_at_a_time = boot_lock();
    let guest = guest();
    let dir = temp_dir();
    // Kata's binaries: the VMM named firecracker (the jailer copies it into the jail, so it
    // must be a file, and a static one) and the jailer.
    let firecracker = dir.join("firecracker");
    std::fs::copy(lkvm(), &firecracker).unwrap();
    let jailer = dir.join("jailer");
    std::os::unix::fs::symlink(lkvm(), &jailer).unwrap();

    // `--version`: the second field of the first line, a semver of at least 0.21.1.
    let version = Command::new(&firecracker).arg("--version").output().unwrap();
    let first_line = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or_default().to_string();
    let semver = first_line.split_whitespace().nth(1).unwrap_or_default().trim_start_matches('v').to_string();
    let parts: Vec<u32> = semver.split('.').filter_map(|p| p.parse().ok()).collect();
    assert!(parts.len() == 3 && parts >= vec![0, 21, 1], "Kata cannot parse {first_line:?}");

    // The jail's root as Kata fills it before the jailer runs: kernel, image, config, FIFOs.
    let id = format!("kata-{}", std::process::id());
    let base = dir.join("vc");
    let root = base.join("firecracker").join(&id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&guest.vmlinux, root.join("vmlinux")).unwrap();
    std::fs::copy(&guest.initramfs, root.join("initramfs.cpio")).unwrap();
    write_file(&root, "rootfs", &pattern(1 << 20, 1));
    write_file(&root, "drive_0", b"");
    let swapped = pattern(2 << 20, 3);
    write_file(&root, "container.img", &swapped);
    let log = fifo_reader(&root.join("logs.fifo"));
    let metrics = fifo_reader(&root.join("metrics.fifo"));
    let uds = root.join("kata.hvsock");
    host_listener(PathBuf::from(format!("{}_{HOST_PORT}", uds.display())));
    let netns = Netns::with_tap(format!("lkvm-kata-{}", std::process::id()), "tap0");
    let boot_args = format!(
        "{KATA_PARAMS} {HOST_GUEST_PARAMS} lkvm.vsockconnect={HOST_PORT}:{CONNECTIONS}:{LEN} \
         lkvm.vsockconnect={DEAD_HOST_PORT}:1:16 lkvm.agent={AGENT_PORT} \
         lkvm.vsocklisten={GUEST_PORT}:{CONNECTIONS}:{LEN} lkvm.swap=vdb:{}:600 lkvm.hold=900",
        swapped.len()
    );
    let limiter = serde_json::json!({});
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": "/vmlinux", "initrd_path": "/initramfs.cpio", "boot_args": boot_args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "smt": false},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": "/rootfs", "is_root_device": false, "is_read_only": true},
            {"drive_id": "drive_0", "path_on_host": "/drive_0", "is_root_device": false, "is_read_only": false,
             "cache_type": "Unsafe"},
        ],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:fc:00:00:00:05",
                                "rx_rate_limiter": limiter, "tx_rate_limiter": limiter}],
        "vsock": {"guest_cid": 3, "uds_path": "/kata.hvsock", "vsock_id": "root"},
        "logger": {"log_path": "/logs.fifo", "level": "Debug"},
        "metrics": {"metrics_path": "/metrics.fifo"},
    });
    write_file(&root, "fcConfig.json", config.to_string().as_bytes());

    let netns_path = netns.path();
    let args = [
        "--id",
        &id,
        "--exec-file",
        firecracker.to_str().unwrap(),
        "--uid",
        "0",
        "--gid",
        "0",
        "--chroot-base-dir",
        base.to_str().unwrap(),
        "--daemonize",
        "--netns",
        netns_path.to_str().unwrap(),
        "--",
        "--config-file",
        "/fcConfig.json",
    ];
    // The jailer becomes lkvm (no new PID namespace); until it detaches, its errors come here.
    let mut jailed = Command::new(&jailer).args(args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut jailer_errors = String::new();
    jailed.stderr.take().unwrap().read_to_string(&mut jailer_errors).unwrap();
    let describe = || format!("jailer: {jailer_errors}\nlkvm's log:\n{}", log.lock().unwrap().join("\n"));
    let jailed = Mutex::new(jailed);
    // Kata's liveness check, kill(pid, 0), on a child this test must also reap.
    let alive = || jailed.lock().unwrap().try_wait().unwrap().is_none();

    // The pid file, then `GET /` every 10 ms for 10 s until Running (the config file started it).
    let pid_file = root.join("firecracker.pid");
    wait_for("the pid file", Duration::from_secs(10), || pid_file.exists() || !alive());
    assert!(alive(), "{}", describe());
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(pid, jailed.lock().unwrap().id(), "the jailer execs the VMM in its own process");
    let api = root.join("run/firecracker.socket");
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let reply = api.exists().then(|| curl(&api, "GET", "/", None));
        if let Some((200, body)) = &reply {
            if body.contains("\"state\":\"Running\"") {
                break body.clone();
            }
        }
        assert!(Instant::now() < deadline && alive(), "not Running: {reply:?}\n{}", describe());
        thread::sleep(Duration::from_millis(10));
    };
    let info: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!((info["app_name"].as_str(), info["id"].as_str()), (Some("Firecracker"), Some(id.as_str())));
    // Kata chmods the vsock socket right after: it exists by then.
    std::fs::set_permissions(&uds, std::fs::Permissions::from_mode(0o640)).unwrap();

    // Jailed: its root is the jail, in the netns, daemonized; its vCPU threads named as Kata
    // looks for them.
    let proc = PathBuf::from(format!("/proc/{pid}"));
    assert_eq!(std::fs::read_link(proc.join("root")).unwrap(), Path::new("/"), "a root of its own");
    let namespace = |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    assert_eq!(namespace(&proc.join("ns/net")), namespace(&netns_path), "in the network namespace given");
    assert_eq!(std::fs::read_link(proc.join("fd/0")).unwrap(), Path::new("/dev/null"), "daemonized");
    let comms: Vec<String> = std::fs::read_dir(proc.join("task"))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string())
        .collect();
    assert!(comms.iter().any(|c| c == "fc_vcpu 0"), "no vCPU thread named as Kata finds it: {comms:?}");

    // The agent: Kata redials until it answers. The guest has run its guest-to-host checks.
    let results = wait_for_result(&uds, "agent", alive);
    assert_eq!(value(&results, "cpus"), Some("1"), "{results:?}");
    assert_eq!(value(&results, &format!("vsockconnect:{HOST_PORT}")), Some(&*format!("{CONNECTIONS}/{CONNECTIONS}")));
    let dead = value(&results, &format!("vsockconnect:{DEAD_HOST_PORT}")).unwrap_or_default();
    assert!(dead.starts_with("err:") && dead.contains("reset"), "no host listener: the guest is reset: {dead}");

    // Host to guest: refused for a port without a listener, then every connection both ways.
    assert!(connect(&uds, DEAD_GUEST_PORT).is_none(), "a port nobody listens on is not OK");
    wait_for_result(&uds, "vsock_listening", alive);
    assert_eq!(host_clients(&uds), vec!["ok".to_string(); CONNECTIONS], "{}", describe());

    // Block "hotplug": a real image onto the empty placeholder; the guest sees its new size.
    wait_for_result(&uds, "swap_ready", alive);
    let patch = serde_json::json!({"drive_id": "drive_0", "path_on_host": "/container.img"}).to_string();
    let reply = curl(&api, "PATCH", "/drives/drive_0", Some(&patch));
    assert_eq!(reply.0, 204, "PATCH /drives/drive_0: {}", reply.1);
    let swapped_results = wait_for_result(&uds, "swap_read", alive);
    assert_eq!(value(&swapped_results, "swap_size"), Some(&*swapped.len().to_string()));
    assert_eq!(value(&swapped_results, "swap_read"), Some(&*format!("{:016x}", fnv1a(&swapped))));

    // Metrics: each line a Firecracker metrics JSON object (FlushMetrics writes one now).
    let flush = curl(&api, "PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#));
    assert_eq!(flush.0, 204, "{}", flush.1);
    wait_for("a metrics line", Duration::from_secs(10), || !metrics.lock().unwrap().is_empty());
    for line in metrics.lock().unwrap().iter() {
        let metric: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(metric["utc_timestamp_ms"].is_u64(), "{line}");
    }

    // SIGTERM ends it within Kata's 15 s.
    // SAFETY: a signal to the process the pid file names, which this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    wait_for("lkvm to end on SIGTERM", Duration::from_secs(15), || !alive());
    drop(netns);
    let _ = std::fs::remove_dir_all(dir);
}

/// `--new-pid-ns`: the VMM is the first process of a PID namespace of its own; the pid file
/// names it as the host sees it, and SIGTERM still ends it (a namespace's first process only
/// gets the signals it handles).
#[test]
fn the_jailer_starts_the_vmm_in_a_new_pid_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED the_jailer_starts_the_vmm_in_a_new_pid_namespace: the jailer needs root !!!");
        return;
    }
    let dir = temp_dir();
    let firecracker = dir.join("firecracker");
    std::fs::copy(lkvm(), &firecracker).unwrap();
    let base = dir.join("jails");
    let id = format!("pidns-{}", std::process::id());
    let args = ["jailer", "--id", &id, "--exec-file", firecracker.to_str().unwrap(), "--uid", "0", "--gid", "0"];
    let jailer = Command::new(lkvm())
        .args(args)
        .args(["--chroot-base-dir", base.to_str().unwrap(), "--new-pid-ns", "--daemonize"])
        .output()
        .unwrap();
    assert!(jailer.status.success(), "{}", String::from_utf8_lossy(&jailer.stderr));
    let root = base.join("firecracker").join(&id).join("root");
    let pid_file = root.join("firecracker.pid");
    wait_for("the pid file", Duration::from_secs(10), || pid_file.exists());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ns_pids = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap().split_whitespace().count();
    assert_eq!(ns_pids, 2, "in a PID namespace of its own: {status}");
    let api = root.join("run/firecracker.socket");
    wait_for("the API socket", Duration::from_secs(10), || api.exists());
    let (code, info) = curl(&api, "GET", "/", None);
    assert!(code == 200 && info.contains(&id) && info.contains("Not started"), "{info}");
    // SAFETY: a signal to the process the pid file names, which this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let gone = || !Path::new(&format!("/proc/{pid}")).exists();
    wait_for("lkvm to end on SIGTERM", Duration::from_secs(15), gone);
    let _ = std::fs::remove_dir_all(dir);
}
