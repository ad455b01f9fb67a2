//! kvmtool's zero-setup guest: `~/.lkvm/NAME/`, a root directory served over 9p whose /bin,
//! /lib, /usr... point into /host (the host's / shared read-only), with our init as /virt/init.

pub mod warm;

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::control::lkvm_dir;
use crate::exec::protocol::Request;

/// The static init built by build.rs from `init/main.rs`.
const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lkvm-init"));

/// The rootfs `lkvm run` boots when given no disk and no initrd.
pub const DEFAULT_NAME: &str = "default";
/// Mount tags: the root filesystem and the host's / for /host.
pub const ROOT_TAG: &str = "root";
pub const HOST_TAG: &str = "hostfs";
/// The kernel parameters that mount a 9p root and start our init. kvmtool's tag is
/// `/dev/root`, which Linux >= 5.18 first tries as tag `root` (and logs an error) before
/// falling back to it; the tag `root` mounts at once.
pub const ROOT_PARAMS: &str = "root=root rw rootflags=trans=virtio,version=9p2000.L,cache=loose rootfstype=9p";
pub const INIT_PARAM: &str = "init=/virt/init";

const DIRS: &[&str] = &["dev", "etc", "home", "host", "proc", "root", "sys", "tmp", "var", "virt", "virt/sandbox"];
const HOST_LINKS: &[&str] = &["bin", "lib", "lib32", "lib64", "libx32", "sbin", "usr"];
const INIT_PATH: &str = "virt/init";

pub fn path(name: &str) -> PathBuf {
    lkvm_dir().join(name)
}

/// Whether `dir` was made by `lkvm setup` (so it boots our init and needs the host's /): one
/// of `~/.lkvm/`'s directories with our init. Where it lives is part of the test: a guest can
/// write a /virt/init into any root it is given, and must not earn the host's / by it.
pub fn is_lkvm_rootfs(dir: &Path) -> bool {
    let (Ok(dir), Ok(home)) = (fs::canonicalize(dir), fs::canonicalize(lkvm_dir())) else { return false };
    dir.parent() == Some(home.as_path()) && dir.join(INIT_PATH).is_file()
}

/// `lkvm setup NAME`: refuses a name that exists, as kvmtool does.
pub fn create(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("'{name}' is not a guest name (no '/', no leading '.')"));
    }
    let root = path(name);
    if root.exists() {
        return Err(format!("{} already exists", root.display()));
    }
    populate(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    Ok(root)
}

/// Creates or completes the rootfs at `root`, and refreshes its init to this lkvm's. Its guests
/// write in it as root: whatever they left is not followed (no symlink where a directory
/// belongs, no file written through a symlink).
pub fn populate(root: &Path) -> io::Result<()> {
    fs::create_dir_all(root)?;
    for dir in DIRS {
        ensure_dir(&root.join(dir))?;
    }
    let tmp =
        fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(root.join("tmp"))?;
    tmp.set_permissions(fs::Permissions::from_mode(0o1777))?;
    for name in HOST_LINKS {
        let link = root.join(name);
        match symlink(Path::new("/host").join(name), link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    write_if_missing(&root.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n")?;
    write_if_missing(&root.join("etc/group"), b"root:x:0:\n")?;
    if let Ok(resolv) = fs::read("/etc/resolv.conf") {
        write_if_missing(&root.join("etc/resolv.conf"), &resolv)?;
    }
    let init = root.join(INIT_PATH);
    if is_current_init(&init) {
        return Ok(()); // most runs write nothing
    }
    // Written under a name of its own and renamed: a guest running the old init keeps it, and
    // lkvm processes starting together do not write into each other's copy.
    let staged = root.join(format!("virt/.init.{}", std::process::id()));
    let _ = fs::remove_file(&staged);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&staged)
        .and_then(|mut f| io::Write::write_all(&mut f, INIT))?;
    fs::rename(staged, init) // replaces a symlink there, never follows it
}

/// Whether `path` is a regular file holding this lkvm's init (not followed if a symlink, not
/// waited on if a FIFO: guests write here).
fn is_current_init(path: &Path) -> bool {
    let Ok(file) = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
    else {
        return false;
    };
    if !file.metadata().is_ok_and(|m| m.is_file() && m.len() == INIT.len() as u64) {
        return false;
    }
    let mut current = Vec::with_capacity(INIT.len());
    io::Read::read_to_end(&mut io::Read::take(&file, INIT.len() as u64), &mut current).is_ok() && current == INIT
}

/// Makes `path` a directory unless it is one; anything else there (a symlink) is an error.
fn ensure_dir(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other(format!("{} is not a directory (remove it)", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(path),
        Err(e) => Err(e),
    }
}

/// Creates `path` with `contents`; O_EXCL means a symlink there is not followed.
fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| io::Write::write_all(&mut f, contents))
}

fn write_if_missing(path: &Path, contents: &[u8]) -> io::Result<()> {
    match write_new(path, contents) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// lkvm sandbox's command as the guest runs it: an absolute `argv[0]` is looked up in the
/// host's / (under /host), and it runs in the host's current directory as seen under /host.
pub fn sandbox_request(argv: &[String], tty: Option<(u16, u16)>) -> io::Result<Request> {
    let mut argv = argv.to_vec();
    if let Some(program) = argv.first_mut().filter(|p| p.starts_with('/')) {
        *program = format!("/host{program}");
    }
    let cwd = std::env::current_dir()?;
    let cwd = Path::new("/host").join(cwd.strip_prefix("/").unwrap_or(&cwd));
    let env = crate::exec::terminal_env(tty);
    Ok(Request { tty, cwd: cwd.to_string_lossy().into_owned(), env, argv })
}

/// How a sandbox guest says it is ready for its command: lkvm creates
/// `ROOTFS/virt/sandbox/ready-NONCE` and boots with `lkvm.sandbox=NONCE`; the guest's init
/// removes the file once it listens for the command. Removed on drop if the guest did not.
pub struct SandboxReady {
    path: PathBuf,
    nonce: String,
}

impl SandboxReady {
    pub fn create(root: &Path) -> io::Result<SandboxReady> {
        let nonce = std::process::id().to_string();
        let path = root.join("virt/sandbox").join(format!("ready-{nonce}"));
        let _ = fs::remove_file(&path); // left by a process of the same pid that died
        write_new(&path, b"")?;
        Ok(SandboxReady { path, nonce })
    }

    /// The kernel parameter that makes init get ready, announce it and wait for the command.
    pub fn param(&self) -> String {
        format!("lkvm.sandbox={}", self.nonce)
    }

    pub fn pending(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok()
    }
}

impl Drop for SandboxReady {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_makes_kvmtools_layout_with_our_init() {
        let root = std::env::temp_dir().join(format!("lkvm-rootfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        populate(&root).unwrap();
        for dir in DIRS {
            assert!(root.join(dir).is_dir(), "{dir}");
        }
        assert_eq!(fs::read_link(root.join("usr")).unwrap(), Path::new("/host/usr"));
        assert_eq!(fs::read_to_string(root.join("etc/passwd")).unwrap(), "root:x:0:0:root:/root:/bin/sh\n");
        let init = fs::read(root.join(INIT_PATH)).unwrap();
        assert_eq!(&init[..4], b"\x7fELF");
        assert_eq!(init[4], 2, "64-bit");
        assert_eq!(fs::metadata(root.join(INIT_PATH)).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(!is_lkvm_rootfs(&root), "only directories of ~/.lkvm are lkvm's");
        // A second run keeps what the user changed and refreshes the init.
        fs::write(root.join("etc/passwd"), "mine\n").unwrap();
        fs::write(root.join(INIT_PATH), "stale").unwrap();
        populate(&root).unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/passwd")).unwrap(), "mine\n");
        assert_eq!(fs::read(root.join(INIT_PATH)).unwrap(), init);

        let ready = SandboxReady::create(&root).unwrap();
        assert!(ready.pending());
        assert_eq!(ready.param(), format!("lkvm.sandbox={}", std::process::id()));
        fs::remove_file(root.join(format!("virt/sandbox/ready-{}", std::process::id()))).unwrap();
        assert!(!ready.pending(), "the guest removed it");
        drop(SandboxReady::create(&root).unwrap());
        assert_eq!(fs::read_dir(root.join("virt/sandbox")).unwrap().count(), 0, "removed when dropped");
        let request = sandbox_request(&["/bin/sh".into(), "-c".into(), "exit 7".into()], None).unwrap();
        assert_eq!(request.argv, ["/host/bin/sh", "-c", "exit 7"]);
        assert!(request.cwd.starts_with("/host/") && request.tty.is_none());
        assert_eq!(sandbox_request(&["make".into()], Some((24, 80))).unwrap().argv, ["make"], "a PATH lookup");
        // A guest's symlink where a directory belongs stops the next run.
        fs::remove_dir(root.join("tmp")).unwrap();
        symlink("/etc", root.join("tmp")).unwrap();
        assert!(populate(&root).unwrap_err().to_string().contains("not a directory"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn setup_refuses_bad_or_taken_names() {
        assert!(create("../etc").unwrap_err().contains("not a guest name"));
        assert!(create(".hidden").unwrap_err().contains("not a guest name"));
    }
}
