//! Devices the guest sees, and the buses that route its accesses to them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;

/// An eventfd as lkvm uses them: non-blocking, and close-on-exec so that no child (a tap
/// script) inherits it.
pub fn eventfd() -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// A device's state in a snapshot: saved while the VM is paused, restored before it runs
/// again. The bytes are the device's own (`crate::snapshot::encode`); restore refuses bytes it
/// cannot decode or that do not fit this device with an error, never a panic.
pub trait Persist: Send {
    fn save(&mut self) -> Vec<u8>;
    fn restore(&mut self, state: &[u8]) -> Result<(), String>;
}
