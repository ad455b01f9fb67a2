//! Boot timer: the guest writes to this port when it reaches the point it wants timed (our test
//! init does so first thing), and lkvm logs the time since it started.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::vmm::stats::RunStats;

pub const PORT: u16 = 0x440;

pub struct BootMarker {
    stats: Arc<RunStats>,
    marks: u32,
}

impl BootMarker {
    pub fn new(stats: Arc<RunStats>) -> Self {
        BootMarker { stats, marks: 0 }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.marks += 1;
        let elapsed = self.stats.boot_marker();
        crate::guest_info!(
            "boot marker {} (value {:#x}) at {}.{:03} s since start",
            self.marks,
            data[0],
            elapsed.as_secs(),
            elapsed.subsec_millis()
        );
    }
}
