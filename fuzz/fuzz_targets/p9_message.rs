//! Feeds fuzzed 9P messages to a share (lkvm's confinement checks, then the p9 server) over a
//! temporary directory, after a version and attach; then checks that nothing outside the
//! share changed: a confinement failure is a crash.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lkvm::share::{Share, ShareSpec};

struct Dirs {
    share: PathBuf,
    outside: PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("lkvm-fuzz-9p-{}", std::process::id()));
        let (share, outside) = (base.join("share"), base.join("outside"));
        std::fs::create_dir_all(share.join("dir")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        std::fs::write(share.join("file"), b"file contents").unwrap();
        let _ = std::os::unix::fs::symlink("../outside", share.join("up"));
        let _ = std::os::unix::fs::symlink(outside.join("secret"), share.join("abs"));
        Dirs { share, outside }
    })
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = ((body.len() + 7) as u32).to_le_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(body);
    m
}

fuzz_target!(|input: &[u8]| {
    let dirs = dirs();
    let Some((&read_only, mut rest)) = input.split_first() else { return };
    let spec = ShareSpec { path: dirs.share.clone(), tag: "fuzz".into(), read_only: read_only & 1 == 1 };
    let mut share = Share::open(&spec).unwrap();
    let mut sink = Vec::new();
    let mut version = message(100, &[0, 0, 1, 0, 8, 0, b'9', b'P', b'2', b'0', b'0', b'0', b'.', b'L']);
    share.handle(&mut version, &mut sink).unwrap();
    let mut attach = message(104, &[0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0]);
    share.handle(&mut attach, &mut sink).unwrap();
    // The input is a sequence of messages, each starting with its little-endian size.
    while rest.len() >= 4 {
        let size = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (request, tail) = rest.split_at(size.clamp(4, rest.len()));
        let mut request = request.to_vec();
        rest = tail;
        sink.clear();
        let _ = share.handle(&mut request, &mut sink);
    }
    let outside: Vec<_> = std::fs::read_dir(&dirs.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside.len(), 1, "something appeared outside the share: {outside:?}");
    assert_eq!(std::fs::read(dirs.outside.join("secret")).unwrap(), b"secret");
    let beside = std::fs::read_dir(dirs.share.parent().unwrap()).unwrap().count();
    assert_eq!(beside, 2, "something appeared beside the share");
});
