//! Minimal, hardware-reduced ACPI (as Firecracker's): RSDP, XSDT, FADT, MADT (the vCPUs and the
//! IOAPIC) and a DSDT with a VM generation ID device and a Generic Event Device. The guest
//! reseeds its random number generator when the generation ID changes (Linux >= 5.18's
//! vmgenid driver): every fork child and restored clone gets a new one, and the GED's
//! interrupt tells the guest to read it. The MP table stays for kernels booted with acpi=off.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{ACPI_TABLES_START, IOAPIC_ADDR, LAPIC_ADDR, RSDP_START, VMGENID_ADDR};

/// The GED's interrupt line: an IOAPIC pin no other device uses.
pub const GED_GSI: u32 = 23;

const OEM_ID: [u8; 6] = *b"LKVMRS";
const OEM_TABLE_ID: [u8; 8] = *b"LKVMRS  ";
const OEM_REVISION: u32 = 1;
/// FADT boot architecture flags: legacy devices and an i8042 are present (the guest's keyboard
/// controller resets the VM), no VGA.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const SCI_IRQ: u16 = 9;
/// The notification Linux's vmgenid driver acts on.
const VMGENID_NOTIFY: u8 = 0x80;

/// Writes the tables for `cpus` vCPUs and a fresh generation ID.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), GuestMemoryError> {
    let mut next = ACPI_TABLES_START;
    let mut place = |bytes: &[u8]| -> Result<u64, GuestMemoryError> {
        let at = next;
        mem.write_slice(bytes, GuestAddress(at))?;
        next = (at + bytes.len() as u64).next_multiple_of(16);
        Ok(at)
    };
    let dsdt = place(&dsdt())?;
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).dsdt_64(dsdt).flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_NO_VGA).into();
    // Unused on hardware-reduced ACPI, but Linux routing interrupts by the MP table still makes
    // the SCI's line level-triggered on the 8259: the conventional 9, never the timer's 0.
    fadt.sci_int = SCI_IRQ.into();
    let fadt = place(&bytes(&fadt.finalize()))?;
    let madt = place(&bytes(&madt(cpus)))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(&bytes(&xsdt))?;
    mem.write_slice(&bytes(&Rsdp::new(OEM_ID, xsdt)), GuestAddress(RSDP_START))?;
    new_generation(mem)
}

/// Gives the VM a new generation ID (a fork child or restored clone); the caller then raises
/// `GED_GSI` so that a running guest reads it.
pub fn new_generation(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    let mut id = [0u8; 16];
    rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty()).expect("the host's random numbers");
    mem.write_slice(&id, GuestAddress(VMGENID_ADDR))
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn madt(cpus: u8) -> MADT {
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // The MP table's IOAPIC id: one past the last vCPU's APIC id.
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    madt
}

/// \_SB.VGEN: the generation ID's address (ADDR, low and high halves). \_SB.GED0: its
/// interrupt, on which _EVT tells VGEN's driver that the ID changed.
fn dsdt() -> Vec<u8> {
    let address = VMGENID_ADDR;
    let (low, high) = (address as u32, (address >> 32) as u32);
    let vgen_hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let vgen_cid = aml::Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let vgen_ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let addr_package = aml::Package::new(vec![&low, &high]);
    let vgen_addr = aml::Name::new("ADDR".into(), &addr_package);
    let vgen = aml::Device::new("VGEN".into(), vec![&vgen_hid, &vgen_cid, &vgen_ddn, &vgen_addr]);

    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let interrupt = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let resources = aml::ResourceTemplate::new(vec![&interrupt]);
    let ged_crs = aml::Name::new("_CRS".into(), &resources);
    let (gsi, notify_value) = (GED_GSI, VMGENID_NOTIFY);
    let vgen_path = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen_path, &notify_value);
    let is_vgen_line = aml::Equal::new(&aml::Arg(0), &gsi);
    let on_line = aml::If::new(&is_vgen_line, vec![&notify]);
    let ged_evt = aml::Method::new("_EVT".into(), 1, true, vec![&on_line]);
    let ged = aml::Device::new("GED0".into(), vec![&ged_hid, &ged_uid, &ged_crs, &ged_evt]);

    let bus = aml::Scope::new("\\_SB_".into(), vec![&vgen, &ged]);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&bytes(&bus));
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn the_rsdp_leads_to_checksummed_tables_and_the_generation_id_changes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_tables(&mem, 2).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_START)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let read_table = |at: u64| {
            let mut header = [0u8; 8];
            mem.read_slice(&mut header, GuestAddress(at)).unwrap();
            let mut table = vec![0u8; u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize];
            mem.read_slice(&mut table, GuestAddress(at)).unwrap();
            assert!(checksum_ok(&table), "{:?}", &table[..4]);
            table
        };
        let xsdt = read_table(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        let entries: Vec<Vec<u8>> =
            xsdt[36..].chunks(8).map(|e| read_table(u64::from_le_bytes(e.try_into().unwrap()))).collect();
        let signatures: Vec<&[u8]> = entries.iter().map(|t| &t[..4]).collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
        let fadt = &entries[0];
        assert_ne!(u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & Flags::HwReducedAcpi as u32, 0);
        let dsdt = read_table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        let text = String::from_utf8_lossy(&dsdt);
        assert!(text.contains("VMGENCTR") && text.contains("ACPI0013"), "{text}");
        // Two local APICs and the IOAPIC.
        let madt = &entries[1];
        let kinds: Vec<u8> = {
            let (mut at, mut kinds) = (44, Vec::new());
            while at < madt.len() {
                kinds.push(madt[at]);
                at += usize::from(madt[at + 1]);
            }
            kinds
        };
        assert_eq!(kinds, [0, 0, 1]);
        let mut first = [0u8; 16];
        mem.read_slice(&mut first, GuestAddress(VMGENID_ADDR)).unwrap();
        new_generation(&mem).unwrap();
        let mut second = [0u8; 16];
        mem.read_slice(&mut second, GuestAddress(VMGENID_ADDR)).unwrap();
        assert_ne!(first, second);
    }
}
