//! Recognising a kernel image and loading it into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::Error;
use crate::arch::x86_64::layout::{EBDA_START, FLAT_LOAD_ADDR, FLAT_LOAD_SEGMENT, HIMEM_START};
use crate::arch::x86_64::regs::BootEntry;

/// Largest flat binary: from its load address up to the EBDA.
pub const FLAT_MAX_SIZE: u64 = EBDA_START - FLAT_LOAD_ADDR;
const ELF_MAGIC: &[u8] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
const ELF_MACHINE_X86_64: u16 = 62;
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_XLOADFLAGS_OFFSET: usize = 0x236;
const XLF_KERNEL_64: u8 = 1;
/// The 64-bit entry point of a bzImage's protected-mode kernel, from its load address.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;

/// Files that are often passed as a kernel by mistake, by their magic numbers.
const NOT_A_KERNEL: &[(&[u8], &str)] = &[
    (b"\x1f\x8b", "a gzip archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"BZh", "a bzip2 archive"),
    (b"070701", "a cpio archive (an initrd? pass it with -i)"),
    (b"070707", "a cpio archive (an initrd? pass it with -i)"),
    (b"#!", "a script"),
];

#[derive(Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
    Flat,
}

/// Tells the format from the first bytes of the image (at least 0x240 of them if it is that
/// long) and its size.
pub fn detect(head: &[u8], size: u64) -> Result<KernelFormat, String> {
    if size == 0 {
        return Err("the file is empty".into());
    }
    if head.starts_with(ELF_MAGIC) {
        let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if head.get(4) != Some(&ELF_CLASS_64) || machine != Some(ELF_MACHINE_X86_64) {
            return Err("an ELF file, but not an x86_64 ELF kernel".into());
        }
        return Ok(KernelFormat::Elf);
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        let xloadflags = head.get(BZIMAGE_XLOADFLAGS_OFFSET).copied().unwrap_or(0);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err("a bzImage without the 64-bit boot entry (needs Linux 3.8 or later, x86_64)".into());
        }
        return Ok(KernelFormat::BzImage);
    }
    if let Some((_, what)) = NOT_A_KERNEL.iter().find(|(magic, _)| head.starts_with(magic)) {
        return Err(format!("{what}, not a kernel"));
    }
    if size > FLAT_MAX_SIZE {
        return Err(format!(
            "neither an ELF vmlinux nor a bzImage, and too large ({size} bytes) for a flat binary (at most {FLAT_MAX_SIZE})"
        ));
    }
    Ok(KernelFormat::Flat)
}

/// What loading the kernel left for the rest of the boot.
pub struct LoadedKernel {
    pub entry: BootEntry,
    /// First free byte after the kernel image.
    pub end: u64,
    /// The bzImage's own setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Whether `path` holds a flat real-mode binary rather than Linux (false if it cannot be read:
/// loading it says why).
pub fn is_flat_binary(path: &Path) -> bool {
    let Ok(mut file) = File::open(path) else { return false };
    let size = file.metadata().map_or(0, |m| if m.is_file() { m.len() } else { 0 });
    read_head(&mut file).is_ok_and(|head| detect(&head, size) == Ok(KernelFormat::Flat))
}

/// The first bytes `detect` looks at; the file is left at its start.
fn read_head(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(0x240);
    file.take(0x240).read_to_end(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(head)
}

pub fn load(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let bad = |reason: String| Error::Kernel(path.to_owned(), reason);
    let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(bad("is a directory".into()));
    }
    let head = read_head(&mut file).map_err(|e| bad(e.to_string()))?;

    match detect(&head, size).map_err(bad)? {
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| bad(format!("{e} (does it fit in guest memory?)")))?;
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh { entry: addr.0 },
                _ => BootEntry::Linux64 { entry: loaded.kernel_load.0 },
            };
            Ok(LoadedKernel { entry, end: loaded.kernel_end, setup_header: None })
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| bad(format!("{e} (does it fit in guest memory?)")))?;
            let header = loaded.setup_header.expect("bzImage loader returns its header");
            // The kernel decompresses itself in place and needs init_size bytes there.
            let needed = loaded.kernel_load.0 + u64::from(header.init_size);
            let end = needed.max(loaded.kernel_end);
            if !mem.address_in_range(GuestAddress(end - 1)) {
                return Err(bad(format!("needs {} MiB of guest memory to decompress", end >> 20)));
            }
            let entry = BootEntry::Linux64 { entry: loaded.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET };
            Ok(LoadedKernel { entry, end, setup_header: Some(header) })
        }
        KernelFormat::Flat => {
            let mut image = Vec::with_capacity(size as usize);
            file.read_to_end(&mut image).map_err(|e| bad(e.to_string()))?;
            mem.write_slice(&image, GuestAddress(FLAT_LOAD_ADDR))
                .map_err(|e| bad(format!("writing to guest memory: {e}")))?;
            let entry = BootEntry::RealMode { segment: FLAT_LOAD_SEGMENT };
            Ok(LoadedKernel { entry, end: FLAT_LOAD_ADDR + size, setup_header: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = class;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    fn bzimage(xloadflags: u8) -> Vec<u8> {
        let mut h = vec![0u8; 0x240];
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h[0x236] = xloadflags;
        h
    }

    #[test]
    fn recognises_kernels() {
        assert_eq!(detect(&elf(2, 62), 1 << 20), Ok(KernelFormat::Elf));
        assert_eq!(detect(&bzimage(1), 1 << 20), Ok(KernelFormat::BzImage));
        assert_eq!(detect(&[0xf4], 1), Ok(KernelFormat::Flat));
    }

    #[test]
    fn refuses_what_is_not_a_bootable_kernel() {
        assert!(detect(&elf(1, 3), 4096).unwrap_err().contains("not an x86_64"));
        assert!(detect(&elf(2, 183), 4096).unwrap_err().contains("not an x86_64"));
        assert!(detect(&bzimage(0), 1 << 20).unwrap_err().contains("64-bit"));
        assert!(detect(b"070701000", 512).unwrap_err().contains("cpio"));
        assert!(detect(b"\x1f\x8b\x08", 512).unwrap_err().contains("gzip"));
        assert!(detect(b"", 0).unwrap_err().contains("empty"));
        assert!(detect(&[0x90; 16], FLAT_MAX_SIZE + 1).unwrap_err().contains("too large"));
    }
}
