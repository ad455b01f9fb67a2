//! A type-0 PCI configuration space: header, 32-bit memory BARs (with the sizing protocol),
//! and a capability list.

pub const CAP_MSIX: u8 = 0x11;
pub const CAP_VENDOR: u8 = 0x09;
const REG_COUNT: usize = 64;
const REG_COMMAND: usize = 1;
const REG_BAR0: usize = 4;
const REG_CAP_POINTER: usize = 13;
const REG_INTERRUPT: usize = 15;
const STATUS_CAPABILITIES: u32 = 0x10 << 16;
const FIRST_CAP_OFFSET: usize = 0x40;
/// Command bits a driver may change: I/O, memory, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;

#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Bar {
    addr: u32,
    size: u32,
}

pub struct PciConfig {
    regs: [u32; REG_COUNT],
    bars: [Bar; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct PciConfigSnapshot {
    regs: Vec<u32>,
    bars: Vec<Bar>,
}

pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut regs = [0u32; REG_COUNT];
        regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        regs[2] = (ids.class << 8) | u32::from(ids.revision);
        regs[11] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        PciConfig { regs, bars: [Bar::default(); 6], next_cap: FIRST_CAP_OFFSET, last_cap: None }
    }

    /// A 32-bit, non-prefetchable memory BAR at `addr`; `size` is a power of two.
    pub fn add_memory_bar(&mut self, index: usize, addr: u32, size: u32) {
        assert!(size.is_power_of_two() && addr.is_multiple_of(size), "BAR placed by the device manager");
        self.bars[index] = Bar { addr, size };
    }

    /// Appends a capability (its first byte is the ID; the next-pointer byte is filled in)
    /// and returns its offset in config space.
    pub fn add_capability(&mut self, body: &[u8]) -> usize {
        let offset = self.next_cap;
        assert!(offset + body.len() <= REG_COUNT * 4, "capabilities fit in config space");
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { *b });
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[REG_CAP_POINTER] = offset as u32;
                self.regs[REG_COMMAND] |= STATUS_CAPABILITIES;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + body.len() + 3) & !3;
        offset
    }

    #[cfg(test)]
    fn byte(&self, offset: usize) -> u8 {
        (self.regs[offset / 4] >> ((offset % 4) * 8)) as u8
    }

    pub fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// The registers and BARs as the driver left them, for a snapshot.
    pub fn save(&self) -> PciConfigSnapshot {
        PciConfigSnapshot { regs: self.regs.to_vec(), bars: self.bars.to_vec() }
    }

    pub fn restore(&mut self, saved: PciConfigSnapshot) -> Result<(), String> {
        let regs = saved.regs.try_into().map_err(|_| "PCI config space of the wrong size")?;
        let bars: [Bar; 6] = saved.bars.try_into().map_err(|_| "PCI BAR count")?;
        if bars.iter().zip(&self.bars).any(|(saved, ours)| saved.size != ours.size) {
            return Err("PCI BAR sizes differ from this device's".into());
        }
        (self.regs, self.bars) = (regs, bars);
        Ok(())
    }

    pub fn read(&self, reg: usize) -> u32 {
        match reg {
            REG_BAR0..=9 => self.bars[reg - REG_BAR0].addr,
            _ => self.regs.get(reg).copied().unwrap_or(0xffff_ffff),
        }
    }

    /// Applies a driver write of `data` at byte `offset` of register `reg`, keeping read-only
    /// bits. Capability bodies are the device's business (see `PciDevice::config_write`).
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let mut value = self.read(reg).to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = value.get_mut(offset + i) {
                *slot = *b;
            }
        }
        let value = u32::from_le_bytes(value);
        match reg {
            REG_COMMAND => {
                self.regs[reg] = (self.regs[reg] & !COMMAND_WRITABLE) | (value & COMMAND_WRITABLE);
            }
            REG_BAR0..=9 => {
                let bar = &mut self.bars[reg - REG_BAR0];
                if bar.size == 0 {
                    return;
                }
                let requested = value & !(bar.size - 1);
                // All-ones is the sizing probe; reading back gives !(size - 1).
                if value != 0xffff_ffff && requested != bar.addr && bar.addr != !(bar.size - 1) {
                    crate::guest_warn!(
                        "guest moved PCI BAR {} to {requested:#x}; lkvm keeps BARs where it put them",
                        reg - REG_BAR0
                    );
                }
                bar.addr = requested;
            }
            REG_INTERRUPT => self.regs[reg] = (self.regs[reg] & !0xff) | (value & 0xff),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x018000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    #[test]
    fn header_ids_and_read_only_fields() {
        let mut c = config();
        assert_eq!(c.read(0), 0x1042_1af4);
        assert_eq!(c.read(2), 0x0180_0001);
        c.write(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read(0), 0x1042_1af4);
        c.write(1, 0, &[0xff, 0xff]);
        assert_eq!(c.read(1) & 0xffff, COMMAND_WRITABLE);
        assert_eq!(c.read(64), 0xffff_ffff);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = config();
        c.add_memory_bar(0, 0xe000_0000, 0x8000);
        assert_eq!(c.read(4), 0xe000_0000);
        c.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(4), 0xffff_8000);
        c.write(4, 0, &0xe000_0000u32.to_le_bytes());
        assert_eq!(c.read(4), 0xe000_0000);
        c.write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(5), 0, "an unimplemented BAR sizes as zero");
    }

    #[test]
    fn capability_list_is_linked() {
        let mut c = config();
        let first = c.add_capability(&[CAP_VENDOR, 0xaa, 16, 1]);
        let second = c.add_capability(&[CAP_MSIX, 0, 0, 0]);
        assert_eq!((first, second), (0x40, 0x44));
        assert_eq!(c.read(REG_CAP_POINTER), 0x40);
        assert_ne!(c.read(1) & STATUS_CAPABILITIES, 0);
        assert_eq!(c.byte(0x41), 0x44, "next pointer overwritten");
        assert_eq!(c.byte(0x45), 0, "list ends");
        assert_eq!(c.byte(0x44), CAP_MSIX);
    }
}
