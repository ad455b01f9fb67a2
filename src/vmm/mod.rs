//! The VM builder and its run loop: KVM, guest memory, irqchip, boot, devices, vCPU threads.

mod device_manager;
mod irq_routing;
pub mod exit;
pub mod vcpu;

use std::io;
use std::path::PathBuf;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::x86_64::cpuid::{self, Feature};
use crate::arch::x86_64::memory::ram_regions;
use crate::arch::x86_64::mptable;
use crate::arch::x86_64::regs;
use crate::boot::cmdline::KernelCmdline;
use crate::boot::{self, BootSpec};
use crate::devices::bus;
use crate::disk::{self, DiskImage, DiskSpec};
use crate::share::{self, Share, ShareSpec};
use crate::net::NetSpec;
use crate::term;
use exit::VmExit;
use crate::control::{Controller, RunState};
use crate::devices::legacy::serial::SerialPort;
use crate::devices::virtio::balloon::BalloonControl;
use vcpu::{Vcpu, VcpuControl};

/// Where KVM keeps its three-page TSS on Intel: just below the BIOS area, inside the hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// How long console input waits for a guest that is not reading its console before dropping it.
const CONSOLE_INPUT_PATIENCE: Duration = Duration::from_secs(2);

/// Everything needed to build and run one VM, already validated by the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Pci,
    Mmio,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleDevice {
    Serial,
    Virtio,
}

#[derive(Debug)]
pub struct VmConfig {
    pub name: String,
    pub kvm_device: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: KernelCmdline,
    pub disks: Vec<DiskSpec>,
    /// Host directories over virtio-9p, after the disks.
    pub shares: Vec<ShareSpec>,
    /// An `lkvm setup` root directory being booted (also among `shares`), which the caller
    /// creates or refreshes first.
    pub lkvm_rootfs: Option<PathBuf>,
    pub transport: Transport,
    pub console: ConsoleDevice,
    pub rng: bool,
    pub balloon: bool,
    pub nets: Vec<NetSpec>,
    pub mem_size: u64,
    pub cpus: u8,
    pub disabled_cpuid: Vec<&'static Feature>,
    /// When lkvm started, for the boot marker.
    pub started: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    KvmDevice { path: PathBuf, reason: String },
    #[error("KVM lacks {0}, which lkvm needs")]
    MissingCapability(&'static str),
    #[error("{requested} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyCpus { requested: u8, max: usize },
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    VcpuSetup(#[from] regs::Error),
    #[error("device layout: {0}")]
    Bus(#[from] bus::Error),
    #[error("{0}: {1}")]
    Host(&'static str, io::Error),
    #[error(transparent)]
    Disk(#[from] disk::OpenError),
    #[error(transparent)]
    Share(#[from] share::OpenError),
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Control(String),
    #[error("no room for device {0}: {1}")]
    DeviceSpace(String, String),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Opens the KVM device and checks the capabilities this VMM relies on. Probing /dev/kvm
/// (not host CPUID flags) is what tells whether KVM works, nested hosts included.
fn open_kvm(path: &PathBuf) -> Result<Kvm, Error> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::KvmDevice { path: path.clone(), reason: "invalid path".into() })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
        let reason = match e.errno() {
            libc::ENOENT => "not found: is KVM enabled (kvm_intel/kvm_amd loaded, virtualisation on)?".to_string(),
            libc::EACCES | libc::EPERM => "permission denied: add your user to the 'kvm' group".to_string(),
            _ => e.to_string(),
        };
        Error::KvmDevice { path: path.clone(), reason }
    })?;
    if kvm.get_api_version() != 12 {
        return Err(Error::KvmDevice { path: path.clone(), reason: "not a KVM device (wrong API version)".into() });
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Pit2, "an in-kernel PIT"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Irqfd, "irqfd"),
        (Cap::ImmediateExit, "immediate_exit"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(kvm)
}

fn create_memory(vm: &VmFd, mem_size: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(mem_size).into_iter().map(|(start, size)| (GuestAddress(start), size as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(mem_size >> 20, e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(mem_size >> 20, e.to_string()))?;
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM's use of it
        // (vCPU threads are joined before `mem` is dropped).
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(mem)
}

/// Builds the VM, boots it, and runs it until the guest or the user ends it.
pub fn run(config: &VmConfig) -> Result<VmExit, Error> {
    tracing::info!(
        "# lkvm run -k {} -m {} -c {} --name {}",
        config.kernel.display(),
        config.mem_size >> 20,
        config.cpus,
        config.name
    );
    // Input files first: a bad disk must fail before anything else happens.
    let disks = config.disks.iter().map(DiskImage::open).collect::<Result<Vec<_>, _>>()?;
    let shares = config.shares.iter().map(|spec| Ok((Share::open(spec)?, spec.tag.clone()))).collect::<Result<Vec<_>, Error>>()?;
    let (events, exits) = channel();
    let control = Arc::new(VcpuControl::new(usize::from(config.cpus)));
    let controller = Arc::new(VmController {
        vcpus: control.clone(),
        events: Mutex::new(events.clone()),
        balloon: OnceLock::new(),
        com1: OnceLock::new(),
        guest_mib: config.mem_size >> 20,
    });
    let _control_socket = crate::control::Server::start(&config.name, controller.clone()).map_err(Error::Control)?;
    let kvm = open_kvm(&config.kvm_device)?;
    let max_cpus = kvm.get_max_vcpus().min(usize::from(mptable::MAX_CPUS));
    if usize::from(config.cpus) > max_cpus {
        return Err(Error::TooManyCpus { requested: config.cpus, max: max_cpus });
    }
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
        .map_err(kvm_err("create PIT"))?;
    let mem = create_memory(&vm, config.mem_size)?;

    let mut cmdline = config.cmdline.clone();
    let devices = device_manager::create_devices(&vm, &mem, config, disks, shares, &mut cmdline, &events)?;
    if let Some(balloon) = &devices.balloon {
        let _ = controller.balloon.set(balloon.clone());
    }
    let _ = controller.com1.set(devices.com1.clone());

    let cmdline = cmdline.as_string();
    let spec = BootSpec {
        kernel: &config.kernel,
        initrd: config.initrd.as_deref(),
        cmdline: &cmdline,
        mem_size: config.mem_size,
        cpus: config.cpus,
    };
    let entry = boot::load(&mem, &spec)?;

    let pio = Arc::new(devices.pio);
    let mmio = Arc::new(devices.mmio);

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for index in 0..config.cpus {
        let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("create vCPU"))?;
        let cpuid = cpuid::for_vcpu(&supported, index, config.cpus, &config.disabled_cpuid);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        regs::setup_vcpu(&fd, (index == 0).then_some(entry))?;
        vcpus.push(Vcpu { index, fd, pio: pio.clone(), mmio: mmio.clone(), mem: mem.clone() });
    }

    vcpu::register_kick_handler().map_err(|e| Error::Host("signal handler", io::Error::from_raw_os_error(e.errno())))?;
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let (control, events) = (control.clone(), events.clone());
        let thread = thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index))
            .spawn(move || vcpu.run(&control, &events))
            .map_err(|e| Error::Host("spawn vCPU thread", e))?;
        threads.push(thread);
    }
    control.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
    spawn_console_input(devices.console_input, events.clone())?;

    let _raw_terminal = term::RawMode::stdin();
    let reason = exits.recv().expect("the VMM holds a sender until here");
    control.stop();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(reason)
}

/// The control socket's view of the VM.
struct VmController {
    vcpus: Arc<VcpuControl>,
    events: Mutex<Sender<VmExit>>,
    balloon: OnceLock<Arc<BalloonControl>>,
    com1: OnceLock<Arc<Mutex<SerialPort>>>,
    guest_mib: u64,
}

impl VmController {
    fn balloon_device(&self) -> Result<&BalloonControl, String> {
        self.balloon.get().map(|b| &**b).ok_or_else(|| "the guest has no balloon device (run it with --balloon)".to_string())
    }
}

impl Controller for VmController {
    fn state(&self) -> RunState {
        if self.vcpus.paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }
    fn stop(&self) {
        let _ = self.events.lock().unwrap().send(VmExit::Stopped);
    }
    fn pause(&self) -> Result<(), String> {
        self.vcpus.pause()
    }
    fn resume(&self) -> Result<(), String> {
        self.vcpus.resume()
    }
    fn registers(&self) -> Result<Vec<String>, String> {
        self.vcpus.registers()
    }
    fn balloon(&self, delta_mib: i64) -> Result<(u64, u64), String> {
        let balloon = self.balloon_device()?;
        let target = balloon.resize(delta_mib, self.guest_mib)?;
        Ok((target, balloon.actual_mib()))
    }
    fn stats(&self) -> Result<std::collections::BTreeMap<String, u64>, String> {
        self.balloon_device()?.stats()
    }
    fn nmi(&self, cpu: u32) -> Result<(), String> {
        self.vcpus.inject_nmi(cpu as usize)
    }
    fn sysrq(&self, key: char) -> Result<(), String> {
        let key = u8::try_from(key).ok().filter(u8::is_ascii_graphic).ok_or("sysrq keys are ASCII characters")?;
        self.com1.get().ok_or("the VM is still starting")?.lock().unwrap().send_sysrq(key)
    }
}

/// Feeds the terminal to the guest console. The thread is left blocked in read() when the VM ends: lkvm
/// exits right after.
fn spawn_console_input(mut input: device_manager::ConsoleInput, events: Sender<VmExit>) -> Result<(), Error> {
    let deliver = move |mut bytes: &[u8]| {
        let deadline = Instant::now() + CONSOLE_INPUT_PATIENCE;
        while !bytes.is_empty() && Instant::now() < deadline {
            let taken = input(bytes);
            bytes = &bytes[taken..];
            if taken == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let quit = move || {
        let _ = events.send(VmExit::UserQuit);
    };
    thread::Builder::new()
        .name("console".into())
        .spawn(move || term::pump_stdin(deliver, quit))
        .map(drop)
        .map_err(|e| Error::Host("spawn console thread", e))
}
