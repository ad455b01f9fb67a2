//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs,
//! the IOAPIC and the ISA interrupt routing.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};
use crate::config::MAX_CPUS;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Family 6, with the FPU and APIC feature bits: what the guest expects of a modern CPU.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// Every IOAPIC pin is routed, so virtio-mmio devices can use GSIs above 15.
const IOAPIC_PINS: u8 = 24;

/// Builds the floating pointer structure followed by the configuration table, to be written at
/// guest physical address `addr`.
pub fn build(addr: u64, cpus: u8) -> Vec<u8> {
    assert!((1..=MAX_CPUS).contains(&cpus), "vCPU count checked by the caller");
    let table_addr = addr + 16;
    let ioapic_id = cpus;

    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // LINT0 takes the 8259's ExtINT, LINT1 the NMI, on every local APIC (0xff).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
    }
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    table.extend_from_slice(b"LKVM    ");
    table.extend_from_slice(b"KVMTOOL-RS  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// The byte that makes the sum of all bytes zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointer() {
        let mp = build(0x9fc00, 4);
        assert_eq!(&mp[0..4], b"_MP_");
        assert_eq!(sum(&mp[0..16]), 0);
        assert_eq!(u32::from_le_bytes(mp[4..8].try_into().unwrap()), 0x9fc10);
        let table = &mp[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_every_cpu_with_one_boot_processor_and_the_ioapic() {
        let cpus = 3;
        let mp = build(0x9fc00, cpus);
        let table = &mp[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut offset = 44;
        let (mut seen_cpus, mut boot, mut ioapic, mut irqs) = (Vec::new(), 0, None, 0);
        for _ in 0..count {
            match table[offset] {
                ENTRY_PROCESSOR => {
                    seen_cpus.push(table[offset + 1]);
                    if table[offset + 3] & CPU_BOOT_PROCESSOR != 0 {
                        boot += 1;
                    }
                    offset += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some((
                        table[offset + 1],
                        u32::from_le_bytes(table[offset + 4..offset + 8].try_into().unwrap()),
                    ));
                    offset += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    irqs += 1;
                    offset += 8;
                }
                _ => offset += 8,
            }
        }
        assert_eq!(offset, table.len());
        assert_eq!(seen_cpus, vec![0, 1, 2]);
        assert_eq!(boot, 1);
        assert_eq!(ioapic, Some((cpus, 0xfec0_0000)));
        assert_eq!(irqs, 24);
    }

    #[test]
    fn largest_table_fits_below_one_mib() {
        assert!(0x9fc00 + build(0x9fc00, MAX_CPUS).len() <= 0x10_0000);
    }
}
