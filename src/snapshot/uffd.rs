//! Firecracker's Uffd memory backend: guest RAM is anonymous memory registered with a
//! userfaultfd, and a page-fault handler process listening on a UNIX socket receives that
//! userfaultfd and the regions' layout (Firecracker's JSON), then fills each page on first touch
//! from wherever it keeps the snapshot's memory.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use linux_raw_sys::general::UFFD_FEATURE_EVENT_REMOVE;
use linux_raw_sys::general::{uffdio_api, uffdio_range, uffdio_register, UFFDIO_REGISTER_MODE_MISSING, UFFD_API};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_REGISTER};
use rustix::mm::{userfaultfd, UserfaultfdFlags};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::Error;

/// One region as Firecracker describes it to its page-fault handlers.
#[derive(Serialize)]
struct RegionMapping {
    /// Where the region is mapped in this process: what UFFDIO_COPY fills.
    base_host_virt_addr: u64,
    size: usize,
    /// Where the region's contents start in the memory file.
    offset: u64,
    page_size: usize,
    /// The same, under the name older handlers read (it is in bytes despite the name).
    page_size_kib: usize,
}

const PAGE_SIZE: usize = 4096;

/// Creates guest RAM laid out as `ranges`, registers it with a new userfaultfd, and hands that
/// to the handler listening at `handler`. The returned descriptor stays open for as long as the
/// memory is used: if the handler dies, faults then wait instead of reading silent zeros.
pub fn map(handler: &Path, ranges: &[(GuestAddress, usize)]) -> Result<(GuestMemoryMmap, OwnedFd), Error> {
    let fail = |reason: String| Error::Uffd(handler.to_path_buf(), reason);
    let mem = GuestMemoryMmap::from_ranges(ranges).map_err(|e| fail(e.to_string()))?;
    // Guest memory is touched by KVM in the kernel too: not USER_MODE_ONLY.
    // SAFETY: the descriptor only ever gets guest RAM registered, and only the handler fills it.
    let uffd = unsafe { userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
        .map_err(|e| fail(format!("userfaultfd: {e} (root, or vm.unprivileged_userfaultfd=1, is needed)")))?;
    // Remove events let a handler see the pages a balloon gives back.
    let mut api = uffdio_api { api: u64::from(UFFD_API), features: u64::from(UFFD_FEATURE_EVENT_REMOVE), ioctls: 0 };
    // SAFETY: UFFDIO_API on our own userfaultfd, with a uffdio_api that lives across the call.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
        return Err(fail(format!("UFFDIO_API: {}", std::io::Error::last_os_error())));
    }
    let mut mappings = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for region in mem.iter() {
        let start = region.as_ptr() as u64;
        let len = region.len();
        let range = uffdio_range { start, len };
        let mut register = uffdio_register { range, mode: u64::from(UFFDIO_REGISTER_MODE_MISSING), ioctls: 0 };
        // SAFETY: registers a mapping `mem` owns; the kernel only reads and fills the struct.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut register) } < 0 {
            return Err(fail(format!("UFFDIO_REGISTER: {}", std::io::Error::last_os_error())));
        }
        let size = len as usize;
        mappings.push(RegionMapping {
            base_host_virt_addr: start,
            size,
            offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        });
        offset += len;
    }
    let layout = serde_json::to_vec(&mappings).map_err(|e| fail(e.to_string()))?;
    let socket = UnixStream::connect(handler).map_err(|e| fail(format!("no page-fault handler listening: {e}")))?;
    socket
        .send_with_fd(&layout[..], uffd.as_raw_fd())
        .map_err(|e| fail(format!("handing over the userfaultfd: {e}")))?;
    Ok((mem, uffd))
}
