//! Feeds fuzzed bytes to the snapshot decoders: the state file (header, checksum, bincode), and
//! each device's own state restored into a real device (legacy ones, and a virtio-mmio transport
//! whose restored queues point wherever the bytes say, against a small guest memory). A corrupt
//! snapshot must be refused with an error; any panic is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lkvm::devices::legacy::{cmos::Cmos, i8042::I8042, serial::SerialPort};
use lkvm::devices::virtio::mmio::MmioTransport;
use lkvm::devices::virtio::rng::Rng;
use lkvm::devices::Persist;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

struct NoTrigger;
impl Trigger for NoTrigger {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fuzz_target!(|input: &[u8]| {
    let _ = lkvm::snapshot::parse_state(input);
    // The same bytes behind a valid header, so the decoder itself is reached past the checksum.
    let _ = lkvm::snapshot::parse_state(&lkvm::snapshot::frame(input));
    let Some((&which, state)) = input.split_first() else { return };
    let mut device: Box<dyn Persist> = match which % 4 {
        0 => Box::new(Cmos::new(128 << 20, 0)),
        1 => Box::new(I8042::new(NoTrigger, NoTrigger)),
        2 => Box::new(SerialPort::new(eventfd(), Box::new(std::io::sink()))),
        _ => {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 1024)]).unwrap();
            Box::new(MmioTransport::new(Box::new(Rng::new(&Default::default()).unwrap()), mem, eventfd()).unwrap())
        }
    };
    if device.restore(state).is_ok() {
        // What was accepted saves again.
        let _ = device.save();
    }
});
