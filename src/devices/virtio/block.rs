//! virtio-blk: a raw image or host block device, served on the device's worker thread.
//! Every sector, length and descriptor the guest gives is checked: a bad request completes with
//! an error status and touches neither the image outside its bounds nor host memory.

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::worker::Worker;
use super::*;
use crate::disk::{DiskImage, SECTOR_SIZE};

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

pub struct Block {
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    worker: Option<Worker>,
}

impl Block {
    /// `id` is what the guest reads as the disk's serial (truncated to 20 bytes).
    pub fn new(disk: DiskImage, id: &str) -> Self {
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        let config = Self::config_space(&disk);
        Block { disk: Arc::new(disk), id: serial, config, worker: None }
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
        DEVICE_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let common = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;
        let blk = feature(VIRTIO_BLK_F_SEG_MAX) | feature(VIRTIO_BLK_F_BLK_SIZE) | feature(VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only() {
            common | blk | feature(VIRTIO_BLK_F_RO)
        } else {
            common | blk | feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        mut queues: Vec<ActiveQueue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount(queues.len(), 1));
        }
        let ActiveQueue { mut queue, kick } = queues.remove(0);
        let handler = RequestHandler { disk: self.disk.clone(), id: self.id, buffer: BounceBuffer::new() };
        let mut handler = handler;
        self.worker = Some(Worker::spawn("virtio-blk".into(), vec![kick], move |_| {
            handler.process_queue(&mut queue, &mem, &*interrupt);
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

pub struct RequestHandler {
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    buffer: BounceBuffer,
}

impl RequestHandler {
    /// Completes every available request.
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        serve_queue(queue, mem, interrupt, 0, |chain| self.handle(chain, mem));
    }

    /// Runs one request; returns the bytes written into the driver's buffers (data + status),
    /// 0 when the chain has nowhere to put a status.
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            return 0;
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let status = match reader.read_obj::<RequestHeader>() {
            Ok(header) => self.execute(header, &mut reader, &mut writer),
            Err(_) => VIRTIO_BLK_S_IOERR,
        };
        let _ = status_writer.write_all(&[status as u8]);
        (writer.bytes_written() + 1) as u32
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
        (len as u64 % SECTOR_SIZE == 0 && end <= self.disk.size() / SECTOR_SIZE * SECTOR_SIZE).then_some(offset)
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
