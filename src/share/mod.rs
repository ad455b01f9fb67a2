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
//! - set-user-ID and set-group-ID bits are cleared from the modes the guest sets, so a guest
//!   cannot plant a set-id program for host users.

use std::io::{self, Write};
use std::path::PathBuf;

/// The largest message the server accepts (payload plus header room); the guest's msize is
/// negotiated down to this.
pub const MAX_MESSAGE_SIZE: u32 = 512 * 1024 + 64;
/// virtio-9p limits a mount tag to what fits in its config space; Linux reads it as a string.
const MAX_TAG_LEN: usize = 255;

// Message types, from the Linux client (include/net/9p/9p.h).
const RLERROR: u8 = 7;
const TLOPEN: u8 = 12;
const TLCREATE: u8 = 14;
const TSYMLINK: u8 = 16;
const TMKNOD: u8 = 18;
const TRENAME: u8 = 20;
const TSETATTR: u8 = 26;
const TXATTRCREATE: u8 = 32;
const TLINK: u8 = 70;
const TMKDIR: u8 = 72;
const TRENAMEAT: u8 = 74;
const TUNLINKAT: u8 = 76;
const TWALK: u8 = 110;
const TWRITE: u8 = 118;
const TREMOVE: u8 = 122;

// Tlopen flags that write: access mode (O_WRONLY, O_RDWR, 3), O_CREAT, O_TRUNC, O_APPEND.
const P9_ACCESS_MASK: u32 = 0o3;
const P9_WRITING_FLAGS: u32 = 0o100 | 0o1000 | 0o2000;
const P9_SETATTR_MODE: u32 = 1;
const SET_ID_BITS: u32 = (libc::S_ISUID | libc::S_ISGID) as u32;

/// How the user asked for a share (`--9p DIR,TAG[,ro]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareSpec {
    pub path: PathBuf,
    pub tag: String,
    pub read_only: bool,
}

impl ShareSpec {
    pub fn parse(arg: &str) -> Result<ShareSpec, String> {
        let mut parts = arg.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("--9p needs DIR,TAG")?;
        let tag = parts.next().ok_or_else(|| format!("--9p {arg}: needs a mount tag, as in --9p DIR,TAG"))?;
        let mut spec = ShareSpec::new(path, tag)?;
        for option in parts {
            match option {
                "ro" => spec.read_only = true,
                other => return Err(format!("--9p {arg}: unknown option '{other}' (known: ro)")),
            }
        }
        Ok(spec)
    }

    pub fn new(path: impl Into<PathBuf>, tag: &str) -> Result<ShareSpec, String> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(format!("9p mount tag '{tag}' must be 1 to {MAX_TAG_LEN} bytes"));
        }
        Ok(ShareSpec { path: path.into(), tag: tag.to_string(), read_only: false })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("9p share {path}: {reason}")]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: String,
}

/// One shared directory and the 9P server session the guest holds on it.
pub struct Share {
    server: p9::Server,
    read_only: bool,
}

impl Share {
    pub fn open(spec: &ShareSpec) -> Result<Share, OpenError> {
        let fail = |reason: String| OpenError { path: spec.path.clone(), reason };
        // The server opens the root with O_NOFOLLOW: resolve a symlinked share path here.
        let root = std::fs::canonicalize(&spec.path).map_err(|e| fail(e.to_string()))?;
        if !root.is_dir() {
            return Err(fail("is not a directory".into()));
        }
        let config = p9::Config { root: root.into(), msize: MAX_MESSAGE_SIZE, ..Default::default() };
        let server = p9::Server::with_config(config).map_err(|e| fail(format!("cannot start the 9p server: {e}")))?;
        Ok(Share { server, read_only: spec.read_only })
    }

    /// Answers one T-message with one R-message. `request` may be edited (set-id bits cleared).
    pub fn handle<W: Write>(&mut self, request: &mut [u8], reply: &mut W) -> io::Result<()> {
        match self.vet(request) {
            Ok(()) => self.server.handle_message(&mut &request[..], reply),
            Err(errno) => {
                let tag = request.get(5..7).map_or([0xff, 0xff], |t| [t[0], t[1]]);
                let mut message = [0u8; 11];
                message[..4].copy_from_slice(&11u32.to_le_bytes());
                message[4] = RLERROR;
                message[5..7].copy_from_slice(&tag);
                message[7..].copy_from_slice(&(errno as u32).to_le_bytes());
                reply.write_all(&message)?;
                reply.flush()
            }
        }
    }

    /// Refuses, with an errno, a message that names something outside one directory level or
    /// writes to a read-only share. Malformed messages pass: the server's decoder rejects them.
    fn vet(&self, message: &mut [u8]) -> Result<(), i32> {
        match self.vet_fields(message) {
            Ok(()) | Err(Stop::Truncated) => Ok(()),
            Err(Stop::Refused(errno)) => Err(errno),
        }
    }

    fn vet_fields(&self, message: &mut [u8]) -> Result<(), Stop> {
        let kind = *message.get(4).ok_or(Stop::Truncated)?;
        let writes = matches!(
            kind,
            TLCREATE | TSYMLINK | TMKNOD | TRENAME | TSETATTR | TXATTRCREATE | TLINK | TMKDIR | TRENAMEAT | TUNLINKAT | TWRITE | TREMOVE
        );
        if writes && self.read_only {
            return Err(Stop::Refused(libc::EROFS));
        }
        // Fields follow size[4] type[1] tag[2]; layouts as in the Linux client.
        let mut fields = Fields { message, at: 7 };
        match kind {
            TWALK => {
                fields.skip(8)?; // fid, newfid
                for _ in 0..fields.u16()? {
                    fields.name()?;
                }
            }
            TLOPEN => {
                fields.skip(4)?;
                let flags = fields.u32()?;
                if self.read_only && (flags & P9_ACCESS_MASK != 0 || flags & P9_WRITING_FLAGS != 0) {
                    return Err(Stop::Refused(libc::EROFS));
                }
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
                fields.skip(4)?;
                if fields.u32()? & P9_SETATTR_MODE != 0 {
                    fields.clear_set_id()?;
                }
            }
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

    /// A string that must name an entry of one directory.
    fn name(&mut self) -> Result<(), Stop> {
        let len = self.u16()?;
        let name = self.take(usize::from(len))?;
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            tracing::debug!("9p: refused name {:?}", String::from_utf8_lossy(name));
            return Err(Stop::Refused(libc::EACCES));
        }
        Ok(())
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
