//! Disk images behind virtio-blk: raw files and host block devices, qcow2 images (`qcow2.rs`),
//! and throw-away overlays; each is a `DiskBackend`, positioned I/O only.

pub mod qcow2;
pub mod uring;

use crate::config::{DiskFormat, DiskSpec, IoEngine};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
#[error("disk {path}: {reason}")]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: String,
}

/// What an image format does for virtio-blk.
pub trait DiskBackend: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range where the format can; reads of it return zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The file reads and writes may go to directly (io_uring), if the format is raw.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Writes zeros over a range, for formats with no cheaper way.
fn write_zero_buffers(disk: &dyn DiskBackend, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        disk.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

pub struct DiskImage {
    backend: Box<dyn DiskBackend>,
    size: u64,
    read_only: bool,
    io_engine: IoEngine,
    direct: bool,
    /// A writable image probed as raw: its head may not be written to look like another format
    /// (a guest could otherwise plant a qcow2 header naming any host file as its backing file).
    guard_head: bool,
    /// The format probing chose, when the user named none.
    probed: Option<DiskFormat>,
}

/// Images of formats lkvm does not serve, by their magic: named rather than served as raw.
const OTHER_FORMATS: &[(&[u8], &str)] =
    &[(b"QED\0", "QED"), (b"KDMV", "VMDK"), (b"vhdxfile", "VHDX"), (b"# Disk DescriptorFile", "VMDK")];

/// How many leading bytes probing reads: enough for every magic above.
const PROBE_LEN: usize = 32;

/// The format an image's first bytes claim, if any but raw.
fn probed_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(qcow2::MAGIC) {
        return Some("qcow2");
    }
    OTHER_FORMATS.iter().find(|(magic, _)| head.starts_with(magic)).map(|(_, name)| *name)
}

impl DiskImage {
    pub fn open(spec: &DiskSpec) -> Result<DiskImage, OpenError> {
        let fail = |reason: String| OpenError { path: spec.path.clone(), reason };
        let meta = std::fs::metadata(&spec.path).map_err(|e| fail(e.to_string()))?;
        if meta.is_dir() {
            return Err(fail("is a directory, not a disk image".into()));
        }
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(fail("is neither a regular file nor a block device".into()));
        }
        let format = match spec.format {
            Some(format) => format,
            None => {
                let probe = File::open(&spec.path).map_err(|e| fail(e.to_string()))?;
                let mut head = [0u8; PROBE_LEN];
                let n = probe.read_at(&mut head, 0).map_err(|e| fail(e.to_string()))?;
                match probed_format(&head[..n]) {
                    None => DiskFormat::Raw,
                    Some("qcow2") => DiskFormat::Qcow2,
                    Some(name) => {
                        return Err(fail(format!(
                            "a {name} image: lkvm takes raw and qcow2 images (qemu-img convert -O qcow2)"
                        )))
                    }
                }
            }
        };
        if spec.backing.is_some() && format != DiskFormat::Qcow2 {
            return Err(fail("backing= is for qcow2 images; this one is raw".into()));
        }
        let backing = spec.backing.as_deref();
        let (backend, size): (Box<dyn DiskBackend>, u64) = if spec.snapshot {
            let overlay = qcow2::ImagoDisk::overlay(&spec.path, format, spec.direct, backing).map_err(fail)?;
            let size = overlay.size();
            (Box::new(overlay), size)
        } else if format == DiskFormat::Qcow2 {
            let image = qcow2::ImagoDisk::open(&spec.path, !spec.read_only, spec.direct, backing).map_err(fail)?;
            let size = image.size();
            (Box::new(image), size)
        } else {
            let raw = RawFile::open(spec).map_err(fail)?;
            let size = raw.size;
            (Box::new(raw), size)
        };
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk {}: size {size} is not a multiple of 512; the tail is not visible",
                spec.path.display()
            );
        }
        if spec.io_engine == IoEngine::Async && backend.raw_fd().is_none() {
            tracing::warn!(
                "disk {}: the async engine serves raw images; this one is served synchronously",
                spec.path.display()
            );
        }
        let guard_head = spec.format.is_none() && format == DiskFormat::Raw && !spec.read_only && !spec.snapshot;
        Ok(DiskImage {
            backend,
            size,
            read_only: spec.read_only,
            io_engine: spec.io_engine,
            direct: spec.direct,
            guard_head,
            probed: spec.format.is_none().then_some(format),
        })
    }

    /// The warning for an image whose format was probed, to give once it is in use (a VM that
    /// fails to start says only why).
    pub fn probe_warning(&self, path: &std::path::Path) -> Option<String> {
        let name = match self.probed? {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let guard =
            if self.guard_head { "; the guest may not write its first sector to look like another format" } else { "" };
        Some(format!(
            "disk {}: no format named, probed as {name}{guard}; add ,format={name} to name it",
            path.display()
        ))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Opened O_DIRECT: buffers handed to the kernel must be sector-aligned.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The raw file to submit reads and writes to when the async engine is asked for.
    pub fn async_fd(&self) -> Option<RawFd> {
        (self.io_engine == IoEngine::Async).then(|| self.backend.raw_fd()).flatten()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.backend.read_at(buf, offset)
    }

    /// Whether a write at `offset` must go through `write_at`'s check of the image's head
    /// (the async engine leaves such writes to the synchronous path).
    pub fn checks_write_at(&self, offset: u64) -> bool {
        self.guard_head && offset < PROBE_LEN as u64
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.checks_write_at(offset) {
            let mut head = [0u8; PROBE_LEN];
            let _ = self.backend.read_at(&mut head, 0);
            let start = offset as usize;
            let n = buf.len().min(PROBE_LEN - start);
            head[start..start + n].copy_from_slice(&buf[..n]);
            if let Some(name) = probed_format(&head) {
                crate::guest_warn!(
                    "the guest wrote a {name} header to a disk probed as raw: refused (name the format with ,format=raw to allow it)"
                );
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a write that changes the probed format"));
            }
        }
        self.backend.write_at(buf, offset)
    }

    pub fn flush(&self) -> io::Result<()> {
        self.backend.flush()
    }

    /// Deallocates a range; reads of it return zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.backend.discard(offset, len)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.backend.write_zeroes(offset, len)
    }
}

/// A raw image file or host block device.
struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    fn open(spec: &DiskSpec) -> Result<RawFile, String> {
        let mut options = OpenOptions::new();
        options.read(true).write(!spec.read_only);
        if spec.direct {
            // The block device's bounce buffer is page-aligned, as O_DIRECT needs.
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(&spec.path).map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) if !spec.read_only => {
                format!("{e}; add ',ro' to use it read-only")
            }
            _ => e.to_string(),
        })?;
        let size = file_size(&file).map_err(|e| e.to_string())?;
        Ok(RawFile { file, size })
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only acts on our own descriptor.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl DiskBackend for RawFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    /// The file system's zero-range where it has one, else zeros written.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len).is_ok() {
            return Ok(());
        }
        write_zero_buffers(self, offset, len)
    }
}

fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Works for block devices too, whose metadata length is 0.
    (&*file).seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disk_options() {
        assert_eq!(DiskSpec::parse("a.img").unwrap(), DiskSpec::new("a.img"));
        let spec = DiskSpec::parse("/x/b.img,ro,direct").unwrap();
        assert!(spec.read_only && spec.direct && !spec.snapshot);
        let spec = DiskSpec::parse("c.qcow2,snapshot,backing=/base.img").unwrap();
        assert!(spec.snapshot && spec.backing.as_deref() == Some(std::path::Path::new("/base.img")));
        assert!(DiskSpec::parse("a.img,rw2").unwrap_err().contains("unknown disk option 'rw2'"));
        assert!(DiskSpec::parse("a.img,backing=").is_err());
        assert_eq!(DiskSpec::parse("a.img").unwrap().io_engine, IoEngine::Async);
        assert_eq!(DiskSpec::parse("a.img,sync").unwrap().io_engine, IoEngine::Sync);
        assert!(DiskSpec::parse(",ro").is_err());
        assert_eq!(DiskSpec::parse("a.img,format=qcow2").unwrap().format, Some(DiskFormat::Qcow2));
        assert!(DiskSpec::parse("a.img,format=vmdk").unwrap_err().contains("unknown disk format 'vmdk'"));
    }

    #[test]
    fn a_probed_raw_image_keeps_probing_as_raw_unless_its_format_is_named() {
        let dir = std::env::temp_dir().join(format!("lkvm-disk-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let mut planted = vec![0u8; 512];
        planted[..4].copy_from_slice(qcow2::MAGIC);
        let probed = DiskImage::open(&DiskSpec::new(&path)).unwrap();
        assert!(probed.checks_write_at(0) && !probed.checks_write_at(512));
        let refused = probed.write_at(&planted, 0).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
        // Its last bytes alone complete no magic either: the check merges them with the head.
        probed.write_at(&planted[..2], 0).unwrap();
        assert!(probed.write_at(&planted[2..4], 2).is_err());
        probed.write_at(b"plain data", 0).unwrap();
        probed.write_at(&planted, 4096).unwrap();
        drop(probed);
        assert!(!std::fs::read(&path).unwrap().starts_with(qcow2::MAGIC));

        let named = DiskImage::open(&DiskSpec { format: Some(DiskFormat::Raw), ..DiskSpec::new(&path) }).unwrap();
        assert!(!named.checks_write_at(0));
        named.write_at(&planted, 0).unwrap();
        let read_only =
            DiskImage::open(&DiskSpec { read_only: true, format: Some(DiskFormat::Raw), ..DiskSpec::new(&path) });
        let mut head = [0u8; 4];
        read_only.unwrap().read_at(&mut head, 0).unwrap();
        assert_eq!(&head, qcow2::MAGIC, "named raw: served as it is, header bytes and all");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_directories_and_missing_files() {
        let spec = DiskSpec::new;
        assert!(DiskImage::open(&spec("/tmp")).err().unwrap().reason.contains("directory"));
        assert!(DiskImage::open(&spec("/nonexistent.img")).err().unwrap().reason.contains("No such file"));
    }

    #[test]
    fn read_write_punch_and_zero() {
        let dir = std::env::temp_dir().join(format!("lkvm-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0xaa; 1 << 20]).unwrap();
        let disk = DiskImage::open(&DiskSpec::new(&path)).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        disk.write_at(b"hello", 4096).unwrap();
        let mut buf = [0u8; 5];
        disk.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
        disk.punch_hole(0, 8192).unwrap();
        disk.write_zeroes(8192, 4096).unwrap();
        let mut page = vec![1u8; 12288];
        disk.read_at(&mut page, 0).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        disk.read_at(&mut buf, 12288).unwrap();
        assert_eq!(buf, [0xaa; 5]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
