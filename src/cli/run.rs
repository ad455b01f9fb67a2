//! `lkvm run`: options as in kvmtool, turned into a validated VM configuration.

use std::path::PathBuf;

use clap::Args;

use crate::arch::x86_64::cpuid;
use crate::config::firecracker::{FullConfig, VSOCK_ID};
use crate::config::{
    BalloonConfig, BootConfig, CmdlinePolicy, ConsoleDevice, DriveConfig, EntropyConfig, FsConfig, MachineConfig,
    NetConfig, RootShare, ShareConfig, Transport, VmConfig, VsockConfig,
};
use crate::config::{DiskSpec, FsSpec, GdbConfig, NetMode, NetSpec, RateLimit, ShareSpec, MAX_CPUS};
use crate::host::lkvm_dir;
use crate::jail::landlock::Rule;
use crate::rootfs;

const MIB: u64 = 1 << 20;
/// kvmtool's default: 64 MiB per vCPU plus 192 MiB...
const DEFAULT_MEM_PER_CPU: u64 = 64 * MIB;
/// ... capped at 80% of host RAM.
const DEFAULT_MEM_HOST_PERCENT: u64 = 80;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry), bzImage, or a flat real-mode binary
    #[arg(short = 'k', long = "kernel", value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The kernel, as a bare argument (kvmtool style)
    #[arg(value_name = "KERNEL", conflicts_with = "kernel")]
    pub kernel_arg: Option<PathBuf>,
    /// Initial ramdisk
    #[arg(short = 'i', long = "initrd", value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel parameters, appended to the generated command line
    #[arg(short = 'p', long = "params", value_name = "PARAMS", allow_hyphen_values = true)]
    pub params: Option<String>,
    /// Guest memory: MiB, or with a suffix B, K, M, G, T [default: 64 MiB x (cpus + 3)]
    #[arg(short = 'm', long = "mem", value_name = "SIZE", value_parser = parse_mem_size)]
    pub mem: Option<u64>,
    /// Number of vCPUs [default: host CPUs]
    #[arg(short = 'c', long = "cpus", value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest name [default: guest-<pid>]
    #[arg(long)]
    pub name: Option<String>,
    /// Do not generate a kernel command line; pass only -p
    #[arg(long)]
    pub nodefaults: bool,
    /// KVM device
    #[arg(long = "dev", value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Hide CPUID features from the guest, e.g. `popcnt,avx2` (names as in /proc/cpuinfo)
    #[arg(long = "disable-cpuid", value_name = "FEATURES", value_delimiter = ',')]
    pub disable_cpuid: Vec<String>,
    /// Disk image or host block device, `PATH[,ro][,direct]`; repeatable (/dev/vda, /dev/vdb, ...).
    /// A directory is booted as a 9p root filesystem; the NAME of an `lkvm setup` guest boots it
    #[arg(short = 'd', long = "disk", value_name = "IMAGE|DIR")]
    pub disks: Vec<String>,
    /// Share a host directory over virtio-9p, `DIR,TAG[,ro]`; repeatable. In the guest:
    /// mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt
    #[arg(long = "9p", value_name = "DIR,TAG")]
    pub shares: Vec<String>,
    /// Share a host directory over virtio-fs, `DIR,TAG[,ro]`; repeatable. In the guest:
    /// mount -t virtiofs TAG /mnt
    #[arg(long = "fs", value_name = "DIR,TAG")]
    pub fs: Vec<String>,
    /// On lkvm's root filesystem (no disk): make the host directory DIR writable in the guest,
    /// at /host/DIR; repeatable. The rest of the host's files are read-only to the guest
    #[arg(long = "rw", value_name = "DIR")]
    pub writable: Vec<PathBuf>,
    /// Virtio transport
    #[arg(long = "virtio-transport", value_name = "TRANSPORT", default_value = "pci", value_parser = ["pci", "mmio"])]
    pub virtio_transport: String,
    /// Where the guest console is: serial (ttyS0) or virtio (hvc0)
    #[arg(long, value_name = "DEVICE", default_value = "serial", value_parser = ["serial", "virtio"])]
    pub console: String,
    /// Add a virtio-rng device fed from the host's getrandom; `--rng=bw=SIZE/MS,ops=N/MS` holds
    /// the guest to token-bucket rate limits
    #[arg(long, value_name = "LIMITS", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub rng: Option<String>,
    /// Add a virtio-balloon device (lkvm balloon, lkvm stat)
    #[arg(long)]
    pub balloon: bool,
    /// Add a virtio-vsock device with guest CID `CID` (3 or more). Host programs connect to
    /// the UNIX socket `uds=PATH` (default ~/.lkvm/NAME.vsock) as to Firecracker's
    #[arg(long, value_name = "CID[,uds=PATH]")]
    pub vsock: Option<String>,
    /// Network: `mode=user|tap|none[,tapif=NAME][,guest_mac=MAC][,host_ip=IP][,guest_ip=IP]
    /// [,script=PATH][,hostfwd=tcp:[HOSTADDR:]HOSTPORT:GUESTPORT]`; repeatable. Default for Linux: one user-mode NIC
    #[arg(short = 'n', long = "network", value_name = "OPTIONS")]
    pub networks: Vec<String>,
    /// Serve gdb's remote protocol on 127.0.0.1:PORT or on the UNIX socket PATH. The guest
    /// waits before its first instruction until gdb continues or detaches (see --gdb-wait)
    #[arg(long, value_name = "PORT|unix:PATH", conflicts_with = "restore")]
    pub gdb: Option<String>,
    /// With --gdb: whether the guest waits for gdb before its first instruction
    #[arg(long, value_name = "yes|no", default_value = "yes", value_parser = ["yes", "no"], requires = "gdb")]
    pub gdb_wait: String,
    /// Log level: error, warning, info, debug
    #[arg(long, value_name = "LEVEL", default_value = "warning", value_parser = ["error", "warning", "info", "debug"])]
    pub loglevel: String,
    /// seccomp filters per thread: on (a forbidden system call stops lkvm), log (allowed, and
    /// logged by the kernel), off
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: crate::thread::Seccomp,
    /// Run as this user once the VM's host resources are open (lkvm started as root, e.g. for a
    /// tap) [default under sudo: SUDO_UID]
    #[arg(long, value_name = "UID", requires = "gid")]
    pub uid: Option<u32>,
    /// With --uid: the group [default under sudo: SUDO_GID]
    #[arg(long, value_name = "GID", requires = "uid")]
    pub gid: Option<u32>,
    /// Once the VM is built, lkvm opens only its shares, images and ~/.lkvm (Landlock), and the
    /// paths --landlock-rules adds
    #[arg(long, conflicts_with = "restore")]
    pub landlock: bool,
    /// With --landlock: also allow `path=PATH,access=r|rw` (snapshot or dump directories, drive
    /// images swapped in later); repeatable
    #[arg(long, value_name = "path=PATH,access=r|rw", requires = "landlock")]
    pub landlock_rules: Vec<String>,
    /// Run in namespaces of lkvm's own, its root a tmpfs on DIR holding only what the VM uses
    /// (needs root; with -i or -d, not lkvm's root filesystem)
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    pub jail: Option<PathBuf>,
    /// Also serve Firecracker's API for this VM on a UNIX socket
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM as a Firecracker JSON config file describes it (instead of -k, -d, -m, ...)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "kernel_arg", "initrd", "params", "mem", "cpus", "disks", "shares", "fs", "writable", "networks", "rng", "balloon", "vsock", "nodefaults", "console", "disable_cpuid"])]
    pub config_file: Option<PathBuf>,
    /// Restore the snapshot in DIR (from `lkvm snapshot`) instead of booting
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config_file", "kernel", "kernel_arg", "initrd", "params", "mem", "cpus", "disks", "shares", "fs", "writable", "networks", "rng", "balloon", "vsock", "nodefaults", "console", "disable_cpuid"])]
    pub restore: Option<PathBuf>,
    /// A fork's child (started by `lkvm fork`): the state file is descriptor 3, guest memory
    /// the N descriptors after it
    #[arg(long, value_name = "N", hide = true, conflicts_with_all = ["restore", "config_file", "kernel", "kernel_arg", "initrd", "params", "mem", "cpus", "disks", "shares", "fs", "writable", "networks", "rng", "balloon", "vsock", "nodefaults", "console", "disable_cpuid"])]
    pub restore_fork: Option<usize>,
    /// With --restore: use another drive image or tap for a device, by id (`lkvm-disk0=new.img`,
    /// `net0=tap3`); repeatable
    #[arg(long = "override", value_name = "ID=VALUE")]
    pub overrides: Vec<String>,
    /// Serve lkvm's root filesystem over 9p alone (not virtio-fs too), so that the guest can be
    /// snapshotted and forked
    #[arg(long)]
    pub snapshottable: bool,
}

#[derive(Args, Debug)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Boot the guest instead of restoring the cached snapshot of a ready one (see README)
    #[arg(long)]
    pub cold: bool,
    /// What of the host's / the command sees: `system` (its programs, libraries and /etc
    /// without secrets, the current directory and --rw directories) or `full`
    #[arg(long, value_name = "system|full", default_value = "system", value_parser = ["system", "full"])]
    pub host_view: String,
    /// The command to run in the guest, and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Parses kvmtool's size syntax: a plain number is MiB; B, K, M, G, T suffixes.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "M"),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{s}' is not a size (use MiB, or a suffix B, K, M, G, T)")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let bytes = value.checked_mul(1 << shift).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < MIB {
        return Err(format!("'{s}' is less than 1 MiB of guest memory"));
    }
    Ok(bytes)
}

/// kvmtool's kernel search order when -k is absent, with a kernel build tree's own `vmlinux`
/// before its bzImage: the same build, booted without running its decompressor in the guest.
fn default_kernel_paths() -> Vec<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    vec![
        PathBuf::from("./bzImage"),
        PathBuf::from("./vmlinux"),
        PathBuf::from("arch/x86/boot/bzImage"),
        PathBuf::from(format!("/boot/vmlinuz-{release}")),
        PathBuf::from(format!("/boot/bzImage-{release}")),
    ]
}

fn host_ram() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64)
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// The vsock CID of guests booted on an lkvm root filesystem without `--vsock`.
const DEFAULT_ROOTFS_CID: &str = "3";

/// `--vsock CID[,uds=PATH]`. The default socket sits beside the control socket, not in
/// ~/.lkvm/NAME, which a guest booted on that rootfs can write.
fn parse_vsock(arg: &str, name: &str) -> Result<VsockConfig, String> {
    let mut parts = arg.split(',');
    let cid = parts.next().unwrap_or_default();
    let guest_cid = cid.parse().map_err(|_| format!("--vsock {arg}: '{cid}' is not a CID (a number, 3 or more)"))?;
    let mut uds_path = lkvm_dir().join(format!("{name}.vsock"));
    for part in parts {
        match part.split_once('=') {
            Some(("uds", path)) if !path.is_empty() => uds_path = path.into(),
            _ => return Err(format!("--vsock {arg}: unknown option '{part}' (uds=PATH)")),
        }
    }
    Ok(VsockConfig { id: VSOCK_ID.into(), guest_cid, uds_path })
}

/// Which transports serve the shares of lkvm's root filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootfsTransports {
    /// Both, so that the guest's init mounts virtio-fs where its kernel has it and 9p otherwise.
    VirtioFsOr9p,
    /// 9p alone, for a guest that is snapshotted (lkvm sandbox's warm start): a virtio-fs
    /// server's open files are not part of a snapshot.
    NinePOnly,
}

/// A `--rw` directory: absolute, without the characters that would split it on the kernel
/// command line, and not the host's / itself.
fn writable_dir(dir: &std::path::Path) -> Result<PathBuf, String> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| format!("--rw {}: {e}", dir.display()))?;
    if !canonical.is_dir() {
        return Err(format!("--rw {}: not a directory", dir.display()));
    }
    crate::host::check_guest_writable(&canonical).map_err(|e| format!("--rw {}: {e}", dir.display()))?;
    match canonical.to_str() {
        Some(path) if !path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"') => Ok(canonical),
        _ => Err(format!("--rw {}: the path must be UTF-8 without spaces or quotes", canonical.display())),
    }
}

pub fn default_mem(cpus: u32, host_ram: u64) -> u64 {
    let wanted = DEFAULT_MEM_PER_CPU * (u64::from(cpus) + 3);
    wanted.min(host_ram / 100 * DEFAULT_MEM_HOST_PERCENT / MIB * MIB)
}

impl RunArgs {
    /// The snapshot `--restore` names, the guest's name and the host resources it overrides.
    pub fn restore_spec(&self, dir: &std::path::Path) -> Result<crate::vmm::RestoreSpec, String> {
        let memory = crate::config::MemoryBackend::File(dir.join(crate::snapshot::MEMORY_FILE));
        self.spec_for(dir.join(crate::snapshot::STATE_FILE), memory, None)
    }

    /// A fork's child: its state and memory are the descriptors `lkvm fork` gave it, its vsock
    /// socket its own.
    pub fn fork_spec(&self, memory_files: usize) -> Result<crate::vmm::RestoreSpec, String> {
        if memory_files == 0 {
            return Err("--restore-fork: no memory".into());
        }
        let fd = |n: usize| PathBuf::from(format!("/proc/self/fd/{n}"));
        let memory =
            crate::config::MemoryBackend::Forked { base: fd(4), changes: (5..4 + memory_files).map(fd).collect() };
        let name = self.name.clone().ok_or("--restore-fork needs --name")?;
        let vsock_uds = lkvm_dir().join(format!("{name}.vsock"));
        self.spec_for(fd(3), memory, Some(vsock_uds))
    }

    fn spec_for(
        &self,
        state: PathBuf,
        memory: crate::config::MemoryBackend,
        vsock_uds: Option<PathBuf>,
    ) -> Result<crate::vmm::RestoreSpec, String> {
        let overrides = self
            .overrides
            .iter()
            .map(|o| match o.split_once('=') {
                Some((id, value)) if !id.is_empty() && !value.is_empty() => Ok((id.to_string(), value.to_string())),
                _ => Err(format!("--override {o}: use ID=VALUE")),
            })
            .collect::<Result<_, _>>()?;
        let name = self.name.clone().unwrap_or_else(|| format!("guest-{}", std::process::id()));
        crate::host::check_name(&name)?;
        Ok(crate::vmm::RestoreSpec { state, memory, name, overrides, share_views: Vec::new(), vsock_uds })
    }

    /// With --landlock, the paths --landlock-rules adds; None without --landlock.
    pub fn landlock_rules(&self) -> Result<Option<Vec<Rule>>, String> {
        if !self.landlock {
            return Ok(None);
        }
        self.landlock_rules.iter().map(|r| Rule::parse(r)).collect::<Result<_, _>>().map(Some)
    }

    /// Validates the options and builds the VM configuration, or says in one line what is wrong.
    fn gdb_config(&self) -> Result<Option<GdbConfig>, String> {
        self.gdb.as_deref().map(|arg| GdbConfig::parse(arg, self.gdb_wait == "yes")).transpose()
    }

    pub fn into_config(self) -> Result<VmConfig, String> {
        self.into_config_with(RootfsTransports::VirtioFsOr9p)
    }

    pub fn into_config_with(self, rootfs_transports: RootfsTransports) -> Result<VmConfig, String> {
        if !self.overrides.is_empty() {
            return Err("--override goes with --restore: it replaces a snapshot's host resources".into());
        }
        let rootfs_transports = if self.snapshottable { RootfsTransports::NinePOnly } else { rootfs_transports };
        let gdb = self.gdb_config()?;
        if let Some(path) = &self.config_file {
            let name = self.name.unwrap_or_else(|| format!("guest-{}", std::process::id()));
            let transport = if self.virtio_transport == "mmio" { Transport::Mmio } else { Transport::Pci };
            let text = std::fs::read_to_string(path).map_err(|e| format!("--config-file {}: {e}", path.display()))?;
            let full: FullConfig =
                serde_json::from_str(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))?;
            let mut config = full.to_vm_config(&name, transport)?;
            config.kvm_device = self.kvm_device;
            config.gdb = gdb;
            return Ok(config);
        }
        let cpus = self.cpus.unwrap_or_else(|| host_cpus().min(u32::from(MAX_CPUS)));
        if cpus == 0 {
            return Err("-c 0: a guest needs at least one vCPU".into());
        }
        if cpus > u32::from(MAX_CPUS) {
            return Err(format!("-c {cpus}: at most {MAX_CPUS} vCPUs are supported"));
        }
        let ram = host_ram();
        let mem_size = match self.mem {
            Some(mem) if mem > ram => {
                return Err(format!("-m {} MiB is more than this host's {} MiB of RAM", mem / MIB, ram / MIB))
            }
            Some(mem) => mem,
            None => default_mem(cpus, ram),
        };

        let kernel = match self.kernel.or(self.kernel_arg) {
            Some(kernel) => kernel,
            None => find_default_kernel(&default_kernel_paths())?,
        };
        for name in &self.disable_cpuid {
            if cpuid::find_feature(name).is_none() {
                let known: Vec<&str> = cpuid::FEATURES.iter().map(|f| f.name).collect();
                return Err(format!("--disable-cpuid: unknown feature '{name}' (known: {})", known.join(", ")));
            }
        }

        let mut drives = Vec::new();
        let mut root_dir = None;
        for arg in &self.disks {
            let spec = DiskSpec::parse(arg)?;
            let dir = match spec.path.to_str().map(rootfs::path) {
                _ if spec.path.is_dir() => spec.path.clone(),
                Some(named) if !spec.path.exists() && !arg.contains('/') && named.is_dir() => named,
                _ => {
                    let id = format!("lkvm-disk{}", drives.len());
                    drives.push(DriveConfig { id, spec, is_root_device: false, partuuid: None });
                    continue;
                }
            };
            if root_dir.is_some() {
                return Err(format!("-d {arg}: only one directory can be the root filesystem"));
            }
            root_dir = Some((dir, spec.read_only));
        }
        // A flat binary is not Linux: it gets no root filesystem and, as in kvmtool, no NIC
        // unless asked for.
        let flat_binary = crate::boot::kernel::is_flat_binary(&kernel);
        let boots_default_rootfs =
            !flat_binary && drives.is_empty() && root_dir.is_none() && self.initrd.is_none() && !self.nodefaults;
        if boots_default_rootfs {
            root_dir = Some((rootfs::path(rootfs::DEFAULT_NAME), false));
        }
        let mut shares = Vec::new();
        for arg in &self.shares {
            shares.push(ShareConfig { id: format!("9p{}", shares.len()), spec: ShareSpec::parse(arg)? });
        }
        let mut fs = (0..)
            .zip(&self.fs)
            .map(|(index, arg)| Ok(FsConfig { id: format!("fs{index}"), spec: FsSpec::parse(arg)? }))
            .collect::<Result<Vec<_>, String>>()?;
        let mut root_share = None;
        let lkvm_rootfs = root_dir.as_ref().is_some_and(|(dir, _)| boots_default_rootfs || rootfs::is_lkvm_rootfs(dir));
        if !self.writable.is_empty() && (!lkvm_rootfs || self.initrd.is_some() || self.nodefaults) {
            return Err("--rw works on lkvm's root filesystem: give no disk image and no -i, or -d NAME of an \
                        `lkvm setup` guest"
                .into());
        }
        if let (Some((dir, _)), true) = (&root_dir, lkvm_rootfs) {
            // Our rootfs: its /bin, /lib, ... live in the host's /, and its init is ours. The
            // guest sees both read-only, and writes through only to the --rw directories.
            let writable = self.writable.iter().map(|d| writable_dir(d)).collect::<Result<Vec<_>, _>>()?;
            let mut exported =
                vec![(rootfs::ROOT_TAG.to_string(), dir.clone(), true), (rootfs::HOST_TAG.into(), "/".into(), true)];
            exported.extend(writable.iter().enumerate().map(|(i, d)| (rootfs::writable_tag(i), d.clone(), false)));
            for (tag, path, read_only) in exported {
                let spec = ShareSpec { read_only, ..ShareSpec::new(&path, &tag)? };
                shares.push(ShareConfig { id: format!("9p-{tag}"), spec });
                if rootfs_transports == RootfsTransports::VirtioFsOr9p {
                    fs.push(FsConfig { id: format!("fs-{tag}"), spec: FsSpec { path, tag, read_only } });
                }
            }
            root_share = Some(RootShare {
                share_id: format!("9p-{}", rootfs::ROOT_TAG),
                lkvm_rootfs: Some(dir.clone()),
                writable,
            });
        } else if let Some((dir, read_only)) = root_dir {
            let spec = ShareSpec { read_only, ..ShareSpec::new(dir, rootfs::ROOT_TAG)? };
            shares.push(ShareConfig { id: "rootfs".into(), spec });
            root_share = Some(RootShare { share_id: "rootfs".into(), lkvm_rootfs: None, writable: Vec::new() });
        } else if let Some(first) = drives.first_mut() {
            first.is_root_device = true;
        }
        let mut nets = self.networks.iter().map(|n| NetSpec::parse(n)).collect::<Result<Vec<_>, _>>()?;
        if self.networks.is_empty() && !flat_binary {
            nets.push(NetSpec::default()); // kvmtool's default for Linux: one user-mode NIC
        }
        nets.retain(|n| n.mode != NetMode::None);
        let nets = nets.into_iter().enumerate().map(|(i, spec)| NetConfig { id: format!("net{i}"), spec }).collect();

        let name = self.name.unwrap_or_else(|| format!("guest-{}", std::process::id()));
        let mut vsock = self.vsock.as_deref().map(|arg| parse_vsock(arg, &name)).transpose()?;
        if vsock.is_none() && root_share.as_ref().is_some_and(|r| r.lkvm_rootfs.is_some()) {
            // Our init serves `lkvm exec` (and a sandbox's command) on vsock.
            vsock = Some(parse_vsock(DEFAULT_ROOTFS_CID, &name)?);
        }
        let config = VmConfig {
            name,
            kvm_device: self.kvm_device,
            boot: BootConfig {
                kernel,
                initrd: self.initrd,
                params: self.params,
                policy: if self.nodefaults { CmdlinePolicy::Bare } else { CmdlinePolicy::Kvmtool },
            },
            machine: MachineConfig {
                vcpu_count: cpus as u8,
                mem_size_mib: mem_size / MIB,
                disabled_cpuid: self.disable_cpuid,
            },
            drives,
            shares,
            fs,
            root_share,
            nets,
            console: if self.console == "virtio" { ConsoleDevice::Virtio } else { ConsoleDevice::Serial },
            entropy: self.rng.as_deref().map(parse_rng).transpose()?,
            balloon: self.balloon.then(|| BalloonConfig {
                id: "balloon0".into(),
                amount_mib: 0,
                deflate_on_oom: false,
                stats_polling_interval_s: 1,
            }),
            vsock,
            mmds: None,
            transport: if self.virtio_transport == "mmio" { Transport::Mmio } else { Transport::Pci },
            gdb,
        };
        config.validate()?;
        Ok(config)
    }
}

fn find_default_kernel(candidates: &[PathBuf]) -> Result<PathBuf, String> {
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => {
            eprintln!("lkvm: no kernel given (-k); using {}", found.display());
            Ok(found.clone())
        }
        None => {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            Err(format!("no kernel given (-k) and none found in {}", tried.join(", ")))
        }
    }
}

/// `--rng[=bw=SIZE/MS,ops=N/MS]`.
fn parse_rng(limits: &str) -> Result<EntropyConfig, String> {
    let mut rate_limit = RateLimit::default();
    for option in limits.split(',').filter(|o| !o.is_empty()) {
        let known = match option.split_once('=') {
            Some((key, value)) => rate_limit.parse_option(key, value).map_err(|e| format!("--rng: {e}"))?,
            None => false,
        };
        if !known {
            return Err(format!("--rng: unknown option '{option}' (known: bw=SIZE/MS, ops=N/MS)"));
        }
    }
    Ok(EntropyConfig { id: "rng0".into(), rate_limit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::compose::compose;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|w| w.run)
    }

    #[test]
    fn sizes_follow_kvmtool() {
        assert_eq!(parse_mem_size("512"), Ok(512 * MIB));
        assert_eq!(parse_mem_size("2G"), Ok(2048 * MIB));
        assert_eq!(parse_mem_size("2048k"), Ok(2 * MIB));
        assert_eq!(parse_mem_size("1073741824B"), Ok(1024 * MIB));
        assert!(parse_mem_size("0").unwrap_err().contains("less than 1 MiB"));
        assert!(parse_mem_size("12Q").is_err());
        assert!(parse_mem_size("-5").is_err());
        assert!(parse_mem_size("99999999999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn kvmtool_style_options() {
        let args =
            parse(&["-k", "bzImage", "-i", "initrd.cpio", "-p", "quiet", "-m", "128", "-c", "2", "--name", "t1"])
                .unwrap();
        assert_eq!(args.kernel.as_deref(), Some(Path::new("bzImage")));
        assert_eq!(args.mem, Some(128 * MIB));
        assert_eq!((args.cpus, args.name.as_deref()), (Some(2), Some("t1")));
        let bare = parse(&["vmlinux", "-m", "64"]).unwrap();
        assert_eq!(bare.kernel_arg.as_deref(), Some(Path::new("vmlinux")));
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["-m", "0"]).is_err());
    }

    #[test]
    fn config_validation() {
        let base = || RunArgs { kernel: Some("k".into()), ..Default::default() };
        assert!(RunArgs { cpus: Some(0), ..base() }.into_config().unwrap_err().contains("at least one"));
        assert!(RunArgs { cpus: Some(1000), ..base() }.into_config().unwrap_err().contains("at most"));
        assert!(RunArgs { mem: Some(1 << 60), ..base() }.into_config().unwrap_err().contains("host's"));
        let bad = RunArgs { disable_cpuid: vec!["nope".into()], ..base() }.into_config().unwrap_err();
        assert!(bad.contains("unknown feature 'nope'"));

        let config = RunArgs { cpus: Some(2), params: Some("quiet".into()), ..base() }.into_config().unwrap();
        assert_eq!(config.machine.vcpu_count, 2);
        let cmdline = compose(&config, &[]);
        assert!(cmdline.starts_with("console=ttyS0") && cmdline.ends_with("quiet"));
        // No disk and no initrd: kvmtool's default guest, ~/.lkvm/default, mounted by lkvm's
        // initramfs from virtio-fs or 9p, both read-only.
        assert!(!cmdline.contains("root=") && !cmdline.contains("init="), "{cmdline}");
        let tags: Vec<_> =
            config.shares.iter().map(|s| (s.spec.tag.as_str(), s.spec.path.clone(), s.spec.read_only)).collect();
        let expected = [("root", rootfs::path("default"), true), ("hostfs", PathBuf::from("/"), true)];
        assert_eq!(tags, expected);
        let fs_tags: Vec<_> =
            config.fs.iter().map(|s| (s.spec.tag.as_str(), s.spec.path.clone(), s.spec.read_only)).collect();
        assert_eq!(fs_tags, expected);
        assert_eq!(config.lkvm_rootfs(), Some(&rootfs::path("default")));
        // --rw directories: writable on both transports, named on the command line.
        let here = std::env::current_dir().unwrap();
        let rw = RunArgs { cpus: Some(1), writable: vec![".".into()], ..base() }.into_config().unwrap();
        let last = rw.shares.last().unwrap();
        assert_eq!((last.spec.tag.as_str(), &last.spec.path, last.spec.read_only), ("rw0", &here, false));
        assert_eq!(rw.fs.last().unwrap().spec, FsSpec { path: here.clone(), tag: "rw0".into(), read_only: false });
        assert!(compose(&rw, &[]).contains(&format!("lkvm.rw={}", here.display())));
        // A snapshotted guest (lkvm sandbox) gets 9p alone.
        let sandbox = RunArgs { cpus: Some(1), ..base() }.into_config_with(RootfsTransports::NinePOnly).unwrap();
        assert!(sandbox.fs.is_empty() && sandbox.shares.len() == 2);
        let slash = RunArgs { cpus: Some(1), writable: vec!["/".into()], ..base() }.into_config().unwrap_err();
        assert!(slash.contains("stays read-only"), "{slash}");
        let missing = RunArgs { cpus: Some(1), writable: vec!["/no/such".into()], ..base() }.into_config().unwrap_err();
        assert!(missing.contains("--rw /no/such"), "{missing}");
        let disk = RunArgs { cpus: Some(1), writable: vec![".".into()], disks: vec!["a.img".into()], ..base() };
        assert!(disk.into_config().unwrap_err().contains("lkvm's root filesystem"));
        for ignored in [RunArgs { initrd: Some("i".into()), ..base() }, RunArgs { nodefaults: true, ..base() }] {
            let args = RunArgs { cpus: Some(1), writable: vec![".".into()], ..ignored };
            assert!(args.into_config().unwrap_err().contains("lkvm's root filesystem"), "--rw would do nothing");
        }
        let home = RunArgs { cpus: Some(1), writable: vec![crate::host::user_home()], ..base() };
        assert!(home.into_config().unwrap_err().contains("it holds lkvm's"), "the guest would write ~/.lkvm");
        let initrd = RunArgs { cpus: Some(1), initrd: Some("i".into()), ..base() }.into_config().unwrap();
        assert!(!compose(&initrd, &[]).contains("root=") && initrd.shares.is_empty() && initrd.lkvm_rootfs().is_none());
        let bare = RunArgs { cpus: Some(1), nodefaults: true, params: Some("x=1".into()), ..base() };
        assert_eq!(compose(&bare.into_config().unwrap(), &[]), "x=1");
    }

    #[test]
    fn a_disk_brings_root_unless_the_user_chose_one() {
        let base = || RunArgs {
            kernel: Some("k".into()),
            cpus: Some(1),
            disks: vec!["a.img".into(), "b.img,ro".into()],
            ..Default::default()
        };
        let config = base().into_config().unwrap();
        assert_eq!(config.drives.len(), 2);
        assert!(config.drives[1].spec.read_only && config.drives[0].is_root_device);
        assert!(compose(&config, &[]).contains("root=/dev/vda rw"));
        let own_root = RunArgs { params: Some("root=/dev/vdb".into()), ..base() }.into_config().unwrap();
        assert!(!compose(&own_root, &[]).contains("/dev/vda"));
        let hvc = RunArgs { console: "virtio".into(), ..base() }.into_config().unwrap();
        assert_eq!(hvc.console, ConsoleDevice::Virtio);
        assert!(compose(&hvc, &[]).starts_with("console=hvc0 "));
        let none = RunArgs { networks: vec!["mode=none".into()], ..base() }.into_config().unwrap();
        assert!(none.nets.is_empty() && !compose(&none, &[]).contains("ip=dhcp"));
        // A guest booted from its own disk configures its own network (kvmtool's default too).
        let user = RunArgs { networks: vec!["mode=user".into()], ..base() }.into_config().unwrap();
        assert_eq!(user.nets.len(), 1);
        assert!(!compose(&user, &[]).contains("ip="));
        let bad_net = RunArgs { networks: vec!["mode=warp".into()], ..base() }.into_config().unwrap_err();
        assert!(bad_net.contains("unknown mode 'warp'"));
        let bad = RunArgs { disks: vec!["a.img,bogus".into()], ..base() }.into_config().unwrap_err();
        assert!(bad.contains("unknown disk option 'bogus'"));
    }

    #[test]
    fn a_flat_binary_gets_no_rootfs_and_no_default_nic() {
        let flat = std::env::temp_dir().join(format!("lkvm-flat-{}.bin", std::process::id()));
        std::fs::write(&flat, [0xeb, 0xfe]).unwrap();
        let base = || RunArgs { kernel: Some(flat.clone()), cpus: Some(1), ..Default::default() };
        let config = base().into_config().unwrap();
        assert!(config.shares.is_empty() && config.fs.is_empty() && config.lkvm_rootfs().is_none());
        assert!(config.nets.is_empty() && config.vsock.is_none());
        let asked = RunArgs { networks: vec!["mode=user".into()], ..base() }.into_config().unwrap();
        assert_eq!(asked.nets.len(), 1, "a NIC asked for is there");
        std::fs::remove_file(&flat).unwrap();
    }

    #[test]
    fn a_directory_is_a_9p_root() {
        let dir = std::env::temp_dir();
        let base = RunArgs {
            kernel: Some("k".into()),
            cpus: Some(1),
            disks: vec![format!("{},ro", dir.display()), "a.img".into()],
            ..Default::default()
        };
        let config = base.into_config().unwrap();
        assert_eq!(config.drives.len(), 1, "the image stays a disk");
        assert_eq!(
            (config.shares.len(), config.shares[0].spec.tag.as_str(), config.shares[0].spec.read_only),
            (1, "root", true)
        );
        let cmdline = compose(&config, &[]);
        assert!(cmdline.contains(rootfs::ROOT_PARAMS) && !cmdline.contains("/dev/vda"), "{cmdline}");
        assert!(!cmdline.contains("init=") && config.lkvm_rootfs().is_none(), "not an lkvm rootfs: its own init");
        let shared = RunArgs {
            kernel: Some("k".into()),
            cpus: Some(1),
            initrd: Some("i".into()),
            shares: vec!["/tmp,tmp".into()],
            ..Default::default()
        };
        let spec = ShareSpec::new("/tmp", "tmp").unwrap();
        assert_eq!(shared.into_config().unwrap().shares, [ShareConfig { id: "9p0".into(), spec }]);
    }

    #[test]
    fn default_memory_is_kvmtools() {
        assert_eq!(default_mem(2, 64 << 30), 320 * MIB);
        assert_eq!(default_mem(4, 256 * MIB), 204 * MIB);
    }

    #[test]
    fn kernel_search_reports_what_it_tried() {
        let err = find_default_kernel(&[PathBuf::from("/nonexistent/bzImage")]).unwrap_err();
        assert!(err.contains("/nonexistent/bzImage"));
        assert_eq!(
            find_default_kernel(&[PathBuf::from("/nonexistent"), PathBuf::from("/proc/self/status")]).unwrap(),
            PathBuf::from("/proc/self/status")
        );
    }
}
