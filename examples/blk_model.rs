//! Host-side micro-benchmark of lkvm's virtio-blk device model: requests per second through
//! the queue handler (descriptor walk, bounds checks, bounce-buffer copy, pread/pwrite) on a
//! tmpfs image, raw and qcow2 (made by `qemu-img`, when it is installed), with no guest and no VM
//! exits; then the synchronous against the io_uring engine at queue depth 1 and 32, random
//! 4 KiB O_DIRECT reads of an image on disk (/var/tmp). Run with
//! `cargo run --release --example blk_model`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lkvm::config::{DiskSpec, IoEngine};
use lkvm::devices::virtio::block::Block;
use lkvm::devices::virtio::Interrupt;
use lkvm::disk::DiskImage;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const BATCH: u16 = 64;
const ROUNDS: usize = 2000;

struct Count(AtomicUsize);
impl Interrupt for Count {
    fn signal_used_queue(&self, _: u16) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn signal_config_change(&self) {}
}

fn bench(block: &Block, request_type: u32, len: u32) -> f64 {
    bench_depth(block, request_type, len, BATCH, ROUNDS, 4096)
}

/// `depth` requests per round (all in flight at once with the async engine), at sectors spread
/// over `blocks` 4 KiB blocks.
fn bench_depth(block: &Block, request_type: u32, len: u32, depth: u16, rounds: usize, blocks: usize) -> f64 {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut handler = block.request_handler(block.new_ring());
    let interrupt = Count(AtomicUsize::new(0));
    let start = Instant::now();
    for round in 0..rounds {
        // A fresh queue per round, `depth` requests of header + data + status each.
        let mock = MockSplitQueue::new(&mem, 256);
        let mut descs = Vec::new();
        for i in 0..depth {
            let base = 0x10_0000 + u64::from(i) * 0x2_0000;
            // A multiplicative hash spreads the requests over the image.
            let sector = ((round * depth as usize + i as usize).wrapping_mul(2_654_435_761) % blocks) as u64 * 8;
            let header: [u8; 16] = [request_type.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat().try_into().unwrap();
            mem.write_slice(&header, GuestAddress(base)).unwrap();
            mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
            let d = 3 * i;
            let data_flags = if request_type == 0 { NEXT | WRITE } else { NEXT };
            descs.push(RawDescriptor::from(Descriptor::new(base, 16, NEXT, d + 1)));
            descs.push(RawDescriptor::from(Descriptor::new(base + 0x1000, len, data_flags, d + 2)));
            descs.push(RawDescriptor::from(Descriptor::new(base + 0x1000 + u64::from(len), 1, WRITE, 0)));
        }
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        handler.process_queue(&mut queue, &mem, &interrupt);
        handler.drain(&mut queue, &mem, &interrupt);
    }
    (rounds * depth as usize) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let raw = std::path::PathBuf::from(format!("{dir}/lkvm-blk-bench-{}.img", std::process::id()));
    std::fs::write(&raw, vec![0u8; 256 << 20]).unwrap();
    let qcow2 = raw.with_extension("qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args([&qcow2])
        .arg("256M")
        .status()
        .is_ok_and(|s| s.success());
    let mut images = vec![("raw", raw.clone())];
    if made {
        images.push(("qcow2", qcow2.clone()));
    }
    println!("| image | request | requests/s | MB/s |");
    println!("|---|---|---|---|");
    for (format, path) in images {
        let spec = DiskSpec { io_engine: IoEngine::Sync, ..DiskSpec::new(&path) };
        let block = Block::new(DiskImage::open(&spec).unwrap(), "bench", &Default::default()).unwrap();
        // Writes first: on qcow2 they allocate the clusters the reads then find.
        for (name, request_type, len) in [("write 4 KiB", 1, 4096), ("read 4 KiB", 0, 4096), ("read 64 KiB", 0, 65536)]
        {
            let rate = bench(&block, request_type, len);
            println!("| {format} | {name} | {rate:.0} | {:.0} |", rate * f64::from(len) / 1e6);
        }
    }
    std::fs::remove_file(raw).unwrap();
    let _ = std::fs::remove_file(qcow2);

    // On disk, uncached: where requests in flight together pay off.
    let on_disk = std::path::PathBuf::from(format!("/var/tmp/lkvm-blk-bench-{}.img", std::process::id()));
    std::fs::write(&on_disk, vec![0x5au8; 256 << 20]).unwrap();
    println!("\n| engine | queue depth | 4 KiB O_DIRECT random reads/s |");
    println!("|---|---|---|");
    for depth in [1u16, 32] {
        for io_engine in [IoEngine::Sync, IoEngine::Async] {
            let spec = DiskSpec { direct: true, io_engine, ..DiskSpec::new(&on_disk) };
            let block = Block::new(DiskImage::open(&spec).unwrap(), "bench", &Default::default()).unwrap();
            let rounds = 4096 / depth as usize;
            let rate = bench_depth(&block, 0, 4096, depth, rounds, 65536);
            println!("| {io_engine:?} | {depth} | {rate:.0} |");
        }
    }
    std::fs::remove_file(on_disk).unwrap();
}
