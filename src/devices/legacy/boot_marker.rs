//! Boot timer: the guest writes to this port when it reaches the point it wants timed (our test
//! init does so first thing), and lkvm logs the time since it started.

use std::time::Duration;

use crate::devices::bus::BusDevice;

pub const PORT: u16 = 0x440;

pub struct BootMarker {
    /// Notes the mark and returns the time since start.
    mark: Box<dyn Fn() -> Duration + Send>,
    marks: u32,
}

impl BootMarker {
    pub fn new(mark: impl Fn() -> Duration + Send + 'static) -> Self {
        BootMarker { mark: Box::new(mark), marks: 0 }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.marks += 1;
        let elapsed = (self.mark)();
        crate::guest_info!(
            "boot marker {} (value {:#x}) at {}.{:03} s since start",
            self.marks,
            data[0],
            elapsed.as_secs(),
            elapsed.subsec_millis()
        );
    }
}
