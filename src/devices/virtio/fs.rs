//! virtio-fs: a host directory the guest mounts with `mount -t virtiofs TAG DIR`. Each request
//! is one FUSE message in the driver-readable buffers, answered in the writable ones;
//! `crate::share::virtiofs` checks and serves them.
//!
//! fuse-backend-rs writes replies straight into guest memory through vm-memory and
//! virtio-queue 0.17, one release behind the rest of lkvm. The device therefore walks its
//! queues with those: at activation it takes over the queues the transport set up, over a
//! second view of the same guest RAM.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use virtio_queue_fuse::QueueT as _;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vm_memory_fuse::{Bytes as _, GuestAddress as FuseAddress};

use super::worker::{Lifecycle, Worker};
use super::*;
use crate::share::virtiofs::{self, FsShare, MAX_REQUEST};
use crate::thread::DeviceIo;

pub const VIRTIO_ID_FS: u32 = 26;
/// The high-priority queue (FORGET, INTERRUPT), then one request queue.
const QUEUE_SIZES: &[u16] = &[128, 1024];

type FuseMemory = vm_memory_fuse::GuestMemoryMmap;
type FuseQueue = virtio_queue_fuse::Queue;

pub struct Fs {
    config: Vec<u8>,
    share: Arc<FsShare>,
    worker: Option<Worker<Queues>>,
}

struct Queues {
    queues: Vec<FuseQueue>,
    mem: FuseMemory,
    /// Owns the mapping `mem` views.
    _guest: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    share: Arc<FsShare>,
    /// lkvm's copy of the request being served.
    request: Vec<u8>,
}

impl Fs {
    pub fn new(share: FsShare, tag: &str) -> Fs {
        Fs { config: virtiofs::config_space(tag), share: Arc::new(share), worker: None }
    }
}

/// The same guest RAM as fuse-backend-rs's vm-memory sees it.
fn fuse_view(mem: &GuestMemoryMmap) -> io::Result<FuseMemory> {
    let regions = mem
        .iter()
        .map(|region| {
            let host = region.get_host_address(MemoryRegionAddress(0)).map_err(io::Error::other)?;
            // SAFETY: the mapping belongs to `mem`, which the worker keeps alive (`_guest`)
            // as long as this view; a raw region never unmaps it.
            let mapping = unsafe {
                vm_memory_fuse::mmap::MmapRegion::build_raw(
                    host,
                    region.len() as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(io::Error::other)?;
            vm_memory_fuse::GuestRegionMmap::new(mapping, FuseAddress(region.start_addr().0))
                .ok_or_else(|| io::Error::other("guest RAM region out of range"))
        })
        .collect::<io::Result<Vec<_>>>()?;
    FuseMemory::from_regions(regions).map_err(io::Error::other)
}

/// The queue the transport set up, as a virtio-queue 0.17 queue at the same position.
fn fuse_queue(queue: &Queue) -> io::Result<FuseQueue> {
    let invalid = |e: virtio_queue_fuse::Error| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let mut fuse = FuseQueue::new(queue.max_size()).map_err(invalid)?;
    fuse.set_size(queue.size());
    fuse.try_set_desc_table_address(FuseAddress(queue.desc_table())).map_err(invalid)?;
    fuse.try_set_avail_ring_address(FuseAddress(queue.avail_ring())).map_err(invalid)?;
    fuse.try_set_used_ring_address(FuseAddress(queue.used_ring())).map_err(invalid)?;
    fuse.set_event_idx(queue.event_idx_enabled());
    fuse.set_next_avail(queue.next_avail());
    fuse.set_next_used(queue.next_used());
    fuse.set_ready(true);
    Ok(fuse)
}

/// Serves every available request on queue `index`, as `serve_queue` does for the others.
fn process_queue(state: &mut Queues, index: usize) {
    let Queues { queues, mem, interrupt, share, request, .. } = state;
    let Some(queue) = queues.get_mut(index) else { return };
    let mut used = false;
    let mut stalled = false;
    'drain: loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let len = serve(chain, mem, share, request);
            if queue.add_used(&*mem, head, len as u32).is_err() {
                break 'drain;
            }
            used = true;
            progressed = true;
        }
        match queue.enable_notification(&*mem) {
            Ok(true) if progressed || !stalled => stalled = !progressed,
            _ => break,
        }
    }
    if used && queue.needs_notification(&*mem).unwrap_or(true) {
        interrupt.signal_used_queue(index as u16);
    }
}

/// Serves once what the guest has made available on `queue`, as the worker does (for fuzzing
/// the device's queue path: rings, chains and replies in guest memory).
pub fn serve_available(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    share: Arc<FsShare>,
) -> io::Result<()> {
    let mut state = Queues {
        queues: vec![fuse_queue(queue)?],
        mem: fuse_view(mem)?,
        _guest: mem.clone(),
        interrupt,
        share,
        request: Vec::new(),
    };
    process_queue(&mut state, 0);
    Ok(())
}

/// Copies the request out of the guest's buffers (at most `MAX_REQUEST` bytes), then has the
/// share answer it into the writable ones.
fn serve(
    chain: virtio_queue_fuse::DescriptorChain<&FuseMemory>,
    mem: &FuseMemory,
    share: &FsShare,
    request: &mut Vec<u8>,
) -> usize {
    request.clear();
    for desc in chain.clone().readable() {
        let start = request.len();
        let len = (desc.len() as usize).min(MAX_REQUEST - start);
        request.resize(start + len, 0);
        if mem.read_slice(&mut request[start..], desc.addr()).is_err() {
            return 0;
        }
        if request.len() == MAX_REQUEST {
            break;
        }
    }
    match fuse_backend_rs::transport::VirtioFsWriter::new(mem, chain) {
        Ok(writer) => share.handle(request, writer.into()),
        Err(_) => 0,
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [hiprio, requests] = expect_queues(queues)?;
        let state = Queues {
            queues: vec![fuse_queue(&hiprio.queue)?, fuse_queue(&requests.queue)?],
            mem: fuse_view(&mem)?,
            _guest: mem,
            interrupt,
            share: self.share.clone(),
            request: Vec::with_capacity(64 * 1024),
        };
        let kicks = vec![hiprio.kick, requests.kick];
        self.worker = Some(Worker::spawn(DeviceIo::Files, "virtio-fs".into(), kicks, state, |state, index, _| {
            process_queue(state, index)
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }
}
