//! Guest RAM regions and the E820 map that describes them.

use super::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// RAM regions (start, size) for `mem_size` bytes of guest memory: below the MMIO hole, and
/// the remainder above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut regions = vec![(0, low)];
    if mem_size > low {
        regions.push((MMIO_HOLE_END, mem_size - low));
    }
    regions
}

/// The E820 map: low RAM up to the EBDA, reserved EBDA/VGA/BIOS area, then RAM from 1 MiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820Kind::Ram },
        E820Entry { addr: EBDA_START, size: HIMEM_START - EBDA_START, kind: E820Kind::Reserved },
    ];
    for (start, size) in ram_regions(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START { size } else { start + size };
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820Kind::Ram });
        }
    }
    map
}

/// The last usable RAM address + 1 below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_one_low_region() {
        assert_eq!(ram_regions(128 * MIB), vec![(0, 128 * MIB)]);
        let map = e820_map(128 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(map[0], E820Entry { addr: 0, size: 0x9fc00, kind: E820Kind::Ram });
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[1].addr + map[1].size, MIB);
        assert_eq!(map[2], E820Entry { addr: MIB, size: 127 * MIB, kind: E820Kind::Ram });
    }

    #[test]
    fn large_guest_skips_the_pci_hole() {
        let mem = 4096 * MIB;
        let regions = ram_regions(mem);
        assert_eq!(regions, vec![(0, 0xd000_0000), (0x1_0000_0000, mem - 0xd000_0000)]);
        let map = e820_map(mem);
        let ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        // Only the 384 KiB between the EBDA and 1 MiB is not RAM.
        assert_eq!(ram, mem - (MIB - 0x9fc00));
        assert!(map.iter().all(|e| e.addr + e.size <= 0xd000_0000 || e.addr >= 0x1_0000_0000));
        assert_eq!(low_ram_end(mem), 0xd000_0000);
    }
}
