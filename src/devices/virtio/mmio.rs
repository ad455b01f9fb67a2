//! virtio-mmio (version 2) transport: a 4 KiB register window per device and one interrupt
//! line, announced to Linux with `virtio_mmio.device=4K@ADDR:IRQ`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{TransportSnapshot, TransportState};
use super::{Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

pub const WINDOW_SIZE: u64 = 0x1000;
/// Where a queue notification is written; its value is the queue index.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4b4c; // "LKVM"
const CONFIG_OFFSET: u64 = 0x100;
const INT_USED_RING: u32 = 1;
const INT_CONFIG_CHANGE: u32 = 2;

pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio-mmio interrupt: {e}");
        }
    }
}

impl Interrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue: u16) {
        self.raise(INT_USED_RING);
    }
    fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }
}

pub struct MmioTransport {
    state: TransportState,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// `irq` is the eventfd registered with KVM as the irqfd of the device's interrupt line.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: EventFd) -> std::io::Result<Self> {
        Ok(MmioTransport {
            state: TransportState::new(device, mem)?,
            interrupt: Arc::new(MmioInterrupt { status: AtomicU32::new(0), irq }),
        })
    }

    /// Queue notification eventfds, in queue order, to register as ioeventfds.
    pub fn kicks(&self) -> &[EventFd] {
        &self.state.kicks
    }

    fn read_register(&self, offset: u64) -> u32 {
        let s = &self.state;
        let queue = s.selected_queue();
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => s.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => s.device_features_word(),
            0x34 => queue.map_or(0, |q| u32::from(q.max_size)),
            0x44 => queue.map_or(0, |q| u32::from(q.ready)),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => u32::from(s.status),
            0xfc => s.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let s = &mut self.state;
        let set_low = |field: &mut u64| *field = (*field & !0xffff_ffff) | u64::from(value);
        let set_high = |field: &mut u64| *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            0x14 => s.device_features_select = value,
            0x20 => s.write_driver_features_word(value),
            0x24 => s.driver_features_select = value,
            0x30 => s.queue_select = value as u16,
            QUEUE_NOTIFY_OFFSET => s.notify(value),
            0x64 => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            0x70 => {
                let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
                s.write_status(value as u8, &interrupt);
            }
            _ => {
                let Some(q) = s.selected_queue_mut() else { return };
                match offset {
                    0x38 => {
                        // A size the queue cannot have makes activation fail, not the VMM.
                        q.size = value as u16;
                    }
                    0x44 => q.ready = value == 1,
                    0x80 => set_low(&mut q.desc),
                    0x84 => set_high(&mut q.desc),
                    0x90 => set_low(&mut q.avail),
                    0x94 => set_high(&mut q.avail),
                    0xa0 => set_low(&mut q.used),
                    0xa4 => set_high(&mut q.used),
                    _ => tracing::debug!("virtio-mmio: write to unknown register {offset:#x}"),
                }
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.state.device.read_config(offset - CONFIG_OFFSET, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.state.device.write_config(offset - CONFIG_OFFSET, data);
            self.state.config_generation = self.state.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MmioTransportSnapshot {
    transport: TransportSnapshot,
    interrupt_status: u32,
}

impl crate::devices::state::Versioned for MmioTransportSnapshot {
    const KIND: &'static str = "virtio-mmio transport";
    const VERSION: u16 = 1;
}

impl crate::devices::Persist for MmioTransport {
    fn save(&mut self) -> Vec<u8> {
        crate::devices::state::encode(&MmioTransportSnapshot {
            transport: self.state.save(),
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        let saved: MmioTransportSnapshot = crate::devices::state::decode(state)?;
        self.interrupt.status.store(saved.interrupt_status, Ordering::SeqCst);
        self.state.restore(saved.transport)?;
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        Ok(self.state.resume_saved(interrupt)?)
    }
}

impl super::worker::Lifecycle for MmioTransport {
    /// What the guest asked before it was stopped is done first: a snapshot sees it.
    fn pause(&mut self) {
        self.state.complete_status();
        self.state.device.pause();
    }
    fn resume(&mut self) -> std::io::Result<()> {
        self.state.device.resume()
    }
}

impl super::transport::VirtioTransport for MmioTransport {
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
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::transport::*;
    use vm_memory::GuestAddress;

    fn transport() -> MmioTransport {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        MmioTransport::new(Box::new(Rng::new(&Default::default()).unwrap()), mem, crate::host::eventfd().unwrap())
            .unwrap()
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, driver_high_word: u32) -> u32 {
        write(t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        write(t, 0x24, 1);
        write(t, 0x20, driver_high_word);
        write(t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
        read(t, 0x70)
    }

    fn setup_queue(t: &mut MmioTransport, desc: u64) {
        write(t, 0x30, 0);
        write(t, 0x38, 16);
        for (low, addr) in [(0x80, desc), (0x90, 0x2000), (0xa0, 0x3000)] {
            write(t, low, addr as u32);
            write(t, low + 4, (addr >> 32) as u32);
        }
        write(t, 0x44, 1);
    }

    #[test]
    fn identifies_as_a_version_2_virtio_device() {
        let mut t = transport();
        assert_eq!(read(&mut t, 0x00), MAGIC);
        assert_eq!(read(&mut t, 0x04), 2);
        assert_eq!(read(&mut t, 0x08), 4);
        write(&mut t, 0x14, 1);
        assert_eq!(read(&mut t, 0x10) & 1, 1, "VIRTIO_F_VERSION_1 offered");
        assert_eq!(read(&mut t, 0x34), 256);
    }

    #[test]
    fn refuses_features_it_did_not_offer() {
        let mut t = transport();
        assert_eq!(negotiate(&mut t, 1) & u32::from(STATUS_FEATURES_OK), u32::from(STATUS_FEATURES_OK));
        let mut t = transport();
        assert_eq!(negotiate(&mut t, 1 | (1 << 20)) & u32::from(STATUS_FEATURES_OK), 0);
    }

    #[test]
    fn activates_with_valid_rings_and_flags_bad_ones() {
        let mut t = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0x1000);
        write(&mut t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK));
        assert_eq!(read(&mut t, 0x70) & u32::from(STATUS_NEEDS_RESET), 0);
        write(&mut t, 0x70, 0);
        assert_eq!(read(&mut t, 0x70), 0, "reset");

        let mut bad = transport();
        negotiate(&mut bad, 1);
        setup_queue(&mut bad, 0xffff_f000_0000);
        write(&mut bad, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK));
        assert_ne!(read(&mut bad, 0x70) & u32::from(STATUS_NEEDS_RESET), 0);
    }

    #[test]
    fn driver_ok_and_reset_are_left_to_the_vmm_thread() {
        let mut t = transport();
        let (asked_tx, asked) = std::sync::mpsc::channel();
        t.set_completer(Box::new(move || asked_tx.send(()).unwrap()));
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0xffff_f000_0000);
        write(&mut t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK));
        assert!(asked.try_recv().is_ok(), "the VMM thread is asked");
        assert_eq!(read(&mut t, 0x70) & u32::from(STATUS_NEEDS_RESET), 0, "not activated by the register write");
        t.complete_status();
        assert_ne!(read(&mut t, 0x70) & u32::from(STATUS_NEEDS_RESET), 0, "activated (and refused) by the VMM");
        write(&mut t, 0x70, 0);
        assert_eq!(read(&mut t, 0x70), 0, "the registers reset at once");
        assert!(asked.try_recv().is_ok(), "the device's reset is the VMM thread's");
    }

    #[test]
    fn clearing_driver_ok_neither_reopens_queue_setup_nor_activates_again() {
        let mut t = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0x1000);
        let running = u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        write(&mut t, 0x70, running);
        write(&mut t, 0x70, running & !u32::from(STATUS_DRIVER_OK));
        assert_eq!(read(&mut t, 0x70), running, "a cleared bit stays set until reset");
        // Rings moved outside guest memory would fail a second activation.
        setup_queue(&mut t, 0xffff_f000_0000);
        write(&mut t, 0x70, running);
        assert_eq!(read(&mut t, 0x70), running, "no second activation");
        assert_eq!(t.state.queues[0].desc, 0x1000, "queue setup closed while running");
    }

    #[test]
    fn notifications_and_interrupt_acknowledgement() {
        let mut t = transport();
        write(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(t.kicks()[0].read().unwrap(), 1);
        write(&mut t, QUEUE_NOTIFY_OFFSET, 1000); // no such queue
        t.interrupt.signal_used_queue(0);
        assert_eq!(read(&mut t, 0x60), 1);
        write(&mut t, 0x64, 1);
        assert_eq!(read(&mut t, 0x60), 0);
        let mut odd = [0u8; 2];
        t.read(0x00, &mut odd);
        assert_eq!(odd, [0, 0], "registers answer only 32-bit reads");
    }
}
