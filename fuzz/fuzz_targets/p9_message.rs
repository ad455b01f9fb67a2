//! Feeds fuzzed 9P messages to a share (lkvm's confinement checks, then the p9 server) over a
//! temporary directory with a deep tree, after a version and attach, or (the first byte's bit
//! 1) after replaying a fuzzed session as a snapshot's restore replays one (its fids by path and
//! open flags, then the messages can use them). Then checks that nothing
//! outside the share changed (its entries, and the secret file's bytes, mode, owner and
//! mtime), that no reply carried the secret's bytes, and that a read-only share is as it was:
//! a confinement failure is a crash.
#![no_main]

mod p9_world;

use libfuzzer_sys::fuzz_target;
use lkvm::config::ShareSpec;
use lkvm::devices::virtio::p9::P9State;
use lkvm::share::Share;
use p9_world::*;

fuzz_target!(|input: &[u8]| {
    let dirs = dirs();
    let Some((&read_only, mut rest)) = input.split_first() else { return };
    let spec = ShareSpec { read_only: read_only & 1 == 1, ..ShareSpec::new(&dirs.share, "fuzz").unwrap() };
    let mut share = Share::open(&spec).unwrap();
    let before = spec.read_only.then(|| fingerprint(&dirs.share));
    let mut sink = Vec::new();
    let mut version = message(100, &[0, 0, 1, 0, 8, 0, b'9', b'P', b'2', b'0', b'0', b'0', b'.', b'L']);
    share.handle(&mut version, &mut sink).unwrap();
    let mut attach = message(104, &[0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0]);
    share.handle(&mut attach, &mut sink).unwrap();
    if read_only & 2 != 0 {
        // A session from a state file: its length, then its bytes.
        let Some((len, tail)) = rest.split_first_chunk::<2>() else { return };
        let (encoded, tail) = tail.split_at(usize::from(u16::from_le_bytes(*len)).min(tail.len()));
        if let Ok(P9State { session: Some(session) }) = lkvm::devices::state::decode(encoded) {
            share.resume_session(&session);
        }
        rest = tail;
    }
    // The input is a sequence of messages, each starting with its little-endian size.
    while rest.len() >= 4 {
        let size = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (request, tail) = rest.split_at(size.clamp(4, rest.len()));
        let mut request = request.to_vec();
        rest = tail;
        sink.clear();
        let _ = share.handle(&mut request, &mut sink);
        assert!(!leaks_secret(&sink), "a reply carried the outside file's bytes");
    }
    check_outside(dirs);
    if let Some(before) = before {
        assert_eq!(fingerprint(&dirs.share), before, "the read-only share changed");
    }
});
