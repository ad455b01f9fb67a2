//! `--jail DIR`: lkvm runs in namespaces of its own, its root an empty tmpfs on DIR that holds
//! only what the VM uses, each bound in at its own path (read-only unless the VM writes it), in
//! the spirit of Firecracker's jailer. Entered while lkvm still has one thread, before the VM is
//! built: a mount namespace (pivot_root into the tmpfs, the host's tree detached, a /proc of the
//! jail's processes only), new PID, IPC and UTS namespaces, no core dumps. The process that
//! started stays outside, waits for the jailed lkvm (pid 1 of its PID namespace) and exits with
//! its status.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Resource, Rlimit, Signal};
use rustix::thread::UnshareFlags;

use super::landlock::{Access, Rule};
use crate::config::{GdbAddress, NetMode, VmConfig};
use crate::host::TUN_DEVICE;

/// The jailed lkvm's pid, for the signal forwarder outside.
static JAILED: AtomicI32 = AtomicI32::new(0);

/// One host file or directory the jail holds.
struct Bind {
    path: PathBuf,
    access: Access,
    /// Opened before the tmpfs covers DIR, so that a path under DIR still binds.
    source: OwnedFd,
}

/// What the jail holds for the VM `config` (and Firecracker's API on `api_sock`): the kernel
/// and initrd, the KVM device, what Landlock would allow it (shares, images, ~/.lkvm, the
/// vsock socket's directory, libslirp's files), the API and gdb sockets' directories, the tap
/// device, and the directory a throw-away qcow2 overlay goes to.
pub fn paths_for(config: &VmConfig, api_sock: Option<&Path>) -> Result<Vec<Rule>, String> {
    let shared = config.shares.iter().map(|s| &s.spec.path).chain(config.fs.iter().map(|f| &f.spec.path));
    if config.lkvm_rootfs().is_some() || shared.into_iter().any(|p| p == Path::new("/")) {
        return Err("--jail holds only what the VM uses, and lkvm's root filesystem is the host's /: \
                    boot with -i INITRD or -d IMAGE"
            .into());
    }
    if config.nets.iter().any(|n| n.spec.script.is_some()) {
        return Err("--jail: a tap's script= runs host programs, which the jail does not hold; \
                    set the tap up before lkvm starts"
            .into());
    }
    let read = |path: &Path| Rule { path: path.to_path_buf(), access: Access::Read };
    let read_write = |path: &Path| Rule { path: path.to_path_buf(), access: Access::ReadWrite };
    let mut rules = vec![read(&config.boot.kernel), read_write(&config.kvm_device)];
    rules.extend(config.boot.initrd.as_deref().map(read));
    rules.extend(super::landlock::rules_for(config));
    rules.extend(config.drives.iter().filter_map(|d| d.spec.backing.as_deref()).map(read));
    if config.drives.iter().any(|d| d.spec.snapshot) {
        rules.push(read_write(&std::env::temp_dir()));
    }
    if config.nets.iter().any(|n| n.spec.mode == NetMode::Tap) {
        rules.push(read_write(Path::new(TUN_DEVICE)));
    }
    let gdb_socket = config.gdb.as_ref().and_then(|g| match &g.address {
        GdbAddress::Unix(path) => Some(path.as_path()),
        GdbAddress::Tcp(_) => None,
    });
    for socket in [api_sock, gdb_socket].into_iter().flatten() {
        let dir = socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        rules.push(read_write(dir));
    }
    Ok(rules)
}

/// Enters the jail on `dir` holding `paths`. Returns in the jailed lkvm; the process that
/// called it waits outside and exits with the jailed lkvm's status.
pub fn enter(dir: &Path, paths: &[Rule]) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("--jail {}: {what}: {e}", dir.display());
    if !rustix::process::geteuid().is_root() {
        return Err("--jail needs root (it mounts and makes namespaces); the guest can still run as \
                    another user (--uid/--gid, or the user who ran sudo)"
            .into());
    }
    if !dir.is_dir() {
        return Err(format!("--jail {}: not a directory", dir.display()));
    }
    // fork copies only the calling thread: any other would be lost.
    if thread_count() != Some(1) {
        return Err("--jail: lkvm must still have one thread here (a bug)".into());
    }
    let namespaces = UnshareFlags::NEWNS | UnshareFlags::NEWPID | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
    // SAFETY: no descriptor table is unshared, so every thread keeps seeing every descriptor.
    unsafe { rustix::thread::unshare_unsafe(namespaces) }.map_err(|e| fail("unshare", e.into()))?;
    // Opened in the new mount namespace (a bind's source must be in it). A missing path is
    // left out: what needs it then fails in the jail as it would outside.
    let mut binds = Vec::new();
    for rule in paths {
        let path = std::path::absolute(&rule.path).map_err(|e| fail(&rule.path.display().to_string(), e))?;
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_CLOEXEC).open(&path) {
            Ok(source) => binds.push(Bind { path, access: rule.access, source: source.into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&path.display().to_string(), e)),
        }
    }
    // SAFETY: fork in a process of one thread.
    match unsafe { libc::fork() } {
        -1 => Err(fail("fork", io::Error::last_os_error())),
        0 => {
            // The jailed lkvm must not outlive the process that waits for it.
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                .map_err(io::Error::from)
                .and_then(|()| build_root(dir, &binds))
                .map_err(|e| format!("--jail {}: {e}", dir.display()))
        }
        child => wait_outside(child),
    }
}

/// How many threads this process has (from /proc/self/status).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

/// Waits outside for the jailed lkvm and exits as it did. A signal that would end lkvm ends it
/// here too: the jailed lkvm is its PID namespace's init, which the kernel shields from every
/// signal without a handler but SIGKILL.
fn wait_outside(child: libc::pid_t) -> ! {
    extern "C" fn forward(_: libc::c_int) {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(JAILED.load(Ordering::Relaxed), libc::SIGKILL) };
    }
    JAILED.store(child, Ordering::Relaxed);
    // SAFETY: installs an async-signal-safe handler; waitpid and _exit take integers and a
    // pointer to a local.
    unsafe {
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(signal, forward as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
        let mut status = 0;
        while libc::waitpid(child, &mut status, 0) == -1 {
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                libc::_exit(1);
            }
        }
        let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
        libc::_exit(code)
    }
}

/// In the new namespaces: a tmpfs on `dir` with each bind at its path, made the root.
fn build_root(dir: &Path, binds: &[Bind]) -> io::Result<()> {
    make_mounts_private()?;
    let no_suid_dev = MountFlags::NOSUID | MountFlags::NODEV;
    rustix::mount::mount("tmpfs", dir, "tmpfs", no_suid_dev, c"mode=0755,size=64k")?;
    // Parents first: a path inside a bound directory is then already there to bind over.
    let mut binds: Vec<&Bind> = binds.iter().collect();
    binds.sort_by_key(|b| b.path.components().count());
    for bind in binds {
        let target = in_jail(dir, &bind.path);
        let source = fd_path(&bind.source);
        let file_type = std::fs::metadata(&source)?.file_type();
        make_mount_point(dir, &target, file_type.is_dir())?;
        // Not recursive: mounts below a bound directory stay outside.
        rustix::mount::mount_bind(&source, &target)
            .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", bind.path.display())))?;
        // Device nodes (/dev/kvm, /dev/net/tun) keep working; nothing else may be one.
        let mut flags = MountFlags::BIND | MountFlags::NOSUID;
        if !(file_type.is_char_device() || file_type.is_block_device()) {
            flags |= MountFlags::NODEV;
        }
        if bind.access == Access::Read {
            flags |= MountFlags::RDONLY;
        }
        rustix::mount::mount_remount(&target, flags, "")?;
    }
    // The share servers reopen files through /proc/self/fd. This procfs shows only the jail's
    // PID namespace, its processes and nothing else (no sysctls, no kcore).
    let proc = dir.join("proc");
    make_mount_point(dir, &proc, true)?;
    rustix::mount::mount("proc", &proc, "proc", no_suid_dev | MountFlags::NOEXEC, c"subset=pid")?;
    // Relative paths (a drive given as `disk.img`) keep meaning what they did.
    let cwd = std::env::current_dir()?;
    make_mount_point(dir, &in_jail(dir, &cwd), true)?;
    pivot_into(dir)?;
    std::env::set_current_dir(&cwd)?;
    // The jail's own tree is read-only: lkvm writes only through what is bound writable.
    rustix::mount::mount_remount("/", no_suid_dev | MountFlags::RDONLY, "")?;
    rustix::process::setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })?;
    Ok(())
}

/// In a new mount namespace: nothing mounted from here on reaches the host's.
pub fn make_mounts_private() -> io::Result<()> {
    rustix::mount::mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)?;
    Ok(())
}

/// Makes the mount point `dir` the root, the host's tree detached from it, and `/` the working
/// directory.
pub fn pivot_into(dir: &Path) -> io::Result<()> {
    let old_root = dir.join(".host");
    std::fs::DirBuilder::new().mode(0o700).create(&old_root)?;
    rustix::process::pivot_root(dir, &old_root)?;
    std::env::set_current_dir("/")?;
    rustix::mount::unmount("/.host", UnmountFlags::DETACH)?;
    std::fs::remove_dir("/.host")
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Where the host's absolute `path` is in the jail on `dir`.
fn in_jail(dir: &Path, path: &Path) -> PathBuf {
    dir.join(path.strip_prefix("/").unwrap_or(path))
}

/// Creates `target` (a directory, or an empty file for a file to bind) and its parents in the
/// jail's tmpfs, unless a bind made earlier already shows it.
fn make_mount_point(dir: &Path, target: &Path, is_dir: bool) -> io::Result<()> {
    debug_assert!(target.starts_with(dir) && !target.components().any(|c| c == Component::ParentDir));
    if target.exists() {
        return Ok(());
    }
    let parent = if is_dir { target } else { target.parent().unwrap_or(dir) };
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
    if !is_dir {
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(target)?;
    }
    Ok(())
}
