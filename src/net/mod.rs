//! Network backends behind virtio-net: user-mode networking through libslirp (no root needed)
//! and tap devices; and the `-n` option that chooses between them.

pub mod egress;
pub mod slirp;
pub mod tap;

use std::io;
use std::os::fd::AsRawFd;

// The virtio-net frame format the backends share with the device.
/// struct virtio_net_hdr_v1: with VERSION_1 it always includes num_buffers.
pub const HEADER_LEN: usize = 12;
/// A frame's largest size: a 64 KiB segmentation-offload packet plus link-layer headers.
pub const MAX_FRAME: usize = 65536 + 256;
/// The offloads a driver may accept, as `NetBackend::set_offloads` receives them.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;

/// Where the guest's Ethernet frames go.
pub trait NetBackend: Send + AsRawFd {
    /// Whether frames to and from the backend start with a struct virtio_net_hdr_v1 (a tap with
    /// IFF_VNET_HDR), which carries checksum and segmentation offloads; otherwise frames are
    /// bare and complete.
    fn has_vnet_header(&self) -> bool {
        false
    }
    /// Tells the backend the virtio-net features the guest's driver accepted: which offloads
    /// it can take on received frames.
    fn set_offloads(&mut self, _guest_features: u64) -> io::Result<()> {
        Ok(())
    }
    /// With several queue pairs: whether the guest serves this backend's pair.
    fn set_active(&mut self, _active: bool) -> io::Result<()> {
        Ok(())
    }
    /// Sends one frame, waiting a bounded time for room.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Copies the next frame into `buf` and returns its length; `None` when none is ready.
    /// A frame larger than `buf` is dropped.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}
