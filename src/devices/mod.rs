//! Devices the guest sees, and the buses that route its accesses to them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod virtio;
