//! Boot loader: puts the kernel, initrd, command line and boot tables into guest memory and
//! says where the boot vCPU starts.

pub mod cmdline;
pub mod compose;
pub mod kernel;
pub mod params;

use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::arch::x86_64::layout::{CMDLINE_START, EBDA_START};
use crate::arch::x86_64::memory::{e820_map, low_ram_end};
use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{acpi, mptable};
use params::InitrdPlacement;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {0}: {1}")]
    Kernel(PathBuf, String),
    #[error("initrd {0}: {1}")]
    Initrd(PathBuf, String),
    #[error("kernel command line is {0} bytes, the limit is {max}", max = cmdline::MAX_LEN - 1)]
    CmdlineTooLong(usize),
    #[error("writing boot tables: {0}")]
    Tables(String),
}

/// An initrd from a file, or one lkvm made (its rootfs guests' initramfs).
pub enum Initrd<'a> {
    File(&'a Path),
    Built(&'a [u8]),
}

pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<Initrd<'a>>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub cpus: u8,
}

/// Loads everything the guest needs to boot and returns the boot vCPU's entry state.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootEntry, Error> {
    let kernel = kernel::load(mem, spec.kernel)?;
    let tables_err = |e: String| Error::Tables(e);
    regs::write_boot_tables(mem).map_err(|e| tables_err(e.to_string()))?;
    mem.write_slice(&mptable::build(EBDA_START, spec.cpus), GuestAddress(EBDA_START))
        .map_err(|e| tables_err(e.to_string()))?;
    if let BootEntry::RealMode { .. } = kernel.entry {
        return Ok(kernel.entry);
    }
    acpi::write_tables(mem, spec.cpus).map_err(|e| tables_err(e.to_string()))?;

    let initrd_limit = kernel.setup_header.map_or(u64::from(u32::MAX), |h| u64::from(h.initrd_addr_max));
    let limit = low_ram_end(spec.mem_size).min(initrd_limit + 1);
    let initrd = match &spec.initrd {
        Some(Initrd::File(path)) => Some(load_initrd(mem, path, kernel.end, limit)?),
        Some(Initrd::Built(bytes)) => Some(place_built_initrd(mem, bytes, kernel.end, limit)?),
        None => None,
    };

    if spec.cmdline.len() >= cmdline::MAX_LEN {
        return Err(Error::CmdlineTooLong(spec.cmdline.len()));
    }
    let mut cmdline_bytes = spec.cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START)).map_err(|e| tables_err(e.to_string()))?;

    let e820 = e820_map(spec.mem_size);
    match kernel.entry {
        BootEntry::Pvh { .. } => params::write_pvh(mem, initrd, &e820),
        _ => params::write_zero_page(mem, &params::zero_page(kernel.setup_header, spec.cmdline.len(), initrd, &e820)),
    }
    .map_err(|e| tables_err(e.to_string()))?;
    Ok(kernel.entry)
}

/// Puts the initrd page-aligned as high as possible below `limit`, above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, limit: u64) -> Result<InitrdPlacement, Error> {
    let bad = |reason: String| Error::Initrd(path.to_owned(), reason);
    let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if meta.is_dir() {
        return Err(bad("is a directory".into()));
    }
    let size = meta.len();
    let addr = initrd_address(size, kernel_end, limit).ok_or_else(|| bad(too_large(size, kernel_end, limit)))?;
    let slice = mem.get_slice(GuestAddress(addr), size as usize).map_err(|e| bad(e.to_string()))?;
    file.read_exact_volatile(&mut slice.clone()).map_err(|e| bad(e.to_string()))?;
    Ok(InitrdPlacement { addr, size })
}

fn place_built_initrd(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    kernel_end: u64,
    limit: u64,
) -> Result<InitrdPlacement, Error> {
    let bad = |reason: String| Error::Initrd("lkvm's initramfs".into(), reason);
    let size = bytes.len() as u64;
    let addr = initrd_address(size, kernel_end, limit).ok_or_else(|| bad(too_large(size, kernel_end, limit)))?;
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| bad(e.to_string()))?;
    Ok(InitrdPlacement { addr, size })
}

fn too_large(size: u64, kernel_end: u64, limit: u64) -> String {
    format!(
        "{} KiB does not fit in guest memory ({} KiB free above the kernel); give the guest more with -m",
        size.div_ceil(1024),
        limit.saturating_sub(kernel_end) / 1024
    )
}

fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    let addr = limit.checked_sub(size)? & !(PAGE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE)).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_never_over_the_kernel() {
        assert_eq!(initrd_address(0x1800, 0x200_0000, 0x800_0000), Some(0x7ff_e000));
        assert_eq!(initrd_address(0x600_0000, 0x200_0000, 0x800_0000), Some(0x200_0000));
        assert_eq!(initrd_address(0x600_0001, 0x200_0000, 0x800_0000), None);
        assert_eq!(initrd_address(0x900_0000, 0x200_0000, 0x800_0000), None);
    }
}
