//! Devices the guest sees, and the buses that route its accesses to them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;

/// A device's state in a snapshot: saved while the VM is paused, restored before it runs
/// again. The bytes are the device's own (`crate::snapshot::encode`); restore refuses bytes it
/// cannot decode or that do not fit this device with an error, never a panic.
pub trait Persist: Send {
    fn save(&mut self) -> Vec<u8>;
    fn restore(&mut self, state: &[u8]) -> Result<(), String>;
}
