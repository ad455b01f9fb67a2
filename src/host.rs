//! What lkvm owns on the host: the user's `~/.lkvm` and sandbox cache, the private UNIX
//! sockets it listens on, and the eventfds its threads wake each other with.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The device a tap's queues are opened through.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// An eventfd as lkvm uses them: non-blocking, and close-on-exec so that no child (a tap
/// script) inherits it.
pub fn eventfd() -> io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// The warm-sandbox cache: `$XDG_CACHE_HOME/lkvm/sandbox`, or `~/.cache/lkvm/sandbox` (never
/// under /tmp, where another user could plant a snapshot).
pub fn sandbox_cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| user_home().join(".cache"));
    base.join("lkvm/sandbox")
}

/// `~/.lkvm`, kvmtool's directory for sockets and rootfs directories. Without HOME it is the
/// user's home from the password database, never a shared directory such as /tmp.
pub fn lkvm_dir() -> PathBuf {
    user_home().join(".lkvm")
}

/// Whether a guest may be given the host directory `dir` (canonical) to write: not the host's
/// /, nor lkvm's own directory (its sockets, the rootfs of the next run) or the warm-sandbox
/// cache (snapshots lkvm restores), nor a directory holding either.
pub fn check_guest_writable(dir: &Path) -> Result<(), String> {
    if dir == Path::new("/") {
        return Err("the host's / stays read-only; name the directories to write".into());
    }
    let cache = sandbox_cache_root();
    for own in [lkvm_dir(), cache.parent().unwrap_or(&cache).to_path_buf()] {
        let own = std::fs::canonicalize(&own).unwrap_or(own);
        if dir.starts_with(&own) || own.starts_with(dir) {
            return Err(format!("it holds lkvm's {}; name a directory beside it", own.display()));
        }
    }
    Ok(())
}

/// The user's home: HOME, or the password database's.
pub fn user_home() -> PathBuf {
    home_dir(std::env::var_os("HOME"), passwd_home)
}

/// An absolute HOME, else the password database's; else a path that cannot be created (as
/// Debian's users without a home have).
fn home_dir(env_home: Option<std::ffi::OsString>, passwd: impl FnOnce() -> Option<PathBuf>) -> PathBuf {
    env_home
        .map(PathBuf::from)
        .filter(|home| home.is_absolute())
        .or_else(passwd)
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
}

fn passwd_home() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: struct passwd is plain data; all zeroes is a valid (empty) value.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes the entry's strings into `buffer`, which outlives their use here.
    let rc = unsafe { libc::getpwuid_r(libc::geteuid(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    if rc != 0 || found.is_null() || entry.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir points at a NUL-terminated string in `buffer`.
    let dir = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))).filter(|home| home.is_absolute())
}

/// Creates `~/.lkvm` (mode 0700) if it is missing, and refuses one that another user owns,
/// that others can write, or that is a symlink: its sockets and root directories are the
/// user's alone.
pub fn ensure_lkvm_dir() -> Result<PathBuf, String> {
    let dir = lkvm_dir();
    ensure_private_dir(&dir)?;
    Ok(dir)
}

fn ensure_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let bad = |what: String| format!("{}: {what}", dir.display());
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(bad(e.to_string())),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        return Err(bad("not a directory (a symlink?): remove it".into()));
    }
    if meta.uid() != me {
        return Err(bad(format!("owned by uid {}, not by you (uid {me}): refusing to use it", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!("others can write it (mode {:o}): chmod 700 it", meta.mode() & 0o777)));
    }
    Ok(())
}

/// Binds a UNIX socket at `path` that only its owner may connect to (mode 0600 whatever the
/// umask), replacing one left by a process that died. A socket that answers is refused
/// (`AddrInUse`), and so is anything at the path that is not a socket: it is never removed.
pub fn bind_replacing_stale(path: &Path) -> io::Result<UnixListener> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "in use (or not a socket)"));
        }
        std::fs::remove_file(path)?;
    }
    let socket = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&socket, &SocketAddrUnix::new(path)?)?;
    // Nobody can connect before listen: the mode is set while the socket takes no one.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    rustix::net::listen(&socket, 128)?;
    Ok(UnixListener::from(socket))
}

/// The pause after a failed accept. Out of descriptors (EMFILE) it fails until one is closed,
/// and retrying at once would spin a core meanwhile.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections `accept` yields, pausing after each failure.
pub fn connections<S>(mut accept: impl FnMut() -> io::Result<S>) -> impl Iterator<Item = S> {
    std::iter::from_fn(move || loop {
        match accept() {
            Ok(stream) => return Some(stream),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!("accept: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    })
}

pub fn socket_path(name: &str) -> PathBuf {
    lkvm_dir().join(format!("{name}.sock"))
}

/// Guest names become file names: letters, digits, '.', '_' and '-' only.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!("guest name '{name}': use 1-64 letters, digits, '.', '_' or '-'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    #[test]
    fn sockets_are_their_owners_alone_whatever_the_umask() {
        use super::*;
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("lkvm-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = bind_replacing_stale(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok(), "it listens");
        drop(listener);
        assert!(bind_replacing_stale(&path).is_ok(), "a dead socket is replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_guest_writes_neither_the_hosts_root_nor_lkvms_own_directories() {
        use super::*;
        assert!(check_guest_writable(Path::new("/")).unwrap_err().contains("stays read-only"));
        let cache = user_home().join(".cache");
        assert!(check_guest_writable(&cache).unwrap_err().contains("it holds lkvm's"), "--rw ~/.cache");
        assert!(check_guest_writable(&user_home()).is_err(), "--rw ~ holds ~/.lkvm");
        assert!(check_guest_writable(&lkvm_dir().join("default")).is_err());
        assert_eq!(check_guest_writable(&user_home().join("src")), Ok(()));
    }

    #[test]
    fn lkvm_dir_is_the_users_never_a_shared_one() {
        use super::*;

        use std::os::unix::fs::MetadataExt;
        let from_passwd = || Some(PathBuf::from("/home/me"));
        assert_eq!(home_dir(Some("/h".into()), from_passwd), Path::new("/h"));
        assert_eq!(home_dir(None, from_passwd), Path::new("/home/me"), "HOME unset");
        assert_eq!(home_dir(Some("relative".into()), from_passwd), Path::new("/home/me"));
        assert_eq!(home_dir(None, || None), Path::new("/nonexistent"));

        let base = std::env::temp_dir().join(format!("lkvm-dir-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let fresh = base.join("fresh");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        let shared = base.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(ensure_private_dir(&shared).unwrap_err().contains("others can write it"));
        let link = base.join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(ensure_private_dir(&link).unwrap_err().contains("not a directory"));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            assert!(ensure_private_dir(&theirs).unwrap_err().contains("owned by uid 65534"));
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
    #[test]
    fn a_failing_accept_is_retried_after_a_pause_not_at_once() {
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (counted, stopping) = (attempts.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            let accept = || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    true => Ok(()),
                    false => Err(io::Error::from_raw_os_error(libc::EMFILE)),
                }
            };
            connections(accept).next()
        });
        std::thread::sleep(Duration::from_millis(350));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(acceptor.join().unwrap(), Some(()), "a connection after the failures");
        let made = attempts.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=6).contains(&made), "{made} accept attempts in 350 ms");
    }

    #[test]
    fn names_are_safe_file_names() {
        assert!(check_name("guest-123").is_ok());
        assert!(check_name("a.b_c").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
