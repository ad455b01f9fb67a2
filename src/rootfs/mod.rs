//! kvmtool's zero-setup guest: `~/.lkvm/NAME/`, a root directory whose /bin, /lib, /usr...
//! point into /host, the host's /. lkvm boots it through its own initramfs: our init mounts the
//! root directory and the host's / read-only (virtio-fs where the kernel has it, 9p otherwise),
//! each under an overlay whose writes stay in guest memory, and the `--rw` directories writable
//! at their host paths under /host.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::exec::protocol::{Request, READY_PORT};
use crate::host::lkvm_dir;

/// The static init built by build.rs from `init/main.rs`.
const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lkvm-init"));

/// The rootfs `lkvm run` boots when given no disk and no initrd.
pub const DEFAULT_NAME: &str = "default";
/// Mount tags, the same on 9p and virtio-fs: the root directory, the host's / for /host, and
/// `rw0`, `rw1`, ... for the `--rw` directories.
pub const ROOT_TAG: &str = "root";
pub const HOST_TAG: &str = "hostfs";
pub fn writable_tag(index: usize) -> String {
    format!("rw{index}")
}
/// The kernel parameter naming a `--rw` directory, in the order of their tags.
pub const WRITABLE_PARAM: &str = "lkvm.rw=";
/// The kernel parameters that mount a 9p directory (`-d DIR`, not lkvm's) as the root. kvmtool's
/// tag is `/dev/root`, which Linux >= 5.18 first tries as tag `root` (and logs an error) before
/// falling back to it; the tag `root` mounts at once.
pub const ROOT_PARAMS: &str = "root=root rw rootflags=trans=virtio,version=9p2000.L,cache=loose rootfstype=9p";

const DIRS: &[&str] = &["dev", "etc", "home", "host", "proc", "root", "sys", "tmp", "var", "virt"];
const HOST_LINKS: &[&str] = &["bin", "lib", "lib32", "lib64", "libx32", "sbin", "usr"];

pub fn path(name: &str) -> PathBuf {
    lkvm_dir().join(name)
}

/// Whether `dir` was made by `lkvm setup` (so it boots through our init and gets the host's
/// /): one of `~/.lkvm/`'s directories with kvmtool's /virt.
pub fn is_lkvm_rootfs(dir: &Path) -> bool {
    let (Ok(dir), Ok(home)) = (fs::canonicalize(dir), fs::canonicalize(lkvm_dir())) else { return false };
    dir.parent() == Some(home.as_path()) && dir.join("virt").is_dir()
}

/// `lkvm setup NAME`: refuses a name that exists, as kvmtool does.
pub fn create(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("'{name}' is not a guest name (no '/', no leading '.')"));
    }
    crate::host::ensure_lkvm_dir()?;
    let root = path(name);
    if root.exists() {
        return Err(format!("{} already exists", root.display()));
    }
    populate(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    Ok(root)
}

/// Creates or completes the rootfs at `root`. Guests see it read-only; what a user put there
/// is kept, and a symlink where a directory belongs is an error, not followed.
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
    Ok(())
}

/// The initramfs lkvm boots its rootfs guests with: our init as /init, and the console it
/// starts on.
pub fn initramfs() -> Vec<u8> {
    let entry = |name: &str, mode: u32| cpio::NewcBuilder::new(name).mode(mode).nlink(1);
    let console = entry("dev/console", 0o020600).rdev_major(5).rdev_minor(1);
    let entries = [(entry("dev", 0o040755), &[][..]), (console, &[][..]), (entry("init", 0o100755), INIT)];
    let archive = entries.into_iter().fold(Vec::new(), |archive, (builder, data)| {
        let mut writer = builder.write(archive, data.len() as u32);
        io::Write::write_all(&mut writer, data).expect("writing to a Vec");
        writer.finish().expect("writing to a Vec")
    });
    cpio::newc::trailer(archive).expect("writing to a Vec")
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

/// How a sandbox guest says it is ready for its command: booted with `lkvm.sandbox=NONCE`, its
/// init connects to the host on vsock port `READY_PORT` once it listens for the command and
/// sends `NONCE\n`. lkvm listens where Firecracker's host side receives that port
/// (`UDS_READY_PORT`). The guest can write nothing on the host to say it.
pub struct SandboxReady {
    listener: UnixListener,
    path: PathBuf,
    nonce: String,
}

impl SandboxReady {
    /// Listens beside the VM's vsock socket `uds`.
    pub fn listen(uds: &Path) -> io::Result<SandboxReady> {
        let path = PathBuf::from(format!("{}_{READY_PORT}", uds.display()));
        let listener = crate::host::bind_replacing_stale(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        listener.set_nonblocking(true)?;
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let nonce = format!("{}-{}", std::process::id(), since_epoch.subsec_nanos());
        Ok(SandboxReady { listener, path, nonce })
    }

    /// The kernel parameter that makes init get ready, announce it and wait for the command.
    pub fn param(&self) -> String {
        format!("lkvm.sandbox={}", self.nonce)
    }

    /// Waits until the guest says it is ready (true) or `ended` says it never will (false).
    pub fn wait(&self, mut ended: impl FnMut() -> bool) -> bool {
        while !ended() {
            match self.listener.accept() {
                Ok((stream, _)) if self.says_ready(&stream) => return true,
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        false
    }

    fn says_ready(&self, stream: &UnixStream) -> bool {
        let mut line = Vec::new();
        let read = stream.set_nonblocking(false).and_then(|_| stream.set_read_timeout(Some(READY_TIMEOUT)));
        read.and_then(|_| {
            io::BufRead::read_until(&mut io::BufReader::new(io::Read::take(stream, 64)), b'\n', &mut line)
        })
        .is_ok_and(|_| line == format!("{}\n", self.nonce).as_bytes())
    }
}

/// How long a connection to the readiness socket may take to say its line.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for SandboxReady {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_makes_kvmtools_layout() {
        let root = std::env::temp_dir().join(format!("lkvm-rootfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        populate(&root).unwrap();
        for dir in DIRS {
            assert!(root.join(dir).is_dir(), "{dir}");
        }
        assert_eq!(fs::read_link(root.join("usr")).unwrap(), Path::new("/host/usr"));
        assert_eq!(fs::read_to_string(root.join("etc/passwd")).unwrap(), "root:x:0:0:root:/root:/bin/sh\n");
        assert!(!is_lkvm_rootfs(&root), "only directories of ~/.lkvm are lkvm's");
        // A second run keeps what the user changed.
        fs::write(root.join("etc/passwd"), "mine\n").unwrap();
        populate(&root).unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/passwd")).unwrap(), "mine\n");

        let request = sandbox_request(&["/bin/sh".into(), "-c".into(), "exit 7".into()], None).unwrap();
        assert_eq!(request.argv, ["/host/bin/sh", "-c", "exit 7"]);
        assert!(request.cwd.starts_with("/host/") && request.tty.is_none());
        assert_eq!(sandbox_request(&["make".into()], Some((24, 80))).unwrap().argv, ["make"], "a PATH lookup");
        // A symlink where a directory belongs stops the next run.
        fs::remove_dir(root.join("tmp")).unwrap();
        symlink("/etc", root.join("tmp")).unwrap();
        assert!(populate(&root).unwrap_err().to_string().contains("not a directory"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_initramfs_holds_our_init_and_a_console() {
        let archive = initramfs();
        let mut entries = Vec::new();
        let mut rest = &archive[..];
        loop {
            let reader = cpio::NewcReader::new(rest).unwrap();
            let entry = reader.entry();
            if entry.is_trailer() {
                break;
            }
            let (name, mode, rdev) = (entry.name().to_string(), entry.mode(), (entry.rdev_major(), entry.rdev_minor()));
            let mut data = Vec::new();
            let mut reader = reader;
            io::Read::read_to_end(&mut reader, &mut data).unwrap();
            entries.push((name, mode, rdev, data));
            rest = reader.finish().unwrap();
        }
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init"]);
        assert_eq!((entries[1].1, entries[1].2), (0o020600, (5, 1)), "/dev/console, a character device");
        assert_eq!(entries[2].1, 0o100755);
        assert_eq!(&entries[2].3[..4], b"\x7fELF");
        assert_eq!(entries[2].3[4], 2, "64-bit");
    }

    #[test]
    fn a_sandbox_is_ready_when_the_guest_sends_its_nonce() {
        let uds = std::env::temp_dir().join(format!("lkvm-ready-{}.vsock", std::process::id()));
        let ready = SandboxReady::listen(&uds).unwrap();
        let nonce = ready.param().strip_prefix("lkvm.sandbox=").unwrap().to_string();
        let socket = PathBuf::from(format!("{}_{READY_PORT}", uds.display()));
        let send = |line: String| {
            let socket = socket.clone();
            std::thread::spawn(move || io::Write::write_all(&mut UnixStream::connect(socket).unwrap(), line.as_bytes()))
        };
        let ended = std::sync::atomic::AtomicBool::new(false);
        // A wrong line is not readiness; then the VM ends.
        send("someone-else\n".into()).join().unwrap().unwrap();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| ready.wait(|| ended.load(std::sync::atomic::Ordering::Relaxed)));
            std::thread::sleep(std::time::Duration::from_millis(100));
            ended.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(!waiter.join().unwrap());
        });
        send(format!("{nonce}\n")).join().unwrap().unwrap();
        assert!(ready.wait(|| false));
        drop(ready);
        assert!(!socket.exists(), "removed when dropped");
    }

    #[test]
    fn setup_refuses_bad_or_taken_names() {
        assert!(create("../etc").unwrap_err().contains("not a guest name"));
        assert!(create(".hidden").unwrap_err().contains("not a guest name"));
    }
}
