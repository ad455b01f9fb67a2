//! virtio-console (single port, hvc0): guest output to the terminal, terminal input to the
//! guest. Input waits in a bounded inbox until the guest posts receive buffers.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Lifecycle, Worker};
use super::*;
use crate::thread::DeviceIo;

const QUEUE_SIZES: &[u16] = &[256, 256];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const INPUT_READY: usize = 2;
/// Host input held for a guest that is not reading; more waits in the terminal.
const INBOX_CAPACITY: usize = 64 * 1024;
/// Bytes taken from one transmit buffer at most.
const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

/// Terminal input on its way to the guest.
pub struct Inbox {
    bytes: Mutex<VecDeque<u8>>,
    ready: EventFd,
}

impl Inbox {
    /// Queues what fits of `input`; returns how many bytes were taken.
    pub fn push(&self, input: &[u8]) -> usize {
        let mut bytes = self.bytes.lock().unwrap();
        let n = input.len().min(INBOX_CAPACITY - bytes.len());
        bytes.extend(&input[..n]);
        drop(bytes);
        if n > 0 {
            let _ = self.ready.write(1);
        }
        n
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

pub struct Console {
    inbox: Arc<Inbox>,
    /// Shared with the worker, so a console the driver resets and sets up again keeps it.
    output: Output,
    worker: Option<Worker<Port>>,
}

impl Console {
    pub fn new(output: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let inbox = Arc::new(Inbox { bytes: Mutex::new(VecDeque::new()), ready: crate::host::eventfd()? });
        Ok(Console { inbox, output: Arc::new(Mutex::new(output)), worker: None })
    }

    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }
}

/// The console's port 0, served by its worker (and by the fuzz target).
pub struct Port {
    rx: Queue,
    tx: Queue,
    mem: GuestMemoryMmap,
    inbox: Arc<Inbox>,
    output: Output,
    interrupt: Arc<dyn Interrupt>,
}

impl Port {
    /// The port of `console` over its `[rx, tx]` queues.
    pub fn new(console: &Console, [rx, tx]: [Queue; 2], mem: GuestMemoryMmap, interrupt: Arc<dyn Interrupt>) -> Port {
        Port { rx, tx, mem, inbox: console.inbox.clone(), output: console.output.clone(), interrupt }
    }

    /// Serves the queue (or the input) that `event` names.
    pub fn handle(&mut self, event: usize) {
        match event {
            TX_QUEUE => self.transmit(),
            RX_QUEUE | INPUT_READY => self.receive(),
            _ => {}
        }
    }

    fn transmit(&mut self) {
        let (mem, output) = (&self.mem, &self.output);
        serve_queue(&mut self.tx, mem, &*self.interrupt, TX_QUEUE as u16, |chain| {
            if let Ok(mut reader) = chain.reader(mem) {
                let mut chunk = vec![0u8; reader.available_bytes().min(MAX_OUTPUT_CHUNK)];
                if reader.read_exact(&mut chunk).is_ok() {
                    let mut output = output.lock().unwrap();
                    let _ = output.write_all(&chunk);
                    let _ = output.flush();
                }
            }
            0
        });
    }

    /// Moves waiting input into receive buffers; while input waits and no buffer is free,
    /// keeps notifications on so the guest's next buffer wakes the worker.
    fn receive(&mut self) {
        let mut used = false;
        let mut stalled = false;
        loop {
            let mut bytes = self.inbox.bytes.lock().unwrap();
            if bytes.is_empty() {
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                drop(bytes);
                if more_available(&mut self.rx, &self.mem, false, &mut stalled) {
                    continue;
                }
                break;
            };
            stalled = false;
            let head = chain.head_index();
            let mut written = 0;
            if let Ok(mut writer) = chain.writer(&self.mem) {
                let n = writer.available_bytes().min(bytes.len());
                let chunk: Vec<u8> = bytes.drain(..n).collect();
                if writer.write_all(&chunk).is_ok() {
                    written = n;
                }
            }
            drop(bytes);
            if self.rx.add_used(&self.mem, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue(RX_QUEUE as u16);
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [rx, tx] = expect_queues(queues)?;
        let ready = self.inbox.ready.try_clone()?;
        let port = Port::new(self, [rx.queue, tx.queue], mem, interrupt);
        self.worker = Some(Worker::spawn(
            DeviceIo::Memory,
            "virtio-console".into(),
            vec![rx.kick, tx.kick, ready],
            port,
            |port, event, _| port.handle(event),
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::CountingInterrupt;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    #[test]
    fn guest_output_reaches_the_terminal_and_input_the_guest() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rx_mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx_mock = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        mem.write_slice(b"hello", GuestAddress(0x40000)).unwrap();
        tx_mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x40000, 5, 0, 0))], 0).unwrap();
        rx_mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x50000, 2, WRITE, 0))], 0).unwrap();
        rx_mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x60000, 8, WRITE, 0))], 1).unwrap();

        let console = Console::new(Box::new(std::io::sink())).unwrap();
        let out = Capture::default();
        let mut port = Port {
            rx: rx_mock.create_queue().unwrap(),
            tx: tx_mock.create_queue().unwrap(),
            mem: mem.clone(),
            inbox: console.inbox(),
            output: Arc::new(Mutex::new(Box::new(out.clone()))),
            interrupt: Arc::new(CountingInterrupt::default()),
        };
        port.transmit();
        assert_eq!(&*out.0.lock().unwrap(), b"hello");
        assert_eq!(tx_mock.used().idx().load(), 1);

        assert_eq!(console.inbox().push(b"abc"), 3);
        port.receive();
        // "ab" fills the 2-byte buffer, "c" goes to the next.
        assert_eq!(rx_mock.used().idx().load(), 2);
        let mut first = [0u8; 2];
        mem.read_slice(&mut first, GuestAddress(0x50000)).unwrap();
        assert_eq!(&first, b"ab");
        assert_eq!(rx_mock.used().ring().ref_at(1).unwrap().load().len(), 1);
    }

    #[test]
    fn input_for_a_guest_that_does_not_read_is_bounded() {
        let console = Console::new(Box::new(std::io::sink())).unwrap();
        let inbox = console.inbox();
        assert_eq!(inbox.push(&vec![b'x'; INBOX_CAPACITY + 100]), INBOX_CAPACITY);
        assert_eq!(inbox.push(b"more"), 0);
    }
}
