//! Firecracker's configuration, as its API bodies and `--config-file` spell it (field names,
//! required fields, unknown fields refused), and its translation to and from `VmConfig`.

use crate::config::RateLimit;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    BalloonConfig, BootConfig, CmdlinePolicy, ConsoleDevice, DriveConfig, EntropyConfig, MachineConfig, NetConfig,
    Transport, VmConfig, VsockConfig,
};
use crate::config::net::parse_mac;
use crate::config::{DiskFormat, DiskSpec, IoEngine, MemoryBackend, NetMode, NetSpec, MAX_CPUS};

/// Firecracker's vCPU limit; lkvm's MP table allows more, but this is the API's contract.
pub const MAX_VCPUS: u8 = 32;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default = "no_huge_pages")]
    pub huge_pages: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

fn no_huge_pages() -> String {
    "None".into()
}

impl Default for MachineConfiguration {
    fn default() -> Self {
        // Firecracker's defaults before any PUT /machine-config.
        MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: no_huge_pages(),
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<String>,
    pub cpu_template: Option<String>,
}

impl MachineConfiguration {
    /// Applies a PATCH, keeping what it does not name.
    pub fn update(&self, patch: MachineConfigurationUpdate) -> MachineConfiguration {
        MachineConfiguration {
            vcpu_count: patch.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: patch.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: patch.smt.unwrap_or(self.smt),
            track_dirty_pages: patch.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: patch.huge_pages.unwrap_or_else(|| self.huge_pages.clone()),
            cpu_template: patch.cpu_template.or_else(|| self.cpu_template.clone()),
        }
    }

    /// What lkvm can honour; the rest is refused with the reason rather than ignored.
    pub fn check(&self) -> Result<(), String> {
        let smt_odd = self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1;
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS.min(MAX_CPUS) || smt_odd {
            return Err(format!(
                "Machine config error: The number of vCPUs must be greater than 0, less than {} and must be 1 or an \
                 even number if SMT is enabled.",
                MAX_VCPUS.min(MAX_CPUS)
            ));
        }
        if self.mem_size_mib == 0 {
            return Err("mem_size_mib must be at least 1".into());
        }
        if self.huge_pages != "None" {
            return Err(format!("huge_pages '{}' is not supported by lkvm (only None)", self.huge_pages));
        }
        if let Some(template) = self.cpu_template.as_deref().filter(|t| *t != "None") {
            return Err(format!("cpu_template '{template}' is not supported by lkvm (only None)"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default = "unsafe_cache")]
    pub cache_type: String,
    #[serde(default = "sync_engine")]
    pub io_engine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// lkvm's: `"qcow2"` serves a qcow2 image; Firecracker's drives are raw, and so is the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

fn unsafe_cache() -> String {
    "Unsafe".into()
}

fn sync_engine() -> String {
    "Sync".into()
}

impl Drive {
    pub fn check(&self) -> Result<(), String> {
        check_id(&self.drive_id)?;
        if self.socket.is_some() {
            return Err("vhost-user drives (socket) are not supported by lkvm".into());
        }
        if self.path_on_host.is_none() {
            return Err("path_on_host is required".into());
        }
        if !matches!(self.cache_type.as_str(), "Unsafe" | "Writeback") {
            return Err(format!("cache_type '{}': use Unsafe or Writeback", self.cache_type));
        }
        if !matches!(self.io_engine.as_str(), "Sync" | "Async") {
            return Err(format!("io_engine '{}': use Sync or Async", self.io_engine));
        }
        Ok(())
    }
}

/// `PATCH /drives/{id}`: a new backing file, new rate limits, or both.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: String,
    pub backend_path: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    /// Deprecated in Firecracker in favour of `mem_backend`; still accepted.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

impl SnapshotLoad {
    /// Where the memory comes from, once the request is checked against what lkvm supports.
    /// `enable_diff_snapshots` and `track_dirty_pages` only ask for dirty tracking after the
    /// load, which a Full snapshot does not need: accepted, as Firecracker accepts them.
    pub fn memory_backend(&self) -> Result<MemoryBackend, String> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(path), None) => Ok(MemoryBackend::File(path.clone())),
            (None, Some(backend)) if backend.backend_type == "File" => {
                Ok(MemoryBackend::File(backend.backend_path.clone()))
            }
            (None, Some(backend)) if backend.backend_type == "Uffd" => {
                Ok(MemoryBackend::Uffd(backend.backend_path.clone()))
            }
            (None, Some(backend)) => Err(format!("unknown backend_type '{}' (File or Uffd)", backend.backend_type)),
            _ => Err("give exactly one of mem_backend and mem_file_path".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    pub path_on_host: Option<PathBuf>,
    pub rate_limiter: Option<RateLimit>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimit>,
}

/// `PATCH /network-interfaces/{id}`: new rate limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimit>,
    pub tx_rate_limiter: Option<RateLimit>,
}

/// A limit as the API shows it: absent when it limits nothing.
fn shown(limit: &RateLimit) -> Option<RateLimit> {
    limit.limits().then_some(*limit)
}

impl NetworkInterface {
    fn spec(&self) -> Result<NetSpec, String> {
        check_id(&self.iface_id)?;
        if self.mtu.is_some() {
            return Err("mtu is not supported by lkvm".into());
        }
        if self.host_dev_name.is_empty() || self.host_dev_name.len() >= libc::IFNAMSIZ {
            return Err("Network config error: Could not create the network device: Open tap device failed: Invalid interface name".into());
        }
        let guest_mac = match &self.guest_mac {
            Some(mac) => Some(parse_mac(mac).ok_or_else(|| format!("guest_mac '{mac}' is not a unicast MAC address"))?),
            None => None,
        };
        Ok(NetSpec {
            mode: NetMode::Tap,
            tapif: Some(self.host_dev_name.clone()),
            guest_mac,
            rx_rate_limit: self.rx_rate_limiter.unwrap_or_default(),
            tx_rate_limit: self.tx_rate_limiter.unwrap_or_default(),
            // Firecracker never configures the tap it is handed.
            tap_as_given: true,
            ..NetSpec::default()
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u64,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl Balloon {
    pub fn check(&self) -> Result<(), String> {
        if self.free_page_hinting || self.free_page_reporting {
            return Err("free page hinting and reporting are not supported by lkvm".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

/// PUT /vsock and the file's "vsock": `vsock_id` is accepted and ignored, as in Firecracker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// The id of the vsock device in configs the API and the CLI produce (there is only one).
pub const VSOCK_ID: &str = "vsock";

impl Vsock {
    pub fn to_config(&self) -> VsockConfig {
        VsockConfig { id: VSOCK_ID.into(), guest_cid: self.guest_cid, uds_path: self.uds_path.clone() }
    }
}

/// `vsock_override` of PUT /snapshot/load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "log_level")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// A level `parse_log_level` knows, refused in Firecracker's words.
fn log_level<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(deserializer)?;
    match super::parse_log_level(&name) {
        Some(_) => Ok(Some(name)),
        None => Err(serde::de::Error::custom("Invalid LevelFilter")),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

/// The whole configuration: `--config-file` and `GET /vm/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(rename = "mmds-config", default, skip_serializing_if = "Option::is_none")]
    pub mmds_config: Option<crate::config::MmdsConfig>,
    #[serde(rename = "cpu-config", default, skip_serializing_if = "Option::is_none")]
    pub cpu_config: Option<serde_json::Value>,
}

/// Ids become device names and file names: keep them short and plain, as Firecracker does.
pub fn check_id(id: &str) -> Result<(), String> {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if id.is_empty() || id.len() > 64 || !plain {
        return Err(format!("id '{id}' must be 1 to 64 characters of letters, digits, '_' or '-'"));
    }
    Ok(())
}

impl FullConfig {
    /// Whether anything about the VM itself was configured (logger and metrics are not).
    pub fn configures_vm(&self) -> bool {
        let blank = FullConfig { logger: self.logger.clone(), metrics: self.metrics.clone(), ..FullConfig::default() };
        *self != blank
    }

    /// Adds or replaces drive `drive.drive_id`; the root device goes first (it is /dev/vda).
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), String> {
        drive.check()?;
        if drive.is_root_device && self.drives.iter().any(|d| d.is_root_device && d.drive_id != drive.drive_id) {
            return Err("a root device is already configured".into());
        }
        self.drives.retain(|d| d.drive_id != drive.drive_id);
        if drive.is_root_device {
            self.drives.insert(0, drive);
        } else {
            self.drives.push(drive);
        }
        Ok(())
    }

    pub fn put_network_interface(&mut self, iface: NetworkInterface) -> Result<(), String> {
        iface.spec()?;
        let clash = self.network_interfaces.iter().find(|n| {
            n.iface_id != iface.iface_id
                && (n.host_dev_name == iface.host_dev_name || (n.guest_mac.is_some() && n.guest_mac == iface.guest_mac))
        });
        if let Some(other) = clash {
            return Err(format!("interface '{}' already uses that tap device or MAC address", other.iface_id));
        }
        match self.network_interfaces.iter_mut().find(|n| n.iface_id == iface.iface_id) {
            Some(existing) => *existing = iface,
            None => self.network_interfaces.push(iface),
        }
        Ok(())
    }

    /// The VM this configuration describes, or why it cannot start.
    pub fn to_vm_config(&self, name: &str, transport: Transport) -> Result<VmConfig, String> {
        let boot = self
            .boot_source
            .as_ref()
            .ok_or("Start microvm error: Cannot start microvm without kernel configuration.")?;
        if self.cpu_config.is_some() {
            return Err("CPU configuration is not supported by lkvm".into());
        }
        let machine = self.machine_config.clone().unwrap_or_default();
        machine.check()?;
        let mut drives = Vec::new();
        for drive in &self.drives {
            drive.check()?;
            let path = drive.path_on_host.clone().unwrap_or_default();
            let io_engine = if drive.io_engine == "Async" { IoEngine::Async } else { IoEngine::Sync };
            let rate_limit = drive.rate_limiter.unwrap_or_default();
            let format = Some(drive.format.unwrap_or(DiskFormat::Raw));
            let spec = DiskSpec { read_only: drive.is_read_only, format, io_engine, rate_limit, ..DiskSpec::new(path) };
            let config = DriveConfig {
                id: drive.drive_id.clone(),
                spec,
                is_root_device: drive.is_root_device,
                partuuid: drive.partuuid.clone(),
            };
            if drive.is_root_device {
                drives.insert(0, config);
            } else {
                drives.push(config);
            }
        }
        let nets = self
            .network_interfaces
            .iter()
            .map(|n| Ok(NetConfig { id: n.iface_id.clone(), spec: n.spec()? }))
            .collect::<Result<Vec<_>, String>>()?;
        let balloon = match &self.balloon {
            Some(b) => {
                b.check()?;
                if b.amount_mib > machine.mem_size_mib {
                    return Err(format!(
                        "balloon amount_mib {} is more than the guest's {} MiB",
                        b.amount_mib, machine.mem_size_mib
                    ));
                }
                Some(BalloonConfig {
                    id: "balloon".into(),
                    amount_mib: b.amount_mib,
                    deflate_on_oom: b.deflate_on_oom,
                    stats_polling_interval_s: b.stats_polling_interval_s,
                })
            }
            None => None,
        };
        if let Some(mmds) = &self.mmds_config {
            mmds.check(&self.network_interfaces.iter().map(|n| n.iface_id.as_str()).collect::<Vec<_>>())?;
        }
        let config = VmConfig {
            vsock: self.vsock.as_ref().map(Vsock::to_config),
            mmds: self.mmds_config.clone(),
            name: name.to_string(),
            kvm_device: PathBuf::from("/dev/kvm"),
            boot: BootConfig {
                kernel: boot.kernel_image_path.clone(),
                initrd: boot.initrd_path.clone(),
                params: boot.boot_args.clone(),
                policy: CmdlinePolicy::Firecracker,
            },
            machine: MachineConfig {
                vcpu_count: machine.vcpu_count,
                mem_size_mib: machine.mem_size_mib,
                disabled_cpuid: Vec::new(),
            },
            drives,
            shares: Vec::new(),
            fs: Vec::new(),
            root_share: None,
            gdb: None,
            nets,
            console: ConsoleDevice::Serial,
            entropy: self
                .entropy
                .as_ref()
                .map(|e| EntropyConfig { id: "entropy".into(), rate_limit: e.rate_limiter.unwrap_or_default() }),
            balloon,
            transport,
        };
        config.validate()?;
        Ok(config)
    }

    /// A VM config in the file's shape, for a VM another frontend configured (`lkvm run
    /// --api-sock`); what the file cannot say (9p shares, user-mode networking) is left out.
    pub fn describe(config: &VmConfig) -> FullConfig {
        let drives = config
            .drives
            .iter()
            .map(|d| Drive {
                drive_id: d.id.clone(),
                is_root_device: d.is_root_device,
                path_on_host: Some(d.spec.path.clone()),
                is_read_only: d.spec.read_only,
                partuuid: d.partuuid.clone(),
                cache_type: unsafe_cache(),
                io_engine: format!("{:?}", d.spec.io_engine),
                rate_limiter: shown(&d.spec.rate_limit),
                socket: None,
                format: d.spec.format.filter(|f| *f == DiskFormat::Qcow2),
            })
            .collect();
        let network_interfaces = config
            .nets
            .iter()
            .filter(|n| n.spec.mode == NetMode::Tap)
            .map(|n| NetworkInterface {
                iface_id: n.id.clone(),
                host_dev_name: n.spec.tapif.clone().unwrap_or_default(),
                guest_mac: n.spec.guest_mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                mtu: None,
                rx_rate_limiter: shown(&n.spec.rx_rate_limit),
                tx_rate_limiter: shown(&n.spec.tx_rate_limit),
            })
            .collect();
        FullConfig {
            boot_source: Some(BootSource {
                kernel_image_path: config.boot.kernel.clone(),
                boot_args: config.boot.params.clone(),
                initrd_path: config.boot.initrd.clone(),
            }),
            machine_config: Some(MachineConfiguration {
                vcpu_count: config.machine.vcpu_count,
                mem_size_mib: config.machine.mem_size_mib,
                ..MachineConfiguration::default()
            }),
            drives,
            network_interfaces,
            balloon: config.balloon.as_ref().map(|b| Balloon {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_polling_interval_s: b.stats_polling_interval_s,
                free_page_hinting: false,
                free_page_reporting: false,
            }),
            entropy: config.entropy.as_ref().map(|e| Entropy { rate_limiter: shown(&e.rate_limit) }),
            vsock: config.vsock.as_ref().map(|v| Vsock {
                vsock_id: None,
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
            }),
            mmds_config: config.mmds.clone(),
            ..FullConfig::default()
        }
    }

    /// The file-shaped view of a running VM's config: what was put, with the drives as they
    /// are now (after PATCH /drives) and the balloon's current target.
    pub fn with_running(&self, running: &VmConfig) -> FullConfig {
        let mut full = self.clone();
        for drive in &mut full.drives {
            if let Some(now) = running.drives.iter().find(|d| d.id == drive.drive_id) {
                drive.path_on_host = Some(now.spec.path.clone());
                drive.rate_limiter = shown(&now.spec.rate_limit);
            }
        }
        for iface in &mut full.network_interfaces {
            if let Some(now) = running.nets.iter().find(|n| n.id == iface.iface_id) {
                iface.rx_rate_limiter = shown(&now.spec.rx_rate_limit);
                iface.tx_rate_limiter = shown(&now.spec.tx_rate_limit);
            }
        }
        if let (Some(balloon), Some(now)) = (&mut full.balloon, &running.balloon) {
            balloon.amount_mib = now.amount_mib;
        }
        full.machine_config.get_or_insert_with(MachineConfiguration::default);
        full
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const FILE: &str = r#"{
        "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 reboot=k"},
        "drives": [
            {"drive_id": "data", "path_on_host": "data.img", "is_root_device": false, "is_read_only": true},
            {"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}
        ],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}],
        "balloon": {"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1},
        "entropy": {},
        "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}
    }"#;

    #[test]
    fn config_file_becomes_a_vm_config() {
        let full: FullConfig = serde_json::from_str(FILE).unwrap();
        let config = full.to_vm_config("fc", Transport::Mmio).unwrap();
        assert_eq!(config.machine.vcpu_count, 2);
        assert_eq!(config.machine.mem_size_mib, 256);
        assert_eq!(config.drives[0].id, "rootfs", "the root drive is vda");
        assert!(config.drives[1].spec.read_only);
        assert_eq!(config.nets[0].spec.tapif.as_deref(), Some("tap0"));
        assert_eq!(config.nets[0].spec.guest_mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(config.balloon.as_ref().unwrap().amount_mib, 16);
        assert!(config.entropy.is_some());
        let vsock = config.vsock.as_ref().unwrap();
        assert_eq!((vsock.guest_cid, vsock.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        // GET /vm/config gives back the same shape.
        let back: FullConfig =
            serde_json::from_value(serde_json::to_value(full.with_running(&config)).unwrap()).unwrap();
        assert_eq!(back.drives.len(), 2);
    }

    #[test]
    fn refusals_say_why() {
        let err = |json: &str| serde_json::from_str::<FullConfig>(json).unwrap_err().to_string();
        assert!(err(r#"{"boot-source": {"kernel_image_path": "k", "bogus": 1}}"#).contains("unknown field"));
        assert!(err(r#"{"drives": [{"drive_id": "a"}]}"#).contains("is_root_device"));
        let no_boot = FullConfig::default().to_vm_config("x", Transport::Pci).unwrap_err();
        assert!(no_boot.contains("without kernel configuration"), "{no_boot}");
        let mut full: FullConfig = serde_json::from_str(FILE).unwrap();
        full.machine_config.as_mut().unwrap().vcpu_count = 0;
        assert!(full.to_vm_config("x", Transport::Pci).unwrap_err().contains("number of vCPUs"));
        let mut full: FullConfig = serde_json::from_str(FILE).unwrap();
        full.machine_config.as_mut().unwrap().cpu_template = Some("T2".into());
        assert!(full.to_vm_config("x", Transport::Pci).unwrap_err().contains("cpu_template"));
        let mut full: FullConfig = serde_json::from_str(FILE).unwrap();
        let second_root = Drive { drive_id: "other".into(), ..full.drives[1].clone() };
        assert!(full.put_drive(second_root).unwrap_err().contains("root device"));
        assert!(check_id("../x").is_err() && check_id("").is_err() && check_id("rootfs_1-a").is_ok());
        let bad_mac = NetworkInterface {
            iface_id: "e".into(),
            host_dev_name: "tap1".into(),
            guest_mac: Some("01:00:00:00:00:00".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert!(full.put_network_interface(bad_mac).unwrap_err().contains("MAC"));
        let mut full: FullConfig = serde_json::from_str(FILE).unwrap();
        full.vsock.as_mut().unwrap().guest_cid = 2;
        assert!(full.to_vm_config("x", Transport::Pci).unwrap_err().contains("CID 2 is reserved"));
    }

    #[test]
    fn machine_config_patch_keeps_the_rest() {
        let base = MachineConfiguration { vcpu_count: 2, mem_size_mib: 256, ..Default::default() };
        let patched = base.update(serde_json::from_str(r#"{"mem_size_mib": 512}"#).unwrap());
        assert_eq!((patched.vcpu_count, patched.mem_size_mib), (2, 512));
        assert!(serde_json::from_str::<MachineConfigurationUpdate>(r#"{"vcpus": 1}"#).is_err());
    }
}
