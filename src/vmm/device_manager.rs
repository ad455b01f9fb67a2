//! Creates the guest's devices from the config, places them on the buses, wires their
//! interrupts and notifications to KVM (irqfd, ioeventfd), and keeps a handle on each by id.

use super::stats::RunStats;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::GuestMemoryMmap;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::action::Action;
use super::exit::{ExitSender, VmExit, VmmMessage};
use super::irq_routing::{KvmMsiRouting, FIRST_MSI_GSI};
use super::{kvm_err, Error};
use crate::arch::x86_64::layout::{IOAPIC_ADDR, MMIO_HOLE_START};
use crate::arch::x86_64::memory::ram_regions;
use crate::config::net::DEFAULT_GUEST_MAC;
use crate::config::{ConsoleDevice, NetMode, Transport, VmConfig};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::legacy::{boot_marker, cmos, i8042, serial, stub};
use crate::devices::pci::msix::{MsiRouting, MsixState, Vector};
use crate::devices::pci::{self, PciRoot};
use crate::devices::virtio::balloon::{Balloon, BalloonControl};
use crate::devices::virtio::block::{Block, DriveMedia};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::net::{Net, NicLimiters};
use crate::devices::virtio::p9::P9;
use crate::devices::virtio::pci::{self as virtio_pci, VirtioPciTransport};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::transport::VirtioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::Persist;
use crate::disk::DiskImage;
use crate::mmds::stack::MmdsBackend;
use crate::net::slirp::Slirp;
use crate::net::tap::Tap;
use crate::net::NetBackend;
use crate::share::virtiofs::FsShare;
use crate::share::Share;

/// Registry ids of the legacy devices the VMM reaches by id.
pub const COM1_ID: &str = "com1";
pub const KEYBOARD_ID: &str = "i8042";
/// Snapshot ids of the devices a config does not name; no config id contains the colon.
const LEGACY: &str = "legacy:";
const CONSOLE_ID: &str = "console";
/// IRQ line of the i8042's keyboard port.
const KEYBOARD_IRQ: u32 = 1;

/// GSIs for virtio-mmio devices: IOAPIC pins no legacy device uses (8 is the RTC's, 23 the
/// ACPI event device's).
const VIRTIO_MMIO_GSIS: &[u32] = &[5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22];

/// Takes what fits of the terminal's input for the guest console; returns the bytes taken.
pub type ConsoleInput = Box<dyn FnMut(&[u8]) -> usize + Send>;

pub type Keyboard = i8042::I8042<ExitTrigger, i8042::IrqLine>;

/// What the VMM can reach of a device after it is placed on the buses.
pub enum DeviceEntry {
    /// A virtio-blk drive, whose image can be swapped.
    Drive(Arc<DriveMedia>),
    Balloon(Arc<BalloonControl>),
    /// A NIC, whose rate limits can change.
    Nic(Arc<NicLimiters>),
    /// COM1, for SysRq.
    Serial(Arc<Mutex<serial::SerialPort>>),
    /// The i8042, for Ctrl+Alt+Del.
    Keyboard(Arc<Mutex<Keyboard>>),
    /// A device the VMM needs no handle on (9p, entropy, console).
    Plain,
}

pub type Registry = BTreeMap<String, DeviceEntry>;

/// The virtio devices on their transports, which the VMM thread pauses and resumes with the
/// vCPUs, and resets and activates when the guest asks (`Action::CompleteDeviceStatus`).
pub type VirtioDevices = Vec<Arc<Mutex<dyn VirtioTransport>>>;

/// Every device with state a snapshot keeps, by id.
pub type Persistent = BTreeMap<String, Arc<Mutex<dyn Persist>>>;

pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub console_input: ConsoleInput,
    pub registry: Registry,
    pub virtio: VirtioDevices,
    pub persistent: Persistent,
    /// `virtio_mmio.device=` values for the kernel command line.
    pub mmio_cmdline: Vec<String>,
}

/// Ends the VM with a fixed reason when triggered (the i8042 reset line).
pub struct ExitTrigger {
    events: ExitSender,
    reason: VmExit,
}

impl Trigger for ExitTrigger {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        if self.events.send(self.reason.clone()) {
            Ok(())
        } else {
            Err(())
        }
    }
}

fn eventfd() -> Result<EventFd, Error> {
    crate::host::eventfd().map_err(|e| Error::Host("eventfd", e))
}

/// The host files and directories a VM's devices serve, opened (and checked) before the VM is.
pub struct HostResources {
    pub disks: Vec<DiskImage>,
    pub shares: Vec<Share>,
    pub fs_shares: Vec<FsShare>,
}

pub fn create_devices(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    host: HostResources,
    events: &ExitSender,
    stats: &Arc<RunStats>,
) -> Result<Devices, Error> {
    let mut pio = Bus::default();
    let mut registry = Registry::new();
    let mut persistent = Persistent::new();
    let com1 = add_legacy_devices(vm, config, events, stats, &mut pio, &mut registry, &mut persistent)?;
    let mut console_input: ConsoleInput = Box::new(move |bytes: &[u8]| com1.lock().unwrap().receive(bytes));

    // The guest enumerates these in order: disks become vda, vdb, ...
    let mut virtio: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    let HostResources { disks, shares, fs_shares } = host;
    for (drive, disk) in config.drives.iter().zip(disks) {
        let block =
            Block::new(disk, &drive.id, &drive.spec.rate_limit).map_err(|e| Error::Host("rate limiter timer", e))?;
        registry.insert(drive.id.clone(), DeviceEntry::Drive(block.media()));
        virtio.push((drive.id.clone(), Box::new(block)));
    }
    for (config, share) in config.shares.iter().zip(shares) {
        virtio.push((config.id.clone(), Box::new(P9::new(share, &config.spec.tag))));
        registry.insert(config.id.clone(), DeviceEntry::Plain);
    }
    for (config, share) in config.fs.iter().zip(fs_shares) {
        virtio.push((config.id.clone(), Box::new(Fs::new(share, &config.spec.tag))));
        registry.insert(config.id.clone(), DeviceEntry::Plain);
    }
    for (index, net) in config.nets.iter().enumerate() {
        let spec = &net.spec;
        let mut backends: Vec<Box<dyn NetBackend>> = match spec.mode {
            NetMode::User => vec![Box::new(Slirp::start(spec).map_err(Error::Network)?)],
            NetMode::Tap => {
                Tap::open(spec, index).map_err(Error::Network)?.into_iter().map(|t| Box::new(t) as _).collect()
            }
            NetMode::None => continue,
        };
        if let Some(mmds) = config.mmds.as_ref().filter(|m| m.network_interfaces.contains(&net.id)) {
            crate::mmds::store().set_version(mmds.version);
            backends = backends
                .into_iter()
                .map(|b| MmdsBackend::new(b, mmds.ipv4_address).map(|m| Box::new(m) as Box<dyn NetBackend>))
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Host("MMDS", e))?;
        }
        let mut mac = spec.guest_mac.unwrap_or(DEFAULT_GUEST_MAC);
        if spec.guest_mac.is_none() {
            mac[5] = mac[5].wrapping_add(index as u8);
        }
        let nic = Net::new(mac, backends, &spec.rx_rate_limit, &spec.tx_rate_limit)
            .map_err(|e| Error::Host("rate limiter timer", e))?;
        registry.insert(net.id.clone(), DeviceEntry::Nic(nic.limiters()));
        virtio.push((net.id.clone(), Box::new(nic)));
    }
    if config.console == ConsoleDevice::Virtio {
        let console = Console::new(Box::new(serial::Stdout)).map_err(|e| Error::Host("virtio console", e))?;
        let inbox = console.inbox();
        console_input = Box::new(move |bytes: &[u8]| inbox.push(bytes));
        virtio.push((CONSOLE_ID.into(), Box::new(console)));
        registry.insert(CONSOLE_ID.into(), DeviceEntry::Plain);
    }
    if let Some(entropy) = &config.entropy {
        virtio.push((
            entropy.id.clone(),
            Box::new(Rng::new(&entropy.rate_limit).map_err(|e| Error::Host("rate limiter timer", e))?),
        ));
        registry.insert(entropy.id.clone(), DeviceEntry::Plain);
    }
    if let Some(config) = &config.balloon {
        let balloon =
            Balloon::new(config.amount_mib, config.deflate_on_oom).map_err(|e| Error::Host("virtio balloon", e))?;
        registry.insert(config.id.clone(), DeviceEntry::Balloon(balloon.control()));
        virtio.push((config.id.clone(), Box::new(balloon)));
    }

    if let Some(config) = &config.vsock {
        let vsock = Vsock::new(config.guest_cid, config.uds_path.clone())
            .map_err(|e| Error::Vsock(config.uds_path.clone(), e))?;
        virtio.push((config.id.clone(), Box::new(vsock)));
        registry.insert(config.id.clone(), DeviceEntry::Plain);
    }

    let mut mmio = Bus::default();
    let mut mmio_cmdline = Vec::new();
    let mut space = AddressAllocator::new(MMIO_HOLE_START, u64::from(IOAPIC_ADDR) - MMIO_HOLE_START)
        .expect("the MMIO hole is a valid range");
    if config.transport == Transport::Pci {
        let mut pci = PciRoot::default();
        let routing = Arc::new(KvmMsiRouting::new(vm.clone()));
        let mut next_gsi = FIRST_MSI_GSI;
        let mut transports = VirtioDevices::new();
        for (id, device) in virtio {
            let transport = add_virtio_pci(vm, mem, device, &routing, &mut next_gsi, &mut space, &mut mmio, &mut pci)?;
            transport.lock().unwrap().set_completer(completer(events, transports.len()));
            transports.push(transport.clone());
            persistent.insert(id, transport);
        }
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(pci.clone(), u64::from(pci::CONFIG_PORT), pci::CONFIG_PORT_LEN)?;
        persistent.insert(format!("{LEGACY}pci"), pci);
        return Ok(Devices { pio, mmio, console_input, registry, virtio: transports, persistent, mmio_cmdline });
    }
    if virtio.len() > VIRTIO_MMIO_GSIS.len() {
        return Err(Error::DeviceSpace(
            format!("{} virtio devices", virtio.len()),
            format!("virtio-mmio has {} interrupt lines", VIRTIO_MMIO_GSIS.len()),
        ));
    }
    let mut transports = VirtioDevices::new();
    for ((id, device), gsi) in virtio.into_iter().zip(VIRTIO_MMIO_GSIS) {
        let (transport, cmdline) = add_virtio_mmio(vm, mem, device, *gsi, &mut space, &mut mmio)?;
        transport.lock().unwrap().set_completer(completer(events, transports.len()));
        transports.push(transport.clone());
        persistent.insert(id, transport);
        mmio_cmdline.push(cmdline);
    }
    Ok(Devices { pio, mmio, console_input, registry, virtio: transports, persistent, mmio_cmdline })
}

/// How the transport of `VirtioDevices[index]` asks the VMM thread to reset or activate its
/// device.
fn completer(events: &ExitSender, index: usize) -> Box<dyn Fn() + Send> {
    let events = events.clone();
    Box::new(move || {
        events.post(VmmMessage::Post(Action::CompleteDeviceStatus(index)));
    })
}

/// A naturally aligned window of `size` bytes in the MMIO hole.
fn allocate(space: &mut AddressAllocator, size: u64, what: &str) -> Result<RangeInclusive, Error> {
    space.allocate(size, size, AllocPolicy::FirstMatch).map_err(|e| Error::DeviceSpace(what.to_string(), e.to_string()))
}

#[allow(clippy::too_many_arguments)]
fn add_virtio_pci(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    routing: &Arc<KvmMsiRouting>,
    next_gsi: &mut u32,
    space: &mut AddressAllocator,
    bus: &mut Bus,
    pci: &mut PciRoot,
) -> Result<Arc<Mutex<VirtioPciTransport>>, Error> {
    let what = format!("virtio-pci device type {}", device.device_type());
    let bar = allocate(space, virtio_pci::BAR_SIZE, &what)?;
    let mut vectors = Vec::new();
    for _ in 0..virtio_pci::vector_count(device.as_ref()) {
        let irqfd = eventfd()?;
        vm.register_irqfd(&irqfd, *next_gsi).map_err(kvm_err("register MSI-X irqfd"))?;
        vectors.push(Vector { gsi: *next_gsi, irqfd });
        *next_gsi += 1;
    }
    let routing: Arc<dyn MsiRouting> = routing.clone();
    let msix = MsixState::new(vectors, routing);
    let transport = VirtioPciTransport::new(device, mem.clone(), bar.start() as u32, msix)
        .map_err(|e| Error::Host("virtio transport", e))?;
    for (queue, kick) in transport.kicks().iter().enumerate() {
        let addr = bar.start() + virtio_pci::NOTIFY_OFFSET + queue as u64 * u64::from(virtio_pci::NOTIFY_MULTIPLIER);
        vm.register_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("register virtio ioeventfd"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    bus.insert(transport.clone(), bar.start(), virtio_pci::BAR_SIZE)?;
    pci.add(transport.clone()).ok_or_else(|| Error::DeviceSpace(what, "PCI bus 0 is full".into()))?;
    Ok(transport)
}

fn add_virtio_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    gsi: u32,
    space: &mut AddressAllocator,
    bus: &mut Bus,
) -> Result<(Arc<Mutex<MmioTransport>>, String), Error> {
    let what = format!("virtio-mmio device type {}", device.device_type());
    let range = allocate(space, mmio::WINDOW_SIZE, &what)?;
    let irq = eventfd()?;
    vm.register_irqfd(&irq, gsi).map_err(kvm_err("register virtio irqfd"))?;
    let transport = MmioTransport::new(device, mem.clone(), irq).map_err(|e| Error::Host("virtio transport", e))?;
    let notify = IoEventAddress::Mmio(range.start() + mmio::QUEUE_NOTIFY_OFFSET);
    for (queue, kick) in transport.kicks().iter().enumerate() {
        vm.register_ioevent(kick, &notify, queue as u32).map_err(kvm_err("register virtio ioeventfd"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    bus.insert(transport.clone(), range.start(), mmio::WINDOW_SIZE)?;
    Ok((transport, format!("4K@{:#x}:{gsi}", range.start())))
}

fn add_legacy_devices(
    vm: &VmFd,
    config: &VmConfig,
    events: &ExitSender,
    stats: &Arc<RunStats>,
    pio: &mut Bus,
    registry: &mut Registry,
    persistent: &mut Persistent,
) -> Result<Arc<Mutex<serial::SerialPort>>, Error> {
    let mut console = None;
    for (i, (port, irq)) in serial::PORTS.iter().enumerate() {
        let irq_evt = eventfd()?;
        vm.register_irqfd(&irq_evt, *irq).map_err(kvm_err("register serial irqfd"))?;
        let out: Box<dyn io::Write + Send> = if i == 0 { Box::new(serial::Stdout) } else { Box::new(io::sink()) };
        let uart = Arc::new(Mutex::new(serial::SerialPort::new(irq_evt, out)));
        pio.insert(uart.clone(), u64::from(*port), serial::PORT_LEN)?;
        persistent.insert(format!("{LEGACY}com{}", i + 1), uart.clone());
        console.get_or_insert(uart);
    }
    let reset = ExitTrigger { events: events.clone(), reason: VmExit::Reset };
    let keyboard_irq = eventfd()?;
    vm.register_irqfd(&keyboard_irq, KEYBOARD_IRQ).map_err(kvm_err("register keyboard irqfd"))?;
    let keyboard = Arc::new(Mutex::new(i8042::I8042::new(reset, i8042::IrqLine(keyboard_irq))));
    pio.insert(keyboard.clone(), u64::from(i8042::BASE), i8042::LEN)?;
    persistent.insert(format!("{LEGACY}{KEYBOARD_ID}"), keyboard.clone());
    registry.insert(KEYBOARD_ID.into(), DeviceEntry::Keyboard(keyboard));
    let (low, high) = match ram_regions(config.machine.mem_size_mib << 20).as_slice() {
        [(_, low), (_, high)] => (*low, *high),
        [(_, low)] => (*low, 0),
        _ => unreachable!("guest RAM is one or two regions"),
    };
    let cmos = Arc::new(Mutex::new(cmos::Cmos::new(low, high)));
    pio.insert(cmos.clone(), u64::from(cmos::BASE), cmos::LEN)?;
    persistent.insert(format!("{LEGACY}cmos"), cmos);
    let stub: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(stub::StubPort));
    pio.insert(stub.clone(), u64::from(stub::POST_PORT), 1)?;
    pio.insert(stub, u64::from(stub::SYSTEM_CONTROL_A), 1)?;
    let stats = stats.clone();
    let marker = boot_marker::BootMarker::new(move || stats.boot_marker());
    pio.insert(Arc::new(Mutex::new(marker)), u64::from(boot_marker::PORT), 1)?;
    let com1 = console.expect("COM1 exists");
    registry.insert(COM1_ID.into(), DeviceEntry::Serial(com1.clone()));
    Ok(com1)
}

/// Gives every device its saved state. The snapshot must name exactly the devices this config
/// created: anything else means it was taken of another machine.
pub fn restore_devices(persistent: &Persistent, saved: &BTreeMap<String, Vec<u8>>) -> Result<(), Error> {
    if let Some(extra) = saved.keys().find(|id| !persistent.contains_key(*id)) {
        return Err(Error::Restore(format!("the snapshot has a device '{extra}' its config does not create")));
    }
    for (id, device) in persistent {
        let state =
            saved.get(id).ok_or_else(|| Error::Restore(format!("the snapshot has no state for device '{id}'")))?;
        device.lock().unwrap().restore(state).map_err(|e| Error::Restore(format!("device '{id}': {e}")))?;
    }
    Ok(())
}
