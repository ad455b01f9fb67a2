//! Feeds fuzzed FUSE requests to a virtio-fs share (lkvm's checks, then fuse-backend-rs's
//! passthrough server) over a temporary directory holding links out of it, after FUSE_INIT;
//! then checks that nothing outside the share changed and no reply carried its secret: a
//! confinement failure is a crash. With the first byte's bit 1, the requests come as a guest's
//! driver lays them out instead (a fuzzed ring and buffers in a small guest memory, served by
//! the device's queue path), and the replies in guest memory are checked.
#![no_main]

mod common;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use fuse_backend_rs::transport::{FuseDevWriter, Writer};
use libfuzzer_sys::fuzz_target;
use lkvm::config::FsSpec;
use lkvm::share::virtiofs::{FsShare, MAX_REQUEST};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const SECRET: &[u8] = b"outside-secret";
const FUSE_INIT: u32 = 26;

struct Setup {
    share: PathBuf,
    outside: PathBuf,
    /// Writable and read-only servers over the share.
    servers: [Arc<FsShare>; 2],
    /// Replies are also committed here.
    sink: std::fs::File,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("lkvm-fuzz-fuse-{}", std::process::id()));
        let (share, outside) = (base.join("share"), base.join("outside"));
        std::fs::create_dir_all(share.join("dir")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), SECRET).unwrap();
        std::fs::write(share.join("file"), b"file contents").unwrap();
        std::os::unix::fs::symlink("../outside", share.join("up")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), share.join("abs")).unwrap();
        let servers = [false, true].map(|read_only| {
            Arc::new(FsShare::open(&FsSpec { path: share.clone(), tag: "fuzz".into(), read_only }).unwrap())
        });
        let sink = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        Setup { share, outside, servers, sink }
    })
}

fn serve(share: &FsShare, sink: &std::fs::File, request: &mut [u8], reply: &mut [u8]) -> usize {
    let writer = FuseDevWriter::<()>::new(sink.as_raw_fd(), reply).unwrap();
    share.handle(request, Writer::from(writer))
}

fn holds_secret(bytes: &[u8]) -> bool {
    bytes.windows(SECRET.len()).any(|w| w == SECRET)
}

fn init_request() -> Vec<u8> {
    let mut m = Vec::new();
    for word in [64u32, FUSE_INIT] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    m.extend_from_slice(&[0; 32]); // unique, nodeid, uid, gid, pid, padding
    for word in [7u32, 31, 1 << 20, 0] {
        m.extend_from_slice(&word.to_le_bytes()); // major, minor, max_readahead, flags
    }
    m
}

fuzz_target!(|input: &[u8]| {
    let setup = setup();
    let Some((&mode, mut rest)) = input.split_first() else { return };
    let share = &setup.servers[usize::from(mode & 1)];
    let mut reply = vec![0u8; MAX_REQUEST];
    serve(share, &setup.sink, &mut init_request(), &mut reply);
    if mode & 2 != 0 {
        // The fuzzer may learn the secret from the check itself: it must come from the share.
        let Some((config, data)) = rest.split_first_chunk::<8>().filter(|_| !holds_secret(rest)) else { return };
        let Some((mem, queue)) = common::setup(config, data) else { return };
        let _ = lkvm::devices::virtio::fs::serve_available(&queue, &mem, Arc::new(common::NoInterrupt), share.clone());
        let mut memory = vec![0u8; common::MEM_SIZE];
        mem.read_slice(&mut memory, GuestAddress(0)).unwrap();
        assert!(!holds_secret(&memory), "a reply in guest memory carried the outside secret");
        rest = &[];
    }
    // A sequence of requests, each as long as its header's len field says (clamped).
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (request, tail) = rest.split_at(len.clamp(4, rest.len()));
        rest = tail;
        let written = serve(share, &setup.sink, &mut request.to_vec(), &mut reply);
        let sent = &reply[..written.min(reply.len())];
        assert!(!holds_secret(sent), "a reply carried the outside secret");
    }
    let outside: Vec<_> = std::fs::read_dir(&setup.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside.len(), 1, "something appeared outside the share: {outside:?}");
    assert_eq!(std::fs::read(setup.outside.join("secret")).unwrap(), SECRET);
    let beside = std::fs::read_dir(setup.share.parent().unwrap()).unwrap().count();
    assert_eq!(beside, 2, "something appeared beside the share");
});
