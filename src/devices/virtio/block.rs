//! virtio-blk: a raw image or host block device, served on the device's worker thread.
//! Every sector, length and descriptor the guest gives is checked: a bad request completes with
//! an error status and touches neither the image outside its bounds nor host memory.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::worker::{Lifecycle, Watch, Worker};
use super::*;
use crate::config::RateLimit;
use crate::devices::rate_limiter::RateLimiter;
use crate::disk::uring::{Done, Uring};
use crate::disk::{DiskImage, SECTOR_SIZE};
use crate::thread::DeviceIo;

pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];
/// Data segments per request: the queue size less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const MAX_DISCARD_SEGMENTS: u32 = 16;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Reported serial (VIRTIO_BLK_T_GET_ID) length limit.
const ID_BYTES: usize = 20;
/// Bounce buffer size: large enough for most requests, page-aligned for O_DIRECT.
const BOUNCE_PAGES: usize = 32;
const PAGE: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RequestHeader {
    request_type: u32,
    _ioprio: u32,
    sector: u64,
}
// SAFETY: plain little-endian integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: as above.
unsafe impl ByteValued for DiscardSegment {}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; PAGE]);

/// A page-aligned buffer, so the same copy path works with O_DIRECT images.
struct BounceBuffer(Vec<Page>);

impl BounceBuffer {
    fn new() -> Self {
        BounceBuffer(vec![Page([0; PAGE]); BOUNCE_PAGES])
    }
    fn bytes(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(BOUNCE_PAGES * PAGE);
        // SAFETY: the pages are contiguous, initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// The image behind a drive, which the host may swap while the guest runs (Firecracker's
/// `PATCH /drives`): the guest is told through a config-change interrupt and sees the new size.
pub struct DriveMedia {
    disk: RwLock<Arc<DiskImage>>,
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    /// Every drive has one (unlimited unless configured), so a limit can be set while it runs.
    limiter: Mutex<RateLimiter>,
}

impl DriveMedia {
    fn current(&self) -> Arc<DiskImage> {
        self.disk.read().unwrap().clone()
    }

    /// Writes what the image format caches (qcow2 metadata) and syncs it.
    pub fn flush(&self) -> std::io::Result<()> {
        self.current().flush()
    }

    /// New rate limits from the next request on (Firecracker's `PATCH /drives`: the buckets
    /// named replace theirs).
    pub fn set_rate_limit(&self, limit: &RateLimit) {
        self.limiter.lock().unwrap().update(limit);
    }

    /// Serves `disk` from the next request on; requests in flight finish on the old image.
    pub fn replace(&self, disk: DiskImage) {
        *self.disk.write().unwrap() = Arc::new(disk);
        if let Some(interrupt) = &*self.interrupt.lock().unwrap() {
            interrupt.signal_config_change();
        }
    }
}

/// What the worker owns while it serves the request queue.
type BlockQueue = (Queue, GuestMemoryMmap, Arc<dyn Interrupt>, RequestHandler);

pub struct Block {
    media: Arc<DriveMedia>,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// The async engine's ring, made with the device (before lkvm's threads are confined: no
    /// thread that serves the guest may create rings) and lent to each activation's worker.
    ring: Option<Uring<Pending>>,
    worker: Option<Worker<BlockQueue>>,
}

impl Block {
    /// `id` is what the guest reads as the disk's serial (truncated to 20 bytes).
    pub fn new(disk: DiskImage, id: &str, limit: &RateLimit) -> std::io::Result<Self> {
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        let read_only = disk.read_only();
        let media = Arc::new(DriveMedia {
            disk: RwLock::new(Arc::new(disk)),
            interrupt: Mutex::new(None),
            limiter: Mutex::new(RateLimiter::new(limit)?),
        });
        let mut block = Block { media, read_only, id: serial, ring: None, worker: None };
        block.ring = block.new_ring();
        Ok(block)
    }

    pub fn media(&self) -> Arc<DriveMedia> {
        self.media.clone()
    }

    /// A ring for the async engine, if the disk asks for it and the host has io_uring.
    pub fn new_ring(&self) -> Option<Uring<Pending>> {
        self.media.current().async_fd().and_then(|_| {
            Uring::new(u32::from(QUEUE_SIZE))
                .inspect_err(|e| tracing::info!("io_uring unavailable ({e}): the disk is served synchronously"))
                .ok()
        })
    }

    /// A request handler over this disk, as the device's worker runs it, on `uring` if given.
    pub fn request_handler(&self, uring: Option<Uring<Pending>>) -> RequestHandler {
        let disk = self.media.current();
        RequestHandler { media: self.media.clone(), disk, id: self.id, buffer: BounceBuffer::new(), uring }
    }

    fn config_space(disk: &DiskImage) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let mut put = |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
        put(0, &(disk.size() / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &((PAGE as u64 / SECTOR_SIZE) as u32).to_le_bytes()); // discard alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max write-zeroes sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]); // write zeroes may unmap
        c
    }
}

fn feature(bit: u32) -> u64 {
    1 << bit
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let blk = feature(VIRTIO_BLK_F_SEG_MAX) | feature(VIRTIO_BLK_F_BLK_SIZE) | feature(VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            COMMON_FEATURES | blk | feature(VIRTIO_BLK_F_RO)
        } else {
            COMMON_FEATURES | blk | feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&Self::config_space(&self.media.current()), offset, data);
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [ActiveQueue { queue, kick }] = expect_queues(queues)?;
        let ring = self.ring.take();
        let handler = self.request_handler(ring);
        *self.media.interrupt.lock().unwrap() = Some(interrupt.clone());
        // Events: the queue's kick (0), the async engine's completions, the limiter's timer.
        let mut fds: Vec<_> = handler.uring.as_ref().map(Uring::eventfd).into_iter().collect();
        fds.push(self.media.limiter.lock().unwrap().as_raw_fd());
        let state = (queue, mem, interrupt, handler);
        let drain: fn(&mut BlockQueue) = |(queue, mem, interrupt, handler)| handler.drain(queue, mem, &**interrupt);
        self.worker = Some(Worker::spawn_with_fds(
            DeviceIo::Disk,
            "virtio-blk".into(),
            vec![kick],
            fds,
            state,
            serve,
            Some(drain),
        )?);
        Ok(())
    }

    /// Stops the worker (which waits for the requests in flight) and takes its ring back.
    fn reset(&mut self) {
        if let Some((_, _, _, handler)) = self.worker.take().and_then(Worker::stop) {
            self.ring = handler.uring;
        }
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }
}

/// The worker's handler: a queue notification (0), completions of the async engine (1, with
/// one), or the rate limiter's timer (last).
fn serve((queue, mem, interrupt, handler): &mut BlockQueue, event: usize, _: &Watch) {
    match event {
        0 => handler.process_queue(queue, mem, &**interrupt),
        1 if handler.uring.is_some() => handler.complete(queue, mem, &**interrupt),
        _ => {
            handler.media.limiter.lock().unwrap().timer_fired();
            handler.process_queue(queue, mem, &**interrupt)
        }
    }
}

/// What happened to a request taken from the ring.
enum Outcome {
    /// Done: the bytes written into the driver's buffers (data + status).
    Done(u32),
    /// Handed to the async engine; its completion reports it.
    Started,
    /// The rate limiter holds it: back into the ring, taken again when its timer fires.
    Held,
}

pub struct RequestHandler {
    media: Arc<DriveMedia>,
    /// The media's image as of this batch of requests.
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    buffer: BounceBuffer,
    /// The async engine, for a raw image asked to use it.
    uring: Option<Uring<Pending>>,
}

/// A request in the async engine's hands.
pub struct Pending {
    head: u16,
    /// Where its status byte goes, and the bytes it reports used (data read + status).
    status: GuestAddress,
    used_len: u32,
    /// Kept open until the kernel is done, whatever replaced it meanwhile.
    _disk: Arc<DiskImage>,
}

/// A request's guest buffers, in the order virtio lays them out: the readable ones (header,
/// then data for a write) and the writable ones (data for a read, then the status byte).
struct Layout {
    readable: Vec<(u64, usize)>,
    writable: Vec<(u64, usize)>,
}

impl Layout {
    fn of(chain: DescriptorChain<&GuestMemoryMmap>) -> Option<Layout> {
        let mut layout = Layout { readable: Vec::new(), writable: Vec::new() };
        for desc in chain {
            let buffer = (desc.addr().0, desc.len() as usize);
            if desc.is_write_only() {
                layout.writable.push(buffer);
            } else if layout.writable.is_empty() {
                layout.readable.push(buffer);
            } else {
                return None; // readable after writable: refused, as the synchronous path does
            }
        }
        Some(layout)
    }

    /// `buffers` less their first `skip` and last `trim` bytes.
    fn middle(buffers: &[(u64, usize)], mut skip: usize, trim: usize) -> Option<Vec<(u64, usize)>> {
        let total: usize = buffers.iter().map(|b| b.1).sum();
        let mut keep = total.checked_sub(skip)?.checked_sub(trim)?;
        let mut out = Vec::new();
        for &(addr, len) in buffers {
            let start = skip.min(len);
            skip -= start;
            let n = (len - start).min(keep);
            if n > 0 {
                out.push((addr.checked_add(start as u64)?, n));
            }
            keep -= n;
        }
        Some(out)
    }
}

impl RequestHandler {
    /// Completes every available request, or with the async engine starts as many as it takes
    /// (the rest wait in the ring until completions make room).
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        self.disk = self.media.current();
        if self.uring.is_none() || self.disk.async_fd().is_none() {
            serve_queue_limited(queue, mem, interrupt, 0, |chain| self.handle(chain, mem));
            return;
        }
        let (mut used, mut stalled) = (false, false);
        'drain: loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut progressed = false;
            while self.uring.as_ref().is_some_and(Uring::has_room) {
                let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
                let head = chain.head_index();
                match self.start(chain, mem) {
                    Outcome::Held => {
                        queue.go_to_previous_position(); // taken again when the limiter's timer fires
                        break 'drain;
                    }
                    Outcome::Started => progressed = true,
                    Outcome::Done(len) => {
                        progressed = true;
                        if queue.add_used(mem, head, len).is_err() {
                            break 'drain;
                        }
                        used = true;
                    }
                }
            }
            // Full: the next completion comes back here.
            if !self.uring.as_ref().is_some_and(Uring::has_room)
                || !more_available(queue, mem, progressed, &mut stalled)
            {
                break;
            }
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_used_queue(0);
        }
    }

    /// Hands finished async requests back to the driver, then starts what waits.
    pub fn complete(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        let done = self.uring.as_mut().map(Uring::completions).unwrap_or_default();
        Self::finish(done, queue, mem, interrupt);
        self.process_queue(queue, mem, interrupt);
    }

    /// Waits for every async request in flight and hands them back (before a pause or reset).
    pub fn drain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        let done = self.uring.as_mut().map(Uring::drain).unwrap_or_default();
        Self::finish(done, queue, mem, interrupt);
    }

    fn finish(done: Vec<Done<Pending>>, queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        if done.is_empty() {
            return;
        }
        for Done { token, ok } in done {
            let status = if ok { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR } as u8;
            let used_len = if ok { token.used_len } else { 1 };
            let _ = mem.write_obj(status, token.status);
            let _ = queue.add_used(mem, token.head, used_len);
        }
        if queue.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_used_queue(0);
        }
    }

    /// Starts a read, write or flush on the async engine; any other request, and any the
    /// engine cannot take as it is, runs synchronously, which also gives malformed ones their
    /// error status. The guest's header and buffers are read once: what the limiter charges is
    /// what the engine is given, whatever the guest writes into its ring meanwhile.
    fn start(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Outcome {
        let submitted = (|| {
            let header: RequestHeader = chain.clone().reader(mem).ok()?.read_obj().ok()?;
            let layout = Layout::of(chain.clone())?;
            let &(status_addr, status_len) = layout.writable.last()?;
            let status = GuestAddress(status_addr.checked_add(status_len.checked_sub(1)? as u64)?);
            let header_len = std::mem::size_of::<RequestHeader>();
            let (write, data) = match header.request_type {
                VIRTIO_BLK_T_IN => (false, Layout::middle(&layout.writable, 0, 1)?),
                VIRTIO_BLK_T_OUT if !self.disk.read_only() => (true, Layout::middle(&layout.readable, header_len, 0)?),
                VIRTIO_BLK_T_FLUSH => {
                    let token = Pending { head: chain.head_index(), status, used_len: 1, _disk: self.disk.clone() };
                    let fd = self.disk.async_fd()?;
                    if !self.media.limiter.lock().unwrap().consume(0) {
                        return Some(Outcome::Held);
                    }
                    return self.uring.as_mut()?.sync(fd, token).ok().map(|()| Outcome::Started);
                }
                _ => return None,
            };
            let len: usize = data.iter().map(|d| d.1).sum();
            let offset = self.range(header.sector, len)?;
            if write && self.disk.checks_write_at(offset) {
                return None;
            }
            // O_DIRECT takes sector-aligned buffers; others go through the aligned bounce buffer.
            let aligned =
                |&(addr, n): &(u64, usize)| addr.is_multiple_of(SECTOR_SIZE) && (n as u64).is_multiple_of(SECTOR_SIZE);
            if self.disk.direct() && !data.iter().all(aligned) {
                return None;
            }
            // Each buffer must lie in guest RAM; the kernel reads or writes it there.
            let iovecs = data
                .iter()
                .map(|&(addr, n)| {
                    let slice = mem.get_slice(GuestAddress(addr), n).ok()?;
                    Some(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: n })
                })
                .collect::<Option<Vec<_>>>()?;
            let used_len = if write { 1 } else { len as u32 + 1 };
            let token = Pending { head: chain.head_index(), status, used_len, _disk: self.disk.clone() };
            let fd = self.disk.async_fd()?;
            if !self.media.limiter.lock().unwrap().consume(len as u64) {
                return Some(Outcome::Held);
            }
            // SAFETY: the iovecs point into guest memory, mapped for the VM's life; the
            // engine waits for every request before it is dropped.
            unsafe { self.uring.as_mut()?.read_write(fd, write, offset, iovecs, token) }.ok().map(|()| Outcome::Started)
        })();
        submitted.unwrap_or_else(|| self.handle(chain, mem).map_or(Outcome::Held, Outcome::Done))
    }

    /// Runs one request, charging the drive's limiter one operation and the data bytes it
    /// moves, counted from the same read of the header and buffers that it runs (None when the
    /// limiter says no: nothing is read or written). Returns the bytes written into the
    /// driver's buffers (data + status), 0 when the chain has nowhere to put a status.
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Option<u32> {
        let parsed = (chain.clone().reader(mem), chain.writer(mem));
        let (Ok(mut reader), Ok(mut writer)) = parsed else {
            return self.media.limiter.lock().unwrap().consume(0).then_some(0);
        };
        let header = reader.read_obj::<RequestHeader>();
        let data_len = writer.available_bytes().checked_sub(1);
        let bytes = match (&header, data_len) {
            (Ok(h), Some(len)) if h.request_type == VIRTIO_BLK_T_IN => len,
            (Ok(h), Some(_)) if h.request_type == VIRTIO_BLK_T_OUT => reader.available_bytes(),
            _ => 0,
        };
        if !self.media.limiter.lock().unwrap().consume(bytes as u64) {
            return None;
        }
        let Some(data_len) = data_len else { return Some(0) };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return Some(0);
        };
        let status = match header {
            Ok(header) => self.execute(header, &mut reader, &mut writer),
            Err(_) => VIRTIO_BLK_S_IOERR,
        };
        let _ = status_writer.write_all(&[status as u8]);
        Some((writer.bytes_written() + 1) as u32)
    }

    fn execute(
        &mut self,
        header: RequestHeader,
        reader: &mut virtio_queue::Reader,
        writer: &mut virtio_queue::Writer,
    ) -> u32 {
        let read_only = self.disk.read_only();
        let result = match header.request_type {
            VIRTIO_BLK_T_IN => self.range(header.sector, writer.available_bytes()).and_then(|offset| {
                let mut done = 0;
                let len = writer.available_bytes();
                while done < len {
                    let chunk = self.buffer.bytes(len - done);
                    let n = chunk.len();
                    self.disk.read_at(chunk, offset + done as u64).ok()?;
                    writer.write_all(chunk).ok()?;
                    done += n;
                }
                Some(())
            }),
            VIRTIO_BLK_T_OUT if !read_only => self.range(header.sector, reader.available_bytes()).and_then(|offset| {
                let mut done = 0;
                let len = reader.available_bytes();
                while done < len {
                    let chunk = self.buffer.bytes(len - done);
                    let n = chunk.len();
                    reader.read_exact(chunk).ok()?;
                    self.disk.write_at(chunk, offset + done as u64).ok()?;
                    done += n;
                }
                Some(())
            }),
            VIRTIO_BLK_T_FLUSH => self.disk.flush().ok(),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                writer.write_all(&self.id[..n]).ok()
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if !read_only => {
                self.discard_or_zero(header.request_type, reader)
            }
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => None,
            _ => return VIRTIO_BLK_S_UNSUPP,
        };
        match result {
            Some(()) => VIRTIO_BLK_S_OK,
            None => VIRTIO_BLK_S_IOERR,
        }
    }

    /// Byte offset of `sector` if `len` bytes from there are whole sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len as u64)?;
        ((len as u64).is_multiple_of(SECTOR_SIZE) && end <= self.disk.size() / SECTOR_SIZE * SECTOR_SIZE)
            .then_some(offset)
    }

    fn discard_or_zero(&mut self, request_type: u32, reader: &mut virtio_queue::Reader) -> Option<()> {
        let segments = reader.available_bytes() / std::mem::size_of::<DiscardSegment>();
        if segments == 0 || segments > MAX_DISCARD_SEGMENTS as usize {
            return None;
        }
        for _ in 0..segments {
            let segment: DiscardSegment = reader.read_obj().ok()?;
            if segment.num_sectors > MAX_DISCARD_SECTORS {
                return None;
            }
            let len = u64::from(segment.num_sectors) * SECTOR_SIZE;
            let offset = self.range(segment.sector, len as usize)?;
            let unmap = segment.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let result = if request_type == VIRTIO_BLK_T_DISCARD || unmap {
                self.disk.punch_hole(offset, len)
            } else {
                self.disk.write_zeroes(offset, len)
            };
            result.ok()?;
        }
        Some(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{DiskSpec, IoEngine};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const HEADER: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x80000;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const DISK_SECTORS: u64 = 128;

    #[derive(Default)]
    pub struct CountingInterrupt(pub AtomicUsize);
    impl Interrupt for CountingInterrupt {
        fn signal_used_queue(&self, _queue: u16) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config_change(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        handler: RequestHandler,
        block: Block,
        path: std::path::PathBuf,
    }

    fn harness(read_only: bool) -> Harness {
        harness_with(read_only, false)
    }

    fn harness_with(read_only: bool, direct: bool) -> Harness {
        harness_engine(read_only, direct, IoEngine::Sync)
    }

    fn harness_engine(read_only: bool, direct: bool, io_engine: IoEngine) -> Harness {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path =
            std::env::temp_dir().join(format!("lkvm-blk-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let image: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        std::fs::write(&path, image).unwrap();
        let disk = DiskImage::open(&DiskSpec { read_only, direct, io_engine, ..DiskSpec::new(&path) }).unwrap();
        let block = Block::new(disk, "serial-0123456789abcdefXYZ", &RateLimit::default()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Harness { mem, handler: block.request_handler(block.new_ring()), block, path }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    impl Harness {
        /// Submits one request made of `descs` and returns (status byte, used length).
        fn submit(&mut self, descs: &[RawDescriptor]) -> (u8, u32) {
            let mock = MockSplitQueue::new(&self.mem, 16);
            mock.add_desc_chains(descs, 0).unwrap();
            let mut queue: Queue = mock.create_queue().unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let interrupt = CountingInterrupt::default();
            self.handler.process_queue(&mut queue, &self.mem, &interrupt);
            // The async engine's requests complete when it says so.
            self.handler.drain(&mut queue, &self.mem, &interrupt);
            assert_eq!(mock.used().idx().load(), 1, "the request is completed");
            assert_eq!(interrupt.0.load(Ordering::SeqCst), 1);
            let used = mock.used().ring().ref_at(0).unwrap().load();
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
        }

        fn header(&self, request_type: u32, sector: u64) {
            self.mem.write_obj(RequestHeader { request_type, _ioprio: 0, sector }, GuestAddress(HEADER)).unwrap();
        }

        /// A three-descriptor request: header, data (device-writable when `data_in`), status.
        fn simple(&mut self, request_type: u32, sector: u64, len: u32, data_in: bool) -> (u8, u32) {
            self.header(request_type, sector);
            self.submit(&[
                desc(HEADER, 16, NEXT, 1),
                desc(DATA, len, NEXT | if data_in { WRITE } else { 0 }, 2),
                desc(STATUS, 1, WRITE, 0),
            ])
        }

        fn disk_bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    #[test]
    fn reads_sectors_into_guest_memory() {
        let mut h = harness(false);
        let (status, used) = h.simple(VIRTIO_BLK_T_IN, 3, 1024, true);
        assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 1025));
        let mut data = vec![0u8; 1024];
        h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data[..512].iter().all(|b| *b == 3) && data[512..].iter().all(|b| *b == 4));
    }

    #[test]
    fn a_rate_limited_disk_holds_requests_in_the_ring_until_tokens_return() {
        for engine in [IoEngine::Sync, IoEngine::Async] {
            let mut h = harness_engine(false, false, engine);
            let one_page_a_minute = RateLimit {
                bandwidth: Some(crate::config::BucketConfig { size: 4096, one_time_burst: None, refill_time: 60_000 }),
                ..RateLimit::default()
            };
            h.block.media().set_rate_limit(&one_page_a_minute);
            let mock = MockSplitQueue::new(&h.mem, 16);
            h.header(VIRTIO_BLK_T_IN, 0);
            for i in 0..2u16 {
                let chain = [
                    desc(HEADER, 16, NEXT, 3 * i + 1),
                    desc(DATA + 0x1000 * u64::from(i), 4096, NEXT | WRITE, 3 * i + 2),
                    desc(STATUS + u64::from(i), 1, WRITE, 0),
                ];
                mock.add_desc_chains(&chain, 3 * i).unwrap();
            }
            let mut queue: Queue = mock.create_queue().unwrap();
            let interrupt = CountingInterrupt::default();
            h.handler.process_queue(&mut queue, &h.mem, &interrupt);
            h.handler.drain(&mut queue, &h.mem, &interrupt);
            assert_eq!(mock.used().idx().load(), 1, "{engine:?}: one page passes, the second waits");
            h.handler.process_queue(&mut queue, &h.mem, &interrupt);
            assert_eq!(mock.used().idx().load(), 1, "{engine:?}: still waiting");
            let unlimited = crate::config::BucketConfig::default(); // size 0: no limit
            h.block.media().set_rate_limit(&RateLimit { bandwidth: Some(unlimited), ops: None });
            h.block.media().limiter.lock().unwrap().timer_fired();
            h.handler.process_queue(&mut queue, &h.mem, &interrupt);
            h.handler.drain(&mut queue, &h.mem, &interrupt);
            assert_eq!(mock.used().idx().load(), 2, "{engine:?}: served once the limit is lifted");
        }
    }

    #[test]
    fn swapped_media_serves_the_new_image_and_size() {
        let mut h = harness(true);
        let bigger = h.path.with_extension("new");
        std::fs::write(&bigger, vec![0xab; 2 * DISK_SECTORS as usize * 512]).unwrap();
        let interrupt = Arc::new(CountingInterrupt::default());
        *h.block.media.interrupt.lock().unwrap() = Some(interrupt.clone());
        let media = h.block.media();
        media.replace(DiskImage::open(&DiskSpec { read_only: true, ..DiskSpec::new(&bigger) }).unwrap());
        std::fs::remove_file(&bigger).unwrap();
        assert_eq!(interrupt.0.load(Ordering::SeqCst), 1, "the driver is told the config changed");
        let mut capacity = [0u8; 8];
        h.block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2 * DISK_SECTORS);
        assert_eq!(h.simple(VIRTIO_BLK_T_IN, 3, 4096, true).0, VIRTIO_BLK_S_OK as u8);
        let mut data = vec![0u8; 4096];
        h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data.iter().all(|b| *b == 0xab), "reads come from the new image");
        assert_eq!(
            h.simple(VIRTIO_BLK_T_IN, DISK_SECTORS + 8, 512, true).0,
            VIRTIO_BLK_S_OK as u8,
            "and reach its end"
        );
    }

    #[test]
    fn writes_reach_the_image_and_flush_succeeds() {
        let mut h = harness(false);
        h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_OUT, 7, 512, false), (VIRTIO_BLK_S_OK as u8, 1));
        let image = h.disk_bytes();
        assert!(image[7 * 512..8 * 512].iter().all(|b| *b == 0x5a));
        assert!(image[8 * 512..9 * 512].iter().all(|b| *b == 8), "neighbours untouched");
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.submit(&[desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)]).0, VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn the_async_engine_serves_requests_in_flight_together_and_checks_them_as_the_sync_one() {
        let mut h = harness_engine(false, false, IoEngine::Async);
        assert!(h.handler.uring.is_some(), "io_uring on this host");
        assert_eq!(h.simple(VIRTIO_BLK_T_IN, 3, 1024, true), (VIRTIO_BLK_S_OK as u8, 1025));
        let mut data = vec![0u8; 1024];
        h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data[..512].iter().all(|b| *b == 3) && data[512..].iter().all(|b| *b == 4));
        h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_OUT, 7, 512, false), (VIRTIO_BLK_S_OK as u8, 1));
        assert!(h.disk_bytes()[7 * 512..8 * 512].iter().all(|b| *b == 0x5a));
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.submit(&[desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)]).0, VIRTIO_BLK_S_OK as u8);
        // Checked as the synchronous engine checks them: past the end, a buffer outside guest
        // memory, a partial sector.
        assert_eq!(h.simple(VIRTIO_BLK_T_IN, DISK_SECTORS, 512, true).0, VIRTIO_BLK_S_IOERR as u8);
        let outside = [desc(HEADER, 16, NEXT, 1), desc(0xf_f000, 0x2000, NEXT | WRITE, 2), desc(STATUS, 1, WRITE, 0)];
        let mut sync = harness(false);
        for harness in [&mut h, &mut sync] {
            harness.header(VIRTIO_BLK_T_IN, 0);
        }
        assert_eq!(h.submit(&outside), sync.submit(&outside), "as the synchronous engine answers");
        assert_eq!(h.simple(VIRTIO_BLK_T_OUT, 0, 100, false).0, VIRTIO_BLK_S_IOERR as u8);

        // 32 reads of one sector each, in flight at once, each landing in its own buffer.
        let mock = MockSplitQueue::new(&h.mem, 128);
        let mut descs = Vec::new();
        for i in 0..32u16 {
            let base = 0x4_0000 + u64::from(i) * 0x1000;
            h.mem
                .write_obj(
                    RequestHeader { request_type: VIRTIO_BLK_T_IN, _ioprio: 0, sector: u64::from(i) },
                    GuestAddress(base),
                )
                .unwrap();
            let d = 3 * i;
            descs.push(desc(base, 16, NEXT, d + 1));
            descs.push(desc(base + 0x100, 512, NEXT | WRITE, d + 2));
            descs.push(desc(base + 0x400, 1, WRITE, 0));
        }
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let interrupt = CountingInterrupt::default();
        h.handler.process_queue(&mut queue, &h.mem, &interrupt);
        assert!(h.handler.uring.as_ref().unwrap().in_flight() + mock.used().idx().load() as usize == 32);
        h.handler.drain(&mut queue, &h.mem, &interrupt);
        assert_eq!(mock.used().idx().load(), 32, "every request completed");
        for i in 0..32u64 {
            let base = 0x4_0000 + i * 0x1000;
            assert_eq!(h.mem.read_obj::<u8>(GuestAddress(base + 0x400)).unwrap(), VIRTIO_BLK_S_OK as u8);
            let want = if i == 7 { 0x5a } else { i as u8 }; // sector 7 was written above
            assert_eq!(h.mem.read_obj::<u8>(GuestAddress(base + 0x100 + 511)).unwrap(), want, "sector {i}");
        }
    }

    #[test]
    fn direct_io_images_read_and_write() {
        let mut h = harness_with(false, true);
        h.mem.write_slice(&[0x77; 4096], GuestAddress(DATA)).unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_OUT, 8, 4096, false).0, VIRTIO_BLK_S_OK as u8);
        assert_eq!(h.simple(VIRTIO_BLK_T_IN, 8, 4096, true).0, VIRTIO_BLK_S_OK as u8);
        let mut data = vec![0u8; 4096];
        h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data.iter().all(|b| *b == 0x77));
        assert!(h.disk_bytes()[8 * 512..16 * 512].iter().all(|b| *b == 0x77));
    }

    #[test]
    fn out_of_range_requests_fail_without_touching_the_image() {
        let mut h = harness(false);
        let before = h.disk_bytes();
        // Past the end, straddling the end, a sector number that overflows, a partial sector.
        for (sector, len) in [(DISK_SECTORS, 512), (DISK_SECTORS - 1, 1024), (u64::MAX / 256, 512), (0, 100)] {
            assert_eq!(h.simple(VIRTIO_BLK_T_OUT, sector, len, false).0, VIRTIO_BLK_S_IOERR as u8);
            assert_eq!(h.simple(VIRTIO_BLK_T_IN, sector, len, true).0, VIRTIO_BLK_S_IOERR as u8);
        }
        assert_eq!(h.disk_bytes(), before);
    }

    #[test]
    fn read_only_disk_refuses_writes_discards_and_zeroes() {
        let mut h = harness(true);
        let before = h.disk_bytes();
        assert_eq!(h.simple(VIRTIO_BLK_T_OUT, 0, 512, false).0, VIRTIO_BLK_S_IOERR as u8);
        h.mem.write_obj(DiscardSegment { sector: 0, num_sectors: 8, flags: 0 }, GuestAddress(DATA)).unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_DISCARD, 0, 16, false).0, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(h.simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(h.simple(VIRTIO_BLK_T_IN, 0, 512, true).0, VIRTIO_BLK_S_OK as u8);
        assert_eq!(h.disk_bytes(), before);
    }

    #[test]
    fn discard_and_write_zeroes_clear_ranges() {
        let mut h = harness(false);
        h.mem.write_obj(DiscardSegment { sector: 8, num_sectors: 8, flags: 0 }, GuestAddress(DATA)).unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_DISCARD, 0, 16, false).0, VIRTIO_BLK_S_OK as u8);
        h.mem.write_obj(DiscardSegment { sector: 20, num_sectors: 1, flags: 0 }, GuestAddress(DATA)).unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0, VIRTIO_BLK_S_OK as u8);
        let image = h.disk_bytes();
        assert!(image[8 * 512..16 * 512].iter().all(|b| *b == 0));
        assert!(image[20 * 512..21 * 512].iter().all(|b| *b == 0));
        assert!(image[21 * 512..22 * 512].iter().all(|b| *b == 21));
        h.mem
            .write_obj(DiscardSegment { sector: DISK_SECTORS - 1, num_sectors: 2, flags: 0 }, GuestAddress(DATA))
            .unwrap();
        assert_eq!(h.simple(VIRTIO_BLK_T_DISCARD, 0, 16, false).0, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn get_id_and_unsupported_requests() {
        let mut h = harness(false);
        assert_eq!(h.simple(VIRTIO_BLK_T_GET_ID, 0, 20, true), (VIRTIO_BLK_S_OK as u8, 21));
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
        assert_eq!(h.simple(0xdead, 0, 512, true).0, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn malformed_chains_get_an_error_or_are_dropped_safely() {
        let mut h = harness(false);
        // Header shorter than 16 bytes.
        assert_eq!(h.submit(&[desc(HEADER, 8, NEXT, 1), desc(STATUS, 1, WRITE, 0)]).0, VIRTIO_BLK_S_IOERR as u8);
        // No device-writable byte for the status: completed with length 0.
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.submit(&[desc(HEADER, 16, 0, 0)]).1, 0);
        // Data buffer outside guest memory.
        h.header(VIRTIO_BLK_T_IN, 0);
        let (status, _) =
            h.submit(&[desc(HEADER, 16, NEXT, 1), desc(0xffff_0000, 512, NEXT | WRITE, 2), desc(STATUS, 1, WRITE, 0)]);
        assert_ne!(status, VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn an_avail_index_out_of_range_does_not_hang_the_worker() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        h.header(VIRTIO_BLK_T_IN, 0);
        let (mut queue, used_idx): (Queue, GuestAddress) = {
            let mock = MockSplitQueue::new(&mem, 16);
            mock.add_desc_chains(&[desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)], 0).unwrap();
            mock.avail().idx().store(1000); // claims 1000 buffers in a 16-entry ring
            (mock.create_queue().unwrap(), mock.used_addr().unchecked_add(2))
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // A detached thread: if the handler spins, the test fails instead of hanging.
        std::thread::spawn(move || {
            h.handler.process_queue(&mut queue, &h.mem, &CountingInterrupt::default());
            done_tx.send(()).unwrap();
        });
        assert!(done_rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(), "process_queue spun forever");
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 0, "nothing from a broken ring is completed");
    }

    #[test]
    fn features_and_config_follow_the_image() {
        let rw = harness(false);
        let block = Block::new(DiskImage::open(&DiskSpec::new(&rw.path)).unwrap(), "x", &RateLimit::default()).unwrap();
        assert_eq!(block.features() & feature(VIRTIO_BLK_F_RO), 0);
        assert_ne!(block.features() & feature(VIRTIO_BLK_F_DISCARD), 0);
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        let ro = Block::new(
            DiskImage::open(&DiskSpec { read_only: true, ..DiskSpec::new(&rw.path) }).unwrap(),
            "x",
            &RateLimit::default(),
        )
        .unwrap();
        assert_ne!(ro.features() & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & (feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)), 0);
        let mut beyond = [0xffu8; 4];
        ro.read_config(4096, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }
}
