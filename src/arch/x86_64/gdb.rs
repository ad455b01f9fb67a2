//! What gdb sees of an x86-64 vCPU: the register file (gdb's core and SSE registers, then the
//! segment bases and control registers a kernel debugger needs) and the debug-register encoding
//! of hardware breakpoints and watchpoints.

use gdbstub::arch::{Arch, Registers};
use gdbstub::target::ext::breakpoints::WatchKind;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// gdb's x86-64 core and SSE registers, then FS/GS bases and the system registers.
pub enum X86_64Kvm {}

impl Arch for X86_64Kvm {
    type Usize = u64;
    type Registers = VcpuRegisters;
    type RegId = ();
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// The register numbers follow the order `VcpuRegisters` serialises in.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<feature name="org.gnu.gdb.i386.core">
<reg name="rax" bitsize="64" type="int64" regnum="0"/><reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/><reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/><reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/><reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/><reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/><reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/><reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/><reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="int32"/>
<reg name="cs" bitsize="32" type="int32"/><reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/><reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/><reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/><reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/><reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/><reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/><reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/><reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/><reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/><reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/><reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>
<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>
<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>
<reg name="xmm0" bitsize="128" type="vec128"/><reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/><reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/><reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/><reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/><reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/><reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/><reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/><reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="int" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
<reg name="fs_base" bitsize="64" type="int"/><reg name="gs_base" bitsize="64" type="int"/>
</feature>
<feature name="org.lkvm.x86.system">
<reg name="k_gs_base" bitsize="64" type="int" group="system"/>
<reg name="cr0" bitsize="64" type="int" group="system"/><reg name="cr2" bitsize="64" type="int" group="system"/>
<reg name="cr3" bitsize="64" type="int" group="system"/><reg name="cr4" bitsize="64" type="int" group="system"/>
<reg name="cr8" bitsize="64" type="int" group="system"/><reg name="efer" bitsize="64" type="int" group="system"/>
</feature>
</target>"#;

/// Bytes of gdb's core and SSE registers in a `g` packet.
const CORE_BYTES: usize = 0x218;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VcpuRegisters {
    pub core: X86_64CoreRegs,
    /// fs_base, gs_base, k_gs_base, cr0, cr2, cr3, cr4, cr8, efer: the order of `TARGET_XML`.
    pub system: [u64; 9],
}

impl Registers for VcpuRegisters {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for byte in self.system.iter().flat_map(|r| r.to_le_bytes()) {
            write_byte(Some(byte));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != CORE_BYTES + 8 * self.system.len() {
            return Err(());
        }
        self.core.gdb_deserialize(&bytes[..CORE_BYTES])?;
        for (reg, chunk) in self.system.iter_mut().zip(bytes[CORE_BYTES..].chunks_exact(8)) {
            *reg = u64::from_le_bytes(chunk.try_into().unwrap());
        }
        Ok(())
    }
}

/// What KVM keeps of a vCPU that gdb shows; `k_gs_base` is an MSR.
pub struct KvmRegisters {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub k_gs_base: u64,
}

pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

impl From<&KvmRegisters> for VcpuRegisters {
    fn from(k: &KvmRegisters) -> Self {
        let (r, s, f) = (&k.regs, &k.sregs, &k.fpu);
        let mut core = X86_64CoreRegs {
            regs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15,
            ],
            eflags: r.rflags as u32,
            rip: r.rip,
            mxcsr: f.mxcsr,
            ..Default::default()
        };
        let segments = &mut core.segments;
        (segments.cs, segments.ss, segments.ds) = (s.cs.selector.into(), s.ss.selector.into(), s.ds.selector.into());
        (segments.es, segments.fs, segments.gs) = (s.es.selector.into(), s.fs.selector.into(), s.gs.selector.into());
        for (st, fpr) in core.st.iter_mut().zip(&f.fpr) {
            st.copy_from_slice(&fpr[..10]);
        }
        core.fpu.fctrl = f.fcw.into();
        core.fpu.fstat = f.fsw.into();
        core.fpu.ftag = full_tag_word(f.ftwx);
        core.fpu.fop = f.last_opcode.into();
        core.fpu.fioff = f.last_ip as u32;
        core.fpu.fooff = f.last_dp as u32;
        for (xmm, bytes) in core.xmm.iter_mut().zip(&f.xmm) {
            *xmm = u128::from_le_bytes(*bytes);
        }
        VcpuRegisters { core, system: [s.fs.base, s.gs.base, k.k_gs_base, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer] }
    }
}

impl VcpuRegisters {
    /// Writes gdb's values into KVM's. Segment selectors are left alone: loading one needs its
    /// descriptor, which gdb does not send.
    pub fn apply(&self, k: &mut KvmRegisters) {
        let (r, s, f) = (&mut k.regs, &mut k.sregs, &mut k.fpu);
        let g = &self.core.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) = (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = self.core.rip;
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(self.core.eflags);
        for (fpr, st) in f.fpr.iter_mut().zip(&self.core.st) {
            fpr[..10].copy_from_slice(st);
        }
        f.fcw = self.core.fpu.fctrl as u16;
        f.fsw = self.core.fpu.fstat as u16;
        f.mxcsr = self.core.mxcsr;
        for (bytes, xmm) in f.xmm.iter_mut().zip(&self.core.xmm) {
            *bytes = xmm.to_le_bytes();
        }
        let [fs_base, gs_base, k_gs_base, cr0, cr2, cr3, cr4, cr8, efer] = self.system;
        (s.fs.base, s.gs.base, k.k_gs_base) = (fs_base, gs_base, k_gs_base);
        (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer) = (cr0, cr2, cr3, cr4, cr8, efer);
    }
}

/// KVM keeps the FXSAVE abridged tag (one bit per register: in use); gdb shows the x87 tag
/// word (two bits: 00 valid, 11 empty).
fn full_tag_word(abridged: u8) -> u32 {
    (0..8).map(|i| if abridged & (1 << i) != 0 { 0 } else { 0b11 << (2 * i) }).sum()
}

/// The four address slots of DR0-DR3.
pub const DEBUG_SLOTS: usize = 4;

/// What one debug address register watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwPoint {
    Execute,
    Watch(WatchKind, u64),
}

/// DR7 for the points in the slots: local enable, condition and length per slot. x86 cannot
/// trap reads alone, so read watchpoints trap reads and writes (as gdb expects of x86).
pub fn dr7(slots: &[Option<(u64, HwPoint)>; DEBUG_SLOTS]) -> u64 {
    let mut dr7 = 0;
    for (slot, point) in slots.iter().enumerate() {
        let Some((_, point)) = point else { continue };
        let (condition, len) = match point {
            HwPoint::Execute => (0b00, 0b00),
            HwPoint::Watch(kind, len) => {
                let condition = if *kind == WatchKind::Write { 0b01 } else { 0b11 };
                let len = match len {
                    1 => 0b00,
                    2 => 0b01,
                    8 => 0b10,
                    _ => 0b11,
                };
                (condition, len)
            }
        };
        dr7 |= 1 << (slot * 2);
        dr7 |= (condition | len << 2) << (16 + slot * 4);
    }
    dr7
}

/// Whether x86 can watch `len` bytes at `addr`: 1, 2, 4 or 8, aligned to its length.
pub fn watchable(addr: u64, len: u64) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && addr.is_multiple_of(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_through_a_g_packet() {
        let mut regs = VcpuRegisters::default();
        regs.core.rip = 0xffff_ffff_8100_0000;
        regs.core.regs[7] = 0x1234;
        regs.system = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b.unwrap()));
        assert_eq!(bytes.len(), CORE_BYTES + 72);
        let mut back = VcpuRegisters::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, regs);
        assert!(back.gdb_deserialize(&bytes[1..]).is_err(), "a short packet is refused");
    }

    #[test]
    fn kvm_registers_map_to_gdb_names_and_back() {
        let mut kvm = KvmRegisters {
            regs: kvm_regs { rax: 1, rsp: 8, r15: 16, rip: 0x1000, rflags: 0x246, ..Default::default() },
            sregs: kvm_sregs { cr3: 0x5000, efer: 0xd01, ..Default::default() },
            fpu: kvm_fpu { ftwx: 0b1000_0001, ..Default::default() },
            k_gs_base: 0xffff_8880_0000_0000,
        };
        kvm.sregs.gs.base = 0xffff_8880_1000_0000;
        let gdb = VcpuRegisters::from(&kvm);
        assert_eq!((gdb.core.regs[0], gdb.core.regs[7], gdb.core.regs[15]), (1, 8, 16));
        assert_eq!(gdb.system[1], 0xffff_8880_1000_0000);
        assert_eq!((gdb.system[2], gdb.system[5], gdb.system[8]), (0xffff_8880_0000_0000, 0x5000, 0xd01));
        assert_eq!(gdb.core.fpu.ftag, 0b0011_1111_1111_1100, "registers 0 and 7 in use, the rest empty");
        let mut changed = gdb.clone();
        changed.core.rip = 0x2000;
        changed.system[5] = 0x6000;
        changed.apply(&mut kvm);
        assert_eq!((kvm.regs.rip, kvm.sregs.cr3, kvm.regs.rflags), (0x2000, 0x6000, 0x246));
    }

    #[test]
    fn debug_registers_encode_each_slot() {
        let mut slots = [None; DEBUG_SLOTS];
        slots[0] = Some((0xffff_ffff_8100_0000, HwPoint::Execute));
        assert_eq!(dr7(&slots), 0b01);
        slots[2] = Some((0x1000, HwPoint::Watch(WatchKind::Write, 4)));
        // L2 enabled; R/W2 = 01 (write), LEN2 = 11 (4 bytes) at bits 24-27.
        assert_eq!(dr7(&slots), 0b01 | 0b01_0000 | 0b1101 << 24);
        slots[2] = Some((0x1000, HwPoint::Watch(WatchKind::ReadWrite, 8)));
        assert_eq!(dr7(&slots) >> 24 & 0xf, 0b1011);
        assert!(watchable(0x1000, 8) && !watchable(0x1001, 2) && !watchable(0x1000, 3));
    }
}
