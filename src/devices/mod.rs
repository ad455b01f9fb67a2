//! Devices the guest sees, and the buses that route its accesses to them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod state;
pub mod virtio;

/// A device's state in a snapshot: saved while the VM is paused, restored before it runs
/// again. The bytes are the device's own versioned struct (`state::encode`); restore refuses
/// bytes of another version, bytes it cannot decode or that do not fit this device with an
/// error, never a panic.
pub trait Persist: Send {
    fn save(&mut self) -> Vec<u8>;
    fn restore(&mut self, state: &[u8]) -> Result<(), state::StateError>;
}
