//! The VM configuration every frontend produces (kvmtool CLI, Firecracker CLI, API, config
//! file): plain, serialisable data with an id on every device. `Vm::build` consumes it; the
//! kernel command line is composed from it in one place (`boot::compose`).

pub mod disk;
pub mod firecracker;
pub mod gdb;
pub mod mmds;
pub mod net;
pub mod rate_limit;
pub mod share;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use disk::{DiskFormat, DiskSpec, IoEngine};
pub use gdb::{GdbAddress, GdbConfig};
pub use mmds::MmdsConfig;
pub use net::{NetMode, NetSpec, PortForward, Protocol};
pub use rate_limit::{BucketConfig, RateLimit};
pub use share::{FsSpec, ShareSpec};

/// The most vCPUs a VM may have: APIC IDs are 8 bits in the MP table, and the IOAPIC takes
/// the ID after the last CPU.
pub const MAX_CPUS: u8 = 254;

/// Where a restored guest's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryBackend {
    /// The memory file, mapped copy-on-write.
    File(PathBuf),
    /// A page-fault handler listening on this UNIX socket (Firecracker's Uffd backend).
    Uffd(PathBuf),
    /// A fork's memory: the base file mapped copy-on-write, then the pages each sparse file of
    /// changes holds over it, in order.
    Forked { base: PathBuf, changes: Vec<PathBuf> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Pci,
    Mmio,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleDevice {
    Serial,
    Virtio,
}

/// Whose conventions the generated kernel command line follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CmdlinePolicy {
    /// kvmtool's generated defaults, then what the devices need, then the user's `-p`.
    Kvmtool,
    /// Only the user's parameters (and what the devices need): `--nodefaults`.
    Bare,
    /// Firecracker's: `boot_args` (or its default), then `root=` for the root drive.
    Firecracker,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The user's kernel parameters (`-p`, `boot_args`); `None` for Firecracker means its default.
    pub params: Option<String>,
    pub policy: CmdlinePolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    /// CPUID features hidden from the guest, by their /proc/cpuinfo names.
    pub disabled_cpuid: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    pub id: String,
    #[serde(flatten)]
    pub spec: DiskSpec,
    /// The guest's root filesystem: `root=` names it unless the user named another.
    pub is_root_device: bool,
    /// Firecracker's `partuuid`: the root is that partition of this drive.
    pub partuuid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareConfig {
    pub id: String,
    #[serde(flatten)]
    pub spec: ShareSpec,
}

/// A host directory over virtio-fs (`--fs DIR,TAG[,ro]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub id: String,
    #[serde(flatten)]
    pub spec: FsSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub id: String,
    #[serde(flatten)]
    pub spec: NetSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    pub id: String,
    /// Initial target: how much memory the guest is asked to give back.
    pub amount_mib: u64,
    pub deflate_on_oom: bool,
    pub stats_polling_interval_s: u16,
}

/// virtio-vsock: the guest's CID, and the UNIX socket host programs connect to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub id: String,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceId {
    pub id: String,
}

/// virtio-rng, its requests held to `rate_limit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyConfig {
    pub id: String,
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// A 9p directory booted as the root filesystem (`-d DIR`, or lkvm's own rootfs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootShare {
    /// The share (in `shares`) holding the root.
    pub share_id: String,
    /// An `lkvm setup` directory: lkvm populates it before booting and boots it through its
    /// own initramfs and init.
    pub lkvm_rootfs: Option<PathBuf>,
    /// On an lkvm rootfs: the host directories the guest writes through to (`--rw`), in the
    /// order of their tags.
    #[serde(default)]
    pub writable: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub kvm_device: PathBuf,
    pub boot: BootConfig,
    pub machine: MachineConfig,
    /// In the guest's order: vda, vdb, ...
    pub drives: Vec<DriveConfig>,
    pub shares: Vec<ShareConfig>,
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    pub root_share: Option<RootShare>,
    pub nets: Vec<NetConfig>,
    pub console: ConsoleDevice,
    pub entropy: Option<EntropyConfig>,
    pub balloon: Option<BalloonConfig>,
    pub vsock: Option<VsockConfig>,
    /// The metadata service and the NICs the guest reaches it through (its document is not
    /// part of the config: `crate::mmds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<crate::config::MmdsConfig>,
    pub transport: Transport,
    /// A gdb stub for this run; never part of a snapshot.
    #[serde(skip)]
    pub gdb: Option<GdbConfig>,
}

impl VmConfig {
    /// The `lkvm setup` directory this VM boots, which must be populated first.
    pub fn lkvm_rootfs(&self) -> Option<&PathBuf> {
        self.root_share.as_ref().and_then(|r| r.lkvm_rootfs.as_ref())
    }

    /// Every device id in the config, for uniqueness checks.
    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        let drives = self.drives.iter().map(|d| d.id.as_str());
        let shares = self.shares.iter().map(|s| s.id.as_str()).chain(self.fs.iter().map(|f| f.id.as_str()));
        let nets = self.nets.iter().map(|n| n.id.as_str());
        let rest = self.entropy.iter().map(|e| e.id.as_str()).chain(self.balloon.iter().map(|b| b.id.as_str()));
        let rest = rest.chain(self.vsock.iter().map(|v| v.id.as_str()));
        drives.chain(shares).chain(nets).chain(rest)
    }

    /// Points a restored VM's host resource elsewhere: drive `id` at the image `value`, or the
    /// tap NIC `id` at the tap device `value`. The guest sees the same device.
    pub fn override_host_resource(&mut self, id: &str, value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Err(format!("override for '{id}': empty value"));
        }
        if let Some(drive) = self.drives.iter_mut().find(|d| d.id == id) {
            drive.spec.path = value.into();
            return Ok(());
        }
        if let Some(vsock) = self.vsock.as_mut().filter(|v| v.id == id) {
            vsock.uds_path = value.into();
            return Ok(());
        }
        match self.nets.iter_mut().find(|n| n.id == id) {
            Some(net) if net.spec.mode == crate::config::NetMode::Tap => {
                net.spec.tapif = Some(value.to_string());
                Ok(())
            }
            Some(_) => Err(format!("network interface '{id}' is not a tap: nothing on the host to rename")),
            None => Err(format!("the snapshot has no drive, network interface or vsock '{id}'")),
        }
    }

    /// 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
    pub fn check_vsock_cid(cid: u64) -> Result<(), String> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(format!("vsock guest CID {cid} is reserved: use 3 to {}", u32::MAX - 1));
        }
        Ok(())
    }

    /// Why this VM cannot be forked, if it cannot: children are separate processes that share
    /// its memory as it was, but not its virtio-fs servers, nor a disk both would write.
    pub fn check_forkable(&self) -> Result<(), String> {
        if !self.fs.is_empty() {
            return Err("a guest with virtio-fs shares cannot be forked (boot lkvm's root filesystem with \
                        --snapshottable, which serves it over 9p alone)"
                .into());
        }
        match self.drives.iter().find(|d| !d.spec.read_only) {
            Some(drive) => Err(format!(
                "drive '{}' ({}) is writable: the children would write it under each other; attach it read-only \
                 (,ro) to fork the guest",
                drive.id,
                drive.spec.path.display()
            )),
            None => Ok(()),
        }
    }

    /// Checks what no frontend may get wrong: unique ids, at most one root drive.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for id in self.device_ids() {
            if !seen.insert(id) {
                return Err(format!("device id '{id}' is used twice"));
            }
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err("only one drive can be the root device".into());
        }
        if let Some(vsock) = &self.vsock {
            Self::check_vsock_cid(vsock.guest_cid)?;
        }
        if self.machine.vcpu_count == 0 {
            return Err("a guest needs at least one vCPU".into());
        }
        Ok(())
    }
}

/// Parses kvmtool's and Firecracker's level names (any case): the rank `logging` takes, 0 (off) to 5 (trace).
pub fn parse_log_level(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "off" => Some(0),
        "error" => Some(1),
        "warn" | "warning" => Some(2),
        "info" => Some(3),
        "debug" => Some(4),
        "trace" => Some(5),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal VM config for tests to change.
    pub fn base(policy: CmdlinePolicy, params: Option<&str>) -> VmConfig {
        VmConfig {
            name: "t".into(),
            kvm_device: "/dev/kvm".into(),
            boot: BootConfig { kernel: "k".into(), initrd: None, params: params.map(str::to_string), policy },
            machine: MachineConfig { vcpu_count: 1, mem_size_mib: 128, disabled_cpuid: vec![] },
            drives: vec![],
            shares: vec![],
            fs: vec![],
            root_share: None,
            nets: vec![],
            console: ConsoleDevice::Serial,
            entropy: None,
            balloon: None,
            vsock: None,
            mmds: None,
            transport: Transport::Pci,
            gdb: None,
        }
    }
}
