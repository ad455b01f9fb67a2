//! Host directories shared over virtio-fs (`--fs DIR,TAG[,ro]`): FUSE requests served by
//! fuse-backend-rs's passthrough filesystem, behind lkvm's own checks.
//!
//! The passthrough filesystem keeps the guest inside DIR itself: it resolves every name from a
//! directory descriptor it holds, one component at a time with O_NOFOLLOW, and refuses `.`,
//! `..` and names with `/`, so neither symlinks nor renames done meanwhile can lead a lookup
//! out. What it would allow and the 9p share does not is refused here, on lkvm's own copy of
//! each request (a guest rewriting its buffer afterwards changes nothing):
//! - device nodes: mknod of a character or block device is refused (EPERM), and a device node
//!   already in the share cannot be opened (EACCES): a guest must not drive host devices;
//! - set-user-ID and set-group-ID bits are cleared from every mode the guest sets, and from a
//!   file the guest writes, truncates or allocates, whatever FUSE flags its kernel negotiated
//!   (with lkvm as root the host kernel would keep them);
//! - on a read-only share every request that writes is answered EROFS;
//! - past the share's cap on host descriptors, lookups and opens are answered ENFILE
//!   (`BoundedFs`).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::SetattrValid;
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, Reader, Writer};

use super::bounded_fs::BoundedFs;
use crate::config::share::MAX_FS_TAG_LEN;
use crate::config::FsSpec;
use vm_memory_fuse::ByteValued;

/// The largest request lkvm copies: a 1 MiB write (fuse-backend-rs's max_write) and headers.
pub const MAX_REQUEST: usize = (1 << 20) + 4096;

const IN_HEADER: usize = std::mem::size_of::<InHeader>();
const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
const FATTR_MODE: u32 = 1;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const TMPFILE: u32 = 51;
/// Where each mode field sits in its request, after the header.
const MKNOD_MODE: usize = IN_HEADER;
const MKDIR_MODE: usize = IN_HEADER;
const CREATE_MODE: usize = IN_HEADER + 4;
const OPEN_FLAGS: usize = IN_HEADER;
const SETATTR_VALID: usize = IN_HEADER;
/// fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, three nsecs, mode.
const SETATTR_MODE: usize = IN_HEADER + 4 + 4 + 6 * 8 + 3 * 4;
/// ... then unused4, uid, gid.
const SETATTR_UID: usize = SETATTR_MODE + 8;
const SETATTR_GID: usize = SETATTR_MODE + 12;
/// The request header's node id; fuse_copy_file_range_in: fh_in, off_in, then nodeid_out.
const NODE_ID: usize = 16;
const COPY_OUT_NODE: usize = IN_HEADER + 16;

/// A directory served over FUSE, with lkvm's checks in front.
pub struct FsShare {
    fs: Arc<PassthroughFs>,
    server: Server<Arc<BoundedFs>>,
    read_only: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("--fs {path}: {error}", path = .path.display())]
pub struct OpenError {
    path: PathBuf,
    error: io::Error,
}

impl FsShare {
    pub fn open(spec: &FsSpec) -> Result<FsShare, OpenError> {
        let fail = |error: io::Error| OpenError { path: spec.path.clone(), error };
        if !std::fs::metadata(&spec.path).map_err(fail)?.is_dir() {
            return Err(fail(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let root_dir = spec.path.to_str().ok_or_else(|| fail(io::Error::other("the path is not UTF-8")))?;
        let config = Config {
            root_dir: root_dir.to_string(),
            cache_policy: CachePolicy::Auto,
            // Set-id bits are dropped on writes by unprivileged guest users, as the host does.
            killpriv_v2: true,
            do_import: true,
            ..Config::default()
        };
        let fs = Arc::new(PassthroughFs::new(config).map_err(fail)?);
        // import() clears the process's umask, so that guests can set every mode bit; lkvm is
        // one process, and its own sockets and files keep the user's umask.
        // SAFETY: umask only swaps the process's file-creation mask.
        let umask = unsafe { libc::umask(0o077) };
        let imported = fs.import();
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        imported.map_err(fail)?;
        super::descriptor_room(); // its probe and the limit, while this thread may still make both
        let bounded = Arc::new(BoundedFs::new(fs.clone(), super::descriptor_cap_per_share()));
        Ok(FsShare { server: Server::new(bounded), fs, read_only: spec.read_only })
    }

    /// Serves one request: `request` is lkvm's copy of it (checked and edited here first), the
    /// reply goes to `writer`. Returns the bytes written.
    pub fn handle(&self, request: &mut [u8], mut writer: Writer) -> usize {
        let Some(header) = read_u32(request, 4).zip(read_u64(request, 8)) else { return 0 };
        let (opcode, unique) = header;
        if let Err(errno) = self.check(opcode, request) {
            let reply = OutHeader { len: std::mem::size_of::<OutHeader>() as u32, error: -errno, unique };
            return match io::Write::write_all(&mut writer, reply.as_slice()) {
                Ok(()) => reply.len as usize,
                Err(_) => 0,
            };
        }
        let Ok(reader) = Reader::from_fuse_buffer(FuseBuf::new(request)) else { return 0 };
        match self.server.handle_message(reader, writer, None, None) {
            Ok(written) => written,
            Err(e) => {
                tracing::debug!("virtio-fs: request not answered: {e}");
                0
            }
        }
    }

    /// Refuses what the share must not do (as an errno) and clears set-id bits in modes.
    fn check(&self, opcode: u32, request: &mut [u8]) -> Result<(), i32> {
        let writes = [
            Opcode::Setattr,
            Opcode::Symlink,
            Opcode::Mknod,
            Opcode::Mkdir,
            Opcode::Unlink,
            Opcode::Rmdir,
            Opcode::Rename,
            Opcode::Link,
            Opcode::Write,
            Opcode::Setxattr,
            Opcode::Removexattr,
            Opcode::Create,
            Opcode::Fallocate,
            Opcode::Rename2,
            Opcode::CopyFileRange,
            Opcode::SetupMapping,
        ];
        if self.read_only && (writes.iter().any(|w| *w as u32 == opcode) || opcode == TMPFILE) {
            return Err(libc::EROFS);
        }
        match opcode {
            o if o == Opcode::Mknod as u32 => {
                let mode = read_u32(request, MKNOD_MODE).ok_or(libc::EINVAL)?;
                if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
                    return Err(libc::EPERM);
                }
                clear_set_id(request, MKNOD_MODE);
            }
            o if o == Opcode::Mkdir as u32 => clear_set_id(request, MKDIR_MODE),
            o if o == Opcode::Create as u32 || o == TMPFILE => clear_set_id(request, CREATE_MODE),
            o if o == Opcode::Write as u32 || o == Opcode::Fallocate as u32 => {
                self.drop_set_id(read_u64(request, NODE_ID).ok_or(libc::EINVAL)?)?;
            }
            o if o == Opcode::CopyFileRange as u32 => {
                self.drop_set_id(read_u64(request, COPY_OUT_NODE).ok_or(libc::EINVAL)?)?;
            }
            o if o == Opcode::Setattr as u32 => {
                let valid = read_u32(request, SETATTR_VALID).unwrap_or(0);
                if valid & FATTR_SIZE != 0 {
                    self.drop_set_id(read_u64(request, NODE_ID).ok_or(libc::EINVAL)?)?;
                }
                // The owner and group of host files stay; a chown to the current ones passes.
                if valid & (FATTR_UID | FATTR_GID) != 0 {
                    let node = read_u64(request, 16).ok_or(libc::EINVAL)?;
                    let (stat, _) = self.fs.getattr(&Context::default(), node, None).map_err(|e| errno(&e))?;
                    let changes = |flag: u32, at: usize, current: u32| -> Result<bool, i32> {
                        Ok(valid & flag != 0 && read_u32(request, at).ok_or(libc::EINVAL)? != current)
                    };
                    if changes(FATTR_UID, SETATTR_UID, stat.st_uid)? || changes(FATTR_GID, SETATTR_GID, stat.st_gid)? {
                        return Err(libc::EPERM);
                    }
                }
                if valid & FATTR_MODE != 0 {
                    clear_set_id(request, SETATTR_MODE);
                }
            }
            o if o == Opcode::Open as u32 => {
                let flags = read_u32(request, OPEN_FLAGS).ok_or(libc::EINVAL)? as i32;
                if self.read_only && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0) {
                    return Err(libc::EROFS);
                }
                let node = read_u64(request, 16).ok_or(libc::EINVAL)?;
                let (stat, _) = self.fs.getattr(&Context::default(), node, None).map_err(|e| errno(&e))?;
                if matches!(stat.st_mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
                    return Err(libc::EACCES);
                }
                if flags & libc::O_TRUNC != 0 {
                    self.drop_set_id(node)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Before the guest changes a file's contents: a set-id file loses those bits (failing
    /// that, the change is refused).
    fn drop_set_id(&self, node: u64) -> Result<(), i32> {
        let context = Context::default();
        let Ok((mut stat, _)) = self.fs.getattr(&context, node, None) else { return Ok(()) }; // refused later
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG || stat.st_mode & SET_ID_BITS == 0 {
            return Ok(());
        }
        stat.st_mode &= !SET_ID_BITS;
        match self.fs.setattr(&context, node, stat, None, SetattrValid::MODE) {
            Ok(_) => Ok(()),
            // Not the owner: unless lkvm is root, the host kernel itself drops the bits.
            // SAFETY: geteuid has no arguments.
            Err(_) if unsafe { libc::geteuid() } != 0 => Ok(()),
            Err(e) => Err(errno(&e)),
        }
    }
}

fn errno(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Clears the set-id bits of the mode at `at`, if the request is long enough to hold one.
fn clear_set_id(request: &mut [u8], at: usize) {
    if let Some(mode) = read_u32(request, at) {
        request[at..at + 4].copy_from_slice(&(mode & !SET_ID_BITS).to_le_bytes());
    }
}

/// The tag as virtio-fs's config space carries it: NUL-padded, then one request queue.
pub fn config_space(tag: &str) -> Vec<u8> {
    let mut config = vec![0u8; MAX_FS_TAG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config.extend_from_slice(&1u32.to_le_bytes());
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn request(opcode: Opcode, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let header = InHeader {
            len: (IN_HEADER + body.len()) as u32,
            opcode: opcode as u32,
            unique: 7,
            nodeid,
            ..Default::default()
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    fn words(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn share(read_only: bool) -> (FsShare, PathBuf) {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lkvm-virtiofs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("file"), b"x").unwrap();
        let spec = FsSpec { path: dir.clone(), tag: "t".into(), read_only };
        (FsShare::open(&spec).unwrap(), dir)
    }

    #[test]
    fn device_nodes_cannot_be_made_and_set_id_bits_are_cleared() {
        let (share, dir) = share(false);
        let mut mknod = request(Opcode::Mknod, 1, &words(&[libc::S_IFBLK | 0o600, 0x0801, 0, 0]));
        assert_eq!(share.check(Opcode::Mknod as u32, &mut mknod), Err(libc::EPERM));
        let mut fifo = request(Opcode::Mknod, 1, &words(&[libc::S_IFIFO | libc::S_ISUID | 0o644, 0, 0, 0]));
        assert_eq!(share.check(Opcode::Mknod as u32, &mut fifo), Ok(()));
        assert_eq!(read_u32(&fifo, MKNOD_MODE), Some(libc::S_IFIFO | 0o644));
        let mut mkdir = request(Opcode::Mkdir, 1, &words(&[libc::S_ISGID | 0o755, 0]));
        share.check(Opcode::Mkdir as u32, &mut mkdir).unwrap();
        assert_eq!(read_u32(&mkdir, MKDIR_MODE), Some(0o755));
        let mut create = request(Opcode::Create, 1, &words(&[libc::O_RDWR as u32, libc::S_ISUID | 0o700, 0, 0]));
        share.check(Opcode::Create as u32, &mut create).unwrap();
        assert_eq!(read_u32(&create, CREATE_MODE), Some(0o700));
        let mut setattr_body = vec![0u8; SETATTR_MODE + 16 - IN_HEADER];
        setattr_body[..4].copy_from_slice(&FATTR_MODE.to_le_bytes());
        setattr_body[SETATTR_MODE - IN_HEADER..][..4].copy_from_slice(&(libc::S_ISUID | 0o4755).to_le_bytes());
        let mut setattr = request(Opcode::Setattr, 1, &setattr_body);
        share.check(Opcode::Setattr as u32, &mut setattr).unwrap();
        assert_eq!(read_u32(&setattr, SETATTR_MODE), Some(0o755));
        // A request cut short: nothing to clear, nothing read out of bounds.
        let mut short = request(Opcode::Setattr, 1, &FATTR_MODE.to_le_bytes());
        assert_eq!(share.check(Opcode::Setattr as u32, &mut short), Ok(()));
        let mut headless = vec![0u8; 10];
        assert_eq!(share.check(Opcode::Mknod as u32, &mut headless), Err(libc::EINVAL));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn writing_truncating_or_allocating_a_set_id_file_clears_the_bits_whatever_the_guest_negotiated() {
        use std::os::unix::fs::PermissionsExt;
        let (share, dir) = share(false);
        let mode = |name: &str| std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o7777;
        let setattr_size = {
            let mut body = vec![0u8; SETATTR_MODE + 16 - IN_HEADER];
            body[..4].copy_from_slice(&FATTR_SIZE.to_le_bytes());
            body
        };
        let cases: [(&str, Opcode, Vec<u8>); 4] = [
            ("written", Opcode::Write, vec![0; 40]),
            ("truncated", Opcode::Setattr, setattr_size),
            ("opened", Opcode::Open, words(&[(libc::O_RDWR | libc::O_TRUNC) as u32, 0])),
            ("allocated", Opcode::Fallocate, vec![0; 32]),
        ];
        for (name, opcode, body) in cases {
            std::fs::write(dir.join(name), b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o6755)).unwrap();
            let node = share.fs.lookup(&Context::default(), 1, &CString::new(name).unwrap()).unwrap().inode;
            let mut message = request(opcode, node, &body);
            assert_eq!(share.check(opcode as u32, &mut message), Ok(()), "{name}");
            assert_eq!(mode(name), 0o755, "{name}: no longer set-id");
        }
        // Reading leaves the bits.
        std::fs::set_permissions(dir.join("file"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        let file = share.fs.lookup(&Context::default(), 1, c"file").unwrap().inode;
        let mut open = request(Opcode::Open, file, &words(&[libc::O_RDONLY as u32, 0]));
        share.check(Opcode::Open as u32, &mut open).unwrap();
        assert_eq!(mode("file"), 0o4755);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn owners_of_host_files_stay() {
        let (share, dir) = share(false);
        let owner = std::fs::metadata(&dir).unwrap();
        let (uid, gid) = (std::os::unix::fs::MetadataExt::uid(&owner), std::os::unix::fs::MetadataExt::gid(&owner));
        let setattr = |valid: u32, uid: u32, gid: u32| {
            let mut body = vec![0u8; SETATTR_GID + 8 - IN_HEADER];
            body[..4].copy_from_slice(&valid.to_le_bytes());
            body[SETATTR_UID - IN_HEADER..][..4].copy_from_slice(&uid.to_le_bytes());
            body[SETATTR_GID - IN_HEADER..][..4].copy_from_slice(&gid.to_le_bytes());
            request(Opcode::Setattr, 1, &body)
        };
        let check = |mut request: Vec<u8>| share.check(Opcode::Setattr as u32, &mut request);
        assert_eq!(check(setattr(FATTR_UID, uid + 1, gid)), Err(libc::EPERM));
        assert_eq!(check(setattr(FATTR_GID, uid, gid + 1)), Err(libc::EPERM));
        assert_eq!(check(setattr(FATTR_UID | FATTR_GID, uid, gid)), Ok(()));
        // Only the fields named in `valid` count.
        assert_eq!(check(setattr(FATTR_MODE, uid + 1, gid + 1)), Ok(()));
        // A request cut short before the owner it names: refused, nothing read out of bounds.
        let mut short = setattr(FATTR_UID, uid + 1, gid);
        short.truncate(SETATTR_UID);
        assert_eq!(share.check(Opcode::Setattr as u32, &mut short), Err(libc::EINVAL));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_nodes_in_the_share_cannot_be_opened() {
        let (share, dir) = share(false);
        let path = CString::new(dir.join("null").to_str().unwrap()).unwrap();
        // SAFETY: a valid path; only root may make device nodes, so others skip the check.
        if unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } != 0 {
            eprintln!("not root: no device node to test with");
            return;
        }
        let ctx = Context::default();
        let node = share.fs.lookup(&ctx, 1, c"null").unwrap().inode;
        let mut open = request(Opcode::Open, node, &words(&[libc::O_RDWR as u32, 0]));
        assert_eq!(share.check(Opcode::Open as u32, &mut open), Err(libc::EACCES));
        let file = share.fs.lookup(&ctx, 1, c"file").unwrap().inode;
        let mut open = request(Opcode::Open, file, &words(&[libc::O_RDWR as u32, 0]));
        assert_eq!(share.check(Opcode::Open as u32, &mut open), Ok(()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_read_only_share_refuses_every_write() {
        let (share, dir) = share(true);
        let file = share.fs.lookup(&Context::default(), 1, c"file").unwrap().inode;
        for (flags, expected) in [
            (libc::O_RDONLY, Ok(())),
            (libc::O_WRONLY, Err(libc::EROFS)),
            (libc::O_RDWR, Err(libc::EROFS)),
            (libc::O_RDONLY | libc::O_TRUNC, Err(libc::EROFS)),
        ] {
            let mut open = request(Opcode::Open, file, &words(&[flags as u32, 0]));
            assert_eq!(share.check(Opcode::Open as u32, &mut open), expected, "flags {flags:#o}");
        }
        for opcode in [Opcode::Write, Opcode::Unlink, Opcode::Rename2, Opcode::Setattr, Opcode::Create] {
            let mut body = request(opcode, file, &[0; 64]);
            assert_eq!(share.check(opcode as u32, &mut body), Err(libc::EROFS), "{opcode:?}");
        }
        let mut tmpfile = request(Opcode::Create, 1, &[0; 16]);
        assert_eq!(share.check(TMPFILE, &mut tmpfile), Err(libc::EROFS));
        let mut read = request(Opcode::Read, file, &[0; 40]);
        assert_eq!(share.check(Opcode::Read as u32, &mut read), Ok(()));
        assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"x");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn opening_a_share_keeps_the_process_umask() {
        // SAFETY: umask only swaps the file-creation mask.
        let before = unsafe { libc::umask(0o027) };
        let (_share, dir) = share(false);
        // SAFETY: as above.
        let after = unsafe { libc::umask(before) };
        assert_eq!(after, 0o027, "fuse-backend-rs's umask(0) must not leak into lkvm");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tags_and_options_are_checked() {
        let spec = FsSpec::parse("/tmp,work,ro").unwrap();
        assert_eq!((spec.tag.as_str(), spec.read_only), ("work", true));
        assert!(FsSpec::parse("/tmp").unwrap_err().contains("needs a mount tag"));
        assert!(FsSpec::parse(&format!("/tmp,{}", "t".repeat(37))).unwrap_err().contains("1 to 36 bytes"));
        assert!(FsSpec::parse("/tmp,t,rw").unwrap_err().contains("unknown option 'rw'"));
        let config = config_space("work");
        assert_eq!((config.len(), &config[..4], &config[36..]), (40, &b"work"[..], &1u32.to_le_bytes()[..]));
        let missing = FsSpec { path: "/nonexistent/dir".into(), tag: "t".into(), read_only: false };
        assert!(FsShare::open(&missing).err().unwrap().to_string().starts_with("--fs /nonexistent/dir: "));
    }
}
