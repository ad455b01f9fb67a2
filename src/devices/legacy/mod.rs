//! The PC platform devices a Linux guest expects on the ISA port bus.

pub mod boot_marker;
pub mod cmos;
pub mod i8042;
pub mod serial;
pub mod stub;
