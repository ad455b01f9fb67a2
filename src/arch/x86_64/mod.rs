//! x86_64 machine model: memory layout, CPU state and the tables firmware would provide.

pub mod acpi;
pub mod coredump;
pub mod cpuid;
pub mod gdb;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod regs;
pub mod state;
