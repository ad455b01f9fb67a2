//! Boot information handed to the kernel: the Linux zero page or the PVH start_info, each with
//! the E820 map, command line and initrd.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::memory::E820Entry;

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Where the initrd was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// The zero page for the 64-bit Linux boot protocol. `header` is the bzImage's own; an ELF
/// vmlinux has none and gets a minimal one.
pub fn zero_page(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> boot_params {
    let hdr = header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDR_MAGIC,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    // Boot protocol 2.14: where the RSDP is, without a scan of the BIOS area.
    params.acpi_rsdp_addr = RSDP_START;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, r#type: entry.kind as u32 };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), linux_loader::configurator::Error> {
    LinuxBootConfigurator::write_bootparams(&BootParams::new(params, GuestAddress(ZERO_PAGE_START)), mem)
}

/// Writes the PVH start_info, its memory map and the initrd as module 0.
pub fn write_pvh(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> Result<(), linux_loader::configurator::Error> {
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { PVH_MODLIST_START } else { 0 },
        rsdp_paddr: RSDP_START,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry { paddr: initrd.addr, size: initrd.size, ..Default::default() };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::memory::e820_map;
    use vm_memory::Bytes;

    #[test]
    fn elf_zero_page_has_magic_cmdline_initrd_and_e820() {
        let e820 = e820_map(128 << 20);
        let initrd = InitrdPlacement { addr: 0x7f0_0000, size: 0x1234 };
        let params = zero_page(None, 42, Some(initrd), &e820);
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.header }, HDR_MAGIC);
        assert_eq!({ params.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!(({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size }), (0x7f0_0000, 0x1234));
        assert_eq!(params.e820_entries as usize, e820.len());
        let last = params.e820_table[e820.len() - 1];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), (1 << 20, 127 << 20, 1));
    }

    #[test]
    fn bzimage_zero_page_keeps_the_image_header() {
        let header = setup_header { version: 0x20f, init_size: 0x123000, header: HDR_MAGIC, ..Default::default() };
        let params = zero_page(Some(header), 10, None, &e820_map(64 << 20));
        assert_eq!(({ params.hdr.version }, { params.hdr.init_size }), (0x20f, 0x123000));
        assert_eq!({ params.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn pvh_start_info_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = e820_map(64 << 20);
        write_pvh(&mem, Some(InitrdPlacement { addr: 0x300_0000, size: 4096 }), &e820).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.magic, info.version, info.nr_modules), (XEN_HVM_START_MAGIC, 1, 1));
        assert_eq!((info.cmdline_paddr, info.memmap_entries as usize), (CMDLINE_START, e820.len()));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 4096));
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.size, first.type_), (0, 0x9fc00, 1));
        // The tables must not overlap each other.
        assert!(PVH_MODLIST_START >= PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64);
        assert!(PVH_MEMMAP_START >= PVH_MODLIST_START + std::mem::size_of::<hvm_modlist_entry>() as u64);
    }
}
