//! Modern (virtio 1.x) PCI transport: capabilities pointing into BAR 0 for the common config,
//! ISR, device config and notifications, and MSI-X for interrupts.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{TransportSnapshot, TransportState, NO_VECTOR};
use super::{Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::devices::pci::config::{PciConfig, PciConfigSnapshot, PciIds, CAP_MSIX, CAP_VENDOR};
use crate::devices::pci::msix::{MsixSnapshot, SharedMsix};
use crate::devices::pci::PciDevice;
use crate::devices::Persist;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Queue N is notified at NOTIFY_OFFSET + N * NOTIFY_MULTIPLIER.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;
const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_MODERN_DEVICE_BASE: u16 = 0x1040;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// PCI class code for each virtio device type, as Linux lists them.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00,     // network controller
        2 | 9 => 0x01_80_00, // mass storage
        3 => 0x07_80_00,     // communication
        _ => 0xff_00_00,
    }
}

struct PciInterrupt {
    msix: SharedMsix,
    isr: Arc<AtomicU8>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

impl Interrupt for PciInterrupt {
    fn signal_used_queue(&self, queue: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        if let Some(&vector) = self.queue_vectors.get(usize::from(queue)) {
            if vector != NO_VECTOR {
                self.msix.lock().unwrap().signal(vector);
            }
        }
    }

    fn signal_config_change(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        if self.config_vector != NO_VECTOR {
            self.msix.lock().unwrap().signal(self.config_vector);
        }
    }
}

pub struct VirtioPciTransport {
    state: TransportState,
    config: PciConfig,
    msix: SharedMsix,
    msix_cap: usize,
    isr: Arc<AtomicU8>,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![CAP_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(extra) = extra {
        cap.extend_from_slice(&extra.to_le_bytes());
    }
    cap
}

impl VirtioPciTransport {
    /// `bar` is BAR 0's guest address; `msix` has one vector per queue plus one for config.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bar: u32,
        msix: SharedMsix,
    ) -> std::io::Result<Self> {
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_VENDOR,
            device: VIRTIO_MODERN_DEVICE_BASE + device_type as u16,
            class: class_of(device_type),
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.add_memory_bar(0, bar, BAR_SIZE as u32);
        config.add_capability(&virtio_cap(CFG_TYPE_COMMON, COMMON_OFFSET, COMMON_LEN, None));
        config.add_capability(&virtio_cap(CFG_TYPE_ISR, ISR_OFFSET, 1, None));
        config.add_capability(&virtio_cap(CFG_TYPE_DEVICE, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_LEN, None));
        config.add_capability(&virtio_cap(CFG_TYPE_NOTIFY, NOTIFY_OFFSET, NOTIFY_LEN, Some(NOTIFY_MULTIPLIER)));
        let mut msix_cap = vec![CAP_MSIX, 0, 0, 0];
        msix_cap.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes()); // BIR 0
        msix_cap.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix_cap);
        Ok(VirtioPciTransport {
            state: TransportState::new(device, mem)?,
            config,
            msix,
            msix_cap,
            isr: Arc::new(AtomicU8::new(0)),
        })
    }

    pub fn kicks(&self) -> &[EventFd] {
        &self.state.kicks
    }

    fn interrupt(&self) -> Arc<dyn Interrupt> {
        Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            queue_vectors: self.state.queues.iter().map(|q| q.msix_vector).collect(),
            config_vector: self.state.config_vector,
        })
    }

    /// A vector number the driver picked, or NO_VECTOR if the device has no such vector.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.lock().unwrap().vector_count() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn read_common(&self, offset: u64) -> u64 {
        let s = &self.state;
        let q = s.selected_queue();
        match offset {
            0x00 => u64::from(s.device_features_select),
            0x04 => u64::from(s.device_features_word()),
            0x08 => u64::from(s.driver_features_select),
            0x0c => match s.driver_features_select {
                0 => s.driver_features & 0xffff_ffff,
                1 => s.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(s.config_vector),
            0x12 => s.queues.len() as u64,
            0x14 => u64::from(s.status),
            0x15 => u64::from(s.config_generation as u8),
            0x16 => u64::from(s.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(s.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, value: u64) {
        let set = |field: &mut u64, high: bool| {
            *field = if high {
                (*field & 0xffff_ffff) | (value << 32)
            } else {
                (*field & !0xffff_ffff) | (value & 0xffff_ffff)
            }
        };
        match offset {
            0x00 => self.state.device_features_select = value as u32,
            0x08 => self.state.driver_features_select = value as u32,
            0x0c => self.state.write_driver_features_word(value as u32),
            0x10 => self.state.config_vector = self.checked_vector(value as u16),
            0x14 => {
                let interrupt = self.interrupt();
                self.state.write_status(value as u8, &interrupt);
                if value == 0 {
                    self.isr.store(0, Ordering::SeqCst);
                }
            }
            0x16 => self.state.queue_select = value as u16,
            0x1a => {
                let vector = self.checked_vector(value as u16);
                if let Some(q) = self.state.selected_queue_mut() {
                    q.msix_vector = vector;
                }
            }
            _ => {
                let Some(q) = self.state.selected_queue_mut() else { return };
                match offset {
                    0x18 => q.size = value as u16,
                    0x1c => q.ready = value == 1,
                    0x20 | 0x24 => set(&mut q.desc, offset == 0x24),
                    0x28 | 0x2c => set(&mut q.avail, offset == 0x2c),
                    0x30 | 0x34 => set(&mut q.used, offset == 0x34),
                    _ => {}
                }
            }
        }
    }
}

fn to_u64(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

impl BusDevice for VirtioPciTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            COMMON_OFFSET..0x38 => {
                let bytes = self.read_common(offset).to_le_bytes();
                let n = data.len().min(8);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            ISR_OFFSET => data[0] = self.isr.swap(0, Ordering::SeqCst),
            DEVICE_CONFIG_OFFSET..NOTIFY_OFFSET => self.state.device.read_config(offset - DEVICE_CONFIG_OFFSET, data),
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => {
                self.msix.lock().unwrap().read_table(offset - MSIX_TABLE_OFFSET, data)
            }
            MSIX_PBA_OFFSET..BAR_SIZE => self.msix.lock().unwrap().read_pba(offset - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON_OFFSET..0x38 => self.write_common(offset, to_u64(data)),
            DEVICE_CONFIG_OFFSET..NOTIFY_OFFSET => {
                self.state.device.write_config(offset - DEVICE_CONFIG_OFFSET, data);
                self.state.config_generation = self.state.config_generation.wrapping_add(1);
            }
            NOTIFY_OFFSET..MSIX_TABLE_OFFSET => {
                self.state.notify(((offset - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as u32)
            }
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => {
                self.msix.lock().unwrap().write_table(offset - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciTransport {
    fn config_read(&self, reg: usize) -> u32 {
        let value = self.config.read(reg);
        if reg == self.msix_cap / 4 {
            (value & 0xffff) | (u32::from(self.msix.lock().unwrap().control()) << 16)
        } else {
            value
        }
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg == self.msix_cap / 4 {
            // Only the message-control word (bytes 2-3) is writable in the MSI-X capability.
            let mut value = self.config_read(reg).to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = value.get_mut(offset + i) {
                    *slot = *b;
                }
            }
            self.msix.lock().unwrap().set_control(u16::from_le_bytes([value[2], value[3]]));
        } else {
            self.config.write(reg, offset, data);
        }
    }
}

/// The MSI-X vectors a device needs: one per queue and one for config changes.
pub fn vector_count(device: &dyn VirtioDevice) -> usize {
    device.queue_max_sizes().len() + 1
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PciTransportSnapshot {
    transport: TransportSnapshot,
    config: PciConfigSnapshot,
    msix: MsixSnapshot,
    isr: u8,
}

impl crate::devices::state::Versioned for PciTransportSnapshot {
    const KIND: &'static str = "virtio-pci transport";
    const VERSION: u16 = 1;
}

impl Persist for VirtioPciTransport {
    fn save(&mut self) -> Vec<u8> {
        crate::devices::state::encode(&PciTransportSnapshot {
            transport: self.state.save(),
            config: self.config.save(),
            msix: self.msix.lock().unwrap().save(),
            isr: self.isr.load(Ordering::SeqCst),
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        let saved: PciTransportSnapshot = crate::devices::state::decode(state)?;
        self.config.restore(saved.config)?;
        self.msix.lock().unwrap().restore(saved.msix)?;
        self.isr.store(saved.isr, Ordering::SeqCst);
        self.state.restore(saved.transport)?;
        let interrupt = self.interrupt();
        Ok(self.state.resume_saved(interrupt)?)
    }
}

impl super::worker::Lifecycle for VirtioPciTransport {
    /// What the guest asked before it was stopped is done first: a snapshot sees it.
    fn pause(&mut self) {
        self.state.complete_status();
        self.state.device.pause();
    }
    fn resume(&mut self) -> std::io::Result<()> {
        self.state.device.resume()
    }
}

impl super::transport::VirtioTransport for VirtioPciTransport {
    fn set_completer(&mut self, completer: Box<dyn Fn() + Send>) {
        self.state.set_completer(completer);
    }
    fn complete_status(&mut self) {
        self.state.complete_status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::msix::{MsiRouting, MsixState, Vector};
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::transport::*;
    use vm_memory::GuestAddress;

    struct NoRouting;
    impl MsiRouting for NoRouting {
        fn route(&self, _: u32, _: u64, _: u32) {}
    }

    fn transport() -> VirtioPciTransport {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vectors = (0..2).map(|i| Vector { gsi: 24 + i, irqfd: crate::host::eventfd().unwrap() }).collect();
        let msix = MsixState::new(vectors, Arc::new(NoRouting));
        VirtioPciTransport::new(Box::new(Rng::new(&Default::default()).unwrap()), mem, 0xe000_0000, msix).unwrap()
    }

    #[test]
    fn capabilities_describe_bar0_layout() {
        let t = transport();
        assert_eq!(t.config_read(0), 0x1044_1af4, "virtio vendor, modern rng device");
        let mut offset = (t.config_read(13) & 0xff) as usize;
        let mut found = Vec::new();
        while offset != 0 {
            let header = t.config_read(offset / 4);
            let id = header as u8;
            if id == CAP_VENDOR {
                let bar_offset = t.config_read(offset / 4 + 2);
                found.push(((header >> 24) as u8, bar_offset));
            } else {
                found.push((id, 0));
            }
            offset = ((header >> 8) & 0xff) as usize;
        }
        assert_eq!(
            found,
            vec![
                (CFG_TYPE_COMMON, 0),
                (CFG_TYPE_ISR, 0x1000),
                (CFG_TYPE_DEVICE, 0x2000),
                (CFG_TYPE_NOTIFY, 0x3000),
                (CAP_MSIX, 0)
            ]
        );
    }

    #[test]
    fn common_config_sets_up_queues_and_vectors() {
        let mut t = transport();
        let w16 = |t: &mut VirtioPciTransport, off: u64, v: u16| t.write(off, &v.to_le_bytes());
        let r16 = |t: &mut VirtioPciTransport, off: u64| {
            let mut d = [0u8; 2];
            t.read(off, &mut d);
            u16::from_le_bytes(d)
        };
        assert_eq!(r16(&mut t, 0x12), 1, "one queue");
        w16(&mut t, 0x16, 0);
        w16(&mut t, 0x1a, 1);
        assert_eq!(r16(&mut t, 0x1a), 1);
        w16(&mut t, 0x1a, 9);
        assert_eq!(r16(&mut t, 0x1a), NO_VECTOR, "a vector the device lacks");
        w16(&mut t, 0x16, 5);
        assert_eq!(r16(&mut t, 0x18), 0, "no queue 5");
        t.write(0x14, &[STATUS_ACKNOWLEDGE]);
        let mut status = [0u8];
        t.read(0x14, &mut status);
        assert_eq!(status[0], STATUS_ACKNOWLEDGE);
        t.write(NOTIFY_OFFSET, &0u16.to_le_bytes());
        assert_eq!(t.kicks()[0].read().unwrap(), 1);
    }

    #[test]
    fn msix_enable_goes_through_config_space() {
        let mut t = transport();
        let reg = t.msix_cap / 4;
        assert_eq!(t.config_read(reg) >> 16, 1, "two vectors, disabled");
        t.config_write(reg, 2, &0x8000u16.to_le_bytes());
        assert_eq!(t.config_read(reg) >> 16, 0x8001);
        assert_eq!(t.config_read(reg) & 0xff, u32::from(CAP_MSIX));
    }
}
