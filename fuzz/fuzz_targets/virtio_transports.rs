//! Drives lkvm's virtio transports as a hostile driver would: any sequence of reads and writes
//! of any size at any offset of the virtio-mmio registers, or of the virtio-pci device's config
//! space and BAR (common config, ISR, device config, notify, MSI-X table and PBA), with rings
//! anywhere in a fuzzed guest memory. Beyond not crashing, a device is activated at most once
//! per reset.
#![no_main]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use lkvm::devices::bus::BusDevice;
use lkvm::devices::pci::msix::{MsiRouting, MsixState, Vector};
use lkvm::devices::pci::PciDevice;
use lkvm::devices::virtio::mmio::MmioTransport;
use lkvm::devices::virtio::pci::VirtioPciTransport;
use lkvm::devices::virtio::worker::Lifecycle;
use lkvm::devices::virtio::{ActivateError, Activation, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Counts activations since the last reset.
struct CountingDevice(Arc<AtomicUsize>);

impl VirtioDevice for CountingDevice {
    fn device_type(&self) -> u32 {
        4 // rng: the simplest config space
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) // VERSION_1, EVENT_IDX
    }
    fn activate(&mut self, _activation: Activation) -> Result<(), ActivateError> {
        let activations = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(activations <= 1, "activated {activations} times without a reset");
        Ok(())
    }
    fn reset(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        Vec::new()
    }
}

struct NoRouting;
impl MsiRouting for NoRouting {
    fn route(&self, _gsi: u32, _address: u64, _data: u32) {}
}

fuzz_target!(|input: &[u8]| {
    let Some((&[selector, memory_len], ops)) = input.split_first_chunk::<2>() else { return };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), common::MEM_SIZE)]) else { return };
    // The first bytes after the selector also lay out guest memory (rings and descriptors).
    let layout = &ops[..ops.len().min(usize::from(memory_len) * 64)];
    let _ = mem.write_slice(layout, GuestAddress(0));
    let device = Box::new(CountingDevice(Arc::new(AtomicUsize::new(0))));
    // Each op: kind, offset (2 bytes), size selector, value (8 bytes).
    let ops = ops.chunks_exact(12).map(|op| {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let size = [1usize, 2, 4, 8][usize::from(op[3] % 4)];
        (op[0], offset, size, <[u8; 8]>::try_from(&op[4..12]).unwrap())
    });
    if selector & 1 == 0 {
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut mmio = MmioTransport::new(device, mem, irq).unwrap();
        for (kind, offset, size, value) in ops {
            let offset = offset % 0x200;
            match kind & 1 {
                0 => mmio.write(offset, &value[..size]),
                _ => mmio.read(offset, &mut [0u8; 8][..size]),
            }
        }
    } else {
        let vectors = (0..3).map(|i| Vector { gsi: 24 + i, irqfd: lkvm::host::eventfd().unwrap() }).collect();
        let msix = MsixState::new(vectors, Arc::new(NoRouting));
        let mut pci = VirtioPciTransport::new(device, mem, 0xe000_0000, msix).unwrap();
        for (kind, offset, size, value) in ops {
            match kind % 4 {
                0 => pci.write(offset % 0x8000, &value[..size]),
                1 => pci.read(offset % 0x8000, &mut [0u8; 8][..size]),
                2 => pci.config_write(usize::from(offset as u8 / 4), usize::from(offset as u8 % 4), &value[..size]),
                _ => {
                    let _ = pci.config_read(usize::from(offset as u8 / 4));
                }
            }
        }
    }
});
