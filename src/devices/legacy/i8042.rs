//! i8042 PS/2 controller with a keyboard behind it and no aux (mouse) port. It models what
//! Linux's i8042 and atkbd drivers need to probe and bind, so the host can press Ctrl+Alt+Del
//! in the guest (Firecracker's `SendCtrlAltDel`), and the controller's reset line that
//! `reboot=k` guests pulse to leave. Translation is off, so the keyboard speaks scancode set 2.
//! The keyboard always scans: enable, disable and rate commands are only acknowledged.

use std::collections::VecDeque;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Ports 0x60 (data) to 0x64 (status and command).
pub const BASE: u16 = 0x60;
pub const LEN: u64 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
/// The last write went to the command port rather than the data port.
const STATUS_COMMAND: u8 = 0x08;
/// Without it Linux warns that the keylock is active.
const STATUS_KBD_UNLOCKED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
/// No translation bit (0x40): atkbd gets raw set-2 scancodes.
const INITIAL_CTR: u8 = CTR_KBD_INT | CTR_SYSTEM;

/// Output port bit 0 drives the CPU reset line, active low; bit 1 is the A20 gate.
const OUTPUT_PORT_RESET: u8 = 0x01;
const INITIAL_OUTPUT_PORT: u8 = OUTPUT_PORT_RESET | 0x02;
/// Bit 7 is the keyboard lock switch, unlocked to match `STATUS_KBD_UNLOCKED`.
const INPUT_PORT: u8 = 0x80;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
/// 0xf0-0xff pulse the output port lines whose bits are clear in the low nibble.
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_PASSED: u8 = 0x55;
const KBD_TEST_PASSED: u8 = 0x00;
/// "Clock line stuck high": nothing drives an absent aux port's clock. Linux takes any answer
/// but 0x00, 0xfa and 0xff as "no aux port".
const AUX_TEST_NO_DEVICE: u8 = 0x02;

const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_PASSED: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_CURRENT_SET: u8 = 2;

/// Set-2 make codes of Left Ctrl, Left Alt and Delete.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Bytes the guest has not read yet; beyond this a guest that stopped reading loses them.
const QUEUE_LEN: usize = 16;

/// Raises the keyboard interrupt by signalling the irqfd registered for IRQ 1.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a controller command expects as its argument on the data port.
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
enum ControllerArg {
    Ctr,
    OutputPort,
    KbdOutput,
    /// Nothing is connected to the aux port; the byte must not reach the keyboard instead.
    AuxByte,
}

pub struct I8042<R: Trigger, I: Trigger> {
    reset: R,
    irq: I,
    ctr: u8,
    output_port: u8,
    last_write_was_command: bool,
    controller_arg: Option<ControllerArg>,
    /// The keyboard command whose argument byte comes next.
    kbd_arg: Option<u8>,
    queue: VecDeque<u8>,
    /// What an empty data port reads as, like the hardware's output buffer keeping its byte.
    last_read: u8,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct I8042State {
    ctr: u8,
    output_port: u8,
    last_write_was_command: bool,
    controller_arg: Option<ControllerArg>,
    kbd_arg: Option<u8>,
    queue: Vec<u8>,
    last_read: u8,
}

impl crate::devices::state::Versioned for I8042State {
    const KIND: &'static str = "i8042";
    const VERSION: u16 = 1;
}

impl<R: Trigger + Send, I: Trigger + Send> crate::devices::Persist for I8042<R, I> {
    fn save(&mut self) -> Vec<u8> {
        crate::devices::state::encode(&I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            last_write_was_command: self.last_write_was_command,
            controller_arg: self.controller_arg,
            kbd_arg: self.kbd_arg,
            queue: self.queue.iter().copied().collect(),
            last_read: self.last_read,
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        let state: I8042State = crate::devices::state::decode(state)?;
        if state.queue.len() > QUEUE_LEN {
            return Err("i8042 queue longer than the controller's".into());
        }
        self.ctr = state.ctr;
        self.output_port = state.output_port;
        self.last_write_was_command = state.last_write_was_command;
        self.controller_arg = state.controller_arg;
        self.kbd_arg = state.kbd_arg;
        self.queue = state.queue.into();
        self.last_read = state.last_read;
        Ok(())
    }
}

impl<R: Trigger, I: Trigger> I8042<R, I> {
    /// `reset` resets the machine; `keyboard_irq` raises IRQ 1 (an edge: it is raised once per
    /// byte that reaches the output buffer).
    pub fn new(reset: R, keyboard_irq: I) -> Self {
        I8042 {
            reset,
            irq: keyboard_irq,
            ctr: INITIAL_CTR,
            output_port: INITIAL_OUTPUT_PORT,
            last_write_was_command: false,
            controller_arg: None,
            kbd_arg: None,
            queue: VecDeque::with_capacity(QUEUE_LEN),
            last_read: 0,
        }
    }

    /// Presses Left Ctrl, Left Alt and Delete; fails if the guest has left too little room
    /// unread for all of them.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), String> {
        if QUEUE_LEN - self.queue.len() < CTRL_ALT_DEL.len() {
            return Err("the guest is not reading its i8042 keyboard".into());
        }
        CTRL_ALT_DEL.iter().for_each(|&byte| self.send(byte));
        Ok(())
    }

    fn read_port(&mut self, offset: u64) -> u8 {
        match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
            _ => 0,
        }
    }

    fn write_port(&mut self, offset: u64, byte: u8) {
        match offset {
            DATA => self.write_data(byte),
            COMMAND => self.write_command(byte),
            _ => {}
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_KBD_UNLOCKED;
        if !self.queue.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        // As on hardware, the status copy of the system flag follows the CTR's.
        if self.ctr & CTR_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if self.last_write_was_command {
            status |= STATUS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.queue.pop_front() {
            self.last_read = byte;
            // Linux's handler reads one byte per interrupt, so each next byte needs its own.
            if !self.queue.is_empty() {
                self.raise_irq();
            }
        }
        self.last_read
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_write_was_command = true;
        self.controller_arg = None;
        match cmd {
            CMD_READ_CTR => self.respond(self.ctr),
            CMD_WRITE_CTR => self.controller_arg = Some(ControllerArg::Ctr),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.respond(AUX_TEST_NO_DEVICE),
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_KBD_TEST => self.respond(KBD_TEST_PASSED),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_INPUT_PORT => self.respond(INPUT_PORT),
            CMD_READ_OUTPUT_PORT => self.respond(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.controller_arg = Some(ControllerArg::OutputPort),
            CMD_WRITE_KBD_OUTPUT => self.controller_arg = Some(ControllerArg::KbdOutput),
            CMD_WRITE_AUX_OUTPUT | CMD_WRITE_AUX => self.controller_arg = Some(ControllerArg::AuxByte),
            CMD_PULSE_FIRST..=u8::MAX => {
                if cmd & OUTPUT_PORT_RESET == 0 {
                    self.reset_cpu();
                }
            }
            _ => tracing::debug!("i8042: ignoring controller command {cmd:#04x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_write_was_command = false;
        match self.controller_arg.take() {
            Some(ControllerArg::Ctr) => {
                let newly_enabled = byte & !self.ctr & CTR_KBD_INT != 0;
                self.ctr = byte;
                // A byte already waiting gets the interrupt it could not have before.
                if newly_enabled && !self.queue.is_empty() {
                    self.raise_irq();
                }
            }
            Some(ControllerArg::OutputPort) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET == 0 {
                    self.reset_cpu();
                }
            }
            Some(ControllerArg::KbdOutput) => self.send(byte),
            Some(ControllerArg::AuxByte) => {}
            None => self.keyboard_write(byte),
        }
    }

    fn keyboard_write(&mut self, byte: u8) {
        if let Some(cmd) = self.kbd_arg.take() {
            self.send(KBD_ACK);
            // Scancode set 0 asks which set is in use rather than selecting one.
            if cmd == KBD_SCANCODE_SET && byte == 0 {
                self.send(KBD_CURRENT_SET);
            }
            return;
        }
        match byte {
            KBD_ECHO => self.send(KBD_ECHO),
            KBD_RESET => [KBD_ACK, KBD_RESET_PASSED].iter().for_each(|&b| self.send(b)),
            KBD_IDENTIFY => [KBD_ACK, KBD_ID[0], KBD_ID[1]].iter().for_each(|&b| self.send(b)),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_TYPEMATIC => {
                self.kbd_arg = Some(byte);
                self.send(KBD_ACK);
            }
            _ => self.send(KBD_ACK),
        }
    }

    /// Queues a byte from the keyboard behind those already waiting.
    fn send(&mut self, byte: u8) {
        self.enqueue(byte, false);
    }

    /// Queues a controller's answer ahead of waiting keyboard bytes: a driver polling for it
    /// (Linux holds its lock meanwhile) must not take a keystroke for it, nor its interrupt
    /// handler the answer for a keystroke.
    fn respond(&mut self, byte: u8) {
        self.enqueue(byte, true);
    }

    fn enqueue(&mut self, byte: u8, ahead: bool) {
        if self.queue.len() >= QUEUE_LEN {
            tracing::debug!("i8042: output queue full, dropping {byte:#04x}");
            return;
        }
        let was_empty = self.queue.is_empty();
        if ahead {
            self.queue.push_front(byte);
        } else {
            self.queue.push_back(byte);
        }
        // Otherwise the byte in the output buffer already raised one; reading it raises the next.
        if was_empty {
            self.raise_irq();
        }
    }

    fn raise_irq(&self) {
        if self.ctr & CTR_KBD_INT == 0 {
            return;
        }
        if let Err(e) = self.irq.trigger() {
            tracing::error!("i8042 keyboard interrupt could not be raised: {e:?}");
        }
    }

    fn reset_cpu(&self) {
        if let Err(e) = self.reset.trigger() {
            tracing::error!("i8042 reset could not be signalled: {e:?}");
        }
    }
}

impl<R: Trigger + Send, I: Trigger + Send> BusDevice for I8042<R, I> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Checked before reading: a read of the data port takes a byte off the queue.
        if let Some(first) = data.first_mut() {
            *first = self.read_port(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&byte) = data.first() {
            self.write_port(offset, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Clone, Default)]
    struct Counter(Rc<Cell<u32>>);

    impl Trigger for Counter {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    impl Counter {
        fn get(&self) -> u32 {
            self.0.get()
        }
    }

    /// The device, its reset count and its interrupt count.
    fn device() -> (I8042<Counter, Counter>, Counter, Counter) {
        let (reset, irq) = (Counter::default(), Counter::default());
        (I8042::new(reset.clone(), irq.clone()), reset, irq)
    }

    fn status(dev: &mut I8042<Counter, Counter>) -> u8 {
        dev.read_port(COMMAND)
    }

    /// Reads a byte the way Linux does: only once the output buffer is full.
    fn read(dev: &mut I8042<Counter, Counter>) -> u8 {
        assert_ne!(status(dev) & STATUS_OUTPUT_FULL, 0, "nothing to read");
        dev.read_port(DATA)
    }

    fn read_all(dev: &mut I8042<Counter, Counter>) -> Vec<u8> {
        let mut bytes = Vec::new();
        while status(dev) & STATUS_OUTPUT_FULL != 0 {
            bytes.push(dev.read_port(DATA));
        }
        bytes
    }

    fn command(dev: &mut I8042<Counter, Counter>, cmd: u8) -> u8 {
        dev.write_port(COMMAND, cmd);
        assert_ne!(status(dev) & STATUS_COMMAND, 0);
        read(dev)
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut dev, reset, _) = device();
        assert_eq!(status(&mut dev), STATUS_KBD_UNLOCKED | STATUS_SYSTEM);
        assert_eq!(command(&mut dev, CMD_SELF_TEST), SELF_TEST_PASSED);
        let ctr = command(&mut dev, CMD_READ_CTR);
        assert_eq!(ctr, CTR_KBD_INT | CTR_SYSTEM, "interrupt on, no translation");
        // Linux first disables the keyboard and its interrupt, then enables both.
        for ctr in [(ctr | CTR_KBD_DISABLE) & !CTR_KBD_INT, ctr] {
            dev.write_port(COMMAND, CMD_WRITE_CTR);
            dev.write_port(DATA, ctr);
            assert_eq!(status(&mut dev) & (STATUS_COMMAND | STATUS_OUTPUT_FULL), 0);
            assert_eq!(command(&mut dev, CMD_READ_CTR), ctr);
        }
        assert_eq!(command(&mut dev, CMD_KBD_TEST), KBD_TEST_PASSED);
        let aux = command(&mut dev, CMD_AUX_TEST);
        assert!(![0x00, 0xfa, 0xff].contains(&aux), "Linux would assume an aux port: {aux:#x}");
        dev.write_port(COMMAND, CMD_KBD_DISABLE);
        assert_ne!(command(&mut dev, CMD_READ_CTR) & CTR_KBD_DISABLE, 0);
        dev.write_port(COMMAND, CMD_KBD_ENABLE);
        assert_eq!(command(&mut dev, CMD_READ_CTR) & CTR_KBD_DISABLE, 0);
        assert_eq!(command(&mut dev, CMD_READ_OUTPUT_PORT) & OUTPUT_PORT_RESET, OUTPUT_PORT_RESET);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(reset.get(), 0);
    }

    #[test]
    fn keyboard_commands_are_answered() {
        let (mut dev, _, irq) = device();
        dev.write_port(DATA, KBD_RESET);
        assert_eq!(read_all(&mut dev), [KBD_ACK, KBD_RESET_PASSED]);
        assert_eq!(irq.get(), 2, "one interrupt per byte");
        dev.write_port(DATA, KBD_IDENTIFY);
        assert_eq!(read_all(&mut dev), [KBD_ACK, 0xab, 0x83]);
        for cmd in [KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC] {
            dev.write_port(DATA, cmd);
            dev.write_port(DATA, 0x02);
            assert_eq!(read_all(&mut dev), [KBD_ACK, KBD_ACK], "command {cmd:#x}");
        }
        dev.write_port(DATA, KBD_SCANCODE_SET);
        dev.write_port(DATA, 0);
        assert_eq!(read_all(&mut dev), [KBD_ACK, KBD_ACK, KBD_CURRENT_SET]);
        dev.write_port(COMMAND, CMD_WRITE_KBD_OUTPUT);
        dev.write_port(DATA, 0x5a);
        assert_eq!(read_all(&mut dev), [0x5a]);
        dev.write_port(COMMAND, CMD_WRITE_AUX);
        dev.write_port(DATA, KBD_RESET);
        assert!(read_all(&mut dev).is_empty(), "an aux byte reached the keyboard");
        assert_eq!(dev.read_port(DATA), 0x5a, "an empty data port repeats its last byte");
    }

    #[test]
    fn ctrl_alt_del_reaches_the_guest_in_order() {
        let (mut dev, _, irq) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        assert_ne!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(irq.get(), 1);
        let mut keys = Vec::new();
        for raised in 1..=4 {
            assert_eq!(irq.get(), raised, "one interrupt per byte reaching the output buffer");
            keys.push(read(&mut dev));
        }
        assert_eq!(keys, [0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(irq.get(), 4);
    }

    #[test]
    fn controller_answers_go_ahead_of_keystrokes() {
        let (mut dev, _, _) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(command(&mut dev, CMD_READ_CTR), INITIAL_CTR);
        assert_eq!(read_all(&mut dev), CTRL_ALT_DEL);
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut dev, _, _) = device();
        for _ in 0..QUEUE_LEN / CTRL_ALT_DEL.len() {
            dev.trigger_ctrl_alt_del().unwrap();
        }
        assert!(dev.trigger_ctrl_alt_del().is_err());
        for _ in 0..100 {
            dev.write_port(DATA, KBD_RESET);
            dev.write_port(COMMAND, CMD_SELF_TEST);
        }
        assert_eq!(read_all(&mut dev), CTRL_ALT_DEL.repeat(QUEUE_LEN / CTRL_ALT_DEL.len()));
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn cpu_reset_via_pulse_and_output_port() {
        let (mut dev, reset, _) = device();
        dev.write_port(DATA, 0xfe);
        dev.write_port(COMMAND, 0xff);
        dev.write_port(COMMAND, CMD_WRITE_OUTPUT_PORT);
        dev.write_port(DATA, 0xdf);
        assert_eq!(reset.get(), 0, "resend, pulse nothing and enable A20 are no resets");
        dev.write_port(COMMAND, 0xfe);
        assert_eq!(reset.get(), 1);
        dev.write_port(COMMAND, 0xf0);
        assert_eq!(reset.get(), 2);
        dev.write_port(COMMAND, CMD_WRITE_OUTPUT_PORT);
        dev.write_port(DATA, 0xfe);
        assert_eq!(reset.get(), 3);
    }

    #[test]
    fn no_interrupt_while_disabled_in_ctr() {
        let (mut dev, _, irq) = device();
        dev.write_port(COMMAND, CMD_WRITE_CTR);
        dev.write_port(DATA, CTR_SYSTEM);
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(read(&mut dev), 0x14);
        assert_eq!(irq.get(), 0);
        dev.write_port(COMMAND, CMD_WRITE_CTR);
        dev.write_port(DATA, INITIAL_CTR);
        assert_eq!(irq.get(), 1, "enabling the interrupt signals the waiting byte");
    }

    #[test]
    fn any_port_sequence_is_safe() {
        let (mut dev, _, _) = device();
        for cmd in 0..=u8::MAX {
            dev.write_port(COMMAND, cmd);
            for byte in 0..=u8::MAX {
                let offset = u64::from(byte) % LEN;
                dev.write_port(offset, byte);
                dev.write_port(DATA, byte);
                dev.read_port(offset);
                assert!(dev.queue.len() <= QUEUE_LEN);
            }
        }
    }

    #[test]
    fn bus_accesses_of_any_width_are_safe() {
        struct Ignore;
        impl Trigger for Ignore {
            type E = ();
            fn trigger(&self) -> Result<(), ()> {
                Ok(())
            }
        }
        let mut dev = I8042::new(Ignore, Ignore);
        BusDevice::write(&mut dev, 0, &[KBD_RESET, 0xff]);
        BusDevice::write(&mut dev, 0, &[]);
        let mut empty = [];
        BusDevice::read(&mut dev, 0, &mut empty);
        let mut wide = [0xff; 4];
        BusDevice::read(&mut dev, 1, &mut wide);
        assert_eq!(wide, [0; 4]);
        BusDevice::read(&mut dev, 0, &mut wide);
        assert_eq!(wide, [KBD_ACK, 0, 0, 0]);
        BusDevice::read(&mut dev, 0, &mut wide[..2]);
        assert_eq!(wide[..2], [KBD_RESET_PASSED, 0]);
    }
}
