//! End-to-end vsock: a Linux guest and host programs talking over virtio-vsock through lkvm's
//! UNIX sockets (Firecracker's protocol), many connections at once each way, with checksums.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::thread;
use std::time::Duration;

use common::*;

/// Bytes each connection carries each way: little, as where guest kernel code is emulated its
/// network stacks move 0.1-0.5 MB/s (4 MiB x 8 took minutes); running out of credit both ways
/// is covered by src/vsock's tests.
const LEN: usize = 64 << 10;
const CONNECTIONS: usize = 8;
const GUEST_PORT: u32 = 52;
const HOST_PORT: u32 = 5000;
/// Nobody listens on these.
const DEAD_GUEST_PORT: u32 = 53;
const DEAD_HOST_PORT: u32 = 5001;

/// Reads `stream` to its end: (length, FNV-1a).
fn drain(stream: &mut impl Read) -> (usize, u64) {
    let mut data = Vec::new();
    stream.read_to_end(&mut data).unwrap();
    (data.len(), fnv1a(&data))
}

/// The host program the guest connects to: answers each connection with `LEN HASH` of what
/// came.
fn host_listener(uds: &Path) {
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let (len, hash) = drain(&mut stream);
                let _ = stream.write_all(format!("{len} {hash:016x}\n").as_bytes());
            });
        }
    });
}

/// Once the guest listens: a CONNECT to a port nobody listens on, then CONNECTIONS at once to
/// its listener, each sending the pattern for its index and checking the guest's answer.
fn host_clients(uds: PathBuf, report: Sender<String>) {
    let connect = move |port: u32| {
        let mut stream = UnixStream::connect(&uds).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        reader.read_line(&mut line).unwrap();
        (stream, reader, line)
    };
    let (_, _, refused) = connect(DEAD_GUEST_PORT);
    report.send(format!("dead-port answer {refused:?}")).unwrap();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let connect = connect.clone();
            thread::spawn(move || {
                let (mut stream, mut reader, ok) = connect(GUEST_PORT);
                if !ok.starts_with("OK ") {
                    return format!("CONNECT answered {ok:?}");
                }
                let data = pattern(LEN, 100 + i as u64);
                stream.write_all(&data).unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
                let mut summary = String::new();
                reader.read_line(&mut summary).unwrap();
                let reply = drain(&mut reader);
                let expected = format!("{LEN} {:016x}\n", fnv1a(&data));
                if summary != expected {
                    return format!("guest saw {summary:?}, sent {expected:?}");
                }
                if reply != (LEN, fnv1a(&pattern(LEN, 7))) {
                    return format!("guest's reply: {reply:?}");
                }
                "ok".to_string()
            })
        })
        .collect();
    for client in clients {
        report.send(client.join().unwrap()).unwrap();
    }
}

#[test]
fn guest_and_host_programs_talk_over_vsock_both_ways() {
    if !kvm_available("guest_and_host_programs_talk_over_vsock_both_ways") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let guest = guest();
    let dir = temp_dir();
    let uds = dir.join("vsock");
    host_listener(&uds);
    // Run as root, lkvm runs the guest as nobody, as under sudo: the socket directory and the
    // listener are that user's own, and lkvm hands its vsock socket to that user.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        for path in [dir.clone(), PathBuf::from(format!("{}_{HOST_PORT}", uds.display()))] {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        }
    }
    let params = format!(
        "{HOST_GUEST_PARAMS} lkvm.vsockconnect={HOST_PORT}:{CONNECTIONS}:{LEN} lkvm.vsockconnect={DEAD_HOST_PORT}:1:16 \
         lkvm.vsocklisten={GUEST_PORT}:{CONNECTIONS}:{LEN}"
    );
    let vsock = format!("3,uds={}", uds.display());
    let (report, reports) = channel();
    let clients_uds = uds.clone();
    let mut args = vec![
        "run",
        "-k",
        guest.vmlinux.to_str().unwrap(),
        "-i",
        guest.initramfs.to_str().unwrap(),
        "-m",
        "128",
        "-c",
        "1",
        "-n",
        "mode=none",
        "--vsock",
        &vsock,
        "-p",
        &params,
    ];
    if root {
        args.extend(["--uid", "65534", "--gid", "65534"]);
    }
    let socket_owner = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let owner_seen = socket_owner.clone();
    let out = run_command(lkvm(), &args, None, boot_timeout(), move |line| {
        if line.contains("LKVM-RESULT vsock_listening=") {
            let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::symlink_metadata(&clients_uds).unwrap());
            owner_seen.store(owner, std::sync::atomic::Ordering::SeqCst);
            let (uds, report) = (clients_uds.clone(), report.clone());
            thread::spawn(move || host_clients(uds, report));
        }
    });
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // Guest to host: every connection's data arrived whole, and the host's answer came back.
    assert_eq!(out.result(&format!("vsockconnect:{HOST_PORT}")), Some(format!("{CONNECTIONS}/{CONNECTIONS}")));
    let dead = out.result(&format!("vsockconnect:{DEAD_HOST_PORT}")).unwrap_or_default();
    assert!(dead.starts_with("err:") && dead.contains("reset"), "no host listener: the guest is reset: {dead}");
    // Host to guest: refused for a port without a listener, then every connection both ways.
    assert_eq!(out.result("vsockserved"), Some(format!("{CONNECTIONS}/{CONNECTIONS}")), "{}", out.describe());
    let answers: Vec<String> = reports.try_iter().collect();
    assert_eq!(answers.first().map(String::as_str), Some("dead-port answer \"\""), "closed without OK");
    assert_eq!(answers[1..], vec!["ok".to_string(); CONNECTIONS], "{}", out.describe());
    assert!(!uds.exists(), "lkvm removes its socket when it ends");
    if root {
        // Handed over before the guest ran, so the user's own programs may connect.
        assert_eq!(socket_owner.load(std::sync::atomic::Ordering::SeqCst), 65534);
    }
    let _ = std::fs::remove_dir_all(dir);
}
