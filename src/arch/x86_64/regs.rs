//! The CPU state a vCPU starts in: boot GDT and page tables in guest memory, registers,
//! MSRs, FPU and local APIC.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing boot tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("setting up vCPU state ({0}): {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
}

/// Where and how the boot vCPU starts executing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode without paging, EBX = hvm_start_info.
    Pvh { entry: u64 },
    /// Real mode at `segment:0000`, as kvmtool runs flat binaries.
    RealMode { segment: u16 },
}

const GDT_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
const GDT_TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);
const GDT_CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Linux's boot protocol requires __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const BOOT_GDT: [u64; 6] = [0, 0, GDT_CODE64, GDT_DATA, GDT_TSS, GDT_CODE32];
const SEL_CODE64: usize = 2;
const SEL_DATA: usize = 3;
const SEL_TSS: usize = 4;
const SEL_CODE32: usize = 5;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 3;
const PDE_HUGE: u64 = 1 << 7;
const PAGE_TABLE_GIB: u64 = 4;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes GDT entry `index` into the form KVM takes for a loaded segment register.
fn segment(index: usize) -> kvm_segment {
    let entry = BOOT_GDT[index];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let flag = |bit: u64| ((entry >> bit) & 1) as u8;
    let granular = flag(55) == 1;
    kvm_segment {
        base,
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: flag(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: flag(54),
        s: flag(44),
        l: flag(53),
        g: flag(55),
        avl: flag(52),
        unusable: if flag(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn real_mode_segment(segment: u16) -> kvm_segment {
    kvm_segment {
        base: u64::from(segment) << 4,
        limit: 0xffff,
        selector: segment,
        type_: 3,
        present: 1,
        s: 1,
        ..Default::default()
    }
}

/// Writes the boot GDT, an empty IDT and identity page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..PAGE_TABLE_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let phys = ((gib * 512 + i) << 21) | PTE_PRESENT_RW | PDE_HUGE;
            mem.write_obj(phys, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for the boot vCPU in the given entry mode.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    match entry {
        BootEntry::RealMode { segment } => {
            let seg = real_mode_segment(segment);
            sregs.cs = kvm_segment { type_: 0xb, ..seg };
            sregs.ds = seg;
            sregs.es = seg;
            sregs.fs = seg;
            sregs.gs = seg;
            sregs.ss = seg;
            sregs.cr0 &= !(CR0_PE | CR0_PG);
        }
        BootEntry::Linux64 { .. } | BootEntry::Pvh { .. } => {
            sregs.gdt.base = BOOT_GDT_START;
            sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
            sregs.idt.base = BOOT_IDT_START;
            sregs.idt.limit = 7;
            let data = segment(SEL_DATA);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment(SEL_TSS);
            if let BootEntry::Linux64 { .. } = entry {
                sregs.cs = segment(SEL_CODE64);
                sregs.cr3 = PML4_START;
                sregs.cr4 |= CR4_PAE;
                sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
                sregs.efer |= EFER_LME | EFER_LMA;
            } else {
                sregs.cs = segment(SEL_CODE32);
                sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
        }
    }
    sregs
}

/// General registers for the boot vCPU.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 2, ..Default::default() };
    match entry {
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        BootEntry::RealMode { .. } => {
            regs.rip = 0;
            regs.rsp = FLAT_STACK_POINTER;
            regs.rbp = FLAT_STACK_POINTER;
        }
    }
    regs
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled with write-back as the default memory type.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

fn set_lvt_delivery_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let reg = &mut lapic.regs[offset..offset + 4];
    let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
        *dst = src as _;
    }
}

/// Puts every vCPU in its architectural boot state; only the boot vCPU gets `entry`.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: Option<BootEntry>) -> Result<(), Error> {
    let msrs = Msrs::from_entries(&boot_msrs()).expect("boot MSR list fits a kvm_msrs");
    vcpu.set_msrs(&msrs).map_err(|e| Error::Kvm("MSRs", e))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("FPU", e))?;
    let mut lapic = vcpu.get_lapic().map_err(|e| Error::Kvm("get LAPIC", e))?;
    set_lvt_delivery_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| Error::Kvm("set LAPIC", e))?;
    if let Some(entry) = entry {
        let sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("get sregs", e))?;
        vcpu.set_sregs(&boot_sregs(sregs, entry)).map_err(|e| Error::Kvm("set sregs", e))?;
        vcpu.set_regs(&boot_regs(entry)).map_err(|e| Error::Kvm("set regs", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(SEL_CODE64);
        assert_eq!((code.selector, code.base, code.limit), (0x10, 0, 0xffff_ffff));
        assert_eq!((code.l, code.db, code.present, code.s, code.type_), (1, 0, 1, 1, 0xb));
        let code32 = segment(SEL_CODE32);
        assert_eq!((code32.l, code32.db, code32.selector), (0, 1, 0x28));
        let data = segment(SEL_DATA);
        assert_eq!((data.selector, data.type_, data.limit), (0x18, 3, 0xffff_ffff));
        assert_eq!(GDT_CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_DATA, 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn long_mode_entry_has_paging_and_zero_page() {
        let sregs = boot_sregs(kvm_sregs::default(), BootEntry::Linux64 { entry: 0x100_0000 });
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        let regs = boot_regs(BootEntry::Linux64 { entry: 0x100_0000 });
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, ZERO_PAGE_START));
    }

    #[test]
    fn pvh_entry_is_protected_mode_without_paging() {
        let sregs = boot_sregs(kvm_sregs { cr0: CR0_PG, ..Default::default() }, BootEntry::Pvh { entry: 0x1234 });
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((sregs.efer, sregs.cs.selector, sregs.cs.db), (0, 0x28, 1));
        assert_eq!(boot_regs(BootEntry::Pvh { entry: 0x1234 }).rbx, PVH_INFO_START);
    }

    #[test]
    fn real_mode_entry_uses_the_load_segment() {
        let sregs = boot_sregs(kvm_sregs::default(), BootEntry::RealMode { segment: 0x1000 });
        assert_eq!((sregs.cs.selector, sregs.cs.base), (0x1000, 0x10000));
        assert_eq!(sregs.ss.base, 0x10000);
        assert_eq!(boot_regs(BootEntry::RealMode { segment: 0x1000 }).rip, 0);
    }

    #[test]
    fn lvt_delivery_mode_keeps_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT_LINT0 + 2] = 1; // mask bit (16)
        set_lvt_delivery_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1] as u8, 7);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2], 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde = |i: u64| mem.read_obj::<u64>(GuestAddress(PDE_START + i * 8)).unwrap();
        assert_eq!(pde(0), PTE_PRESENT_RW | PDE_HUGE);
        assert_eq!(pde(2047) & !0xfff, 2047 << 21);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDPTE_START + 24)).unwrap(), (PDE_START + 0x3000) | 3);
    }
}
