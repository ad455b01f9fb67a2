//! kvmtool-rs: the layers of the `lkvm` VMM, from the command line down to the devices.
//! The binary is `src/main.rs`; the library exists so fuzz targets and benchmarks can drive
//! the device models directly.

pub mod api;
pub mod arch;
pub mod boot;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
pub mod disk;
pub mod exec;
pub mod host;
pub mod http;
pub mod jail;
pub mod logging;
pub mod mmds;
pub mod net;
pub mod rootfs;
pub mod share;
pub mod snapshot;
pub mod term;
pub mod thread;
pub mod vmm;
pub mod vsock;
