//! Guest physical memory layout for x86_64 boots.

/// GDT used by the boot protocols (selectors 0x10 code64, 0x18 data, 0x20 TSS, 0x28 code32).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables covering the first 4 GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Flat real-mode binaries are loaded at 0x1000:0000, as in kvmtool.
pub const FLAT_LOAD_SEGMENT: u16 = 0x1000;
pub const FLAT_LOAD_ADDR: u64 = 0x10000;
pub const FLAT_STACK_POINTER: u64 = 0x8000;
/// Kernel command line; the 64-bit boot protocol allows it anywhere below 4 GiB.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the EBDA; the MP table lives here and everything up to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI in the BIOS area, where the guest looks for the RSDP: the pointer, the tables after it,
/// and the VM generation ID (16 bytes) in a page of its own.
pub const RSDP_START: u64 = 0xe_0000;
pub const ACPI_TABLES_START: u64 = 0xe_0040;
pub const VMGENID_ADDR: u64 = 0xe_f000;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO/PCI hole: 768 MiB below 4 GiB, as in kvmtool.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
