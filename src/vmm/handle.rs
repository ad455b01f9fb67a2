//! `VmHandle`: what the VMM thread does to a built VM (the actions of `action.rs`), and its
//! devices by id.

use crate::config::RateLimit;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::action::{ActionError, RunState, SnapshotReport};
use super::device_manager::{DeviceEntry, Persistent, Registry, VirtioDevices};
use super::exit::{ExitSender, VmExit};
use super::vcpu::VcpuControl;
use crate::arch::x86_64::coredump::{self, CpuRegisters};
use crate::config::{DiskSpec, VmConfig};
use crate::devices::virtio::balloon::BalloonControl;
use crate::disk::DiskImage;
use crate::snapshot::memory::Backing;
use crate::snapshot::{self, VmState, MEMORY_FILE, STATE_FILE};

pub struct VmHandle {
    pub(super) vcpus: Arc<VcpuControl>,
    events: ExitSender,
    registry: Registry,
    virtio: VirtioDevices,
    persistent: Persistent,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// Where guest memory's contents live, for forks; None when a page-fault handler fills it.
    backing: Mutex<Option<Backing>>,
    /// The configuration as it is now (drive swaps included), for `GET /vm/config`.
    config: Mutex<VmConfig>,
    started: AtomicBool,
}

/// What the device manager built that the handle reaches.
pub(super) struct Parts {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub backing: Option<Backing>,
    pub registry: Registry,
    pub virtio: VirtioDevices,
    pub persistent: Persistent,
}

/// A fork's children start from these (`lkvm fork`).
pub struct ForkImage {
    /// The state file's bytes, in a memfd.
    pub state: File,
    /// Guest memory: the base, then files of the pages changed since (`MemoryBackend::Forked`).
    pub memory: Vec<File>,
    /// How long the guest was paused for the fork.
    pub paused_micros: u64,
}

impl VmHandle {
    pub(super) fn new(config: VmConfig, vcpus: Arc<VcpuControl>, events: ExitSender, parts: Parts) -> Self {
        VmHandle {
            vcpus,
            events,
            registry: parts.registry,
            virtio: parts.virtio,
            persistent: parts.persistent,
            vm: parts.vm,
            mem: parts.mem,
            backing: Mutex::new(parts.backing),
            config: Mutex::new(config),
            started: AtomicBool::new(false),
        }
    }

    pub(super) fn complete_device_status(&self, index: usize) {
        if let Some(transport) = self.virtio.get(index) {
            transport.lock().unwrap().complete_status();
        }
    }

    pub(super) fn pause_devices(&self) {
        for device in &self.virtio {
            device.lock().unwrap().pause();
        }
    }

    /// Writes a paused VM's state to `state_path` and its memory to `memory_path`.
    pub fn write_snapshot(&self, state_path: &Path, memory_path: &Path) -> Result<SnapshotReport, String> {
        let started = std::time::Instant::now();
        let state = self.capture_state()?;
        let state_bytes = snapshot::write_state(state_path, &state).map_err(|e| e.to_string())?;
        let memory_bytes = snapshot::memory::save(&self.mem, memory_path).map_err(|e| e.to_string())?;
        Ok(SnapshotReport { state_bytes, memory_bytes, millis: started.elapsed().as_millis() as u64 })
    }

    /// Everything but memory, of a paused VM.
    fn capture_state(&self) -> Result<VmState, String> {
        let config = self.config();
        if !config.fs.is_empty() {
            // The guest's FUSE node ids and open files exist only in this lkvm's server.
            return Err("a guest with virtio-fs shares cannot be snapshotted".into());
        }
        if !self.vcpus.paused() {
            return Err("the guest must be paused for a snapshot".into());
        }
        let vcpus = self.vcpus.save()?;
        let kvm = crate::arch::x86_64::state::save_vm(&self.vm)?;
        let devices = self.persistent.iter().map(|(id, device)| (id.clone(), device.lock().unwrap().save())).collect();
        Ok(VmState { config, vcpus, kvm, devices })
    }

    /// What a fork's children start from: the state as it is now and the guest's memory,
    /// shared copy-on-write. The guest is paused (if it runs) only while they are taken.
    pub fn fork(&self) -> Result<ForkImage, String> {
        self.config().check_forkable()?;
        let mut backing = self.backing.lock().unwrap();
        let backing =
            backing.as_mut().ok_or("a guest whose memory a page-fault handler fills (Uffd) cannot be forked")?;
        let started = std::time::Instant::now();
        let was_paused = self.paused();
        if !was_paused {
            self.pause()?;
        }
        let image = self.capture_state().and_then(|state| {
            let state = snapshot::state_memfd(&state).map_err(|e| format!("the fork's state: {e}"))?;
            let memory = backing.fork(&self.mem).map_err(|e| format!("sharing guest memory: {e}"))?;
            Ok(ForkImage { state, memory, paused_micros: 0 })
        });
        if !was_paused {
            self.resume()?;
        }
        image.map(|image| ForkImage { paused_micros: started.elapsed().as_micros() as u64, ..image })
    }

    pub(super) fn exit_sender(&self) -> ExitSender {
        self.events.clone()
    }

    pub(super) fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Ends the VM: `Vm::wait` returns `reason`.
    pub fn end(&self, reason: VmExit) {
        self.events.send(reason);
    }

    pub fn config(&self) -> VmConfig {
        self.config.lock().unwrap().clone()
    }

    pub fn paused(&self) -> bool {
        self.vcpus.paused()
    }

    /// Makes every drive's writes durable: the VM has ended, and the process may exit before
    /// the images are dropped (a guest need not have flushed).
    pub fn flush_drives(&self) {
        for (id, device) in &self.registry {
            if let DeviceEntry::Drive(media) = device {
                if let Err(e) = media.flush() {
                    tracing::error!("drive {id}: flushing at exit: {e}");
                }
            }
        }
    }

    fn balloon_device(&self) -> Result<&BalloonControl, ActionError> {
        self.balloon_control().map(|b| &**b)
    }

    /// The balloon's control, for a thread that waits on the guest's statistics itself.
    pub(super) fn balloon_control(&self) -> Result<&Arc<BalloonControl>, ActionError> {
        self.registry
            .values()
            .find_map(|d| match d {
                DeviceEntry::Balloon(b) => Some(b),
                _ => None,
            })
            .ok_or(ActionError::NoBalloon)
    }

    /// Sets the balloon's target (MiB the guest should give back).
    pub fn set_balloon_target(&self, mib: u64) -> Result<(), ActionError> {
        let guest_mib = self.config.lock().unwrap().machine.mem_size_mib;
        self.balloon_device()?.set_target_mib(mib, guest_mib)?;
        if let Some(balloon) = &mut self.config.lock().unwrap().balloon {
            balloon.amount_mib = mib;
        }
        Ok(())
    }

    /// The balloon's (target, actual) in MiB.
    pub fn balloon_state(&self) -> Result<(u64, u64), ActionError> {
        let balloon = self.balloon_device()?;
        Ok((balloon.target_mib(), balloon.actual_mib()))
    }

    /// Points drive `id` at another image (the guest sees the new contents and size) and/or
    /// gives it new rate limits.
    pub fn update_drive(&self, id: &str, path: Option<&Path>, limit: Option<&RateLimit>) -> Result<(), ActionError> {
        let no_drive = || ActionError::NoDrive(id.to_string());
        let Some(DeviceEntry::Drive(media)) = self.registry.get(id) else { return Err(no_drive()) };
        let mut config = self.config.lock().unwrap();
        let drive = config.drives.iter_mut().find(|d| d.id == id).ok_or_else(no_drive)?;
        if let Some(path) = path {
            let spec = DiskSpec { path: path.to_path_buf(), ..drive.spec.clone() };
            let disk = DiskImage::open(&spec)?;
            if let Some(warning) = disk.probe_warning(path) {
                tracing::warn!("{warning}");
            }
            media.replace(disk);
            drive.spec = spec;
        }
        if let Some(limit) = limit {
            media.set_rate_limit(limit);
            drive.spec.rate_limit.merge(limit);
        }
        Ok(())
    }

    /// New rate limits for NIC `id`'s received and/or sent frames.
    pub fn update_nic(&self, id: &str, rx: Option<&RateLimit>, tx: Option<&RateLimit>) -> Result<(), ActionError> {
        let Some(DeviceEntry::Nic(limiters)) = self.registry.get(id) else {
            return Err(ActionError::NoNic(id.to_string()));
        };
        if rx.is_none() && tx.is_none() {
            return Err("nothing to update: give rx_rate_limiter or tx_rate_limiter".into());
        }
        limiters.update(rx, tx);
        let mut config = self.config.lock().unwrap();
        if let Some(net) = config.nets.iter_mut().find(|n| n.id == id) {
            rx.inspect(|limit| net.spec.rx_rate_limit.merge(limit));
            tx.inspect(|limit| net.spec.tx_rate_limit.merge(limit));
        }
        Ok(())
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), String> {
        match self.registry.get(super::device_manager::KEYBOARD_ID) {
            Some(DeviceEntry::Keyboard(i8042)) => i8042.lock().unwrap().trigger_ctrl_alt_del(),
            _ => Err("the guest has no keyboard controller".into()),
        }
    }
}

/// What the control socket's actions do.
impl VmHandle {
    pub fn run_state(&self) -> RunState {
        if self.vcpus.paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }
    pub fn stop(&self) {
        self.end(VmExit::Stopped);
    }
    pub fn pause(&self) -> Result<(), String> {
        if !self.started.load(Ordering::Acquire) {
            return Err("the guest is not running yet".into());
        }
        // vCPUs first: with them parked, no device is being set up or reset under its lock.
        self.vcpus.pause()?;
        self.pause_devices();
        Ok(())
    }
    pub fn resume(&self) -> Result<(), String> {
        if !self.vcpus.paused() {
            return Err("the guest is not paused".into());
        }
        for device in &self.virtio {
            device.lock().unwrap().resume().map_err(|e| format!("resuming a device: {e}"))?;
        }
        self.vcpus.resume()
    }
    pub fn registers(&self) -> Result<Vec<String>, String> {
        self.vcpus.registers()
    }
    pub fn resize_balloon(&self, delta_mib: i64) -> Result<(u64, u64), ActionError> {
        let balloon = self.balloon_device()?;
        let guest_mib = self.config.lock().unwrap().machine.mem_size_mib;
        let target = balloon.resize(delta_mib, guest_mib)?;
        Ok((target, balloon.actual_mib()))
    }
    pub fn nmi(&self, cpu: u32) -> Result<(), String> {
        self.vcpus.inject_nmi(cpu as usize)
    }
    pub fn snapshot_into(&self, dir: &Path, stop: bool) -> Result<SnapshotReport, String> {
        let was_paused = self.paused();
        if !was_paused {
            self.pause()?;
        }
        let written = self.write_snapshot(&dir.join(STATE_FILE), &dir.join(MEMORY_FILE));
        if stop && written.is_ok() {
            self.end(VmExit::Stopped);
        } else if !was_paused {
            self.resume()?;
        }
        written
    }
    pub fn dump(&self, path: &Path) -> Result<u64, String> {
        use std::os::unix::fs::OpenOptionsExt;
        // Guest memory may be secret: the file is its user's alone.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}{}", path.display(), crate::jail::landlock::hint(&e)))?;
        let was_paused = self.paused();
        if !was_paused {
            self.pause()?;
        }
        let written = self.vcpus.save().and_then(|states| {
            let cpus: Vec<CpuRegisters> =
                states.into_iter().map(|s| CpuRegisters { regs: s.regs, sregs: s.sregs }).collect();
            coredump::write(&file, &self.mem, &cpus).map_err(|e| format!("{}: {e}", path.display()))
        });
        if !was_paused {
            self.resume()?;
        }
        written
    }
    pub fn vsock_uds(&self) -> Option<std::path::PathBuf> {
        self.config.lock().unwrap().vsock.as_ref().map(|v| v.uds_path.clone())
    }
    pub fn sysrq(&self, key: char) -> Result<(), String> {
        let key = u8::try_from(key).ok().filter(u8::is_ascii_graphic).ok_or("sysrq keys are ASCII characters")?;
        match self.registry.get(super::device_manager::COM1_ID) {
            Some(DeviceEntry::Serial(com1)) => com1.lock().unwrap().send_sysrq(key),
            _ => Err("the guest has no serial console".into()),
        }
    }
}
