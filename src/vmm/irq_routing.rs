//! KVM GSI routing: the in-kernel irqchip's legacy routes plus one MSI route per programmed
//! MSI-X vector. KVM_SET_GSI_ROUTING replaces the whole table, so it is rebuilt on each change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::devices::pci::msix::MsiRouting;

const IOAPIC_PINS: u32 = 24;
/// The first GSI above the IOAPIC's pins, for MSI vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

pub struct KvmMsiRouting {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

impl KvmMsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMsiRouting { vm, msi: Mutex::new(BTreeMap::new()) }
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

/// The routes KVM sets up by itself for an in-kernel irqchip: every GSI to its IOAPIC pin,
/// and GSIs 0-15 (but 2, the cascade) to the 8259 pair too.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes: Vec<_> = (0..IOAPIC_PINS).map(|gsi| irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)).collect();
    for gsi in (0..16).filter(|g| *g != 2) {
        let (chip, pin) = if gsi < 8 { (KVM_IRQCHIP_PIC_MASTER, gsi) } else { (KVM_IRQCHIP_PIC_SLAVE, gsi - 8) };
        routes.push(irqchip_entry(gsi, chip, pin));
    }
    routes
}

impl MsiRouting for KvmMsiRouting {
    fn route(&self, gsi: u32, address: u64, data: u32) {
        let mut msi = self.msi.lock().unwrap();
        msi.insert(gsi, (address, data));
        let mut routes = legacy_routes();
        for (&gsi, &(address, data)) in msi.iter() {
            let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            entry.u.msi.address_lo = address as u32;
            entry.u.msi.address_hi = (address >> 32) as u32;
            entry.u.msi.data = data;
            routes.push(entry);
        }
        let table = KvmIrqRouting::from_entries(&routes).expect("route count within KVM's limit");
        if let Err(e) = self.vm.set_gsi_routing(&table) {
            tracing::error!("KVM_SET_GSI_ROUTING: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_kvm_defaults() {
        let routes = legacy_routes();
        assert_eq!(routes.len(), 24 + 15);
        // SAFETY: irqchip is the member set for these entries.
        let pins: Vec<(u32, u32, u32)> =
            routes.iter().map(|r| unsafe { (r.gsi, r.u.irqchip.irqchip, r.u.irqchip.pin) }).collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(pins.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(!pins.iter().any(|p| p.0 == 2 && p.1 != KVM_IRQCHIP_IOAPIC));
    }
}
