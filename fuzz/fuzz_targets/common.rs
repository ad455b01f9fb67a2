//! Shared by the fuzz targets: a small guest memory whose contents, rings included, come from
//! the fuzzer, as a misbehaving guest would lay them out (the Cloud Hypervisor pattern).

use lkvm::devices::virtio::Interrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 64 * 1024;

pub struct NoInterrupt;
impl Interrupt for NoInterrupt {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
}

/// Guest memory filled with `data`, and a queue whose size, ring addresses and EVENT_IDX
/// setting come from `config` (addresses may point anywhere, in or out of memory).
pub fn setup(config: &[u8; 8], data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    mem.write_slice(&data[..data.len().min(MEM_SIZE)], GuestAddress(0)).ok()?;
    let queue = queue(config, &mem)?;
    Some((mem, queue))
}

/// A queue in `mem` laid out as `config` says (see `setup`).
#[allow(dead_code)] // not every target has two queues
pub fn queue(config: &[u8; 8], mem: &GuestMemoryMmap) -> Option<Queue> {
    let size = 1u16 << (config[0] % 9); // 1..=256
    let addr = |b: u8| u64::from(b) * 256; // up to 64 KiB, so some rings overhang the end
    let mut queue = Queue::new(256).ok()?;
    queue.set_size(size);
    queue.set_desc_table_address(Some(addr(config[1]) as u32), Some(0));
    queue.set_avail_ring_address(Some(addr(config[2]) as u32), Some(0));
    queue.set_used_ring_address(Some(addr(config[3]) as u32), Some(0));
    queue.set_event_idx(config[4] & 1 == 1);
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}
