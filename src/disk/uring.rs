//! The asynchronous I/O engine (Firecracker's `io_engine: Async`): reads, writes and syncs of a
//! raw image through io_uring, many in flight, completions reported through an eventfd. The
//! caller's iovecs point into guest memory, which stays mapped while the VM lives; every
//! request is waited for before the engine is dropped, so no I/O lands after a device reset.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

/// What the caller wants back with a completion.
pub struct Done<T> {
    pub token: T,
    /// Whether the whole request succeeded.
    pub ok: bool,
}

struct InFlight<T> {
    token: T,
    /// The bytes a read or write must move; a sync's is 0.
    expected: usize,
    /// Kept alive until the kernel is done with them.
    _iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs are addresses the kernel uses, never dereferenced in Rust; they point into
// guest memory, which is shared by design.
unsafe impl<T: Send> Send for InFlight<T> {}
// SAFETY: as above: a shared InFlight gives access to nothing behind the pointers.
unsafe impl<T: Sync> Sync for InFlight<T> {}

pub struct Uring<T> {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight<T>>>,
    free: Vec<usize>,
}

impl<T: Send> Uring<T> {
    /// An engine with up to `depth` requests in flight.
    pub fn new(depth: u32) -> io::Result<Uring<T>> {
        // Disabled until restricted to reads, writes and syncs: a thread taken over by the guest
        // cannot submit what its seccomp filter forbids (opening files, sockets) through it.
        let ring = IoUring::builder().setup_r_disabled().build(depth)?;
        let eventfd = crate::host::eventfd()?;
        let submitter = ring.submitter();
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(squeue::Flags::IO_DRAIN.bits()),
        ])?;
        submitter.register_enable_rings()?;
        let depth = depth as usize;
        Ok(Uring { ring, eventfd, slots: (0..depth).map(|_| None).collect(), free: (0..depth).rev().collect() })
    }

    /// Readable when completions wait.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Reads into (or, `write`, writes from) `iovecs` at `offset` of `fd`.
    ///
    /// # Safety
    /// The iovecs must stay valid, and untouched by Rust references, until the request
    /// completes (`completions` or `drain` returns it).
    pub unsafe fn read_write(
        &mut self,
        fd: RawFd,
        write: bool,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        token: T,
    ) -> Result<(), T> {
        let expected = iovecs.iter().map(|v| v.iov_len).sum();
        let (pointer, count) = (iovecs.as_ptr(), iovecs.len() as u32);
        let entry = if write {
            opcode::Writev::new(types::Fd(fd), pointer, count).offset(offset).build()
        } else {
            opcode::Readv::new(types::Fd(fd), pointer, count).offset(offset).build()
        };
        self.push(entry, InFlight { token, expected, _iovecs: iovecs })
    }

    /// Syncs `fd`'s data once every request submitted before it has completed.
    pub fn sync(&mut self, fd: RawFd, token: T) -> Result<(), T> {
        let entry =
            opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build().flags(squeue::Flags::IO_DRAIN);
        // SAFETY: a sync reads no caller memory.
        unsafe { self.push(entry, InFlight { token, expected: 0, _iovecs: Vec::new() }) }
    }

    /// # Safety
    /// As `read_write`: what `entry` points at outlives the request (it is kept in `request`).
    unsafe fn push(&mut self, entry: squeue::Entry, request: InFlight<T>) -> Result<(), T> {
        let Some(slot) = self.free.pop() else { return Err(request.token) };
        let entry = entry.user_data(slot as u64);
        // SAFETY: the caller keeps the buffers valid; the slot keeps the iovec array alive.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err(request.token);
        }
        self.slots[slot] = Some(request);
        if let Err(e) = self.ring.submit() {
            tracing::warn!("io_uring submit: {e}"); // the entry stays queued for the next submit
        }
        Ok(())
    }

    /// The requests completed so far.
    pub fn completions(&mut self) -> Vec<Done<T>> {
        let _ = self.eventfd.read();
        let finished: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut done = Vec::with_capacity(finished.len());
        for (slot, result) in finished {
            let Some(request) = self.slots.get_mut(slot as usize).and_then(Option::take) else { continue };
            self.free.push(slot as usize);
            // A short read or write of a raw image inside its size is an error, as in the
            // synchronous engine's read_exact_at / write_all_at.
            let ok = result >= 0 && result as usize == request.expected;
            done.push(Done { token: request.token, ok });
        }
        done
    }

    /// Waits for every request in flight and returns them.
    pub fn drain(&mut self) -> Vec<Done<T>> {
        let mut done = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("io_uring wait: {e}");
                    break;
                }
            }
            done.extend(self.completions());
        }
        done
    }
}

impl<T> Drop for Uring<T> {
    fn drop(&mut self) {
        // The kernel must be done with guest memory before the device lets the guest reuse it.
        while self.slots.iter().any(Option::is_some) {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let finished: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for slot in finished {
                if let Some(entry) = self.slots.get_mut(slot as usize) {
                    *entry = None;
                }
            }
        }
    }
}
