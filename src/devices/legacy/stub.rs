//! Ports a PC has and Linux touches, that need no behaviour here: POST codes (0x80) and
//! system control port A (0x92). Reads return 0, writes are dropped.

use crate::devices::bus::BusDevice;

pub const POST_PORT: u16 = 0x80;
pub const SYSTEM_CONTROL_A: u16 = 0x92;

pub struct StubPort;

impl BusDevice for StubPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
