//! virtio-balloon with the statistics queue. Inflating hands guest pages back to the host
//! (MADV_REMOVE or MADV_DONTNEED: the lkvm process's RSS shrinks); `lkvm stat` reads the guest's memory
//! statistics. Requests are answered promptly, or with "no balloon driver" when the guest has
//! none: nothing waits forever.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Lifecycle, Worker};
use super::*;
use crate::thread::DeviceIo;

const QUEUE_SIZES: &[u16] = &[256, 256, 256];
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const STATS_REQUESTED: usize = 3;
// Feature bits from the virtio spec (virtio-bindings has no balloon module).
const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// The balloon counts in 4 KiB pages whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
const STAT_ENTRY: usize = 10;
const STATS_TIMEOUT: Duration = Duration::from_secs(3);
/// Linux posts at most 256 page frame numbers per buffer and about a dozen statistics; what a
/// buffer holds beyond these bounds is ignored, so one request costs the host bounded work.
const MAX_PFNS: usize = 1024;
const MAX_STATS: usize = 64;
const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

#[derive(Default)]
struct StatsState {
    /// The stats buffer the guest posted, held until the host asks for fresher numbers.
    held: Option<u16>,
    latest: BTreeMap<String, u64>,
    generation: u64,
}

/// The balloon as `lkvm balloon` and `lkvm stat` see it.
pub struct BalloonControl {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    stats: Mutex<StatsState>,
    stats_updated: Condvar,
    stats_request: EventFd,
}

impl BalloonControl {
    /// Moves the balloon target by `delta_mib` (positive inflates); returns the new target in
    /// MiB.
    pub fn resize(&self, delta_mib: i64, guest_mib: u64) -> Result<u64, String> {
        if self.interrupt.lock().unwrap().is_none() {
            return Err("no balloon driver in the guest".into());
        }
        let target = self.target_mib().saturating_add_signed(delta_mib).min(guest_mib);
        self.set_target_mib(target, guest_mib)?;
        Ok(target)
    }

    /// Asks the guest to give back `mib` MiB in all; a guest without a driver yet reads the
    /// target when its driver starts.
    pub fn set_target_mib(&self, mib: u64, guest_mib: u64) -> Result<(), String> {
        if mib > guest_mib {
            return Err(format!("a balloon of {mib} MiB is larger than the guest's {guest_mib} MiB"));
        }
        self.target_pages.store((mib << 20).div_ceil(PAGE_SIZE) as u32, Ordering::SeqCst);
        if let Some(interrupt) = &*self.interrupt.lock().unwrap() {
            interrupt.signal_config_change();
        }
        Ok(())
    }

    pub fn target_mib(&self) -> u64 {
        (u64::from(self.target_pages.load(Ordering::SeqCst)) * PAGE_SIZE) >> 20
    }

    /// Pages the guest says it has given back.
    pub fn actual_mib(&self) -> u64 {
        (u64::from(self.actual_pages.load(Ordering::SeqCst)) * PAGE_SIZE) >> 20
    }

    /// Fresh memory statistics from the guest driver.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>, String> {
        let stats = self.stats.lock().unwrap();
        if stats.held.is_none() && stats.generation == 0 {
            return Err("no balloon driver with statistics in the guest".into());
        }
        let seen = stats.generation;
        drop(stats);
        let _ = self.stats_request.write(1);
        let stats = self.stats.lock().unwrap();
        let (stats, timeout) =
            self.stats_updated.wait_timeout_while(stats, STATS_TIMEOUT, |s| s.generation == seen).unwrap();
        if timeout.timed_out() {
            return Err("the guest did not answer the statistics request within 3 s".into());
        }
        Ok(stats.latest.clone())
    }
}

pub struct Balloon {
    control: Arc<BalloonControl>,
    deflate_on_oom: bool,
    worker: Option<Worker<Queues>>,
}

impl Balloon {
    /// A balloon whose first target is `amount_mib`; `deflate_on_oom` lets the guest take
    /// pages back when it runs out of memory.
    pub fn new(amount_mib: u64, deflate_on_oom: bool) -> std::io::Result<Self> {
        let control = Arc::new(BalloonControl {
            target_pages: AtomicU32::new(((amount_mib << 20) / PAGE_SIZE) as u32),
            actual_pages: AtomicU32::new(0),
            interrupt: Mutex::new(None),
            stats: Mutex::new(StatsState::default()),
            stats_updated: Condvar::new(),
            stats_request: crate::host::eventfd()?,
        });
        Ok(Balloon { control, deflate_on_oom, worker: None })
    }

    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }
}

/// The balloon's queues, served by its worker (and by the fuzz target).
pub struct Queues {
    inflate: Queue,
    deflate: Queue,
    stats: Queue,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    control: Arc<BalloonControl>,
}

impl Queues {
    pub fn new(
        [inflate, deflate, stats]: [Queue; 3],
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        control: Arc<BalloonControl>,
    ) -> Queues {
        Queues { inflate, deflate, stats, mem, interrupt, control }
    }

    /// Serves the queue (or the host's stats request) that `event` names.
    pub fn handle(&mut self, event: usize) {
        match event {
            INFLATE => self.inflate(),
            DEFLATE => self.deflate(),
            STATS => self.collect_stats(),
            STATS_REQUESTED => self.request_stats(),
            _ => {}
        }
    }

    /// Gives the pages named by each page frame number back to the host. Frames outside guest
    /// RAM are skipped.
    fn inflate(&mut self) {
        let mem = &self.mem;
        serve_queue(&mut self.inflate, mem, &*self.interrupt, INFLATE as u16, |chain| {
            let Ok(mut reader) = chain.reader(mem) else { return 0 };
            let mut pfn = [0u8; 4];
            for _ in 0..MAX_PFNS {
                if reader.read_exact(&mut pfn).is_err() {
                    break;
                }
                let addr = GuestAddress(u64::from(u32::from_le_bytes(pfn)) * PAGE_SIZE);
                if let Ok(slice) = mem.get_slice(addr, PAGE_SIZE as usize) {
                    let page = slice.ptr_guard_mut().as_ptr().cast();
                    // SAFETY: a page of guest RAM, which the guest gave up; the mapping stays
                    // valid. Shared memory (a booted guest's memfd) frees its page only when
                    // removed; a private mapping (restored, forked) refuses that and drops its
                    // copy instead, reading back as its file.
                    unsafe {
                        if libc::madvise(page, PAGE_SIZE as usize, libc::MADV_REMOVE) != 0 {
                            libc::madvise(page, PAGE_SIZE as usize, libc::MADV_DONTNEED);
                        }
                    };
                }
            }
            0
        });
    }

    fn deflate(&mut self) {
        // Deflated pages come back on the guest's next touch: nothing to do but complete.
        serve_queue(&mut self.deflate, &self.mem, &*self.interrupt, DEFLATE as u16, |_| 0);
    }

    /// Takes the statistics the guest posted and holds its buffer for the next request.
    fn collect_stats(&mut self) {
        while let Some(chain) = self.stats.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut latest = BTreeMap::new();
            if let Ok(mut reader) = chain.reader(&self.mem) {
                let mut entry = [0u8; STAT_ENTRY];
                for _ in 0..MAX_STATS {
                    if reader.read_exact(&mut entry).is_err() {
                        break;
                    }
                    let tag = u16::from_le_bytes([entry[0], entry[1]]);
                    let value = u64::from_le_bytes(entry[2..].try_into().unwrap());
                    let name = STAT_NAMES.get(usize::from(tag)).map_or(format!("tag_{tag}"), |n| n.to_string());
                    latest.insert(name, value);
                }
            }
            let mut stats = self.control.stats.lock().unwrap();
            if let Some(old) = stats.held.replace(head) {
                // A driver that posts a second buffer gets the first one back.
                let _ = self.stats.add_used(&self.mem, old, 0);
            }
            stats.latest = latest;
            stats.generation += 1;
            self.control.stats_updated.notify_all();
        }
        let _ = self.stats.enable_notification(&self.mem);
    }

    /// Returns the held buffer: the driver refills it with fresh numbers.
    fn request_stats(&mut self) {
        let held = self.control.stats.lock().unwrap().held.take();
        if let Some(head) = held {
            if self.stats.add_used(&self.mem, head, 0).is_ok() {
                self.interrupt.signal_used_queue(STATS as u16);
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let deflate_on_oom = if self.deflate_on_oom { VIRTIO_BALLOON_F_DEFLATE_ON_OOM } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ | deflate_on_oom
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = self.control.target_pages.load(Ordering::SeqCst).to_le_bytes().to_vec();
        config.extend_from_slice(&self.control.actual_pages.load(Ordering::SeqCst).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.control.actual_pages.store(u32::from_le_bytes(data.try_into().unwrap()), Ordering::SeqCst);
        }
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [inflate, deflate, stats] = expect_queues(queues)?;
        *self.control.interrupt.lock().unwrap() = Some(interrupt.clone());
        let request = self.control.stats_request.try_clone()?;
        let queues = Queues::new([inflate.queue, deflate.queue, stats.queue], mem, interrupt, self.control.clone());
        let events = vec![inflate.kick, deflate.kick, stats.kick, request];
        self.worker =
            Some(Worker::spawn(DeviceIo::Memory, "virtio-balloon".into(), events, queues, |queues, event, _| {
                queues.handle(event)
            })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        *self.control.interrupt.lock().unwrap() = None;
        *self.control.stats.lock().unwrap() = StatsState::default();
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }

    /// The target and the guest's `actual` (both in pages); the pages themselves are gone from
    /// the memory file or restored as the guest left them.
    fn save(&mut self) -> Vec<u8> {
        let pages = |a: &AtomicU32| a.load(Ordering::SeqCst);
        crate::devices::state::encode(&BalloonState {
            target_pages: pages(&self.control.target_pages),
            actual_pages: pages(&self.control.actual_pages),
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::devices::state::StateError> {
        let saved: BalloonState = crate::devices::state::decode(state)?;
        self.control.target_pages.store(saved.target_pages, Ordering::SeqCst);
        self.control.actual_pages.store(saved.actual_pages, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BalloonState {
    target_pages: u32,
    actual_pages: u32,
}

impl crate::devices::state::Versioned for BalloonState {
    const KIND: &'static str = "virtio-balloon";
    const VERSION: u16 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::CountingInterrupt;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    #[test]
    fn inflation_zeroes_the_named_pages_and_skips_foreign_ones() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0xaa; 8192], GuestAddress(0x80000)).unwrap();
        let pfns: Vec<u8> = [0x80u32, 0xffff_ffff].iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&pfns, GuestAddress(0x40000)).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x40000, 8, 0, 0))], 0).unwrap();
        let balloon = Balloon::new(0, false).unwrap();
        let mut queues = Queues {
            inflate: mock.create_queue().unwrap(),
            deflate: MockSplitQueue::create(&mem, GuestAddress(0x10000), 16).create_queue().unwrap(),
            stats: MockSplitQueue::create(&mem, GuestAddress(0x20000), 16).create_queue().unwrap(),
            mem: mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
            control: balloon.control(),
        };
        queues.inflate();
        assert_eq!(mock.used().idx().load(), 1);
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x80000)).unwrap();
        assert!(page.iter().all(|b| *b == 0), "inflated page was not released");
        mem.read_slice(&mut page, GuestAddress(0x81000)).unwrap();
        assert!(page.iter().all(|b| *b == 0xaa), "neighbouring page touched");
    }

    #[test]
    fn one_buffer_gives_back_at_most_max_pfns_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0xaa; 4096], GuestAddress(0x80000)).unwrap();
        // MAX_PFNS frames naming page 0x90, then one naming page 0x80: that one is ignored.
        let mut pfns: Vec<u8> = std::iter::repeat_n(0x90u32, MAX_PFNS).flat_map(|p| p.to_le_bytes()).collect();
        pfns.extend_from_slice(&0x80u32.to_le_bytes());
        mem.write_slice(&pfns, GuestAddress(0x40000)).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let len = pfns.len() as u32;
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x40000, len, 0, 0))], 0).unwrap();
        let balloon = Balloon::new(0, false).unwrap();
        let idle = |at| MockSplitQueue::create(&mem, GuestAddress(at), 16).create_queue().unwrap();
        let queues = [mock.create_queue().unwrap(), idle(0x10000), idle(0x20000)];
        let mut queues = Queues::new(queues, mem.clone(), Arc::new(CountingInterrupt::default()), balloon.control());
        queues.handle(INFLATE);
        assert_eq!(mock.used().idx().load(), 1);
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x80000)).unwrap();
        assert!(page.iter().all(|b| *b == 0xaa), "a frame past the bound was given back");
    }

    #[test]
    fn requests_without_a_driver_fail_at_once() {
        let balloon = Balloon::new(0, false).unwrap();
        let control = balloon.control();
        assert!(control.resize(64, 256).unwrap_err().contains("no balloon driver"));
        let start = std::time::Instant::now();
        assert!(control.stats().unwrap_err().contains("no balloon driver"));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn resize_clamps_and_raises_a_config_change() {
        let balloon = Balloon::new(0, false).unwrap();
        let control = balloon.control();
        let interrupt = Arc::new(CountingInterrupt::default());
        *control.interrupt.lock().unwrap() = Some(interrupt.clone());
        assert_eq!(control.resize(64, 256).unwrap(), 64);
        assert_eq!(control.resize(1000, 256).unwrap(), 256);
        assert_eq!(control.resize(-1000, 256).unwrap(), 0);
        assert_eq!(interrupt.0.load(Ordering::SeqCst), 3);
        let mut num_pages = [0u8; 4];
        balloon.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 0);
    }
}
