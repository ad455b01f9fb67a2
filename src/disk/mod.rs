//! Disk images behind virtio-blk: raw files and host block devices, positioned I/O only.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
#[error("disk {path}: {reason}")]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: String,
}

/// How the user asked for a disk (`-d PATH[,ro][,direct]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub direct: bool,
}

impl DiskSpec {
    pub fn parse(arg: &str) -> Result<DiskSpec, String> {
        let mut parts = arg.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("-d needs an image path")?;
        let mut spec = DiskSpec { path: PathBuf::from(path), read_only: false, direct: false };
        for option in parts {
            match option {
                "ro" => spec.read_only = true,
                "direct" => spec.direct = true,
                other => return Err(format!("-d {arg}: unknown disk option '{other}' (known: ro, direct)")),
            }
        }
        Ok(spec)
    }
}

pub struct DiskImage {
    file: File,
    size: u64,
    read_only: bool,
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
        let mut options = OpenOptions::new();
        options.read(true).write(!spec.read_only);
        if spec.direct {
            // The block device's bounce buffer is page-aligned, as O_DIRECT needs.
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(&spec.path).map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) if !spec.read_only => {
                fail(format!("{e}; add ',ro' to use it read-only"))
            }
            _ => fail(e.to_string()),
        })?;
        let size = file_size(&file).map_err(|e| fail(e.to_string()))?;
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk {}: size {size} is not a multiple of 512; the tail is not visible",
                spec.path.display()
            );
        }
        Ok(DiskImage { file, size, read_only: spec.read_only })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a range; reads of it return zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Zeroes a range, preferring the file system's zero-range, else writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
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
        assert_eq!(
            DiskSpec::parse("a.img").unwrap(),
            DiskSpec { path: "a.img".into(), read_only: false, direct: false }
        );
        let spec = DiskSpec::parse("/x/b.img,ro,direct").unwrap();
        assert!(spec.read_only && spec.direct);
        assert!(DiskSpec::parse("a.img,rw2").unwrap_err().contains("unknown disk option 'rw2'"));
        assert!(DiskSpec::parse(",ro").is_err());
    }

    #[test]
    fn refuses_directories_and_missing_files() {
        let spec = |p: &str| DiskSpec { path: p.into(), read_only: false, direct: false };
        assert!(DiskImage::open(&spec("/tmp")).err().unwrap().reason.contains("directory"));
        assert!(DiskImage::open(&spec("/nonexistent.img")).err().unwrap().reason.contains("No such file"));
    }

    #[test]
    fn read_write_punch_and_zero() {
        let dir = std::env::temp_dir().join(format!("lkvm-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0xaa; 1 << 20]).unwrap();
        let disk = DiskImage::open(&DiskSpec { path: path.clone(), read_only: false, direct: false }).unwrap();
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
