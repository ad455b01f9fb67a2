//! Firecracker's jailer (this binary invoked as `jailer`, or `lkvm jailer`), as its
//! docs/jailer.md describes it: builds
//! `<base>/<exec file name>/<id>/root`, copies the exec file there, sets resource limits and
//! cgroups, pivots into the root in a mount namespace of its own, makes the device nodes the VMM
//! needs, joins a network namespace, detaches, drops to uid:gid and execs the copy with `--id`.
//! The root holds nothing else: the binary must be static (see the README).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use rustix::process::{Resource, Rlimit};
use rustix::thread::UnshareFlags;

use crate::jail::User;

#[derive(Args, Debug)]
pub struct JailerArgs {
    /// The microVM's id: letters, digits and '-', at most 64
    #[arg(long)]
    pub id: String,
    /// The Firecracker binary to copy into the jail and run (its name must contain
    /// "firecracker"; a static lkvm named so)
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user the binary runs as
    #[arg(long)]
    pub uid: u32,
    /// The group the binary runs as
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made: <BASE>/<exec file name>/<id>/root
    #[arg(long, value_name = "BASE", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (e.g. /var/run/netns/NAME)
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Detach: a new session, standard input and output on /dev/null
    #[arg(long)]
    pub daemonize: bool,
    /// Run the binary in a new PID namespace (its pid is in <exec file name>.pid)
    #[arg(long)]
    pub new_pid_ns: bool,
    /// 1 or 2
    #[arg(long, value_name = "VERSION", default_value_t = 1)]
    pub cgroup_version: u8,
    /// FILE=VALUE written in the microVM's cgroup (e.g. cpuset.cpus=0), repeatable
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The cgroup the microVM's cgroup is made in (default: the exec file's name)
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,
    /// fsize=BYTES or no-file=N, repeatable (no-file is 2048 unless given)
    #[arg(long, value_name = "RESOURCE=VALUE")]
    pub resource_limit: Vec<String>,
    /// Arguments for the binary, after `--`
    #[arg(last = true)]
    pub exec_args: Vec<String>,
}

/// Firecracker's jailer bounds open files to this unless told otherwise.
const DEFAULT_NO_FILE: u64 = 2048;
const MAX_ID_LEN: usize = 64;

/// The device nodes made in the jail: path, and the host node whose numbers it takes.
const DEVICES: [&str; 4] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom", "/dev/userfaultfd"];

/// Runs the jailer; returns only on failure (the jailed binary replaces this process).
pub fn run(args: &JailerArgs) -> Result<std::convert::Infallible, String> {
    let started_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
    let started_cpu_us = process_cpu_us();
    check_id(&args.id)?;
    let exec_name = exec_file_name(&args.exec_file)?;
    if !rustix::process::geteuid().is_root() {
        return Err("jailer: needs root (it mounts, makes device nodes and changes user)".into());
    }
    let limits = resource_limits(&args.resource_limit)?;
    let cgroup_values = cgroup_values(&args.cgroup)?;
    if !matches!(args.cgroup_version, 1 | 2) {
        return Err(format!("--cgroup-version {}: use 1 or 2", args.cgroup_version));
    }
    close_inherited_descriptors();

    let root = args.chroot_base_dir.join(&exec_name).join(&args.id).join("root");
    let fail = |what: &str, e: io::Error| format!("jailer: {what}: {e}");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&root)
        .map_err(|e| fail(&root.display().to_string(), e))?;
    let jailed_exec = root.join(&exec_name);
    fs::copy(&args.exec_file, &jailed_exec).map_err(|e| fail(&format!("copying {}", args.exec_file.display()), e))?;
    for (resource, limit) in limits {
        rustix::process::setrlimit(resource, Rlimit { current: Some(limit), maximum: Some(limit) })
            .map_err(|e| fail("setrlimit", e.into()))?;
    }
    let parent_cgroup = args.parent_cgroup.clone().unwrap_or_else(|| PathBuf::from(&exec_name));
    join_cgroups(args.cgroup_version, &parent_cgroup.join(&args.id), &cgroup_values)?;

    // What lies outside the root is opened now: the namespace, /dev/null, the devices' numbers.
    let netns = match &args.netns {
        Some(path) => Some(fs::File::open(path).map_err(|e| fail(&format!("--netns {}", path.display()), e))?),
        None => None,
    };
    let dev_null: Option<OwnedFd> = match args.daemonize {
        true => Some(
            fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| fail("/dev/null", e))?.into(),
        ),
        false => None,
    };
    let devices: Vec<(&str, u64)> = DEVICES
        .iter()
        .filter_map(|path| {
            fs::metadata(path).ok().filter(|m| m.file_type().is_char_device()).map(|m| (*path, m.rdev()))
        })
        .collect();

    // SAFETY: no descriptor table is unshared; this process has one thread.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }.map_err(|e| fail("unshare", e.into()))?;
    crate::jail::namespaces::make_mounts_private().map_err(|e| fail("mount propagation", e))?;
    rustix::mount::mount_bind(&root, &root).map_err(|e| fail("binding the root onto itself", e.into()))?;
    crate::jail::namespaces::pivot_into(&root).map_err(|e| fail("pivot_root", e))?;
    rustix::process::chroot(".").map_err(|e| fail("chroot", e.into()))?;

    let user = User { uid: args.uid, gid: args.gid };
    for (path, rdev) in devices {
        make_device(path, rdev, user).map_err(|e| fail(path, e))?;
    }
    std::os::unix::fs::chown("/", Some(user.uid), Some(user.gid)).map_err(|e| fail("chown /", e))?;
    if let Some(netns) = netns {
        // SAFETY: setns on a namespace descriptor this function opened.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(fail("joining the network namespace", io::Error::last_os_error()));
        }
    }
    if let Some(dev_null) = dev_null {
        rustix::process::setsid().map_err(|e| fail("setsid (is the jailer a process group leader?)", e.into()))?;
        for stdio in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            if unsafe { libc::dup2(dev_null.as_raw_fd(), stdio) } < 0 {
                return Err(fail("redirecting to /dev/null", io::Error::last_os_error()));
            }
        }
    }
    let pid_file = PathBuf::from("/").join(format!("{exec_name}.pid"));
    if args.new_pid_ns {
        // SAFETY: as above; the next fork's child is the namespace's init.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }.map_err(|e| fail("unshare", e.into()))?;
        // SAFETY: fork in a process of one thread.
        match unsafe { libc::fork() } {
            -1 => return Err(fail("fork", io::Error::last_os_error())),
            0 => {}
            child => {
                fs::write(&pid_file, child.to_string()).map_err(|e| fail(&pid_file.display().to_string(), e))?;
                std::process::exit(0);
            }
        }
    } else {
        fs::write(&pid_file, std::process::id().to_string()).map_err(|e| fail(&pid_file.display().to_string(), e))?;
    }
    user.become_user(&[])?;
    let mut command = std::process::Command::new(Path::new("/").join(&exec_name));
    command
        .env_clear()
        .arg(format!("--id={}", args.id))
        .arg(format!("--start-time-us={started_us}"))
        .arg(format!("--start-time-cpu-us={started_cpu_us}"))
        .args(&args.exec_args);
    Err(fail(&format!("exec /{exec_name}"), command.exec()))
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("--id {id}: use 1 to {MAX_ID_LEN} letters, digits and '-'"));
    }
    Ok(())
}

/// The exec file's name; as Firecracker's jailer, it must contain "firecracker".
fn exec_file_name(exec_file: &Path) -> Result<String, String> {
    let meta = fs::metadata(exec_file).map_err(|e| format!("--exec-file {}: {e}", exec_file.display()))?;
    let name = exec_file.file_name().filter(|_| meta.is_file()).and_then(|n| n.to_str());
    let name = name.ok_or_else(|| format!("--exec-file {}: not a file with a UTF-8 name", exec_file.display()))?;
    if !name.contains("firecracker") {
        return Err(format!("--exec-file {}: the file name must contain \"firecracker\"", exec_file.display()));
    }
    Ok(name.to_string())
}

/// `fsize=BYTES` and `no-file=N`; no-file defaults to Firecracker's 2048.
fn resource_limits(args: &[String]) -> Result<Vec<(Resource, u64)>, String> {
    let mut limits = vec![(Resource::Nofile, DEFAULT_NO_FILE)];
    for arg in args {
        let bad = || format!("--resource-limit {arg}: use fsize=BYTES or no-file=N");
        let (name, value) = arg.split_once('=').ok_or_else(bad)?;
        let value: u64 = value.parse().map_err(|_| bad())?;
        match name {
            "fsize" => limits.push((Resource::Fsize, value)),
            "no-file" => limits[0].1 = value,
            _ => return Err(bad()),
        }
    }
    Ok(limits)
}

fn cgroup_values(args: &[String]) -> Result<Vec<(String, String)>, String> {
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((file, value)) if file.contains('.') && !file.contains('/') => Ok((file.into(), value.into())),
            _ => Err(format!("--cgroup {arg}: use FILE=VALUE, e.g. cpuset.cpus=0")),
        })
        .collect()
}

fn controller(file: &str) -> &str {
    file.split('.').next().unwrap_or_default()
}

/// Makes the microVM's cgroup `relative` (under each hierarchy holding a controller of
/// `values`), writes the values and moves this process in. Nothing to do without values.
fn join_cgroups(version: u8, relative: &Path, values: &[(String, String)]) -> Result<(), String> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|e| format!("jailer: /proc/mounts: {e}"))?;
    let mut groups: Vec<(PathBuf, Vec<&(String, String)>)> = Vec::new();
    for value in values {
        let controller = controller(&value.0);
        let base = cgroup_mount(&mounts, version, controller).ok_or_else(|| {
            format!("--cgroup {}: no cgroup v{version} hierarchy has the {controller} controller", value.0)
        })?;
        match groups.iter_mut().find(|(b, _)| *b == base) {
            Some((_, values)) => values.push(value),
            None => groups.push((base, vec![value])),
        }
    }
    for (base, values) in groups {
        let dir = base.join(relative);
        let write = |path: &Path, text: &str| {
            fs::write(path, text).map_err(|e| format!("jailer: writing {text} to {}: {e}", path.display()))
        };
        if version == 2 {
            // Each controller must be enabled in every cgroup above the microVM's.
            let controllers: std::collections::BTreeSet<&str> = values.iter().map(|(f, _)| controller(f)).collect();
            let mut above = base.clone();
            let parents: Vec<_> = relative.parent().map(|p| p.components().collect()).unwrap_or_default();
            for part in std::iter::once(None).chain(parents.into_iter().map(Some)) {
                if let Some(part) = part {
                    above.push(part);
                    fs::create_dir_all(&above).map_err(|e| format!("jailer: {}: {e}", above.display()))?;
                }
                for controller in &controllers {
                    write(&above.join("cgroup.subtree_control"), &format!("+{controller}"))?;
                }
            }
        }
        fs::create_dir_all(&dir).map_err(|e| format!("jailer: {}: {e}", dir.display()))?;
        for (file, value) in values {
            write(&dir.join(file), value)?;
        }
        write(&dir.join(if version == 2 { "cgroup.procs" } else { "tasks" }), &std::process::id().to_string())?;
    }
    Ok(())
}

/// Where the hierarchy holding `controller` is mounted: cgroup v2's one hierarchy, or the v1
/// hierarchy whose mount options name it.
fn cgroup_mount(mounts: &str, version: u8, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (point, kind, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        let found = match version {
            2 => *kind == "cgroup2",
            _ => *kind == "cgroup" && options.split(',').any(|o| o == controller),
        };
        found.then(|| PathBuf::from(point))
    })
}

/// A character device `path` with the host's numbers `rdev`, owned by `user`, mode 0600.
fn make_device(path: &str, rdev: u64, user: User) -> io::Result<()> {
    if let Some(dir) = Path::new(path).parent() {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    }
    let name = std::ffi::CString::new(path).map_err(io::Error::other)?;
    // SAFETY: mknod reads the NUL-terminated path only.
    if unsafe { libc::mknod(name.as_ptr(), libc::S_IFCHR | 0o600, rdev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
}

/// Closes every descriptor but standard input, output and error.
fn close_inherited_descriptors() {
    // SAFETY: close_range takes integers; nothing in this process uses a descriptor above 2 yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
}

fn process_cpu_us() -> u128 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes this struct only.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    std::time::Duration::new(time.tv_sec as u64, time.tv_nsec as u32).as_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_limits_and_cgroups_parse_as_firecrackers_jailer_takes_them() {
        assert!(check_id("551e7604-e35c-42b3-b825-416853441234").is_ok());
        assert!(check_id("").is_err() && check_id("a/b").is_err() && check_id(&"a".repeat(65)).is_err());
        let limits = resource_limits(&["fsize=250000000".into(), "no-file=1024".into()]).unwrap();
        assert_eq!(limits, [(Resource::Nofile, 1024), (Resource::Fsize, 250000000)]);
        assert_eq!(resource_limits(&[]).unwrap(), [(Resource::Nofile, DEFAULT_NO_FILE)]);
        assert!(resource_limits(&["cpu=1".into()]).is_err());
        assert_eq!(cgroup_values(&["cpuset.cpus=0-1".into()]).unwrap(), [("cpuset.cpus".into(), "0-1".into())]);
        assert!(cgroup_values(&["cpus".into()]).is_err() && cgroup_values(&["../x.y=1".into()]).is_err());
        let mounts =
            "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\ncgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n";
        assert_eq!(cgroup_mount(mounts, 2, "cpu"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup_mount(mounts, 1, "cpuset"), Some(PathBuf::from("/sys/fs/cgroup/cpuset")));
        assert_eq!(cgroup_mount(mounts, 1, "memory"), None);
        let exec = std::env::temp_dir().join(format!("lkvm-jailer-{}-firecracker", std::process::id()));
        fs::write(&exec, "").unwrap();
        assert!(exec_file_name(&exec).is_ok());
        assert!(exec_file_name(Path::new("/bin/sh")).unwrap_err().contains("must contain"));
        fs::remove_file(exec).unwrap();
    }
}
