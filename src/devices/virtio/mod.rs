//! Virtio devices and their transports. A device implements `VirtioDevice` (features, config
//! space, what to do with its queues); the transports (PCI, MMIO) are shared by all devices.

pub mod balloon;
pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod p9;
pub mod pci;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// What every lkvm device offers: virtio 1.x, indirect descriptors, event-index suppression.
pub const COMMON_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

pub use virtio_bindings::virtio_ids::{
    VIRTIO_ID_9P, VIRTIO_ID_BALLOON, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG,
};

/// How a device tells the driver that it used buffers or changed its config space.
pub trait Interrupt: Send + Sync {
    fn signal_used_queue(&self, queue: u16);
    fn signal_config_change(&self);
}

/// A queue the driver set up, with the eventfd that its notifications arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

/// What a device is activated with: guest memory, how to interrupt the driver, the queues it
/// set up and the features it accepted.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    pub queues: Vec<ActiveQueue>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("virtio device activation: {0}")]
    Io(#[from] std::io::Error),
    #[error("driver set up {0} queues, the device needs {1}")]
    QueueCount(usize, usize),
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device's config space; devices without one read as zeros.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the driver's queues with the features it accepted.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving queues; the driver may set the device up again.
    fn reset(&mut self);
    /// The device's running workers, for pause and resume.
    fn workers(&mut self) -> Vec<&mut dyn worker::Lifecycle>;
    /// Stops serving queues until `resume`, keeping their state; notifications wait.
    fn pause(&mut self) {
        for worker in self.workers() {
            worker.pause();
        }
    }
    fn resume(&mut self) -> std::io::Result<()> {
        self.workers().into_iter().try_for_each(|worker| worker.resume())
    }
    /// The device's own state beyond its queues, for a snapshot (taken while paused).
    fn save(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes back `save`'s state before the device is activated again.
    fn restore(&mut self, _state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        Ok(())
    }
}

/// The `N` queues a device needs, or the error that the driver set up another number.
pub fn expect_queues<const N: usize>(queues: Vec<ActiveQueue>) -> Result<[ActiveQueue; N], ActivateError> {
    queues.try_into().map_err(|q: Vec<_>| ActivateError::QueueCount(q.len(), N))
}

/// Serves every available request on `queue`: `serve` handles one chain and returns how many
/// bytes it wrote into the driver's buffers. Notifications are re-enabled before giving up
/// (with EVENT_IDX this publishes avail_event, without which the driver stops notifying), and
/// the driver is interrupted at the end if it asked to be.
pub fn serve_queue<F>(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, index: u16, mut serve: F)
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    serve_queue_limited(queue, mem, interrupt, index, |chain| Some(serve(chain)))
}

/// Like `serve_queue`, but `serve` may decline a request (`None`: its rate limiter is out of
/// tokens): it stays in the ring and serving stops until the device is woken again.
pub fn serve_queue_limited<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn Interrupt,
    index: u16,
    mut serve: F,
) where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
{
    let mut used = false;
    let mut stalled = false;
    'drain: loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                queue.go_to_previous_position();
                break 'drain;
            };
            if queue.add_used(mem, head, len).is_err() {
                break 'drain;
            }
            used = true;
            progressed = true;
        }
        if !more_available(queue, mem, progressed, &mut stalled) {
            break;
        }
    }
    if used && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue(index);
    }
}

/// Re-enables notifications and tells whether buffers arrived meanwhile. A ring that claims
/// buffers but yields none twice in a row (an avail index the driver pushed out of range) is
/// broken: give up until the next notification rather than spin.
pub fn more_available(queue: &mut Queue, mem: &GuestMemoryMmap, progressed: bool, stalled: &mut bool) -> bool {
    match queue.enable_notification(mem) {
        Ok(true) if progressed || !*stalled => {
            *stalled = !progressed;
            true
        }
        Ok(true) => {
            tracing::debug!("virtqueue offers buffers it cannot yield; waiting for a reset or notification");
            false
        }
        _ => false,
    }
}

/// Copies `src` (a device's config space) at `offset` into `data`; out-of-range bytes read 0.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(tail) = usize::try_from(offset).ok().and_then(|o| src.get(o..)) {
        let n = tail.len().min(data.len());
        data[..n].copy_from_slice(&tail[..n]);
    }
}
