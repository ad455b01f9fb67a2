//! Feeds a fuzzed sequence of port reads and writes, of any size from 1 to 8 bytes and at any
//! port around the legacy devices, through lkvm's port I/O bus: the four UARTs, the i8042
//! keyboard controller (reset line included), the CMOS/RTC, the POST and system-control stubs
//! and the boot marker, laid out as a VM has them; and string instructions (`rep insb/outsw`,
//! up to 64 accesses of 1, 2 or 4 bytes) as KVM's exits bring them to the vCPU's handler.
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VcpuExit;
use libfuzzer_sys::fuzz_target;
use lkvm::devices::bus::{Bus, BusDevice};
use lkvm::devices::legacy::{boot_marker, cmos, i8042, serial, stub};
use lkvm::vmm::vcpu::handle_exit;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// The keyboard controller's reset line, counted instead of resetting the VM.
struct Resets(Arc<AtomicUsize>);
impl Trigger for Resets {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn bus(cmos_memory: (u64, u64)) -> Bus {
    let mut bus = Bus::default();
    let mut add =
        |device: Arc<Mutex<dyn BusDevice>>, base: u16, len: u64| bus.insert(device, u64::from(base), len).unwrap();
    for (port, _) in serial::PORTS {
        let uart = serial::SerialPort::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        add(Arc::new(Mutex::new(uart)), port, serial::PORT_LEN);
    }
    let irq = i8042::IrqLine(EventFd::new(0).unwrap());
    add(Arc::new(Mutex::new(i8042::I8042::new(Resets(Arc::default()), irq))), i8042::BASE, i8042::LEN);
    add(Arc::new(Mutex::new(cmos::Cmos::new(cmos_memory.0, cmos_memory.1))), cmos::BASE, cmos::LEN);
    let stub: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(stub::StubPort));
    add(stub.clone(), stub::POST_PORT, 1);
    add(stub, stub::SYSTEM_CONTROL_A, 1);
    let started = Instant::now();
    let marker = boot_marker::BootMarker::new(move || started.elapsed());
    add(Arc::new(Mutex::new(marker)), boot_marker::PORT, 1);
    bus
}

fuzz_target!(|input: &[u8]| {
    let Some((memory, ops)) = input.split_first_chunk::<8>() else { return };
    // Guest RAM below and above the 4 GiB hole, in 64 KiB units as the CMOS reports it.
    let memory = u64::from_le_bytes(*memory);
    let bus = bus(((memory & 0xffff_ffff) << 16 & 0xffff_ffff, (memory >> 32) << 16));
    for op in ops.chunks_exact(4) {
        let len = usize::from(op[0] & 7) + 1;
        // Ports 0 to 0x4ff: every device, the gaps between them and the edges of each range.
        let port = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x500);
        let mut data = [op[3]; 8];
        if op[0] & 0x40 != 0 {
            let size = [1u8, 2, 4, 4][usize::from(op[0] >> 4 & 3)];
            let mut string = vec![op[3]; usize::from(size) * (usize::from(op[0] & 0x0f) * 4 + 1)];
            let (port, none) = (port as u16, Bus::default());
            let exit =
                if op[0] & 0x80 != 0 { VcpuExit::IoOut(port, &string) } else { VcpuExit::IoIn(port, &mut string) };
            assert!(handle_exit(exit, size, &bus, &none).is_ok());
            continue;
        }
        if op[0] & 0x80 != 0 {
            bus.write(port, &data[..len]);
        } else {
            bus.read(port, &mut data[..len]);
            let mapped = [
                serial::PORTS.map(|(p, _)| (p, serial::PORT_LEN)).as_slice(),
                &[
                    (i8042::BASE, i8042::LEN),
                    (cmos::BASE, cmos::LEN),
                    (stub::POST_PORT, 1),
                    (stub::SYSTEM_CONTROL_A, 1),
                    (boot_marker::PORT, 1),
                ],
            ]
            .concat()
            .iter()
            .any(|&(base, n)| port >= u64::from(base) && port + len as u64 <= u64::from(base) + n);
            // A read no device takes floats high.
            assert!(mapped || data[..len].iter().all(|&b| b == 0xff), "port {port:#x}: {:?}", &data[..len]);
        }
    }
});
