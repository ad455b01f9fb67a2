//! Guest memory in a snapshot: the RAM regions one after another in a sparse file (pages that
//! are all zeros are holes), restored as private copy-on-write mappings of that file. A fork
//! hands its children the same layout without writing a file: the memfd a booted guest's RAM
//! lives in, frozen (`Backing`), and the pages changed since in sparse memfds layered on it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::Error;

const PAGE: usize = 4096;

/// Writes every RAM region, in order, to `path`. The vCPUs and devices must be paused.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, Error> {
    let fail = |e| Error::Io(path.to_path_buf(), e);
    let partial = path.with_extension("partial");
    let file = super::private_file(&partial).map_err(fail)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(fail)?;
    let mut file_offset = 0u64;
    for region in mem.iter() {
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`; nothing writes
        // it while the VM is paused.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        let mut page = 0;
        while page < bytes.len() {
            // Runs of non-zero pages are written in one call; zero pages stay holes.
            if bytes[page..page + PAGE].iter().all(|b| *b == 0) {
                page += PAGE;
                continue;
            }
            let start = page;
            while page < bytes.len() && bytes[page..page + PAGE].iter().any(|b| *b != 0) {
                page += PAGE;
            }
            file.write_all_at(&bytes[start..page], file_offset + start as u64).map_err(fail)?;
        }
        file_offset += region.len();
    }
    file.sync_all().map_err(fail)?;
    std::fs::rename(&partial, path).map_err(fail)?;
    Ok(total)
}

/// Maps `path` privately as guest RAM laid out as `ranges`: guest writes stay in this process,
/// and pages are read from the file only when touched.
pub fn map(path: &Path, ranges: &[(GuestAddress, usize)]) -> Result<(GuestMemoryMmap, Backing), Error> {
    map_layers(path, &[], ranges)
}

/// Fresh guest RAM laid out as `ranges`, in one memfd mapped shared: a fork can then hand its
/// contents to children without copying them (`Backing::fork`).
pub fn create(ranges: &[(GuestAddress, usize)]) -> std::io::Result<(GuestMemoryMmap, Backing)> {
    let memfd = memfd("lkvm-guest-ram")?;
    memfd.set_len(ranges.iter().map(|r| r.1 as u64).sum())?;
    let mem = map_file(&memfd, ranges, libc::MAP_SHARED)?;
    Ok((mem, Backing { layers: vec![memfd], shared: true, pagemap: open_pagemap() }))
}

/// Maps a fork's memory as guest RAM: the base file privately, then the pages each sparse file
/// of changes holds over it, in order.
pub fn map_layers(
    base: &Path,
    changes: &[PathBuf],
    ranges: &[(GuestAddress, usize)],
) -> Result<(GuestMemoryMmap, Backing), Error> {
    let base_file = open_sized(base, ranges)?;
    let mem = map_file(&base_file, ranges, libc::MAP_PRIVATE).map_err(|e| Error::Io(base.to_path_buf(), e))?;
    let mut layers = vec![base_file];
    for path in changes {
        let file = open_sized(path, ranges)?;
        overlay(&mem, &file).map_err(|e| Error::Io(path.clone(), e))?;
        layers.push(file);
    }
    Ok((mem, Backing { layers, shared: false, pagemap: open_pagemap() }))
}

/// Opens a memory file and checks that it holds exactly the RAM `ranges` describe.
fn open_sized(path: &Path, ranges: &[(GuestAddress, usize)]) -> Result<File, Error> {
    let fail = |e| Error::Io(path.to_path_buf(), e);
    let file = File::open(path).map_err(fail)?;
    let expected: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let found = file.metadata().map_err(fail)?.len();
    if found != expected {
        return Err(Error::MemorySize { path: path.to_path_buf(), expected, found });
    }
    Ok(file)
}

fn map_file(file: &File, ranges: &[(GuestAddress, usize)], sharing: i32) -> std::io::Result<GuestMemoryMmap> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, size) in ranges {
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file.try_clone()?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(sharing | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or_else(|| std::io::Error::other("bad region"))?);
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| std::io::Error::other(e.to_string()))
}

pub(super) fn memfd(name: &str) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).expect("no NUL in the name");
    // SAFETY: a NUL-terminated name; the new descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a descriptor nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Opened while lkvm can still open files (before its jail and filters): a later fork reads
/// there which pages the guest changed since its memory was frozen. None where /proc is absent.
fn open_pagemap() -> Option<File> {
    File::open("/proc/self/pagemap").ok()
}

/// Each region's host address, size and offset in the layout's files.
fn placements(mem: &GuestMemoryMmap) -> Vec<(*mut u8, usize, u64)> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let placed = (region.as_ptr(), region.len() as usize, offset);
            offset += region.len();
            placed
        })
        .collect()
}

/// Maps, privately and in place, the runs of pages a sparse layer holds over `mem`.
fn overlay(mem: &GuestMemoryMmap, layer: &File) -> std::io::Result<()> {
    let seek = |at: u64, whence| {
        // SAFETY: lseek on a descriptor `layer` owns.
        let pos = unsafe { libc::lseek(layer.as_raw_fd(), at as i64, whence) };
        if pos < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
        }
        Ok(Some(pos as u64))
    };
    for (host, len, offset) in placements(mem) {
        let end = offset + len as u64;
        let mut at = offset;
        while let Some(data) = seek(at, libc::SEEK_DATA)?.filter(|&data| data < end) {
            let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            let (guest_at, run) = ((data - offset) as usize, (hole - data) as usize);
            // SAFETY: the run lies inside a mapping `mem` owns, which is replaced by a private
            // mapping of the same size; nothing runs the guest yet.
            let mapped = unsafe {
                libc::mmap(
                    host.add(guest_at).cast(),
                    run,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    layer.as_raw_fd(),
                    data as i64,
                )
            };
            if mapped == libc::MAP_FAILED {
                // Too many mappings: copy the run instead.
                // SAFETY: as above; the run is inside the mapping.
                let bytes = unsafe { std::slice::from_raw_parts_mut(host.add(guest_at), run) };
                layer.read_exact_at(bytes, data)?;
            }
            at = hole;
        }
    }
    Ok(())
}

/// Where guest RAM's contents live: layers of files that are mapped privately (a base, then
/// sparse files of the pages changed since), or one memfd the guest still writes through.
pub struct Backing {
    layers: Vec<File>,
    /// The guest writes the first layer itself (a booted guest's memfd).
    shared: bool,
    pagemap: Option<File>,
}

impl Backing {
    /// The files a fork's children map (`map_layers`) to see `mem` as it is now, without
    /// copying it. The first fork freezes the memfd the guest writes: the guest's own mapping
    /// becomes private, so that its later writes reach no child. Later forks add one sparse
    /// memfd with the pages the guest changed since. The VM must be paused.
    pub fn fork(&mut self, mem: &GuestMemoryMmap) -> std::io::Result<Vec<File>> {
        let mut layers = self.layers.iter().map(File::try_clone).collect::<std::io::Result<Vec<_>>>()?;
        if self.shared {
            for (host, len, offset) in placements(mem) {
                // SAFETY: replaces a mapping `mem` owns with a private mapping of the same file
                // range at the same address: its contents are unchanged, KVM faults the pages
                // in again, and no vCPU or device runs while it happens.
                let mapped = unsafe {
                    libc::mmap(
                        host.cast(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        self.layers[0].as_raw_fd(),
                        offset as i64,
                    )
                };
                if mapped == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
            }
            self.shared = false;
        } else {
            layers.push(self.changed_pages(mem)?);
        }
        Ok(layers)
    }

    /// A sparse memfd holding the pages of `mem` that this process changed (private pages,
    /// per /proc/self/pagemap, as opposed to pages still read from a layer).
    fn changed_pages(&self, mem: &GuestMemoryMmap) -> std::io::Result<File> {
        /// Present, swapped, and "a file page or shared anonymous" (pagemap's bits 63, 62, 61).
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_PAGE: u64 = 1 << 61;
        const CHUNK: usize = 1 << 16;
        let pagemap = self.pagemap.as_ref().ok_or_else(|| {
            std::io::Error::other("/proc/self/pagemap was not readable when the VM was built: a guest forked before cannot fork again here")
        })?;
        let changed = memfd("lkvm-fork-changes")?;
        changed.set_len(mem.iter().map(|r| r.len()).sum())?;
        let mut entries = vec![0u8; CHUNK * 8];
        for (host, len, offset) in placements(mem) {
            let pages = len / PAGE;
            let mut first = 0;
            while first < pages {
                let count = CHUNK.min(pages - first);
                let bytes = &mut entries[..count * 8];
                pagemap.read_exact_at(bytes, (host as u64 / PAGE as u64 + first as u64) * 8)?;
                for (index, entry) in bytes.chunks_exact(8).enumerate() {
                    let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
                    if entry & (PRESENT | SWAPPED) != 0 && entry & FILE_PAGE == 0 {
                        let at = (first + index) * PAGE;
                        // SAFETY: a page inside a mapping `mem` owns; the VM is paused.
                        let page = unsafe { std::slice::from_raw_parts(host.add(at), PAGE) };
                        changed.write_all_at(page, offset + at as u64)?;
                    }
                }
                first += count;
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryRegion};

    #[test]
    fn forks_see_the_memory_as_it_was_and_later_forks_the_changes_since() {
        let ranges = [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 30), 2 << 20)];
        let (mem, mut backing) = create(&ranges).unwrap();
        let pages: Vec<GuestAddress> = (0..300u64).map(|i| GuestAddress((i * 7919 * 4096) % (4 << 20))).collect();
        for (i, &at) in pages.iter().enumerate() {
            mem.write_obj(i as u64, at).unwrap();
        }
        let fd_path = |file: &File| PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let first = backing.fork(&mem).unwrap();
        assert_eq!(first.len(), 1, "the first fork shares the memfd itself");
        // The guest goes on writing: the first fork's children must not see it.
        for &at in pages.iter().step_by(3) {
            mem.write_obj(u64::MAX, at).unwrap();
        }
        mem.write_obj(0x5eu64, GuestAddress((1 << 30) + 4096)).unwrap();
        let (child, _) = map_layers(&fd_path(&first[0]), &[], &ranges).unwrap();
        for (i, &at) in pages.iter().enumerate() {
            assert_eq!(child.read_obj::<u64>(at).unwrap(), i as u64);
        }
        let second = backing.fork(&mem).unwrap();
        assert_eq!(second.len(), 2);
        let changes = [fd_path(&second[1])];
        let (grandchild, _) = map_layers(&fd_path(&second[0]), &changes, &ranges).unwrap();
        for region in mem.iter() {
            let len = region.len() as usize;
            let mut ours = vec![0u8; len];
            let mut theirs = vec![0u8; len];
            mem.read_slice(&mut ours, region.start_addr()).unwrap();
            grandchild.read_slice(&mut theirs, region.start_addr()).unwrap();
            assert!(ours == theirs, "the second fork sees the memory as it is");
        }
        // Each child's writes are its own.
        grandchild.write_obj(7u64, pages[1]).unwrap();
        assert_eq!(mem.read_obj::<u64>(pages[1]).unwrap(), 1);
        assert_eq!(child.read_obj::<u64>(pages[1]).unwrap(), 1);
    }

    #[test]
    fn saved_memory_maps_back_private_and_sparse() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 30), 2 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        mem.write_slice(b"low", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 30) + 0x10_0000)).unwrap();
        let dir = std::env::temp_dir().join(format!("lkvm-mem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        assert_eq!(save(&mem, &path).unwrap(), 3 << 20);
        let (restored, _) = map(&path, &ranges).unwrap();
        let mut word = [0u8; 4];
        restored.read_slice(&mut word, GuestAddress((1 << 30) + 0x10_0000)).unwrap();
        assert_eq!(&word, b"high");
        restored.write_slice(b"LOW", GuestAddress(0x1000)).unwrap();
        let (again, _) = map(&path, &ranges).unwrap();
        again.read_slice(&mut word[..3], GuestAddress(0x1000)).unwrap();
        assert_eq!(&word[..3], b"low", "a restored guest's writes stay private");
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 64 * 1024, "zero pages are holes");
        assert!(matches!(map(&path, &ranges[..1]), Err(Error::MemorySize { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
