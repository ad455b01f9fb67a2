//! The server driven with hand-built T-messages against a temporary directory, as the Linux
//! client would send them, and every way out of the share a guest could try.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

const RVERSION: u8 = 101;
const TREAD: u8 = 116;
const TREADDIR: u8 = 40;
const TSTATFS: u8 = 8;
const TFSYNC: u8 = 50;
const TREADLINK: u8 = 22;
const TLOCK: u8 = 52;
const ROOT: u32 = 0;
const P9_RDWR: u32 = 2;
const P9_TRUNC: u32 = 0o1000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("lkvm-share-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("share")).unwrap();
        fs::create_dir_all(path.join("outside")).unwrap();
        fs::write(path.join("outside/secret"), b"host secret").unwrap();
        TempDir(path)
    }
    fn share(&self) -> PathBuf {
        self.0.join("share")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Encodes message fields the way the Linux client does.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn u8(mut self, v: u8) -> Msg {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Msg {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Msg {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn s(mut self, v: &str) -> Msg {
        self.0.extend_from_slice(&(v.len() as u16).to_le_bytes());
        self.0.extend_from_slice(v.as_bytes());
        self
    }
    fn names(mut self, names: &[&str]) -> Msg {
        self.0.extend_from_slice(&(names.len() as u16).to_le_bytes());
        names.iter().fold(self, |m, n| m.s(n))
    }
}

struct Client {
    share: Share,
}

/// A reply: its type and body, or the errno of an Rlerror.
type Reply = Result<(u8, Vec<u8>), u32>;

impl Client {
    fn attach(dir: &Path, read_only: bool) -> Client {
        let spec = ShareSpec { read_only, ..ShareSpec::new(dir, "t").unwrap() };
        let mut client = Client { share: Share::open(&spec).unwrap() };
        let (kind, body) = client.call(TVERSION, Msg::default().u32(65536).s("9P2000.L")).unwrap();
        assert_eq!(kind, RVERSION);
        assert_eq!(&body[6..], b"9P2000.L");
        client.call(TATTACH, Msg::default().u32(ROOT).u32(!0).s("root").s("").u32(0)).unwrap();
        client
    }

    fn call(&mut self, kind: u8, body: Msg) -> Reply {
        let mut message = ((body.0.len() + 7) as u32).to_le_bytes().to_vec();
        message.push(kind);
        message.extend_from_slice(&1u16.to_le_bytes());
        message.extend_from_slice(&body.0);
        let mut reply = Vec::new();
        self.share.handle(&mut message, &mut reply).unwrap();
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize, reply.len());
        assert_eq!(&reply[5..7], &1u16.to_le_bytes(), "tag echoed");
        if reply[4] == RLERROR {
            return Err(u32::from_le_bytes(reply[7..11].try_into().unwrap()));
        }
        assert_eq!(reply[4], kind + 1);
        Ok((reply[4], reply[7..].to_vec()))
    }

    fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> Reply {
        self.call(TWALK, Msg::default().u32(fid).u32(newfid).names(names))
    }
    fn lopen(&mut self, fid: u32, flags: u32) -> Reply {
        self.call(TLOPEN, Msg::default().u32(fid).u32(flags))
    }
    fn lcreate(&mut self, fid: u32, name: &str, mode: u32) -> Reply {
        self.call(TLCREATE, Msg::default().u32(fid).s(name).u32(P9_RDWR).u32(mode).u32(0))
    }
    fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Reply {
        let mut msg = Msg::default().u32(fid).u64(offset).u32(data.len() as u32);
        msg.0.extend_from_slice(data);
        self.call(TWRITE, msg)
    }
    fn read(&mut self, fid: u32, offset: u64, count: u32) -> Vec<u8> {
        let (_, body) = self.call(TREAD, Msg::default().u32(fid).u64(offset).u32(count)).unwrap();
        body[4..].to_vec()
    }
    fn mkdir(&mut self, dfid: u32, name: &str, mode: u32) -> Reply {
        self.call(TMKDIR, Msg::default().u32(dfid).s(name).u32(mode).u32(0))
    }
    fn renameat(&mut self, old: &str, new: &str) -> Reply {
        self.call(TRENAMEAT, Msg::default().u32(ROOT).s(old).u32(ROOT).s(new))
    }
    fn unlinkat(&mut self, name: &str) -> Reply {
        self.call(TUNLINKAT, Msg::default().u32(ROOT).s(name).u32(0))
    }
    fn link(&mut self, fid: u32, name: &str) -> Reply {
        self.call(TLINK, Msg::default().u32(ROOT).u32(fid).s(name))
    }
    fn symlink(&mut self, name: &str, target: &str) -> Reply {
        self.symlink_in(ROOT, name, target)
    }
    fn symlink_in(&mut self, dfid: u32, name: &str, target: &str) -> Reply {
        self.call(TSYMLINK, Msg::default().u32(dfid).s(name).s(target).u32(0))
    }
    fn mknod(&mut self, dfid: u32, name: &str, mode: u32) -> Reply {
        self.call(TMKNOD, Msg::default().u32(dfid).s(name).u32(mode).u32(8).u32(0).u32(0))
    }
    fn set_mode(&mut self, fid: u32, mode: u32) -> Reply {
        let msg = Msg::default().u32(fid).u32(P9_SETATTR_MODE).u32(mode).u32(0).u32(0);
        self.call(TSETATTR, msg.u64(0).u64(0).u64(0).u64(0).u64(0))
    }
    fn set_size(&mut self, fid: u32, size: u64) -> Reply {
        let msg = Msg::default().u32(fid).u32(8).u32(0).u32(0).u32(0);
        self.call(TSETATTR, msg.u64(size).u64(0).u64(0).u64(0).u64(0))
    }
    fn size(&mut self, fid: u32) -> u64 {
        let (_, body) = self.call(TGETATTR, Msg::default().u32(fid).u64(P9_GETATTR_BASIC)).unwrap();
        // valid[8] qid[13] mode[4] uid[4] gid[4] nlink[8] rdev[8] size[8]
        u64::from_le_bytes(body[49..57].try_into().unwrap())
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn serves_the_operations_the_linux_client_uses() {
    let dir = TempDir::new("ops");
    let share = dir.share();
    fs::write(share.join("hello"), b"hello from the host").unwrap();
    symlink("hello", share.join("alias")).unwrap();
    let mut c = Client::attach(&share, false);

    c.walk(ROOT, 1, &["hello"]).unwrap();
    c.lopen(1, 0).unwrap();
    assert_eq!(c.read(1, 6, 100), b"from the host");
    assert_eq!(c.size(1), 19);

    c.walk(ROOT, 2, &[]).unwrap();
    c.lcreate(2, "new", 0o644).unwrap();
    let (_, written) = c.write(2, 0, b"guest data").unwrap();
    assert_eq!(written, 10u32.to_le_bytes());
    c.call(TFSYNC, Msg::default().u32(2).u32(0)).unwrap();
    c.call(TLOCK, Msg::default().u32(2).u8(1).u32(0).u64(0).u64(0).u32(1).s("guest")).unwrap();
    c.set_size(2, 5).unwrap();
    assert_eq!(fs::read(share.join("new")).unwrap(), b"guest");

    c.mkdir(ROOT, "sub", 0o755).unwrap();
    c.renameat("new", "renamed").unwrap();
    c.walk(ROOT, 3, &["renamed"]).unwrap();
    c.link(3, "hardlink").unwrap();
    c.call(TRENAMEAT, Msg::default().u32(ROOT).s("hardlink").u32(ROOT).s("moved")).unwrap();
    c.walk(ROOT, 4, &["sub"]).unwrap();
    c.call(TRENAMEAT, Msg::default().u32(ROOT).s("moved").u32(4).s("inside")).unwrap();
    assert_eq!(fs::read(share.join("sub/inside")).unwrap(), b"guest");
    c.unlinkat("renamed").unwrap();
    assert!(!share.join("renamed").exists() && !share.join("new").exists());

    c.walk(ROOT, 5, &["alias"]).unwrap();
    let (_, target) = c.call(TREADLINK, Msg::default().u32(5)).unwrap();
    assert_eq!(&target[2..], b"hello");

    c.walk(ROOT, 6, &[]).unwrap();
    c.lopen(6, 0o200000).unwrap(); // O_DIRECTORY
    let (_, entries) = c.call(TREADDIR, Msg::default().u32(6).u64(0).u32(8192)).unwrap();
    let listing = String::from_utf8_lossy(&entries);
    assert!(["hello", "alias", "sub"].iter().all(|n| listing.contains(n)), "{listing}");
    let (_, statfs) = c.call(TSTATFS, Msg::default().u32(ROOT)).unwrap();
    assert!(u32::from_le_bytes(statfs[4..8].try_into().unwrap()) > 0, "block size");
    c.call(TCLUNK, Msg::default().u32(6)).unwrap();
    assert_eq!(c.call(TCLUNK, Msg::default().u32(6)), Err(libc::EBADF as u32));
}

#[test]
fn names_cannot_leave_the_share() {
    let dir = TempDir::new("escape");
    let share = dir.share();
    let outside = dir.0.join("outside");
    fs::write(share.join("file"), b"inside").unwrap();
    fs::create_dir(share.join("d")).unwrap();
    let mut c = Client::attach(&share, false);
    let eacces = Err(libc::EACCES as u32);

    assert_eq!(c.walk(ROOT, 1, &[".."]), eacces);
    assert_eq!(c.walk(ROOT, 1, &["d", "..", ".."]), eacces);
    assert_eq!(c.walk(ROOT, 1, &["../outside/secret"]), eacces);
    assert_eq!(c.walk(ROOT, 1, &["."]), eacces);
    assert_eq!(c.walk(ROOT, 1, &[""]), eacces);
    c.walk(ROOT, 2, &["d"]).unwrap();
    assert_eq!(c.lcreate(2, "../../outside/planted", 0o644), eacces);
    assert_eq!(c.mkdir(ROOT, "../planted", 0o755), eacces);
    assert_eq!(c.renameat("file", "../stolen"), eacces);
    assert_eq!(c.renameat("../outside/secret", "stolen"), eacces);
    assert_eq!(c.unlinkat("../outside/secret"), eacces);
    assert_eq!(c.unlinkat(".."), eacces);
    c.walk(ROOT, 3, &["file"]).unwrap();
    assert_eq!(c.link(3, "../linked"), eacces);
    assert_eq!(c.call(TRENAMEAT, Msg::default().u32(ROOT).s("d").u32(ROOT).s("..")), eacces);
    let names: Vec<_> = fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "nothing appeared beside the share: {names:?}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
}

#[test]
fn symlinks_are_never_followed_out_of_the_share() {
    let dir = TempDir::new("symlinks");
    let share = dir.share();
    let outside = dir.0.join("outside");
    symlink(outside.join("secret"), share.join("absolute")).unwrap();
    symlink("../outside/secret", share.join("relative")).unwrap();
    symlink("../outside", share.join("dirlink")).unwrap();
    symlink("/", share.join("root")).unwrap();
    let mut c = Client::attach(&share, false);

    for (fid, link) in [(1, "absolute"), (2, "relative")] {
        c.walk(ROOT, fid, &[link]).unwrap();
        assert_eq!(c.lopen(fid, 0), Err(libc::ELOOP as u32), "open through {link}");
        assert_eq!(c.lopen(fid, P9_RDWR | P9_TRUNC), Err(libc::ELOOP as u32));
        assert!(c.set_size(fid, 0).is_err());
    }
    // A walk through a symlinked directory stops at the link: no fid inside its target.
    let (_, qids) = c.walk(ROOT, 3, &["dirlink", "secret"]).unwrap();
    assert_eq!(qids[..2], 1u16.to_le_bytes(), "only the link itself was walked");
    assert_eq!(c.call(TGETATTR, Msg::default().u32(3).u64(P9_GETATTR_BASIC)), Err(libc::EBADF as u32));
    let (_, qids) = c.walk(ROOT, 4, &["root", "etc"]).unwrap();
    assert_eq!(qids[..2], 1u16.to_le_bytes());
    assert_eq!(c.call(TGETATTR, Msg::default().u32(4).u64(P9_GETATTR_BASIC)), Err(libc::EBADF as u32));
    // Names created at the link's parent land in the share, not in its target.
    c.walk(ROOT, 5, &["dirlink"]).unwrap();
    assert!(c.lcreate(5, "planted", 0o644).is_err());
    assert!(c.mkdir(5, "planted", 0o755).is_err());
    assert!(c.lcreate(ROOT, "absolute", 0o644).is_err(), "O_EXCL does not follow the link");
    // Symlinks the guest makes are stored, and no more followed than the host's.
    c.symlink("mine", "/etc").unwrap();
    c.symlink("up", "../outside").unwrap();
    assert_eq!(fs::read_link(share.join("up")).unwrap(), Path::new("../outside"));
    c.walk(ROOT, 6, &["mine"]).unwrap();
    assert_eq!(c.lopen(6, 0), Err(libc::ELOOP as u32));
    let (_, qids) = c.walk(ROOT, 7, &["up", "secret"]).unwrap();
    assert_eq!(qids[..2], 1u16.to_le_bytes());
    c.walk(ROOT, 8, &["up"]).unwrap();
    assert!(c.symlink_in(8, "planted", "x").is_err(), "a symlink is no directory to create in");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
}

#[test]
fn symlinks_and_fifos_are_made_where_the_guest_says() {
    let dir = TempDir::new("nodes");
    let share = dir.share();
    fs::create_dir_all(share.join("a/b")).unwrap();
    let mut c = Client::attach(&share, false);
    c.walk(ROOT, 1, &["a", "b"]).unwrap();
    let (kind, qid) = c.symlink_in(1, "link", "../target").unwrap();
    assert_eq!((kind, qid[0]), (TSYMLINK + 1, 0x02));
    assert_eq!(fs::read_link(share.join("a/b/link")).unwrap(), Path::new("../target"));
    // After the guest renames a directory, its fids inside follow it.
    c.renameat("a", "moved").unwrap();
    c.symlink_in(1, "after", "/etc/passwd").unwrap();
    assert_eq!(fs::read_link(share.join("moved/b/after")).unwrap(), Path::new("/etc/passwd"));
    // A fid made by lcreate names the new file, which is no directory.
    c.walk(ROOT, 2, &["moved"]).unwrap();
    c.lcreate(2, "file", 0o644).unwrap();
    assert_eq!(c.symlink_in(2, "x", "y"), Err(libc::ENOTDIR as u32));
    c.mknod(1, "fifo", libc::S_IFIFO | 0o4644).unwrap();
    let meta = fs::symlink_metadata(share.join("moved/b/fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o6000, 0, "no set-id bits");
    // Device nodes would give host users the devices: refused.
    assert_eq!(c.mknod(1, "disk", libc::S_IFBLK | 0o666), Err(libc::EPERM as u32));
    assert_eq!(c.mknod(1, "mem", libc::S_IFCHR | 0o666), Err(libc::EPERM as u32));
    assert_eq!(c.symlink_in(99, "x", "y"), Err(libc::EBADF as u32), "an unknown fid");
    c.call(TCLUNK, Msg::default().u32(1)).unwrap();
    assert_eq!(c.symlink_in(1, "x", "y"), Err(libc::EBADF as u32), "a clunked fid");
}

#[test]
fn host_devices_cannot_be_opened_and_fifos_do_not_block() {
    let dir = TempDir::new("devices");
    let share = dir.share();
    let null = CString::new(share.join("null").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; makes a node like /dev/null (needs root).
    let have_node = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;
    let mut c = Client::attach(&share, false);
    if have_node {
        c.walk(ROOT, 1, &["null"]).unwrap();
        assert_eq!(c.lopen(1, 0), Err(libc::EPERM as u32), "a host device node");
        assert_eq!(c.set_size(1, 0), Err(libc::EPERM as u32), "truncating opens it");
        assert_eq!(c.set_mode(1, 0o666), Err(libc::EPERM as u32));
        // A walk whose reply did not fit the guest's buffer still made the fid: still refused.
        let mut walk = Msg::default().u32(ROOT).u32(4).names(&["null"]).0;
        let mut message = ((walk.len() + 7) as u32).to_le_bytes().to_vec();
        message.extend_from_slice(&[TWALK, 1, 0]);
        message.append(&mut walk);
        assert!(c.share.handle(&mut message, &mut &mut [0u8; 1][..]).is_err(), "no room for the reply");
        assert_eq!(c.lopen(4, 0), Err(libc::EPERM as u32));
        // Even when the path it was walked by now names something else.
        c.unlinkat("null").unwrap();
        c.walk(ROOT, 5, &[]).unwrap();
        c.lcreate(5, "null", 0o644).unwrap();
        assert_eq!(c.lopen(1, 0), Err(libc::EPERM as u32), "the fid still holds the device");
    } else {
        eprintln!("!!! host_devices_cannot_be_opened: not root, no device node to try !!!");
    }
    c.mknod(ROOT, "fifo", libc::S_IFIFO | 0o644).unwrap();
    c.walk(ROOT, 2, &["fifo"]).unwrap();
    c.lopen(2, 0).unwrap(); // would block forever without a writer if opened blocking
    c.walk(ROOT, 3, &[]).unwrap();
    c.lopen(3, 0o200000).unwrap(); // directories still open
}

#[test]
fn a_read_only_share_refuses_every_write() {
    let dir = TempDir::new("ro");
    let share = dir.share();
    fs::write(share.join("file"), b"keep me").unwrap();
    fs::create_dir(share.join("d")).unwrap();
    let mut c = Client::attach(&share, true);
    let erofs = Err(libc::EROFS as u32);

    c.walk(ROOT, 1, &["file"]).unwrap();
    assert_eq!(c.lopen(1, P9_RDWR), erofs);
    assert_eq!(c.lopen(1, 1), erofs);
    assert_eq!(c.lopen(1, P9_TRUNC), erofs);
    assert_eq!(c.set_size(1, 0), erofs);
    assert_eq!(c.set_mode(1, 0o777), erofs);
    assert_eq!(c.link(1, "again"), erofs);
    assert_eq!(c.lcreate(ROOT, "new", 0o644), erofs);
    assert_eq!(c.mkdir(ROOT, "new", 0o755), erofs);
    assert_eq!(c.renameat("file", "moved"), erofs);
    assert_eq!(c.unlinkat("file"), erofs);
    assert_eq!(c.unlinkat("d"), erofs);
    assert_eq!(c.symlink("s", "file"), erofs);
    assert_eq!(c.mknod(ROOT, "fifo", libc::S_IFIFO | 0o644), erofs);
    c.lopen(1, 0).unwrap();
    assert_eq!(c.write(1, 0, b"overwrite"), erofs);
    assert_eq!(c.read(1, 0, 100), b"keep me");
    assert_eq!(fs::read(share.join("file")).unwrap(), b"keep me");
    assert_eq!(fs::read_dir(&share).unwrap().count(), 2);
}

#[test]
fn the_guest_cannot_plant_set_id_programs() {
    let dir = TempDir::new("setid");
    let share = dir.share();
    let mut c = Client::attach(&share, false);
    c.walk(ROOT, 1, &[]).unwrap();
    c.lcreate(1, "tool", 0o4755).unwrap();
    assert_eq!(mode_of(&share.join("tool")) & 0o6000, 0);
    c.set_mode(1, 0o6755).unwrap();
    assert_eq!(mode_of(&share.join("tool")), 0o755);
    c.mkdir(ROOT, "group", 0o775).unwrap();
    c.walk(ROOT, 2, &["group"]).unwrap();
    c.set_mode(2, 0o2775).unwrap();
    assert_eq!(mode_of(&share.join("group")), 0o775, "chmod g+s on a directory is cleared too");
}

#[test]
fn writing_a_set_id_file_clears_the_bits_and_owners_do_not_change() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("setid-write");
    let share = dir.share();
    for name in ["tool", "truncated"] {
        fs::write(share.join(name), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(share.join(name), fs::Permissions::from_mode(0o6755)).unwrap();
    }
    let mut c = Client::attach(&share, false);
    c.walk(ROOT, 1, &["tool"]).unwrap();
    c.lopen(1, P9_RDWR).unwrap();
    c.write(1, 0, b"#!/bin/sh\nid\n").unwrap();
    assert_eq!(mode_of(&share.join("tool")), 0o755, "written: no longer set-id");
    c.walk(ROOT, 2, &["truncated"]).unwrap();
    c.set_size(2, 0).unwrap();
    assert_eq!(mode_of(&share.join("truncated")), 0o755, "truncated: no longer set-id");
    fs::set_permissions(share.join("truncated"), fs::Permissions::from_mode(0o4755)).unwrap();
    c.walk(ROOT, 3, &["truncated"]).unwrap();
    c.lopen(3, P9_RDWR | P9_TRUNC).unwrap();
    assert_eq!(mode_of(&share.join("truncated")), 0o755, "opened with O_TRUNC: no longer set-id");

    let meta = fs::metadata(share.join("tool")).unwrap();
    let chown = |c: &mut Client, valid: u32, uid: u32, gid: u32| {
        let msg = Msg::default().u32(1).u32(valid).u32(0).u32(uid).u32(gid);
        c.call(TSETATTR, msg.u64(0).u64(0).u64(0).u64(0).u64(0))
    };
    assert_eq!(chown(&mut c, P9_SETATTR_UID, 4242, 0), Err(libc::EPERM as u32));
    assert_eq!(chown(&mut c, P9_SETATTR_GID, 0, 4242), Err(libc::EPERM as u32));
    assert!(chown(&mut c, P9_SETATTR_UID | P9_SETATTR_GID, meta.uid(), meta.gid()).is_ok(), "a no-op chown");
    let after = fs::metadata(share.join("tool")).unwrap();
    assert_eq!((after.uid(), after.gid()), (meta.uid(), meta.gid()));
}

#[test]
fn malformed_messages_get_errors() {
    let dir = TempDir::new("malformed");
    let mut c = Client::attach(&dir.share(), false);
    // A walk that promises more names than it carries, an unknown type, a truncated header.
    assert!(c.call(TWALK, Msg::default().u32(ROOT).u32(1).names(&["a"]).u8(2)).is_err(), "trailing garbage");
    let two_names_promised = Msg::default().u32(ROOT).u32(1).u8(2).u8(0).s("a");
    assert!(c.call(TWALK, two_names_promised).is_err());
    assert!(c.call(TWALK, Msg::default().u32(ROOT).u32(1).u8(5).u8(0).s("a")).is_err());
    let mut reply = Vec::new();
    let mut unknown = vec![7, 0, 0, 0, 250, 1, 0];
    assert!(c.share.handle(&mut unknown, &mut reply).is_err() || reply.get(4) == Some(&RLERROR));
    let mut short = vec![3, 0];
    let mut reply = Vec::new();
    assert!(c.share.handle(&mut short, &mut reply).is_err() || reply.get(4) == Some(&RLERROR));
}

#[test]
fn share_options() {
    let spec = ShareSpec::parse("/tmp,hosttmp,ro").unwrap();
    assert_eq!((spec.path.as_path(), spec.tag.as_str(), spec.read_only), (Path::new("/tmp"), "hosttmp", true));
    assert!(!ShareSpec::parse("/tmp,t").unwrap().read_only);
    assert!(ShareSpec::parse("/tmp").unwrap_err().contains("needs a mount tag"));
    assert!(ShareSpec::parse("/tmp,").unwrap_err().contains("1 to 255"));
    assert!(ShareSpec::parse("/tmp,t,rw").unwrap_err().contains("unknown option 'rw'"));
    assert!(Share::open(&ShareSpec::new("/nonexistent", "t").unwrap())
        .err()
        .unwrap()
        .to_string()
        .contains("No such file"));
    assert!(Share::open(&ShareSpec::new("/etc/hostname", "t").unwrap())
        .err()
        .unwrap()
        .to_string()
        .contains("not a directory"));
}

#[test]
fn a_saved_session_reopens_its_fids_by_path_on_a_new_server() {
    let dir = TempDir::new("session");
    let share = dir.share();
    fs::create_dir_all(share.join("a/b")).unwrap();
    fs::write(share.join("a/b/data"), b"0123456789").unwrap();
    fs::write(share.join("gone"), b"x").unwrap();
    let mut c = Client::attach(&share, false);
    c.walk(ROOT, 1, &["a", "b", "data"]).unwrap();
    c.lopen(1, P9_RDWR | P9_TRUNC).unwrap();
    c.write(1, 0, b"written").unwrap();
    c.walk(ROOT, 2, &["a"]).unwrap();
    c.lcreate(2, "new", 0o644).unwrap();
    c.write(2, 0, b"created").unwrap();
    c.walk(ROOT, 3, &["gone"]).unwrap();
    let session = c.share.session().expect("a session");
    fs::remove_file(share.join("gone")).unwrap();
    fs::write(share.join("a/b/data"), b"kept by the host").unwrap();

    let spec = ShareSpec::new(&share, "t").unwrap();
    let mut restored = Client { share: Share::open(&spec).unwrap() };
    restored.share.resume_session(&session);
    // Reopened with their flags but without O_TRUNC/O_CREAT again: the data is still there.
    assert_eq!(restored.read(1, 0, 64), b"kept by the host");
    assert_eq!(restored.read(2, 0, 64), b"created");
    restored.write(1, 0, b"KEPT").unwrap();
    assert_eq!(fs::read(share.join("a/b/data")).unwrap(), b"KEPT by the host", "reopened for writing");
    // A session naming a path out of the share (a crafted snapshot) gets no fid.
    let outside = Session { msize: 65536, fids: vec![(9, PathBuf::from("../outside/secret"), Some(0))] };
    restored.share.resume_session(&outside);
    assert_eq!(restored.call(TGETATTR, Msg::default().u32(9).u64(P9_GETATTR_BASIC)), Err(libc::EBADF as u32));
    // A fid whose file was deleted meanwhile is unknown to the new server.
    assert_eq!(restored.call(TGETATTR, Msg::default().u32(3).u64(P9_GETATTR_BASIC)), Err(libc::EBADF as u32));
    assert_eq!(fs::read(share.join("a/new")).unwrap(), b"created");
}

#[test]
fn a_guest_that_never_clunks_gets_errors_not_lkvms_descriptors() {
    let dir = TempDir::new("fids");
    let share = dir.share();
    fs::create_dir(share.join("d")).unwrap();
    let mut c = Client::attach(&share, false);
    let full = c.share.max_fids as u32;
    assert!(full <= MAX_FIDS as u32);
    for fid in 1..full {
        c.walk(ROOT, fid, &["d"]).unwrap();
    }
    assert_eq!(c.walk(ROOT, full, &["d"]), Err(libc::EMFILE as u32), "one fid too many");
    assert_eq!(c.call(TATTACH, Msg::default().u32(full).u32(!0).s("root").s("").u32(0)), Err(libc::EMFILE as u32));
    c.call(TCLUNK, Msg::default().u32(1)).unwrap();
    c.walk(ROOT, full, &["d"]).expect("room again after a clunk");
    // Paths longer than the host's PATH_MAX are refused before anything is copied.
    let long = "x".repeat(255);
    let names: Vec<&str> = std::iter::repeat_n(long.as_str(), 16).collect();
    c.call(TCLUNK, Msg::default().u32(2)).unwrap();
    assert_eq!(c.walk(full, 2, &names), Err(libc::ENAMETOOLONG as u32), "from d/");
}

#[test]
fn a_view_reaches_its_paths_and_their_ancestors_never_secrets_or_the_rest() {
    let dir = TempDir::new("view");
    let share = dir.share();
    for path in ["usr/bin", "work/project/src", "work/other", "home/me"] {
        fs::create_dir_all(share.join(path)).unwrap();
    }
    fs::write(share.join("home/me/secret"), b"s").unwrap();
    let view = vec![share.join("usr"), share.join("work/project")];
    let spec = ShareSpec { read_only: true, view, ..ShareSpec::new(&share, "t").unwrap() };
    let mut c = Client { share: Share::open(&spec).unwrap() };
    c.call(TVERSION, Msg::default().u32(65536).s("9P2000.L")).unwrap();
    c.call(TATTACH, Msg::default().u32(ROOT).u32(!0).s("root").s("").u32(0)).unwrap();
    c.walk(ROOT, 1, &["usr", "bin"]).expect("inside the view");
    c.walk(ROOT, 2, &["work"]).expect("on the way to the view");
    c.walk(2, 3, &["project", "src"]).expect("on into it");
    assert_eq!(c.walk(2, 4, &["other"]), Err(libc::ENOENT as u32), "beside it");
    assert_eq!(c.walk(ROOT, 4, &["home", "me", "secret"]), Err(libc::ENOENT as u32));

    // The host's / in lkvm sandbox's view: /etc, but not its secrets; no /proc.
    let host = ShareSpec { read_only: true, view: vec!["/etc".into()], ..ShareSpec::new("/", "t").unwrap() };
    let mut c = Client { share: Share::open(&host).unwrap() };
    c.call(TVERSION, Msg::default().u32(65536).s("9P2000.L")).unwrap();
    c.call(TATTACH, Msg::default().u32(ROOT).u32(!0).s("root").s("").u32(0)).unwrap();
    c.walk(ROOT, 1, &["etc", "passwd"]).expect("/etc/passwd");
    assert_eq!(c.walk(ROOT, 2, &["etc", "shadow"]), Err(libc::ENOENT as u32));
    assert_eq!(c.walk(ROOT, 2, &["proc", "self", "environ"]), Err(libc::ENOENT as u32));
}

/// Run in a child process of the test binary, whose open-file limit it lowers.
const DESCRIPTOR_CHILD: &str = "LKVM_TEST_DESCRIPTOR_ROOM";

#[test]
fn shares_stop_taking_descriptors_before_lkvm_runs_out() {
    if std::env::var_os(DESCRIPTOR_CHILD).is_none() {
        let test = "share::tests::shares_stop_taking_descriptors_before_lkvm_runs_out";
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--test-threads", "1"])
            .env(DESCRIPTOR_CHILD, "1")
            .output()
            .unwrap();
        assert!(child.status.success(), "{}", String::from_utf8_lossy(&child.stdout));
        return;
    }
    let limit = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
    // SAFETY: setrlimit reads this struct only; this process is the test's own child.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let dir = TempDir::new("room");
    let share = dir.share();
    fs::create_dir(share.join("d")).unwrap();
    let (mut first, mut second) = (Client::attach(&share, false), Client::attach(&share, false));
    // A share's own cap: half the limit, its root fid included.
    let mut fid = 1;
    while first.walk(ROOT, fid, &["d"]).is_ok() {
        fid += 1;
    }
    assert_eq!(fid, 256 / 2);
    // Whatever else holds descriptors, shares stop short of lkvm's reserve.
    let mut held = Vec::new();
    while descriptor_room() {
        held.push(fs::File::open("/dev/null").unwrap());
    }
    assert_eq!(second.walk(ROOT, 1, &["d"]), Err(libc::EMFILE as u32), "another share, few fids of its own");
    let reserve: Vec<_> = (0..256 / 8 - 1).map(|_| fs::File::open("/dev/null").unwrap()).collect();
    assert_eq!(reserve.len(), 31, "lkvm still opens what it needs");
}

/// A virtio-fs share holds a descriptor per inode the guest has looked up and not forgotten,
/// and per open file: past its cap the guest gets ENFILE, and forgetting makes room again.
#[test]
fn virtio_fs_shares_answer_enfile_past_their_descriptor_cap() {
    use fuse_backend_rs::api::filesystem::{Context, FileSystem, ROOT_ID};
    use fuse_backend_rs::passthrough::{Config, PassthroughFs};

    let dir = TempDir::new("virtiofs-cap");
    for name in ["a", "b", "c", "d"] {
        fs::write(dir.share().join(name), name).unwrap();
    }
    let config = Config { root_dir: dir.share().to_str().unwrap().into(), do_import: true, ..Config::default() };
    let passthrough = std::sync::Arc::new(PassthroughFs::new(config).unwrap());
    // import() clears the process's umask: other tests create files.
    // SAFETY: umask only swaps the process's file-creation mask.
    let umask = unsafe { libc::umask(0o022) };
    passthrough.import().unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    let share = super::bounded_fs::BoundedFs::new(passthrough, 3);
    let ctx = Context::default();
    let name = |n: &str| std::ffi::CString::new(n).unwrap();
    let lookup = |n: &str| share.lookup(&ctx, ROOT_ID, &name(n)).map_err(|e| e.raw_os_error());

    let a = lookup("a").unwrap().inode;
    assert_eq!(lookup("a").unwrap().inode, a, "the same inode, one descriptor");
    lookup("b").unwrap();
    let (handle, _, _) = share.open(&ctx, a, libc::O_RDONLY as u32, 0).unwrap();
    assert_eq!(lookup("c").err(), Some(Some(libc::ENFILE)), "two inodes and an open file: the cap");
    assert_eq!(share.open(&ctx, a, libc::O_RDONLY as u32, 0).err().and_then(|e| e.raw_os_error()), Some(libc::ENFILE));
    share.release(&ctx, a, 0, handle.unwrap(), false, false, None).unwrap();
    lookup("c").unwrap();
    assert_eq!(lookup("d").err(), Some(Some(libc::ENFILE)));
    share.forget(&ctx, a, 1);
    assert_eq!(lookup("d").err(), Some(Some(libc::ENFILE)), "a is still looked up once");
    share.batch_forget(&ctx, vec![(a, 1)]);
    lookup("d").unwrap();
}
