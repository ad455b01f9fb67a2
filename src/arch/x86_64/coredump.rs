//! An ELF core file of a paused guest, as QEMU's `dump-guest-memory` writes one: guest RAM
//! once, PT_LOAD segments for it by physical address (what `crash` reads) and for the kernel's
//! virtual mappings found in vCPU 0's page tables (what `gdb vmlinux core` reads), sharing the
//! same file bytes, and an NT_PRSTATUS note per vCPU (gdb shows each as a thread).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_RWX: u32 = 7;
const NT_PRSTATUS: u32 = 1;
/// struct elf_prstatus on x86_64, and where its general registers start.
const PRSTATUS_SIZE: usize = 336;
const PRSTATUS_REGS: usize = 112;
/// Program headers stay below PN_XNUM (0xffff), which would need a section header.
const MAX_SEGMENTS: usize = 60_000;
/// Page-table entries one dump may visit: a guest's tables cannot keep lkvm walking.
const MAX_ENTRIES_WALKED: usize = 1 << 22;
/// The kernel half of a 4-level address space starts at PML4 entry 256.
const KERNEL_PML4_START: u64 = 256;
const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

/// One vCPU as the core file shows it.
pub struct CpuRegisters {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    vaddr: u64,
    paddr: u64,
    offset: u64,
    len: u64,
}

/// Writes the core of `mem` and `cpus` (vCPU 0's page tables give the virtual mappings) to
/// `file`; returns the bytes written (RAM that is all zeros is left as holes).
pub fn write(file: &File, mem: &GuestMemoryMmap, cpus: &[CpuRegisters]) -> io::Result<u64> {
    let notes = notes(cpus);
    let ram: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
    let mut virtual_segments = match cpus.first() {
        Some(cpu) => kernel_mappings(mem, &cpu.sregs, MAX_SEGMENTS.saturating_sub(ram.len())),
        None => Vec::new(),
    };
    // RAM regions in guest-physical order, each at its own place in the file.
    let mut physical = Vec::new();
    let phnum = 1 + ram.len() + virtual_segments.len();
    let notes_offset = EHDR_SIZE + PHDR_SIZE * phnum as u64;
    let mut offset = (notes_offset + notes.len() as u64).div_ceil(PAGE as u64) * PAGE as u64;
    for &(start, len) in &ram {
        physical.push(Segment { vaddr: start, paddr: start, offset, len });
        offset += len;
    }
    let file_offset_of = |paddr: u64| {
        physical.iter().find(|s| paddr >= s.paddr && paddr - s.paddr < s.len).map(|s| s.offset + (paddr - s.paddr))
    };
    for segment in &mut virtual_segments {
        segment.offset = file_offset_of(segment.paddr).expect("kernel_mappings keeps to RAM");
    }

    let mut headers = elf_header(phnum as u16).to_vec();
    headers.extend_from_slice(&program_header(PT_NOTE, 0, 0, notes_offset, notes.len() as u64, 0));
    for s in physical.iter().chain(&virtual_segments) {
        headers.extend_from_slice(&program_header(PT_LOAD, s.vaddr, s.paddr, s.offset, s.len, PF_RWX));
    }
    headers.extend_from_slice(&notes);
    file.set_len(0)?;
    file.write_all_at(&headers, 0)?;
    file.set_len(offset)?; // RAM that stays zero is a hole
    let mut written = headers.len() as u64;
    let mut chunk = vec![0u8; CHUNK];
    for s in &physical {
        let mut done = 0;
        while done < s.len {
            let n = (s.len - done).min(CHUNK as u64) as usize;
            mem.read_slice(&mut chunk[..n], GuestAddress(s.paddr + done)).map_err(io::Error::other)?;
            // Runs of pages that are not all zeros.
            let mut page = 0;
            while page < n {
                let is_data = |p: usize| chunk[p..(p + PAGE).min(n)].iter().any(|&b| b != 0);
                if !is_data(page) {
                    page += PAGE;
                    continue;
                }
                let start = page;
                while page < n && is_data(page) {
                    page += PAGE;
                }
                let end = page.min(n);
                file.write_all_at(&chunk[start..end], s.offset + done + start as u64)?;
                written += (end - start) as u64;
            }
            done += n as u64;
        }
    }
    Ok(written)
}

fn elf_header(phnum: u16) -> [u8; EHDR_SIZE as usize] {
    let mut h = [0u8; EHDR_SIZE as usize];
    h[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]); // 64-bit, little-endian, v1
    h[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
    h[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[32..40].copy_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff
    h[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    h[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    h[56..58].copy_from_slice(&phnum.to_le_bytes());
    h[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize, no sections
    h
}

fn program_header(kind: u32, vaddr: u64, paddr: u64, offset: u64, len: u64, flags: u32) -> [u8; PHDR_SIZE as usize] {
    let mut p = [0u8; PHDR_SIZE as usize];
    p[0..4].copy_from_slice(&kind.to_le_bytes());
    p[4..8].copy_from_slice(&flags.to_le_bytes());
    p[8..16].copy_from_slice(&offset.to_le_bytes());
    p[16..24].copy_from_slice(&vaddr.to_le_bytes());
    p[24..32].copy_from_slice(&paddr.to_le_bytes());
    p[32..40].copy_from_slice(&len.to_le_bytes()); // p_filesz
    p[40..48].copy_from_slice(&len.to_le_bytes()); // p_memsz
    p[48..56].copy_from_slice(&(if kind == PT_LOAD { 4096u64 } else { 4 }).to_le_bytes());
    p
}

/// An NT_PRSTATUS note per vCPU: pr_pid is the vCPU's number + 1, pr_reg its registers in
/// struct user_regs_struct's order.
fn notes(cpus: &[CpuRegisters]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, cpu) in cpus.iter().enumerate() {
        let (r, s) = (&cpu.regs, &cpu.sregs);
        let mut status = [0u8; PRSTATUS_SIZE];
        status[32..36].copy_from_slice(&(index as u32 + 1).to_le_bytes());
        let registers = [
            r.r15,
            r.r14,
            r.r13,
            r.r12,
            r.rbp,
            r.rbx,
            r.r11,
            r.r10,
            r.r9,
            r.r8,
            r.rax,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rax, // orig_rax
            r.rip,
            u64::from(s.cs.selector),
            r.rflags,
            r.rsp,
            u64::from(s.ss.selector),
            s.fs.base,
            s.gs.base,
            u64::from(s.ds.selector),
            u64::from(s.es.selector),
            u64::from(s.fs.selector),
            u64::from(s.gs.selector),
        ];
        for (i, value) in registers.iter().enumerate() {
            let at = PRSTATUS_REGS + 8 * i;
            status[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&5u32.to_le_bytes());
        out.extend_from_slice(&(PRSTATUS_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&NT_PRSTATUS.to_le_bytes());
        out.extend_from_slice(b"CORE\0\0\0\0"); // name, padded to 4
        out.extend_from_slice(&status);
    }
    out
}

/// The kernel half's mappings in the page tables `sregs` points at (4-level long mode), as
/// runs where virtual and physical addresses both advance, each within one RAM region; at most
/// `limit` of them. Entries outside guest RAM are skipped, and the walk is bounded.
fn kernel_mappings(mem: &GuestMemoryMmap, sregs: &kvm_sregs, limit: usize) -> Vec<Segment> {
    let long_mode = sregs.cr0 & CR0_PG != 0 && sregs.efer & EFER_LMA != 0 && sregs.cr4 & CR4_LA57 == 0;
    let mut walk = Walk { mem, runs: Vec::new(), limit, visited: 0 };
    if long_mode {
        walk.table(sregs.cr3 & ADDRESS_MASK, 4, 0);
    }
    walk.runs
}

struct Walk<'a> {
    mem: &'a GuestMemoryMmap,
    runs: Vec<Segment>,
    limit: usize,
    visited: usize,
}

impl Walk<'_> {
    /// Walks the table at `table` of `level` (4: PML4 ... 1: page table) mapping from `base`.
    fn table(&mut self, table: u64, level: u32, base: u64) {
        let first = if level == 4 { KERNEL_PML4_START } else { 0 };
        for index in first..512 {
            if self.visited >= MAX_ENTRIES_WALKED || self.runs.len() >= self.limit {
                return;
            }
            self.visited += 1;
            let Ok(entry) = self.mem.read_obj::<u64>(GuestAddress(table + index * 8)) else { return };
            if entry & PRESENT == 0 {
                continue;
            }
            let shift = 12 + 9 * (level - 1);
            let mut vaddr = base | (index << shift);
            if level == 4 && vaddr & (1 << 47) != 0 {
                vaddr |= 0xffff_0000_0000_0000; // canonical
            }
            let huge = level == 1 || (level <= 3 && entry & HUGE != 0);
            if huge {
                let size = 1u64 << shift;
                self.map(vaddr, entry & ADDRESS_MASK & !(size - 1), size);
            } else if level > 1 {
                self.table(entry & ADDRESS_MASK, level - 1, vaddr);
            }
        }
    }

    /// Adds `len` bytes at `vaddr` -> `paddr`, extending the last run when both continue it,
    /// and keeping only what lies in guest RAM.
    fn map(&mut self, vaddr: u64, paddr: u64, len: u64) {
        let Some(region) = self.mem.find_region(GuestAddress(paddr)) else { return };
        let region_end = region.start_addr().raw_value() + region.len();
        let len = len.min(region_end - paddr);
        if let Some(last) = self.runs.last_mut() {
            let same_region =
                self.mem.find_region(GuestAddress(last.paddr)).map(|r| r.start_addr()) == Some(region.start_addr());
            if same_region && last.vaddr.wrapping_add(last.len) == vaddr && last.paddr + last.len == paddr {
                last.len += len;
                return;
            }
        }
        self.runs.push(Segment { vaddr, paddr, offset: 0, len });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

    /// 4 MiB of RAM whose page tables map the kernel's text range onto it with 2 MiB pages, as
    /// Linux does, and a string where the kernel keeps its banner.
    fn guest() -> (GuestMemoryMmap, CpuRegisters) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (pml4, pdpt, pd) = (0x1000u64, 0x2000u64, 0x3000u64);
        mem.write_obj(pdpt | PRESENT | 2, GuestAddress(pml4 + 511 * 8)).unwrap();
        mem.write_obj(pd | PRESENT | 2, GuestAddress(pdpt + 510 * 8)).unwrap();
        for i in 0..2u64 {
            mem.write_obj((i << 21) | PRESENT | 2 | HUGE, GuestAddress(pd + i * 8)).unwrap();
        }
        // A hostile entry pointing outside RAM is skipped.
        mem.write_obj((1u64 << 40) | PRESENT | HUGE, GuestAddress(pd + 2 * 8)).unwrap();
        mem.write_slice(b"Linux version lkvm-core-test\0", GuestAddress(0x20_1000)).unwrap();
        let mut cpu = CpuRegisters { regs: kvm_regs::default(), sregs: kvm_sregs::default() };
        cpu.regs.rip = KERNEL_MAP + 0x20_1234;
        cpu.regs.rsp = KERNEL_MAP + 0x10_0000;
        cpu.sregs.cr0 = CR0_PG | 1;
        cpu.sregs.efer = EFER_LMA;
        cpu.sregs.cr3 = pml4;
        cpu.sregs.cs.selector = 0x10;
        (mem, cpu)
    }

    #[test]
    fn page_tables_become_segments_over_guest_ram() {
        let (mem, cpu) = guest();
        let runs = kernel_mappings(&mem, &cpu.sregs, 100);
        assert_eq!(runs, [Segment { vaddr: KERNEL_MAP, paddr: 0, offset: 0, len: 4 << 20 }], "one coalesced run");
        assert_eq!(kernel_mappings(&mem, &cpu.sregs, 0), [], "the segment limit holds");
        // Tables that point at themselves everywhere (2^36 mappings) end in bounded time.
        for i in 0..512u64 {
            mem.write_obj(0x1000u64 | PRESENT, GuestAddress(0x1000 + i * 8)).unwrap();
        }
        let runs = kernel_mappings(&mem, &cpu.sregs, MAX_SEGMENTS);
        assert!(!runs.is_empty() && runs.len() <= MAX_SEGMENTS);
    }

    #[test]
    fn gdb_reads_registers_and_kernel_memory_from_the_core() {
        let (mem, cpu) = guest();
        let path = std::env::temp_dir().join(format!("lkvm-core-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let written = write(&file, &mem, &[cpu]).unwrap();
        assert!(written < 64 * 1024, "zero RAM is left as holes: {written} bytes written");
        let out = std::process::Command::new("gdb")
            .args(["-batch", "-nx", "-c"])
            .arg(&path)
            .args([
                "-ex",
                &format!("x/s {:#x}", KERNEL_MAP + 0x20_1000),
                "-ex",
                "info registers rip",
                "-ex",
                "x/s 0x201000",
            ])
            .output()
            .expect("gdb is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.matches("Linux version lkvm-core-test").count() == 2, "by virtual and physical address: {text}");
        assert!(text.contains(&format!("{:#x}", KERNEL_MAP + 0x20_1234)), "rip: {text}");
        std::fs::remove_file(path).unwrap();
    }
}
