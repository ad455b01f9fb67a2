//! The VM: built from a `VmConfig` before it runs (KVM, guest memory, irqchip, kernel, devices
//! kept by id, vCPUs), then started and waited for. Meanwhile the VMM thread runs on its
//! `VmHandle` what the frontends (control socket, API) and the device transports ask
//! (`action.rs`): pause, resume, stop, snapshots, device updates, resets and activations.

pub mod action;
mod device_manager;
pub mod exit;
pub mod gdb;
mod handle;
mod irq_routing;
pub mod stats;
pub mod vcpu;

use stats::RunStats;

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::x86_64::memory::ram_regions;
use crate::arch::x86_64::{acpi, cpuid};
use crate::arch::x86_64::{regs, state};
use crate::boot::{self, compose, BootSpec, Initrd};
use crate::config::{GdbAddress, MemoryBackend, VmConfig};
use crate::devices::bus;
use crate::disk::{self, DiskImage};
use crate::share::virtiofs::FsShare;
use crate::share::{self, Share};
use crate::snapshot::{self, VmState};
use crate::term;
use crate::thread::{self as threads, ThreadKind};
pub use action::VmmClient;
pub use exit::Frontend;
use exit::VmExit;
pub use handle::VmHandle;
use vcpu::{Vcpu, VcpuControl};

/// Where KVM keeps its three-page TSS on Intel: just below the BIOS area, inside the hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// How long console input waits for a guest that is not reading its console before dropping it.
const CONSOLE_INPUT_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    KvmDevice { path: PathBuf, reason: String },
    #[error("KVM lacks {0}, which lkvm needs")]
    MissingCapability(&'static str),
    #[error("{0}")]
    Config(String),
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
    #[error(transparent)]
    FsShare(#[from] share::virtiofs::OpenError),
    #[error("{0}")]
    Network(String),
    #[error("vsock socket {path}: {error}", path = .0.display(), error = .1)]
    Vsock(std::path::PathBuf, io::Error),
    #[error("no room for device {0}: {1}")]
    DeviceSpace(String, String),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error("--gdb {0}: {1}")]
    Gdb(GdbAddress, io::Error),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Opens the KVM device and checks the capabilities this VMM relies on. Probing /dev/kvm
/// (not host CPUID flags) is what tells whether KVM works, nested hosts included.
fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let path = path.to_path_buf();
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

/// Hands guest RAM to KVM, one slot per region.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), Error> {
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
        // A core dump of lkvm must not carry the guest's memory (its secrets, and gigabytes).
        // SAFETY: advice on a live mapping owned by `mem`; it changes no contents.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTDUMP) } != 0 {
            return Err(Error::Host("exclude guest memory from core dumps", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Where a VM's memory and CPU state come from.
enum Origin<'a> {
    /// Fresh memory, the kernel loaded into it, vCPUs at its entry point.
    Boot,
    /// A snapshot's state, and its memory from a file or a page-fault handler.
    Snapshot(&'a VmState, &'a MemoryBackend),
}

/// A snapshot to restore, under which name, with which host resources replaced.
pub struct RestoreSpec {
    pub state: PathBuf,
    pub memory: MemoryBackend,
    pub name: String,
    /// (device id, new drive image path or tap name)
    pub overrides: Vec<(String, String)>,
    /// (share id, the host paths its guest may reach now): a warm sandbox's current view.
    pub share_views: Vec<(String, Vec<PathBuf>)>,
    /// Where the vsock's socket is made instead of the snapshot's path (a fork's child).
    pub vsock_uds: Option<PathBuf>,
}

/// A VM that exists before it runs: `build`, then `start`, then `wait` for its end.
pub struct Vm {
    handle: Arc<VmHandle>,
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    exits: exit::Exits,
    console_input: Option<device_manager::ConsoleInput>,
    /// The terminal reaches the console only once released (`hold_console_input`).
    console_held: bool,
    /// How the VM ended, if that was seen before `wait`.
    ended: Option<VmExit>,
    /// The userfaultfd a page-fault handler fills guest memory through (Uffd restores).
    _uffd: Option<std::os::fd::OwnedFd>,
    /// Sockets the devices listen on for host programs, removed when the VM ends.
    /// UNIX sockets removed when the VM is dropped.
    host_sockets: Vec<PathBuf>,
    /// What the VMM thread serves besides actions (the control socket).
    frontends: Vec<Box<dyn Frontend>>,
    /// The gdb stub's socket, until `start` hands it to the stub's thread.
    gdb: Option<(gdb::Listener, bool)>,
    /// Guest memory and the VM stay mapped until the vCPU threads are joined.
    mem: GuestMemoryMmap,
    stats: Arc<RunStats>,
    _vm: Arc<VmFd>,
}

impl Vm {
    /// Opens what the config names, creates the VM, its memory, devices and vCPUs and loads the
    /// kernel; no guest code runs yet. `started` is when lkvm started, for the boot marker.
    pub fn build(config: VmConfig, started: Instant) -> Result<Vm, Error> {
        Self::assemble(config, started, Origin::Boot)
    }

    /// Rebuilds a snapshot's VM: its config's host resources opened again (drives and taps
    /// where `spec` points them), memory mapped from the memory file, every vCPU and device
    /// set to its saved state. No guest code runs yet.
    pub fn restore(spec: &RestoreSpec, started: Instant) -> Result<Vm, Error> {
        let mut state = snapshot::read_state(&spec.state)?;
        state.config.name = spec.name.clone();
        for (id, value) in &spec.overrides {
            state.config.override_host_resource(id, value).map_err(Error::Config)?;
        }
        if let (Some(path), Some(vsock)) = (&spec.vsock_uds, state.config.vsock.as_mut()) {
            vsock.uds_path = path.clone();
        }
        for (id, view) in &spec.share_views {
            let share = state.config.shares.iter_mut().find(|s| &s.id == id);
            share.ok_or_else(|| Error::Config(format!("the snapshot has no share '{id}'")))?.spec.view = view.clone();
        }
        snapshot::trust::check_host_resources(&state.config)
            .map_err(|e| Error::Config(format!("{}: {e}", spec.state.display())))?;
        let begun = Instant::now();
        let vm = Self::assemble(state.config.clone(), started, Origin::Snapshot(&state, &spec.memory))?;
        tracing::info!("restored the snapshot {} in {} us", spec.state.display(), begun.elapsed().as_micros());
        Ok(vm)
    }

    fn assemble(config: VmConfig, started: Instant, origin: Origin) -> Result<Vm, Error> {
        config.validate().map_err(Error::Config)?;
        let machine = &config.machine;
        tracing::info!(
            "# lkvm run -k {} -m {} -c {} --name {}",
            config.boot.kernel.display(),
            machine.mem_size_mib,
            machine.vcpu_count,
            config.name
        );
        let disabled_cpuid = machine
            .disabled_cpuid
            .iter()
            .map(|name| {
                cpuid::find_feature(name).ok_or_else(|| Error::Config(format!("unknown CPUID feature '{name}'")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Input files first: a bad disk or initrd must fail before anything else happens.
        if let (Some(initrd), Origin::Boot) = (&config.boot.initrd, &origin) {
            std::fs::File::open(initrd).map_err(|e| boot::Error::Initrd(initrd.clone(), e.to_string()))?;
        }
        let gdb = match &config.gdb {
            Some(spec) => {
                Some((gdb::Listener::bind(&spec.address).map_err(|e| Error::Gdb(spec.address.clone(), e))?, spec.wait))
            }
            None => None,
        };
        let disks = config.drives.iter().map(|d| DiskImage::open(&d.spec)).collect::<Result<Vec<_>, _>>()?;
        // Said at boot, once the VM is built; a restore's drives were named when it booted.
        let booting = matches!(origin, Origin::Boot);
        let probe_warnings: Vec<String> =
            disks.iter().zip(&config.drives).filter_map(|(disk, drive)| disk.probe_warning(&drive.spec.path)).collect();
        let shares = config.shares.iter().map(|s| Share::open(&s.spec)).collect::<Result<Vec<_>, _>>()?;
        let fs_shares = config.fs.iter().map(|f| FsShare::open(&f.spec)).collect::<Result<Vec<_>, _>>()?;
        let host = device_manager::HostResources { disks, shares, fs_shares };
        let kvm = open_kvm(&config.kvm_device)?;
        let max_cpus = kvm.get_max_vcpus().min(usize::from(crate::config::MAX_CPUS));
        if usize::from(machine.vcpu_count) > max_cpus {
            return Err(Error::TooManyCpus { requested: machine.vcpu_count, max: max_cpus });
        }
        let mem_size = machine.mem_size_mib << 20;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm_err("create PIT"))?;
        let ranges: Vec<(GuestAddress, usize)> =
            ram_regions(mem_size).into_iter().map(|(start, size)| (GuestAddress(start), size as usize)).collect();
        let (mem, backing, uffd) = match origin {
            Origin::Boot => {
                let (mem, backing) =
                    snapshot::memory::create(&ranges).map_err(|e| Error::Memory(mem_size >> 20, e.to_string()))?;
                (mem, Some(backing), None)
            }
            Origin::Snapshot(_, MemoryBackend::File(path)) => {
                let (mem, backing) = snapshot::memory::map(path, &ranges)?;
                (mem, Some(backing), None)
            }
            Origin::Snapshot(_, MemoryBackend::Forked { base, changes }) => {
                let (mem, backing) = snapshot::memory::map_layers(base, changes, &ranges)?;
                (mem, Some(backing), None)
            }
            // Pages the handler has not filled yet exist nowhere a child could map them.
            Origin::Snapshot(_, MemoryBackend::Uffd(handler)) => {
                let (mem, uffd) = snapshot::uffd::map(handler, &ranges)?;
                (mem, None, Some(uffd))
            }
        };
        register_memory(&vm, &mem, mem_size)?;
        let msrs =
            Arc::new(state::msrs_to_save(kvm.get_msr_index_list().map_err(kvm_err("get MSR index list"))?.as_slice()));

        // vCPUs exist, and a snapshot's are restored, before any device can raise an interrupt.
        let mut vcpu_fds = Vec::with_capacity(usize::from(machine.vcpu_count));
        for index in 0..machine.vcpu_count {
            vcpu_fds.push(vm.create_vcpu(u64::from(index)).map_err(kvm_err("create vCPU"))?);
        }
        if let Origin::Snapshot(saved, _) = origin {
            state::restore_vm(&vm, &saved.kvm).map_err(Error::Restore)?;
            for (index, (fd, state)) in vcpu_fds.iter().zip(&saved.vcpus).enumerate() {
                state::restore_vcpu(fd, state).map_err(|e| Error::Restore(format!("vCPU {index}: {e}")))?;
            }
        }

        let (events, exits) = exit::channel().map_err(|e| Error::Host("exit eventfd", e))?;
        let stats = Arc::new(RunStats::new(started));
        let devices = device_manager::create_devices(&vm, &mem, &config, host, &events, &stats)?;
        match origin {
            Origin::Boot => {
                let cmdline = compose::compose(&config, &devices.mmio_cmdline);
                let lkvm_initramfs = config.lkvm_rootfs().map(|_| crate::rootfs::initramfs());
                let initrd = match (&config.boot.initrd, &lkvm_initramfs) {
                    (Some(path), _) => Some(Initrd::File(path)),
                    (None, Some(built)) => Some(Initrd::Built(built)),
                    (None, None) => None,
                };
                let spec = BootSpec {
                    kernel: &config.boot.kernel,
                    initrd,
                    cmdline: &cmdline,
                    mem_size,
                    cpus: machine.vcpu_count,
                };
                let entry = boot::load(&mem, &spec)?;
                let supported =
                    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
                for (index, fd) in (0..).zip(&vcpu_fds) {
                    let cpuid = cpuid::for_vcpu(&supported, index, machine.vcpu_count, &disabled_cpuid);
                    fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
                    regs::setup_vcpu(fd, (index == 0).then_some(entry))?;
                }
            }
            Origin::Snapshot(saved, _) => {
                device_manager::restore_devices(&devices.persistent, &saved.devices)?;
                // A clone: a new VM generation ID, and the event that makes the guest read it
                // (and reseed its random number generator) once it runs.
                acpi::new_generation(&mem).map_err(|e| Error::Restore(format!("VM generation ID: {e}")))?;
                vm.set_irq_line(acpi::GED_GSI, true).map_err(kvm_err("raise the ACPI event"))?;
                vm.set_irq_line(acpi::GED_GSI, false).map_err(kvm_err("lower the ACPI event"))?;
            }
        }

        let (pio, mmio) = (Arc::new(devices.pio), Arc::new(devices.mmio));
        let vcpus = (0..)
            .zip(vcpu_fds)
            .map(|(index, fd)| Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                msrs: msrs.clone(),
                stats: stats.clone(),
            })
            .collect();
        let control = Arc::new(VcpuControl::new(usize::from(machine.vcpu_count)));
        let parts = handle::Parts {
            vm: vm.clone(),
            mem: mem.clone(),
            backing,
            registry: devices.registry,
            virtio: devices.virtio,
            persistent: devices.persistent,
        };
        let host_sockets = config.vsock.iter().map(|v| v.uds_path.clone()).collect();
        if booting {
            probe_warnings.iter().for_each(|warning| tracing::warn!("{warning}"));
        }
        let handle = Arc::new(VmHandle::new(config, control, events, parts));
        Ok(Vm {
            handle,
            vcpus,
            threads: Vec::new(),
            exits,
            console_input: Some(devices.console_input),
            console_held: false,
            ended: None,
            _uffd: uffd,
            host_sockets,
            frontends: Vec::new(),
            gdb,
            mem,
            stats,
            _vm: vm,
        })
    }

    pub fn handle(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// A way for other threads to ask this VM's VMM thread for actions (`wait` and `has_ended`
    /// run them).
    pub fn client(&self) -> VmmClient {
        VmmClient::new(self.handle.exit_sender())
    }

    /// Runs the guest: one thread per vCPU, and the terminal feeding the console.
    pub fn start(&mut self) -> Result<(), Error> {
        let gdb = self.gdb.take();
        if let Some((listener, wait)) = &gdb {
            if *wait {
                self.handle.vcpus.request_pause().map_err(Error::Config)?;
                eprintln!(
                    "lkvm: the guest waits for gdb on {} (gdb vmlinux -ex 'target remote ...')",
                    listener.describe()
                );
            }
        }
        self.spawn_threads()?;
        if let Some((listener, _)) = gdb {
            let (vcpus, mem, handle) = (self.handle.vcpus.clone(), self.mem.clone(), self.handle.clone());
            threads::spawn(ThreadKind::Gdb, "gdb".into(), move || {
                gdb::serve(listener, vcpus, mem, || handle.end(VmExit::Stopped))
            })
            .map_err(|e| Error::Host("spawn gdb thread", e))?;
        }
        self.handle.mark_started();
        Ok(())
    }

    /// Like `start`, but the vCPUs park before entering the guest and the devices wait: the VM
    /// is paused until resumed (a snapshot loaded without resuming).
    pub fn start_paused(&mut self) -> Result<(), Error> {
        self.handle.vcpus.request_pause().map_err(Error::Restore)?;
        self.handle.pause_devices();
        self.spawn_threads()?;
        self.handle.vcpus.wait_parked().map_err(Error::Restore)?;
        self.handle.mark_started();
        Ok(())
    }

    fn spawn_threads(&mut self) -> Result<(), Error> {
        vcpu::register_kick_handler()
            .map_err(|e| Error::Host("signal handler", io::Error::from_raw_os_error(e.errno())))?;
        self.exits.end_on_termination_signals().map_err(|e| Error::Host("signal handler", e))?;
        for vcpu in self.vcpus.drain(..) {
            let (control, events) = (self.handle.vcpus.clone(), self.handle.exit_sender());
            let thread =
                threads::spawn(ThreadKind::Vcpu, threads::vcpu_name(vcpu.index), move || vcpu.run(&control, &events))
                    .map_err(|e| Error::Host("spawn vCPU thread", e))?;
            self.threads.push(thread);
        }
        self.handle.vcpus.set_threads(self.threads.iter().map(|t| t.as_pthread_t()).collect());
        if !self.console_held {
            self.release_console_input()?;
        }
        Ok(())
    }

    /// Keeps the terminal's input from the guest until `release_console_input`, so that what
    /// lkvm types on the console first (a sandbox's job) comes first.
    pub fn hold_console_input(&mut self) {
        self.console_held = true;
    }

    /// Lets the terminal reach the guest console; no thread is started for an input that has
    /// already ended.
    pub fn release_console_input(&mut self) -> Result<(), Error> {
        match self.console_input.take() {
            Some(input) if !term::stdin_has_ended() => spawn_console_input(input, self.handle.clone()),
            _ => Ok(()),
        }
    }

    /// Whether the VM has ended (without waiting); `wait` then returns how. Runs the actions
    /// and serves the frontends' requests waiting.
    pub fn has_ended(&mut self) -> bool {
        if self.ended.is_none() {
            let handle = &self.handle;
            for frontend in &mut self.frontends {
                frontend.serve_waiting(&|action| action::execute(handle, action));
            }
            self.ended = self.exits.try_recv(&|action| action::execute(handle, action));
        }
        self.ended.is_some()
    }

    /// Waits until the guest or the user ends the VM, then stops every vCPU.
    pub fn wait(mut self) -> VmExit {
        // Raw only while the terminal feeds the console (a sandbox's command may own it).
        let _raw_terminal = if self.console_input.is_none() { term::RawMode::stdin() } else { None };
        let handle = &self.handle;
        let act = |action| action::execute(handle, action);
        let reason = self.ended.take().unwrap_or_else(|| self.exits.recv_serving(&mut self.frontends, &act));
        self.handle.vcpus.stop();
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
        self.handle.flush_drives();
        tracing::info!("{}", self.stats.summary());
        reason
    }

    /// Serves `frontend` from now on, in `has_ended` and `wait`; it is dropped with the VM.
    pub fn serve(&mut self, frontend: Box<dyn Frontend>) {
        self.frontends.push(frontend);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for path in &self.host_sockets {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Feeds the terminal to the guest console. The thread is left blocked in read() when the VM
/// ends: lkvm exits right after.
fn spawn_console_input(mut input: device_manager::ConsoleInput, handle: Arc<VmHandle>) -> Result<(), Error> {
    let deliver = move |mut bytes: &[u8]| {
        let deadline = Instant::now() + CONSOLE_INPUT_PATIENCE;
        while !bytes.is_empty() && Instant::now() < deadline {
            let taken = input(bytes);
            bytes = &bytes[taken..];
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let quit = move || handle.end(VmExit::UserQuit);
    threads::spawn(ThreadKind::Console, "console".into(), move || term::pump_stdin(deliver, quit))
        .map(drop)
        .map_err(|e| Error::Host("spawn console thread", e))
}
