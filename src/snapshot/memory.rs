//! Guest memory in a snapshot: the RAM regions one after another in a sparse file (pages that
//! are all zeros are holes), restored as private copy-on-write mappings of that file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

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
pub fn map(path: &Path, ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, Error> {
    let fail = |e| Error::Io(path.to_path_buf(), e);
    let file = File::open(path).map_err(fail)?;
    let expected: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let found = file.metadata().map_err(fail)?.len();
    if found != expected {
        return Err(Error::MemorySize { path: path.to_path_buf(), expected, found });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, size) in ranges {
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file.try_clone().map_err(fail)?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or_else(|| fail(std::io::Error::other("bad region")))?);
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| fail(std::io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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
        let restored = map(&path, &ranges).unwrap();
        let mut word = [0u8; 4];
        restored.read_slice(&mut word, GuestAddress((1 << 30) + 0x10_0000)).unwrap();
        assert_eq!(&word, b"high");
        restored.write_slice(b"LOW", GuestAddress(0x1000)).unwrap();
        let again = map(&path, &ranges).unwrap();
        again.read_slice(&mut word[..3], GuestAddress(0x1000)).unwrap();
        assert_eq!(&word[..3], b"low", "a restored guest's writes stay private");
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 64 * 1024, "zero pages are holes");
        assert!(matches!(map(&path, &ranges[..1]), Err(Error::MemorySize { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
