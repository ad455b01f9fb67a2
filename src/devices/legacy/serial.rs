//! 16550A UART on the port bus, backed by vm-superio; its interrupt is an irqfd.

use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// (base port, ISA IRQ) of COM1..COM4.
pub const PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];
pub const PORT_LEN: u64 = 8;

/// Raises the UART's interrupt by signalling the irqfd registered for its IRQ line.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

const DATA: u64 = 0;
const LINE_CONTROL: u64 = 3;
const LINE_STATUS: u64 = 5;
const LCR_DLAB: u8 = 0x80;
const LSR_BREAK: u8 = 0x10;

pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    /// A break condition waits in the receive FIFO as a NUL byte (vm-superio models none):
    /// the line status shows it until the driver reads that byte.
    break_pending: bool,
}

impl SerialPort {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialPort { uart: Serial::new(IrqTrigger(irq), out), break_pending: false }
    }

    /// Sends a break followed by `key`: Linux's magic SysRq over a serial console.
    pub fn send_sysrq(&mut self, key: u8) -> Result<(), String> {
        if self.uart.fifo_capacity() < 2 {
            return Err("the guest is not reading its serial port".into());
        }
        self.uart.enqueue_raw_bytes(&[0, key]).map_err(|e| format!("serial input: {e:?}"))?;
        self.break_pending = true;
        Ok(())
    }

    /// Queues as many of `bytes` as the receive FIFO takes; returns how many it took.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n > 0 {
            if let Err(e) = self.uart.enqueue_raw_bytes(&bytes[..n]) {
                tracing::warn!("serial input: {e:?}");
                return 0;
            }
        }
        n
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let receiving = offset == DATA && self.uart.read(LINE_CONTROL as u8) & LCR_DLAB == 0;
        data[0] = self.uart.read(offset as u8);
        if self.break_pending {
            if offset == LINE_STATUS {
                data[0] |= LSR_BREAK;
            } else if receiving {
                self.break_pending = false;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            tracing::warn!("serial output: {e:?}");
        }
    }
}

/// vm-superio's `SerialState`, which has no serde support of its own.
#[derive(serde::Serialize, serde::Deserialize)]
struct SerialPortState {
    registers: [u8; 9],
    in_buffer: Vec<u8>,
    break_pending: bool,
}

impl crate::devices::state::Versioned for SerialPortState {
    const KIND: &'static str = "serial port";
    const VERSION: u16 = 1;
}

impl crate::devices::Persist for SerialPort {
    fn save(&mut self) -> Vec<u8> {
        let s = self.uart.state();
        crate::devices::state::encode(&SerialPortState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
            break_pending: self.break_pending,
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        let saved: SerialPortState = crate::devices::state::decode(state)?;
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            saved.registers;
        let state = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: saved.in_buffer,
        };
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|e| format!("serial irq: {e}"))?;
        let placeholder =
            Serial::new(IrqTrigger(irq.try_clone().map_err(|e| e.to_string())?), Box::new(io::sink()) as _);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out).map_err(|e| format!("serial: {e:?}"))?;
        self.break_pending = saved.break_pending;
        Ok(())
    }
}

/// The terminal's stdout, flushed after every byte so prompts appear at once.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    #[test]
    fn transmits_and_receives_with_interrupts() {
        let out = Capture::default();
        let irq = crate::host::eventfd().unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi" {
            port.write(THR, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");

        port.write(IER, &[1]); // receive-data interrupt on
        assert_eq!(port.receive(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        port.read(LSR, &mut byte);
        assert_ne!(byte[0] & LSR_DATA_READY, 0);
        port.read(THR, &mut byte);
        assert_eq!(byte[0], b'o');
    }

    #[test]
    fn sysrq_is_a_break_then_the_key() {
        let irq = crate::host::eventfd().unwrap();
        let mut port = SerialPort::new(irq, Box::new(io::sink()));
        port.send_sysrq(b'h').unwrap();
        let mut byte = [0u8];
        port.read(LSR, &mut byte);
        assert_eq!(byte[0] & (LSR_BREAK | LSR_DATA_READY), LSR_BREAK | LSR_DATA_READY);
        port.read(THR, &mut byte);
        assert_eq!(byte[0], 0, "the break arrives as a NUL");
        port.read(LSR, &mut byte);
        assert_eq!(byte[0] & LSR_BREAK, 0, "break cleared once read");
        port.read(THR, &mut byte);
        assert_eq!(byte[0], b'h');
    }

    #[test]
    fn full_fifo_takes_only_what_fits() {
        let irq = crate::host::eventfd().unwrap();
        let mut port = SerialPort::new(irq, Box::new(io::sink()));
        let taken = port.receive(&[b'a'; 100]);
        assert!(taken > 0 && taken < 100);
        assert_eq!(port.receive(b"b"), 0);
    }
}
