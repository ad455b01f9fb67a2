//! PCI: a host bridge and bus 0, reached through configuration mechanism #1 (ports
//! 0xCF8/0xCFC); device functions own their config space and BARs.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::devices::bus::BusDevice;
use config::{PciConfig, PciIds};

pub const CONFIG_PORT: u16 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;
const ENABLE: u32 = 1 << 31;
const MAX_DEVICES: usize = 32;

pub trait PciDevice: Send {
    /// Reads config-space register `reg` (a 32-bit index).
    fn config_read(&self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` within register `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
}

struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config_read(&self, reg: usize) -> u32 {
        self.0.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.0.write(reg, offset, data);
    }
}

/// Bus 0 and the CONFIG_ADDRESS/CONFIG_DATA ports that reach it.
pub struct PciRoot {
    address: u32,
    devices: Vec<Arc<Mutex<dyn PciDevice>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        let bridge = HostBridge(PciConfig::new(PciIds {
            vendor: 0x1b36, // Red Hat, as QEMU's generic host bridges
            device: 0x0008,
            class: 0x06_00_00,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }));
        PciRoot { address: 0, devices: vec![Arc::new(Mutex::new(bridge))] }
    }
}

impl PciRoot {
    /// Plugs a device into the next slot; returns the slot, or None when the bus is full.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Option<usize> {
        (self.devices.len() < MAX_DEVICES).then(|| {
            self.devices.push(device);
            self.devices.len() - 1
        })
    }

    /// The addressed device and register, if CONFIG_ADDRESS is enabled and names a device
    /// on bus 0, function 0.
    fn target(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, usize)> {
        let (bus, slot, function) = ((self.address >> 16) & 0xff, (self.address >> 11) & 0x1f, (self.address >> 8) & 7);
        if self.address & ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let reg = ((self.address >> 2) & 0x3f) as usize;
        self.devices.get(slot as usize).map(|d| (d, reg))
    }
}

/// The bus remembers only CONFIG_ADDRESS; each device saves its own config space.
/// The CONFIG_ADDRESS register: which device and register CONFIG_DATA reaches.
#[derive(serde::Serialize, serde::Deserialize)]
struct PciRootState {
    address: u32,
}

impl crate::devices::state::Versioned for PciRootState {
    const KIND: &'static str = "PCI host bridge";
    const VERSION: u16 = 1;
}

impl crate::devices::Persist for PciRoot {
    fn save(&mut self) -> Vec<u8> {
        crate::devices::state::encode(&PciRootState { address: self.address })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        self.address = crate::devices::state::decode::<PciRootState>(state)?.address;
        Ok(())
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 if data.len() == 4 => self.address,
            4..=7 => match self.target() {
                Some((device, reg)) => device.lock().unwrap().config_read(reg) >> ((offset - 4) * 8),
                None => 0xffff_ffff,
            },
            _ => 0xffff_ffff,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => self.address = u32::from_le_bytes(data.try_into().unwrap()),
            4..=7 => {
                if let Some((device, reg)) = self.target() {
                    device.lock().unwrap().config_write(reg, (offset - 4) as usize, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &mut PciRoot, slot: u32, reg: u32) {
        root.write(0, &(ENABLE | (slot << 11) | (reg << 2)).to_le_bytes());
    }

    fn read32(root: &mut PciRoot) -> u32 {
        let mut data = [0u8; 4];
        root.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn finds_the_host_bridge_and_nothing_else() {
        let mut root = PciRoot::default();
        select(&mut root, 0, 0);
        assert_eq!(read32(&mut root), 0x0008_1b36);
        select(&mut root, 0, 2);
        assert_eq!(read32(&mut root) >> 8, 0x06_00_00);
        select(&mut root, 3, 0);
        assert_eq!(read32(&mut root), 0xffff_ffff, "empty slot");
        root.write(0, &((1 << 16) | ENABLE).to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff, "no bus 1");
        let mut word = [0u8; 2];
        select(&mut root, 0, 0);
        root.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x0008, "device ID through the upper data port");
    }
}
