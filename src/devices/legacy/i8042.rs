//! i8042 keyboard controller: only its CPU reset line matters (0xFE to port 0x64), the way
//! `reboot=k` guests leave.

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;

/// Ports 0x60 (data) to 0x64 (command).
pub const BASE: u16 = 0x60;
pub const LEN: u64 = 5;

pub struct I8042<T: Trigger>(I8042Device<T>);

impl<T: Trigger> I8042<T> {
    pub fn new(reset: T) -> Self {
        I8042(I8042Device::new(reset))
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.0.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) = self.0.write(offset as u8, data[0]) {
            tracing::error!("i8042 reset could not be signalled: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    struct Flag(Rc<Cell<u32>>);
    impl Trigger for Flag {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    #[test]
    fn reset_command_triggers_once() {
        let count = Rc::new(Cell::new(0));
        let mut dev = I8042(I8042Device::new(Flag(count.clone())));
        dev.0.write(4, 0xd1).unwrap();
        dev.0.write(0, 0xfe).unwrap();
        assert_eq!(count.get(), 0, "0xfe on the data port is not a reset");
        dev.0.write(4, 0xfe).unwrap();
        assert_eq!(count.get(), 1);
    }
}
