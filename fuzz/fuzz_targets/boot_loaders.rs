//! Feeds hostile kernel images (ELF with PVH notes, bzImage setup headers, flat binaries),
//! initramfs bytes and command lines to lkvm's boot loader over a small guest memory. A bad
//! image must be refused with an error, never crash lkvm or write outside guest memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lkvm::boot::{self, BootSpec, Initrd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 32 << 20;

fuzz_target!(|input: &[u8]| {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    let mem = MEM.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let Some((lengths, rest)) = input.split_first_chunk::<4>() else { return };
    // The kernel, then the initrd, then the command line.
    let kernel_len = usize::from(u16::from_le_bytes([lengths[0], lengths[1]])).min(rest.len());
    let (kernel, rest) = rest.split_at(kernel_len);
    let initrd_len = usize::from(u16::from_le_bytes([lengths[2], lengths[3]])).min(rest.len());
    let (initrd, cmdline) = rest.split_at(initrd_len);
    let path = std::env::temp_dir().join(format!("lkvm-fuzz-kernel-{}", std::process::id()));
    std::fs::write(&path, kernel).unwrap();
    let cmdline = String::from_utf8_lossy(cmdline);
    let spec = BootSpec {
        kernel: &path,
        initrd: (initrd_len > 0).then_some(Initrd::Built(initrd)),
        cmdline: &cmdline,
        mem_size: MEM_SIZE as u64,
        cpus: lengths[0] % 8 + 1,
    };
    let _ = boot::load(mem, &spec);
});
