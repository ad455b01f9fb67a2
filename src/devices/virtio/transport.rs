//! What every virtio transport shares: feature negotiation, device status, per-queue setup and
//! activation. The PCI and MMIO transports only map their registers onto this.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};

#[cfg(test)]
pub const STATUS_ACKNOWLEDGE: u8 = 1;
#[cfg(test)]
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
/// "No MSI-X vector" for config and queue vectors.
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub msix_vector: u16,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig { max_size, size: max_size, msix_vector: NO_VECTOR, ..Default::default() }
    }
}

/// The driver's side of the negotiation and queue setup, plus the device's own state.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    status: u8,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    config_vector: u16,
    config_generation: u32,
    device: Vec<u8>,
}

/// What the driver's status writes ask of the device beyond the registers. The VMM thread does
/// it (`complete_status`), so that no vCPU waits on a device's threads.
#[derive(Default)]
struct Pending {
    reset: bool,
    activate: Option<Arc<dyn Interrupt>>,
}

/// A transport as the VMM thread drives it: pause and resume, and the resets and activations
/// the guest asked for.
pub trait VirtioTransport: super::worker::Lifecycle {
    /// How the transport asks the VMM thread to `complete_status` (the device manager's).
    fn set_completer(&mut self, completer: Box<dyn Fn() + Send>);
    fn complete_status(&mut self);
}

pub struct TransportState {
    pub device: Box<dyn VirtioDevice>,
    pub status: u8,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<QueueConfig>,
    /// One notification eventfd per queue; KVM signals them directly (ioeventfd) and the
    /// transport does when a notification arrives as a plain exit.
    pub kicks: Vec<EventFd>,
    pub config_vector: u16,
    pub config_generation: u32,
    mem: GuestMemoryMmap,
    pending: Pending,
    /// Asks the VMM thread to `complete_status`; without one (unit tests, fuzzing) the transport
    /// completes at once.
    completer: Option<Box<dyn Fn() + Send>>,
}

impl TransportState {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let queues: Vec<QueueConfig> = device.queue_max_sizes().iter().map(|m| QueueConfig::new(*m)).collect();
        let kicks = queues.iter().map(|_| crate::host::eventfd()).collect::<Result<_, _>>()?;
        Ok(TransportState {
            device,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            kicks,
            config_vector: NO_VECTOR,
            config_generation: 0,
            mem,
            pending: Pending::default(),
            completer: None,
        })
    }

    pub fn device_features_word(&self) -> u32 {
        match self.device_features_select {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    pub fn write_driver_features_word(&mut self, value: u32) {
        // Features are fixed once FEATURES_OK is set.
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    /// The selected queue while the driver may still configure it.
    pub fn selected_queue_mut(&mut self) -> Option<&mut QueueConfig> {
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Signals the queue's eventfd, for notifications that did not go through ioeventfd.
    pub fn notify(&self, queue: u32) {
        if let Some(kick) = self.kicks.get(queue as usize) {
            let _ = kick.write(1);
        }
    }

    pub fn set_completer(&mut self, completer: Box<dyn Fn() + Send>) {
        self.completer = Some(completer);
    }

    pub fn write_status(&mut self, status: u8, interrupt: &Arc<dyn Interrupt>) {
        if status == 0 {
            self.reset_registers();
            self.pending = Pending { reset: true, activate: None };
            self.request_completion();
            return;
        }
        // Bits only accumulate until a reset: a driver clearing one (DRIVER_OK, to set it again)
        // must not reopen queue setup under a running device or activate it twice.
        let status = status | self.status;
        let newly_set = status & !self.status;
        if newly_set & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device.features() != 0 {
            // The driver accepted a feature that was never offered: refuse FEATURES_OK.
            self.status = status & !STATUS_FEATURES_OK;
            return;
        }
        self.status = status;
        if newly_set & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 {
            self.pending.activate = Some(interrupt.clone());
            self.request_completion();
        }
    }

    fn request_completion(&mut self) {
        match &self.completer {
            Some(complete) => complete(),
            None => self.complete_status(),
        }
    }

    /// Resets the device and activates it as the driver's status writes asked, in order. A
    /// reset does not wait for the device's threads: one blocked on the host ends on its own.
    pub fn complete_status(&mut self) {
        if std::mem::take(&mut self.pending.reset) {
            self.device.reset();
        }
        if let Some(interrupt) = self.pending.activate.take() {
            if let Err(e) = self.activate(interrupt, false) {
                crate::guest_warn!("virtio device type {}: {e}", self.device.device_type());
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    pub fn save(&mut self) -> TransportSnapshot {
        TransportSnapshot {
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            config_vector: self.config_vector,
            config_generation: self.config_generation,
            device: self.device.save(),
        }
    }

    /// Takes back a saved negotiation; the caller then calls `resume_saved` with the interrupt
    /// the restored registers describe.
    pub fn restore(&mut self, saved: TransportSnapshot) -> Result<(), String> {
        let type_ = self.device.device_type();
        if saved.queues.len() != self.queues.len()
            || saved.queues.iter().zip(&self.queues).any(|(s, ours)| s.max_size != ours.max_size)
        {
            return Err(format!("virtio device type {type_}: saved queues do not match the device's"));
        }
        self.device.restore(&saved.device).map_err(|e| format!("virtio device type {type_}: {e}"))?;
        self.status = saved.status;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.queues = saved.queues;
        self.config_vector = saved.config_vector;
        self.config_generation = saved.config_generation;
        Ok(())
    }

    /// Serves the queues again if the driver had the device running. Every buffer the device
    /// had taken was also returned when it paused (no device holds a request across a pause,
    /// and the balloon's held statistics buffer is simply taken again), so both ring
    /// positions resume at the used index in guest memory. Each queue is kicked once for
    /// notifications that were still waiting when the snapshot was taken.
    pub fn resume_saved(&mut self, interrupt: Arc<dyn Interrupt>) -> Result<(), String> {
        let running = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        if self.status & running != running || self.status & STATUS_NEEDS_RESET != 0 {
            return Ok(());
        }
        self.activate(interrupt, true)?;
        (0..self.kicks.len()).for_each(|q| self.notify(q as u32));
        Ok(())
    }

    /// Hands the ready queues to the device; `resuming` a snapshot, each at its used index.
    fn activate(&mut self, interrupt: Arc<dyn Interrupt>, resuming: bool) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, config) in self.queues.iter().enumerate() {
            if !config.ready {
                continue;
            }
            let mut queue = Queue::new(config.max_size).map_err(|e| e.to_string())?;
            queue.set_size(config.size);
            queue.set_desc_table_address(Some(config.desc as u32), Some((config.desc >> 32) as u32));
            queue.set_avail_ring_address(Some(config.avail as u32), Some((config.avail >> 32) as u32));
            queue.set_used_ring_address(Some(config.used as u32), Some((config.used >> 32) as u32));
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(format!("queue {i} has an invalid size or rings outside guest memory"));
            }
            if resuming {
                let used =
                    queue.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire).map_err(|e| e.to_string())?;
                queue.set_next_avail(used.0);
                queue.set_next_used(used.0);
            }
            let kick = self.kicks[i].try_clone().map_err(|e| e.to_string())?;
            active.push(ActiveQueue { queue, kick });
        }
        let activation =
            Activation { mem: self.mem.clone(), interrupt, queues: active, acked_features: self.driver_features };
        self.device.activate(activation).map_err(|e| e.to_string())
    }

    fn reset_registers(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }
}
