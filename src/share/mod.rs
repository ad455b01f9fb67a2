//! Host directories shared with the guest over 9P2000.L (virtio-9p).
//!
//! The protocol and the file operations are the `p9` crate's (crosvm's server). That server
//! relies on a process sandbox for confinement, so before a message reaches it this module
//! refuses what could leave the shared directory or change a read-only share:
//! - every name the guest sends (walk, create, mkdir, link, symlink, mknod, rename, unlink) must
//!   be one path component: not empty, `.` or `..`, no `/`. The server resolves names with
//!   `openat(dirfd, name, O_NOFOLLOW)` from directory fds it holds, so with single components
//!   neither `..`, symlinks (absolute or relative, never followed; opening one fails with
//!   ELOOP) nor a concurrent rename can take a lookup outside the share;
//! - on a read-only share every message that writes is answered EROFS;
//! - set-user-ID and set-group-ID bits are cleared from the modes the guest sets, and from a
//!   file the guest writes or truncates (as the host kernel does for an unprivileged writer;
//!   lkvm may run as root, which keeps them), so a guest can neither plant a set-id program for
//!   host users nor change one;
//! - the owner and group of host files cannot change (a no-op chown passes);
//! - a share with a view (`lkvm sandbox`'s share of the host's /) lets the guest walk only to
//!   the directories of the view, inside them, and through their ancestors, never to the
//!   secrets below (password hashes, host keys, credential stores) nor to lkvm's own
//!   directories; other names may be listed but not reached.
//!
//! The server refuses symlink and mknod; lkvm serves those itself, in the directory of the fid
//! named, which it knows by mirroring the guest's attaches, walks, creates and renames. A
//! symlink's target is just stored (the server never follows one); mknod makes FIFOs and
//! sockets only, never device nodes, and device nodes already in a share cannot be opened: a
//! guest must not drive host devices. Files open non-blocking, so a FIFO cannot stall the device.

mod bounded_fs;
pub mod virtiofs;

use crate::config::ShareSpec;
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The largest message the server accepts (payload plus header room); the guest's msize is
/// negotiated down to this.
pub const MAX_MESSAGE_SIZE: u32 = 512 * 1024 + 64;

// Message types, from the Linux client (include/net/9p/9p.h).
const RLERROR: u8 = 7;
const TLOPEN: u8 = 12;
const TLCREATE: u8 = 14;
const TSYMLINK: u8 = 16;
const TMKNOD: u8 = 18;
const TRENAME: u8 = 20;
const TGETATTR: u8 = 24;
const RGETATTR: u8 = 25;
const TSETATTR: u8 = 26;
const TXATTRCREATE: u8 = 32;
const TLINK: u8 = 70;
const TMKDIR: u8 = 72;
const TRENAMEAT: u8 = 74;
const TUNLINKAT: u8 = 76;
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TWALK: u8 = 110;
const TWRITE: u8 = 118;
const TCLUNK: u8 = 120;
const TREMOVE: u8 = 122;

// Tlopen flags that write: access mode (O_WRONLY, O_RDWR, 3), O_CREAT, O_TRUNC, O_APPEND.
const P9_ACCESS_MASK: u32 = 0o3;
const P9_WRITING_FLAGS: u32 = 0o100 | 0o1000 | 0o2000;
const P9_NONBLOCK: u32 = 0o4000;
const P9_TRUNC: u32 = 0o1000;
const P9_SETATTR_MODE: u32 = 1;
const P9_SETATTR_UID: u32 = 2;
const P9_SETATTR_GID: u32 = 4;
const P9_SETATTR_SIZE: u32 = 8;
const P9_GETATTR_BASIC: u64 = 0x7ff;
const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
const QID_SYMLINK: u8 = 0x02;
const QID_FILE: u8 = 0x00;

#[derive(Debug, thiserror::Error)]
#[error("9p share {path}: {reason}")]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: String,
}

/// One shared directory and the 9P server session the guest holds on it.
pub struct Share {
    server: p9::Server,
    root: PathBuf,
    read_only: bool,
    /// Each fid's path below the root, as far as the guest's messages tell.
    fid_paths: HashMap<u32, PathBuf>,
    /// The open flags of each opened fid, and the session's msize: what a restored VM's
    /// session is rebuilt from.
    open_flags: HashMap<u32, u32>,
    msize: Option<u32>,
    /// How many fids the guest may hold (fixed when the share was opened).
    max_fids: usize,
    /// The paths below the root the guest may reach, and those it may not even then; no view:
    /// all of it.
    view: Option<View>,
}

struct View {
    visible: Vec<PathBuf>,
    hidden: Vec<PathBuf>,
}

/// Below the host's /: what a view never shows, whatever it names.
const SECRETS: &[&str] = &[
    "etc/shadow",
    "etc/shadow-",
    "etc/gshadow",
    "etc/gshadow-",
    "etc/ssl/private",
    "etc/krb5.keytab",
    "etc/security/opasswd",
    "etc/sudoers",
    "etc/sudoers.d",
    "etc/NetworkManager/system-connections",
    "etc/wpa_supplicant",
    "etc/ssh/ssh_host_dsa_key",
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_rsa_key",
];

impl View {
    fn new(root: &Path, visible: &[PathBuf]) -> View {
        let below = |path: &Path| path.strip_prefix(root).ok().map(Path::to_path_buf);
        let mut hidden: Vec<PathBuf> =
            if root == Path::new("/") { SECRETS.iter().map(PathBuf::from).collect() } else { Vec::new() };
        let cache = crate::host::sandbox_cache_root();
        for own in [crate::host::lkvm_dir(), cache.parent().unwrap_or(&cache).to_path_buf()] {
            hidden.extend(below(&std::fs::canonicalize(&own).unwrap_or(own)));
        }
        View { visible: visible.iter().filter_map(|v| below(v)).collect(), hidden }
    }

    /// Whether `path` (below the root) may be reached: inside a visible path or on the way to
    /// one, and not at or below a hidden one.
    fn shows(&self, path: &Path) -> bool {
        let on_the_way = self.visible.iter().any(|v| path.starts_with(v) || v.starts_with(path));
        on_the_way && !self.hidden.iter().any(|h| path.starts_with(h))
    }
}

/// A guest's 9P session, as a snapshot keeps it: its fids by path, not by host descriptor.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Session {
    msize: u32,
    /// fid, path below the share's root, open flags if opened.
    fids: Vec<(u32, PathBuf, Option<u32>)>,
}

// Tlopen/Tlcreate flags a reopen must not repeat: create, exclusive, truncate.
const P9_REOPEN_DROPPED: u32 = 0o100 | 0o200 | 0o1000;
const NOFID: u32 = u32::MAX;
/// A fid no Linux client uses (it counts up from 0), for rebuilding a session.
const SCRATCH_FID: u32 = u32::MAX - 1;
/// Names per Twalk (P9_MAXWELEM).
const MAX_WALK_NAMES: usize = 16;
/// Fids a guest may hold on one 9p share: each holds a host descriptor and a path copy (the
/// memory this bounds), and a guest that never clunks must get errors, not exhaust lkvm's
/// descriptors or memory (`descriptor_cap_per_share`).
pub const MAX_FIDS: usize = 16384;

/// Whether lkvm may still open descriptors for a guest's share: the lowest free descriptor is
/// below the last eighth of the open-file limit (descriptors are allocated lowest first, so
/// every one below it is taken). The rest is lkvm's own, whatever the guest holds open. The
/// first call (as a share opens, before lkvm's threads are confined) reads the limit.
pub fn descriptor_room() -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    static PROBE: std::sync::OnceLock<Option<vmm_sys_util::eventfd::EventFd>> = std::sync::OnceLock::new();
    let Some(probe) = PROBE.get_or_init(|| crate::host::eventfd().ok()) else { return true };
    let limit = open_file_limit();
    // SAFETY: F_DUPFD_CLOEXEC on our own descriptor; the copy is closed at once.
    let lowest_free = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if lowest_free < 0 {
        return false; // EMFILE: none free at all
    }
    // SAFETY: the copy just made, owned here only.
    drop(unsafe { OwnedFd::from_raw_fd(lowest_free) });
    (lowest_free as u64) < limit - limit / 8
}

/// lkvm's open-file limit, read once: confined threads may not ask (prlimit64).
fn open_file_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes this struct only.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            1024
        }
    })
}

/// Host descriptors one share may hold for the guest: half of those lkvm may open (and all
/// shares together stop short of lkvm's reserve: `descriptor_room`).
fn descriptor_cap_per_share() -> usize {
    (open_file_limit() as usize / 2).max(16)
}

const TXATTRWALK: u8 = 30;

impl Share {
    pub fn open(spec: &ShareSpec) -> Result<Share, OpenError> {
        let fail = |reason: String| OpenError { path: spec.path.clone(), reason };
        // The server opens the root with O_NOFOLLOW: resolve a symlinked share path here.
        let root = std::fs::canonicalize(&spec.path).map_err(|e| fail(e.to_string()))?;
        if !root.is_dir() {
            return Err(fail("is not a directory".into()));
        }
        let config = p9::Config { root: root.clone().into(), msize: MAX_MESSAGE_SIZE, ..Default::default() };
        let server = p9::Server::with_config(config).map_err(|e| fail(format!("cannot start the 9p server: {e}")))?;
        let view = (!spec.view.is_empty()).then(|| View::new(&root, &spec.view));
        descriptor_room(); // its probe and the limit, while this thread may still make both
        Ok(Share {
            server,
            root,
            read_only: spec.read_only,
            fid_paths: HashMap::new(),
            open_flags: HashMap::new(),
            msize: None,
            max_fids: descriptor_cap_per_share().min(MAX_FIDS),
            view,
        })
    }

    /// The guest's session, if it has one, for a snapshot.
    pub fn session(&self) -> Option<Session> {
        let mut fids: Vec<_> =
            self.fid_paths.iter().map(|(fid, path)| (*fid, path.clone(), self.open_flags.get(fid).copied())).collect();
        fids.sort();
        self.msize.map(|msize| Session { msize, fids })
    }

    /// Rebuilds a saved session on this server: each fid walked to its path again and reopened
    /// with its flags. A fid whose file is gone (deleted, or unlinked while open) stays unknown
    /// to the server, and the guest gets errors on it; the others work as before.
    pub fn resume_session(&mut self, session: &Session) {
        let mut message = Vec::new();
        message.extend_from_slice(&session.msize.to_le_bytes());
        put_string(&mut message, b"9P2000.L");
        self.replay(TVERSION, &message);
        for (fid, path, flags) in &session.fids {
            if !self.reopen(*fid, path, *flags) {
                // The guest learns it when it uses the fid; often it never does (a removed file
                // whose dentry the client still held).
                tracing::info!("9p: {} could not be reopened after the restore", self.root.join(path).display());
            }
        }
    }

    fn reopen(&mut self, fid: u32, path: &Path, flags: Option<u32>) -> bool {
        let mut attach = SCRATCH_FID.to_le_bytes().to_vec();
        attach.extend_from_slice(&NOFID.to_le_bytes());
        put_string(&mut attach, b"");
        put_string(&mut attach, b"");
        attach.extend_from_slice(&0u32.to_le_bytes());
        if !self.replay(TATTACH, &attach) {
            return false;
        }
        let names: Vec<&[u8]> = path.iter().map(|n| n.as_bytes()).collect();
        let mut from = SCRATCH_FID;
        let mut walked = true;
        for chunk in names.chunks(MAX_WALK_NAMES).chain(names.is_empty().then_some(&[][..])) {
            let mut walk = from.to_le_bytes().to_vec();
            walk.extend_from_slice(&fid.to_le_bytes());
            walk.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
            chunk.iter().for_each(|name| put_string(&mut walk, name));
            walked &= self.replay(TWALK, &walk);
            from = fid;
        }
        self.replay(TCLUNK, &SCRATCH_FID.to_le_bytes());
        if !walked {
            return false;
        }
        if let Some(flags) = flags {
            let mut open = fid.to_le_bytes().to_vec();
            open.extend_from_slice(&(flags & !P9_REOPEN_DROPPED).to_le_bytes());
            if !self.replay(TLOPEN, &open) {
                return false;
            }
        }
        true
    }

    /// Sends the server one message rebuilt from a snapshot and tells whether it succeeded. It
    /// is vetted as a guest's would be (a snapshot file could name `..`), and the fid tracking
    /// follows it as if the guest had sent it.
    fn replay(&mut self, kind: u8, body: &[u8]) -> bool {
        let mut message = ((7 + body.len()) as u32).to_le_bytes().to_vec();
        message.extend_from_slice(&[kind, 0xff, 0xff]);
        message.extend_from_slice(body);
        let mut reply = Vec::new();
        if self.vet(&mut message).is_err() || self.server.handle_message(&mut &message[..], &mut reply).is_err() {
            return false;
        }
        let answered = reply.get(4).is_some_and(|k| *k != RLERROR);
        let walked = reply.get(7..9).map(|n| u16::from_le_bytes([n[0], n[1]]));
        let complete = kind != TWALK || walked == Some(u16::from_le_bytes([body[8], body[9]]));
        let _ = self.track_fids(&mut message, answered, walked);
        answered && complete
    }

    /// Answers one T-message with one R-message. `request` may be edited (set-id bits cleared).
    pub fn handle<W: Write>(&mut self, request: &mut [u8], reply: &mut W) -> io::Result<()> {
        let tag = request.get(5..7).map_or([0xff, 0xff], |t| [t[0], t[1]]);
        if let Err(errno) = self.vet(request) {
            return send(reply, RLERROR, tag, &(errno as u32).to_le_bytes());
        }
        let kind = request.get(4).copied();
        if let Some(kind @ (TSYMLINK | TMKNOD)) = kind {
            return match self.make_node(request) {
                Ok(qid) => send(reply, kind + 1, tag, &qid),
                Err(Stop::Refused(errno)) => send(reply, RLERROR, tag, &(errno as u32).to_le_bytes()),
                Err(Stop::Truncated) => send(reply, RLERROR, tag, &(libc::EINVAL as u32).to_le_bytes()),
            };
        }
        let mut watched = ReplyHeader { inner: reply, header: Vec::with_capacity(9) };
        let sent = self.server.handle_message(&mut &request[..], &mut watched);
        // The server acted even if its reply did not fit the guest's buffer: follow it anyway.
        let header = watched.header;
        let answered = header.len() > 4 && header[4] != RLERROR;
        let walked = header.get(7..9).map(|n| u16::from_le_bytes([n[0], n[1]]));
        // Only a malformed message fails to parse here, and the server refused it already.
        let _ = self.track_fids(request, answered, walked);
        sent
    }

    /// Follows where fids point: attach, walk (when complete), create, rename, clunk.
    fn track_fids(&mut self, message: &mut [u8], answered: bool, walked: Option<u16>) -> Result<(), Stop> {
        let kind = *message.get(4).ok_or(Stop::Truncated)?;
        let mut fields = Fields { message, at: 7 };
        match kind {
            TVERSION if answered => {
                self.fid_paths.clear();
                self.open_flags.clear();
                self.msize = Some(fields.u32()?.min(MAX_MESSAGE_SIZE));
            }
            TLOPEN if answered => {
                let (fid, flags) = (fields.u32()?, fields.u32()?);
                self.open_flags.insert(fid, flags);
            }
            TATTACH if answered => {
                self.fid_paths.insert(fields.u32()?, PathBuf::new());
            }
            TWALK => {
                let (fid, newfid, count) = (fields.u32()?, fields.u32()?, fields.u16()?);
                let mut path = self.fid_paths.get(&fid).cloned();
                for _ in 0..count {
                    let name = fields.name()?;
                    path = path.map(|p| p.join(OsStr::from_bytes(&name)));
                }
                if answered && walked == Some(count) {
                    match path {
                        Some(path) => self.fid_paths.insert(newfid, path),
                        None => self.fid_paths.remove(&newfid),
                    };
                }
            }
            TLCREATE if answered => {
                let fid = fields.u32()?;
                let name = fields.name()?;
                if let Some(path) = self.fid_paths.get_mut(&fid) {
                    path.push(OsStr::from_bytes(&name));
                }
                self.open_flags.insert(fid, fields.u32()?);
            }
            TRENAMEAT if answered => {
                let (old_dir, old_name) = (fields.u32()?, fields.name()?);
                let (new_dir, new_name) = (fields.u32()?, fields.name()?);
                let (Some(from), Some(to)) = (self.fid_paths.get(&old_dir), self.fid_paths.get(&new_dir)) else {
                    return Ok(());
                };
                let (from, to) = (from.join(OsStr::from_bytes(&old_name)), to.join(OsStr::from_bytes(&new_name)));
                for path in self.fid_paths.values_mut() {
                    if let Ok(rest) = path.strip_prefix(&from) {
                        *path = to.join(rest);
                    }
                }
            }
            // Tremove would clunk too, but the server refuses it and keeps the fid.
            TCLUNK => {
                let fid = fields.u32()?;
                self.fid_paths.remove(&fid);
                self.open_flags.remove(&fid);
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether `fid` is a character or block device, as the server itself sees it (the inode
    /// it would open, whatever became of the path): opening one, or truncating or chmod-ing
    /// it, would let the guest drive a host device (a share of / holds /dev). Fails closed.
    fn is_device(&mut self, fid: u32) -> bool {
        self.attributes(fid).is_none_or(|(mode, ..)| matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK))
    }

    /// The mode, owner and group of `fid`'s inode as the server sees it.
    fn attributes(&mut self, fid: u32) -> Option<(u32, u32, u32)> {
        let mut getattr = 19u32.to_le_bytes().to_vec();
        getattr.push(TGETATTR);
        getattr.extend_from_slice(&[0xff, 0xff]);
        getattr.extend_from_slice(&fid.to_le_bytes());
        getattr.extend_from_slice(&P9_GETATTR_BASIC.to_le_bytes());
        let mut reply = Vec::new();
        if self.server.handle_message(&mut &getattr[..], &mut reply).is_err() || reply.get(4) != Some(&RGETATTR) {
            return None;
        }
        // Rgetattr: size[4] type[1] tag[2] valid[8] qid[13] mode[4] uid[4] gid[4] ...
        let word = |at: usize| reply.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        Some((word(28)?, word(32)?, word(36)?))
    }

    /// Before the guest writes or truncates `fid`: a set-id file loses those bits, through the
    /// server's own setattr (failing that, the write is refused).
    fn drop_set_id(&mut self, fid: u32) -> Result<(), Stop> {
        let Some((mode, ..)) = self.attributes(fid) else { return Ok(()) }; // the server refuses the fid
        if mode & libc::S_IFMT != libc::S_IFREG || mode & SET_ID_BITS == 0 {
            return Ok(());
        }
        let mut setattr = 67u32.to_le_bytes().to_vec();
        setattr.push(TSETATTR);
        setattr.extend_from_slice(&[0xff, 0xff]);
        for word in [fid, P9_SETATTR_MODE, mode & 0o7777 & !SET_ID_BITS, 0, 0] {
            setattr.extend_from_slice(&word.to_le_bytes());
        }
        setattr.extend_from_slice(&[0; 40]); // size, atime, mtime (unused)
        let mut reply = Vec::new();
        match self.server.handle_message(&mut &setattr[..], &mut reply) {
            Ok(()) if reply.get(4) == Some(&(TSETATTR + 1)) => Ok(()),
            // Not the owner: unless lkvm is root, the kernel itself drops the bits on write.
            // SAFETY: geteuid has no arguments.
            _ if unsafe { libc::geteuid() } != 0 => Ok(()),
            _ => Err(Stop::Refused(libc::EPERM)),
        }
    }

    /// Tsymlink (dfid, name, target, gid) and Tmknod (dfid, name, mode, major, minor, gid):
    /// makes the node and returns its qid.
    fn make_node(&mut self, message: &mut [u8]) -> Result<[u8; 13], Stop> {
        let kind = message[4];
        let mut fields = Fields { message, at: 7 };
        let dir = fields.u32()?;
        let name = CString::new(fields.name()?).map_err(|_| Stop::Refused(libc::EINVAL))?;
        let refused = |e: io::Error| Stop::Refused(e.raw_os_error().unwrap_or(libc::EIO));
        let path = self.fid_paths.get(&dir).ok_or(Stop::Refused(libc::EBADF))?;
        let dir = open_dir_beneath(&self.root, path).map_err(refused)?;
        // SAFETY (both calls): NUL-terminated strings that outlive the call, a valid dirfd.
        let rc = if kind == TSYMLINK {
            let target = CString::new(fields.string()?).map_err(|_| Stop::Refused(libc::EINVAL))?;
            unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }
        } else {
            let mode = fields.u32()?;
            let kind = mode & libc::S_IFMT;
            if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
                return Err(Stop::Refused(libc::EPERM));
            }
            unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode & !SET_ID_BITS, 0) }
        };
        if rc < 0 {
            return Err(refused(io::Error::last_os_error()));
        }
        // SAFETY: fstatat fills the zeroed stat for a name in the directory we hold.
        let stat = unsafe {
            let mut stat: libc::stat64 = std::mem::zeroed();
            if libc::fstatat64(dir.as_raw_fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) < 0 {
                return Err(refused(io::Error::last_os_error()));
            }
            stat
        };
        let mut qid = [0u8; 13];
        qid[0] = if stat.st_mode & libc::S_IFMT == libc::S_IFLNK { QID_SYMLINK } else { QID_FILE };
        qid[1..5].copy_from_slice(&(stat.st_mtime as u32).to_le_bytes());
        qid[5..].copy_from_slice(&stat.st_ino.to_le_bytes());
        Ok(qid)
    }

    /// Refuses, with an errno, a message that names something outside one directory level or
    /// writes to a read-only share. Malformed messages pass: the server's decoder rejects them.
    /// A message that makes `newfid` is refused once the guest holds as many fids as it may.
    fn check_fid_room(&self, newfid: u32) -> Result<(), Stop> {
        if (self.fid_paths.len() >= self.max_fids && !self.fid_paths.contains_key(&newfid)) || !descriptor_room() {
            return Err(Stop::Refused(libc::EMFILE));
        }
        Ok(())
    }

    fn vet(&mut self, message: &mut [u8]) -> Result<(), i32> {
        match self.vet_fields(message) {
            Ok(()) | Err(Stop::Truncated) => Ok(()),
            Err(Stop::Refused(errno)) => Err(errno),
        }
    }

    fn vet_fields(&mut self, message: &mut [u8]) -> Result<(), Stop> {
        let kind = *message.get(4).ok_or(Stop::Truncated)?;
        let writes = matches!(
            kind,
            TLCREATE
                | TSYMLINK
                | TMKNOD
                | TRENAME
                | TSETATTR
                | TXATTRCREATE
                | TLINK
                | TMKDIR
                | TRENAMEAT
                | TUNLINKAT
                | TWRITE
                | TREMOVE
        );
        if writes && self.read_only {
            return Err(Stop::Refused(libc::EROFS));
        }
        // Fields follow size[4] type[1] tag[2]; layouts as in the Linux client.
        let mut fields = Fields { message, at: 7 };
        match kind {
            TATTACH | TXATTRWALK => {
                let newfid =
                    if kind == TATTACH { fields.u32()? } else { fields.skip(4).and_then(|()| fields.u32())? };
                self.check_fid_room(newfid)?;
            }
            TWALK => {
                let (fid, newfid) = (fields.u32()?, fields.u32()?);
                self.check_fid_room(newfid)?;
                let mut path = self.fid_paths.get(&fid).cloned();
                let mut path_len = path.as_ref().map_or(0, |p| p.as_os_str().len());
                for _ in 0..fields.u16()? {
                    let name = fields.name()?;
                    path_len += name.len() + 1;
                    if let Some(view) = &self.view {
                        // A fid lkvm lost track of reaches nothing through a view.
                        let path = path.as_mut().ok_or(Stop::Refused(libc::ENOENT))?;
                        path.push(OsStr::from_bytes(&name));
                        if !view.shows(path) {
                            return Err(Stop::Refused(libc::ENOENT));
                        }
                    }
                }
                if path_len > libc::PATH_MAX as usize {
                    return Err(Stop::Refused(libc::ENAMETOOLONG));
                }
            }
            TLOPEN => {
                let fid = fields.u32()?;
                let flags = fields.u32()?;
                if self.read_only && (flags & P9_ACCESS_MASK != 0 || flags & P9_WRITING_FLAGS != 0) {
                    return Err(Stop::Refused(libc::EROFS));
                }
                if self.is_device(fid) {
                    return Err(Stop::Refused(libc::EPERM));
                }
                if flags & P9_TRUNC != 0 {
                    self.drop_set_id(fid)?;
                }
                // A FIFO opened without O_NONBLOCK would block the device's only thread until
                // a writer comes; regular files do not care.
                fields.at -= 4;
                fields.take(4)?.copy_from_slice(&(flags | P9_NONBLOCK).to_le_bytes());
            }
            TLCREATE => {
                fields.skip(4)?;
                fields.name()?;
                fields.skip(4)?; // flags
                fields.clear_set_id()?;
            }
            TMKDIR => {
                fields.skip(4)?;
                fields.name()?;
                fields.clear_set_id()?;
            }
            TSETATTR => {
                let fid = fields.u32()?;
                if self.is_device(fid) {
                    return Err(Stop::Refused(libc::EPERM));
                }
                let valid = fields.u32()?;
                if valid & P9_SETATTR_MODE != 0 {
                    fields.clear_set_id()?;
                } else {
                    fields.skip(4)?;
                }
                let (uid, gid) = (fields.u32()?, fields.u32()?);
                if valid & (P9_SETATTR_UID | P9_SETATTR_GID) != 0 {
                    let (_, owner, group) = self.attributes(fid).ok_or(Stop::Refused(libc::EPERM))?;
                    let changes_owner = valid & P9_SETATTR_UID != 0 && uid != owner;
                    if changes_owner || (valid & P9_SETATTR_GID != 0 && gid != group) {
                        return Err(Stop::Refused(libc::EPERM));
                    }
                }
                if valid & P9_SETATTR_SIZE != 0 {
                    self.drop_set_id(fid)?;
                }
            }
            TWRITE => self.drop_set_id(fields.u32()?)?,
            TSYMLINK | TMKNOD | TUNLINKAT => {
                fields.skip(4)?;
                fields.name()?;
            }
            TRENAME | TLINK => {
                fields.skip(8)?;
                fields.name()?;
            }
            TRENAMEAT => {
                fields.skip(4)?;
                fields.name()?;
                fields.skip(4)?;
                fields.name()?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Opens `path` below `root` one component at a time, never following a symlink.
fn open_dir_beneath(root: &Path, path: &Path) -> io::Result<File> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let open_at = |dir: libc::c_int, name: &OsStr| -> io::Result<File> {
        let name = CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated name; the new descriptor is owned by the returned File.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    };
    let mut dir = open_at(libc::AT_FDCWD, root.as_os_str())?;
    for component in path.components() {
        dir = open_at(dir.as_raw_fd(), component.as_os_str())?;
    }
    Ok(dir)
}

fn put_string(message: &mut Vec<u8>, s: &[u8]) {
    message.extend_from_slice(&(s.len() as u16).to_le_bytes());
    message.extend_from_slice(s);
}

/// Writes one R-message: size, type, tag, body.
fn send<W: Write>(writer: &mut W, kind: u8, tag: [u8; 2], body: &[u8]) -> io::Result<()> {
    let mut message = Vec::with_capacity(7 + body.len());
    message.extend_from_slice(&((7 + body.len()) as u32).to_le_bytes());
    message.push(kind);
    message.extend_from_slice(&tag);
    message.extend_from_slice(body);
    writer.write_all(&message)?;
    writer.flush()
}

/// Passes the server's reply through, keeping its first bytes: size, type, tag, and for an
/// Rwalk the number of names walked.
struct ReplyHeader<'a, W> {
    inner: &'a mut W,
    header: Vec<u8>,
}

impl<W: Write> Write for ReplyHeader<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let keep = data.len().min(9 - self.header.len());
        self.header.extend_from_slice(&data[..keep]);
        let n = self.inner.write(data)?;
        // What the guest's buffer did not take is written again by the caller, not recorded twice.
        self.header.truncate(self.header.len() - (keep - n.min(keep)));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Stop {
    /// The message ends early; the server's decoder answers it.
    Truncated,
    Refused(i32),
}

/// A cursor over a T-message's fields.
struct Fields<'a> {
    message: &'a mut [u8],
    at: usize,
}

impl Fields<'_> {
    fn take(&mut self, len: usize) -> Result<&mut [u8], Stop> {
        let start = self.at;
        let field = self.message.get_mut(start..start + len).ok_or(Stop::Truncated)?;
        self.at += len;
        Ok(field)
    }

    fn skip(&mut self, len: usize) -> Result<(), Stop> {
        self.take(len).map(|_| ())
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        let bytes = self.take(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn string(&mut self) -> Result<Vec<u8>, Stop> {
        let len = self.u16()?;
        Ok(self.take(usize::from(len))?.to_vec())
    }

    /// A string that must name an entry of one directory.
    fn name(&mut self) -> Result<Vec<u8>, Stop> {
        let name = self.string()?;
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            tracing::debug!("9p: refused name {:?}", String::from_utf8_lossy(&name));
            return Err(Stop::Refused(libc::EACCES));
        }
        Ok(name)
    }

    /// Clears the set-id bits of the mode field at the cursor.
    fn clear_set_id(&mut self) -> Result<(), Stop> {
        let bytes = self.take(4)?;
        let mode = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & !SET_ID_BITS;
        bytes.copy_from_slice(&mode.to_le_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
