//! Fuzzed port reads and writes of 1 to 8 bytes at PCI configuration mechanism #1's ports
//! (CONFIG_ADDRESS 0xCF8, CONFIG_DATA 0xCFC-0xCFF) and around them, through lkvm's port bus to
//! the host bridge and a virtio-pci device in slot 1, as a guest's PCI probe and a hostile
//! driver would make them. Reads of no device must float high.
#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use lkvm::devices::bus::Bus;
use lkvm::devices::pci::msix::{MsiRouting, MsixState, Vector};
use lkvm::devices::pci::{PciRoot, CONFIG_PORT, CONFIG_PORT_LEN};
use lkvm::devices::virtio::pci::VirtioPciTransport;
use lkvm::devices::virtio::rng::Rng;
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct NoRouting;
impl MsiRouting for NoRouting {
    fn route(&self, _gsi: u32, _address: u64, _data: u32) {}
}

fuzz_target!(|input: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), common::MEM_SIZE)]) else { return };
    let vectors = (0..2).map(|i| Vector { gsi: 24 + i, irqfd: lkvm::host::eventfd().unwrap() }).collect();
    let msix = MsixState::new(vectors, Arc::new(NoRouting));
    let Ok(rng) = Rng::new(&Default::default()) else { return };
    let Ok(device) = VirtioPciTransport::new(Box::new(rng), mem, 0xe000_0000, msix) else { return };
    let mut root = PciRoot::default();
    root.add(Arc::new(Mutex::new(device))).unwrap();
    let mut bus = Bus::default();
    bus.insert(Arc::new(Mutex::new(root)), u64::from(CONFIG_PORT), CONFIG_PORT_LEN).unwrap();
    for op in input.chunks_exact(6) {
        let len = usize::from(op[0] & 7) + 1;
        // 0xcf0 to 0xd07: the two registers, every byte of them and the edges around.
        let port = u64::from(CONFIG_PORT) - 8 + u64::from(op[1] % 24);
        let mut data = [op[2], op[3], op[4], op[5], op[2], op[3], op[4], op[5]];
        if op[0] & 0x80 != 0 {
            bus.write(port, &data[..len]);
        } else {
            bus.read(port, &mut data[..len]);
            let inside =
                port >= u64::from(CONFIG_PORT) && port + len as u64 <= u64::from(CONFIG_PORT) + CONFIG_PORT_LEN;
            assert!(inside || data[..len].iter().all(|&b| b == 0xff), "port {port:#x}: {:?}", &data[..len]);
        }
    }
});
