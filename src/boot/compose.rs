//! The guest kernel command line, composed from a `VmConfig` in this one place: the policy's
//! defaults, `root=`, `init=`, `ip=`, `console=`, the virtio-mmio devices, the user's parameters.

use super::cmdline::KernelCmdline;
use crate::config::{CmdlinePolicy, ConsoleDevice, NetMode, Transport, VmConfig};
use crate::rootfs;

/// Firecracker's command line when `boot_args` is absent (its serial console is off).
const FIRECRACKER_DEFAULT: &str =
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// The guest's name for the `index`th virtio disk: vda, vdb, ..., vdz, vdaa, ...
pub fn disk_name(index: usize) -> String {
    let letter = |n: usize| char::from(b'a' + (n % 26) as u8);
    match index {
        0..=25 => format!("vd{}", letter(index)),
        _ => format!("vd{}{}", letter(index / 26 - 1), letter(index)),
    }
}

/// The command line for `config`; `mmio_devices` are the `virtio_mmio.device=` values of the
/// virtio-mmio devices as placed.
pub fn compose(config: &VmConfig, mmio_devices: &[String]) -> String {
    let user = config.boot.params.as_deref().unwrap_or("");
    let mut given = KernelCmdline::new(false);
    given.push_user(user);
    let mut cmdline = match config.boot.policy {
        CmdlinePolicy::Kvmtool => kvmtool_defaults(config, &given),
        CmdlinePolicy::Bare => KernelCmdline::new(false),
        CmdlinePolicy::Firecracker => return firecracker(config, &given, mmio_devices),
    };
    for device in mmio_devices {
        cmdline.push(format!("virtio_mmio.device={device}"));
    }
    if config.boot.policy == CmdlinePolicy::Kvmtool {
        route_irqs_by_mp_table(&mut cmdline, &given);
    }
    cmdline.push_user(user);
    cmdline.as_string()
}

/// lkvm's ACPI tables describe no interrupt routing and no PCI bus: a kernel with ACPI takes
/// both from the MP table and a PCI scan, as one without ACPI does.
fn route_irqs_by_mp_table(cmdline: &mut KernelCmdline, given: &KernelCmdline) {
    if !given.has_key("acpi") {
        cmdline.push("acpi=noirq");
    }
}

fn kvmtool_defaults(config: &VmConfig, given: &KernelCmdline) -> KernelCmdline {
    let mut cmdline = KernelCmdline::new(true);
    if config.console == ConsoleDevice::Virtio {
        cmdline.set_console("hvc0");
    }
    let on_lkvm_rootfs = config.lkvm_rootfs().is_some();
    if let Some(root) = &config.root_share {
        if on_lkvm_rootfs {
            // lkvm's initramfs mounts the root; its init reads where the --rw directories go.
            for dir in &root.writable {
                cmdline.push(format!("{}{}", rootfs::WRITABLE_PARAM, dir.display()));
            }
        } else if !given.has_key("root") {
            cmdline.push(rootfs::ROOT_PARAMS);
        }
    } else if let Some(index) = config.drives.iter().position(|d| d.is_root_device) {
        if !given.has_key("root") {
            cmdline.push(format!("root=/dev/{} rw", disk_name(index)));
        }
    }
    // lkvm's rootfs leaves a user-mode NIC to the kernel's DHCP client, as kvmtool's does. Any
    // other guest configures its own network: the kernel's wait for a lease would only slow
    // its boot. A tap is the user's to configure.
    if on_lkvm_rootfs && config.nets.iter().any(|n| n.spec.mode == NetMode::User) && !given.has_key("ip") {
        cmdline.push("ip=dhcp");
    }
    cmdline
}

fn firecracker(config: &VmConfig, given: &KernelCmdline, mmio_devices: &[String]) -> String {
    let mut cmdline = KernelCmdline::new(false);
    match &config.boot.params {
        Some(params) => cmdline.push_user(params),
        None if config.transport == Transport::Mmio => cmdline.push(format!("{FIRECRACKER_DEFAULT} pci=off")),
        None => cmdline.push(FIRECRACKER_DEFAULT),
    }
    if let Some((index, drive)) = config.drives.iter().enumerate().find(|(_, d)| d.is_root_device) {
        if !given.has_key("root") {
            let device = match &drive.partuuid {
                Some(uuid) => format!("PARTUUID={uuid}"),
                None => format!("/dev/{}", disk_name(index)),
            };
            cmdline.push(format!("root={device} {}", if drive.spec.read_only { "ro" } else { "rw" }));
        }
    }
    for device in mmio_devices {
        cmdline.push(format!("virtio_mmio.device={device}"));
    }
    route_irqs_by_mp_table(&mut cmdline, given);
    cmdline.as_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::firecracker::FullConfig;
    use crate::config::tests::base;
    use crate::config::*;

    fn drive(id: &str, root: bool, read_only: bool) -> DriveConfig {
        let spec = DiskSpec { read_only, ..DiskSpec::new(format!("{id}.img")) };
        DriveConfig { id: id.into(), spec, is_root_device: root, partuuid: None }
    }

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(
            [disk_name(0), disk_name(1), disk_name(25), disk_name(26), disk_name(27)],
            ["vda", "vdb", "vdz", "vdaa", "vdab"]
        );
    }

    #[test]
    fn kvmtool_root_disk_network_console_and_user_params_last() {
        let mut config = base(CmdlinePolicy::Kvmtool, Some("quiet"));
        config.drives = vec![drive("a", false, false), drive("b", true, false)];
        config.nets = vec![NetConfig { id: "net0".into(), spec: NetSpec::default() }];
        config.console = ConsoleDevice::Virtio;
        let line = compose(&config, &["4K@0xd0000000:5".into()]);
        assert!(line.starts_with("console=hvc0 reboot=k panic=1"), "{line}");
        assert!(line.ends_with("root=/dev/vdb rw virtio_mmio.device=4K@0xd0000000:5 acpi=noirq quiet"), "{line}");
        config.boot.params = Some("root=/dev/vda acpi=off".into());
        let own = compose(&config, &[]);
        assert!(!own.contains("vdb") && !own.contains("noirq"), "the user's root= and acpi=: {own}");
    }

    #[test]
    fn kvmtool_9p_root_and_lkvm_rootfs() {
        let mut config = base(CmdlinePolicy::Kvmtool, None);
        config.shares = vec![ShareConfig { id: "9p0".into(), spec: ShareSpec::new("/tmp", "root").unwrap() }];
        config.root_share = Some(RootShare { share_id: "9p0".into(), lkvm_rootfs: None, writable: Vec::new() });
        let line = compose(&config, &[]);
        assert!(line.contains(rootfs::ROOT_PARAMS) && !line.contains("init="), "{line}");
        // lkvm's rootfs is mounted by its initramfs, which learns where the --rw directories go.
        let writable = vec!["/src/linux".into(), "/tmp/out".into()];
        config.root_share = Some(RootShare { share_id: "9p0".into(), lkvm_rootfs: Some("/x".into()), writable });
        config.nets = vec![NetConfig { id: "net0".into(), spec: NetSpec::default() }];
        let line = compose(&config, &[]);
        assert!(!line.contains("root=") && !line.contains("init="), "{line}");
        assert!(line.contains("lkvm.rw=/src/linux lkvm.rw=/tmp/out ip=dhcp"), "{line}");
        // Only the user-mode NIC's lease is the kernel's to get, and only without the user's ip=.
        config.nets[0].spec.mode = NetMode::Tap;
        assert!(!compose(&config, &[]).contains("ip=dhcp"));
        config.nets[0].spec.mode = NetMode::User;
        config.boot.params = Some("ip=off".into());
        assert!(!compose(&config, &[]).contains("ip=dhcp"));
    }

    #[test]
    fn bare_is_only_devices_and_user() {
        let config = base(CmdlinePolicy::Bare, Some("x=1"));
        assert_eq!(compose(&config, &["4K@0x1000:5".into()]), "virtio_mmio.device=4K@0x1000:5 x=1");
    }

    #[test]
    fn a_firecracker_config_files_root_drive_is_vda_whatever_its_place() {
        let full: FullConfig = serde_json::from_str(crate::config::firecracker::tests::FILE).unwrap();
        let config = full.to_vm_config("fc", Transport::Mmio).unwrap();
        assert_eq!(compose(&config, &[]), "console=ttyS0 reboot=k root=/dev/vda rw acpi=noirq");
    }

    #[test]
    fn firecracker_boot_args_root_drive_and_default() {
        let mut config = base(CmdlinePolicy::Firecracker, Some("console=ttyS0 reboot=k"));
        config.drives = vec![drive("rootfs", true, true), drive("data", false, false)];
        config.transport = Transport::Mmio;
        assert_eq!(
            compose(&config, &["4K@0x1000:5".into()]),
            "console=ttyS0 reboot=k root=/dev/vda ro virtio_mmio.device=4K@0x1000:5 acpi=noirq"
        );
        config.drives[0].partuuid = Some("0eaa91a0-01".into());
        assert!(compose(&config, &[]).ends_with("root=PARTUUID=0eaa91a0-01 ro acpi=noirq"));
        config.boot.params = None;
        let default = compose(&config, &[]);
        assert!(default.starts_with("reboot=k panic=1") && default.contains("pci=off"), "{default}");
        config.transport = Transport::Pci;
        assert!(!compose(&config, &[]).contains("pci=off"));
    }
}
