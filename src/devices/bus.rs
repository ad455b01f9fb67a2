//! Address-range buses (port I/O and MMIO) that route vCPU exits to devices. Each device has
//! its own lock, so exits to different devices never contend.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("bus range {0:#x}+{1:#x} overlaps another device")]
    Overlap(u64, u64),
    #[error("bus range at {0:#x} is empty or wraps around")]
    BadRange(u64),
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
    /// Addresses with no device that were already reported, so each is logged once; at most
    /// `MAX_REPORTED`, so a guest probing every address cannot grow host memory (or the log).
    reported: Mutex<HashSet<u64>>,
}

const MAX_REPORTED: usize = 256;

impl Bus {
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange(base))?;
        let overlaps_prev = self.ranges.range(..end).next_back().is_some_and(|(start, e)| start + e.len > base);
        if overlaps_prev {
            return Err(Error::Overlap(base, len));
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Entry)> {
        let (start, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - start;
        (offset + len as u64 <= entry.len).then_some((offset, entry))
    }

    /// Routes a read; without a device the bus floats high (all ones) and the address is
    /// reported once.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => entry.device.lock().unwrap().read(offset, data),
            None => {
                data.fill(0xff);
                self.report_unhandled("read", addr, data.len());
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => entry.device.lock().unwrap().write(offset, data),
            None => self.report_unhandled("write", addr, data.len()),
        }
    }

    fn report_unhandled(&self, what: &str, addr: u64, len: usize) {
        let mut reported = self.reported.lock().unwrap();
        if reported.len() >= MAX_REPORTED || !reported.insert(addr) {
            return;
        }
        tracing::info!("unhandled {len}-byte {what} at {addr:#x} (reported once)");
        if reported.len() == MAX_REPORTED {
            tracing::info!("{MAX_REPORTED} unhandled addresses reported: no more will be");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut byte = [0u8; 1];
        bus.read(0x3fd, &mut byte);
        assert_eq!(byte, [5]);
        bus.write(0x3f8, b"x");
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unknown_or_straddling_access_floats_high() {
        let mut bus = Bus::default();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x70, 2).unwrap();
        let mut word = [0u8; 2];
        bus.read(0x71, &mut word);
        assert_eq!(word, [0xff, 0xff]);
        bus.read(0x1000, &mut word);
        assert_eq!(word, [0xff, 0xff]);
    }

    #[test]
    fn a_guest_probing_every_address_is_remembered_within_bounds() {
        let bus = Bus::default();
        let mut byte = [0u8; 1];
        for addr in 0..100_000 {
            bus.read(addr * 8, &mut byte);
            bus.write(addr * 8 + 1, &byte);
        }
        assert_eq!(byte, [0xff]);
        assert_eq!(bus.reported.lock().unwrap().len(), MAX_REPORTED);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::default();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x60, 5).unwrap();
        assert_eq!(bus.insert(dev(), 0x64, 1), Err(Error::Overlap(0x64, 1)));
        assert_eq!(bus.insert(dev(), 0x5f, 2), Err(Error::Overlap(0x5f, 2)));
        assert_eq!(bus.insert(dev(), 0x10, 0), Err(Error::BadRange(0x10)));
        bus.insert(dev(), 0x65, 1).unwrap();
        bus.insert(dev(), 0x50, 0x10).unwrap();
    }
}
