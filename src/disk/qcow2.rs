//! qcow2 images (v2 and v3, backing chains, compressed clusters) and throw-away overlays, through
//! `imago`. lkvm opens the files itself: each is checked for encryption (which imago would
//! otherwise serve as ciphertext) and locked as QEMU locks images, so another lkvm or QEMU
//! writing it is refused; backing files are opened read-only and data files are refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, RwLock};

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, StorageOpenOptions};

use super::DiskBackend;
use crate::config::DiskFormat;

type ImagoFile = imago::file::File;
type Image = FormatAccess<ImagoFile>;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header offset of `crypt_method` (big-endian u32; 0: not encrypted).
const CRYPT_METHOD_OFFSET: u64 = 32;

/// QEMU's image locks (block/file-posix.c): shared OFD locks on byte 100 + permission for the
/// permissions held and 200 + permission for those not shared with others.
const LOCK_CONSISTENT_READ: i64 = 100;
const LOCK_WRITE: i64 = 101;
const LOCK_REFUSE_WRITERS: i64 = 201;

pub fn has_magic(file: &File) -> bool {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0).is_ok() && &magic == MAGIC
}

/// A qcow2 image, or a raw or qcow2 image under a temporary overlay.
pub struct ImagoDisk {
    /// Discards need exclusive access; reads and writes share it.
    image: RwLock<Image>,
}

impl ImagoDisk {
    /// Opens the qcow2 image at `path` and its backing chain (`backing` replaces the one the
    /// image names). Errors are one line, for the user.
    pub fn open(path: &Path, writable: bool, direct: bool, backing: Option<&Path>) -> Result<ImagoDisk, String> {
        let image = open_qcow2(path, writable, direct, backing, 0)?;
        Ok(ImagoDisk { image: RwLock::new(image) })
    }

    /// The image at `path` (never written: it is locked as a reader) under a new qcow2
    /// overlay in the host's temporary directory, deleted as soon as it is made.
    pub fn overlay(path: &Path, format: DiskFormat, direct: bool, backing: Option<&Path>) -> Result<ImagoDisk, String> {
        let base = Arc::new(match format {
            DiskFormat::Qcow2 => open_qcow2(path, false, direct, backing, 0)?,
            DiskFormat::Raw => open_raw(path, direct)?,
        });
        let dir = std::env::temp_dir();
        let overlay = tempfile_in(&dir).map_err(|e| format!("a temporary overlay in {}: {e}", dir.display()))?;
        let storage =
            ImagoFile::from_open_file(overlay, StorageOpenOptions::new().write(true)).map_err(|e| e.to_string())?;
        let size = base.size();
        let image = Qcow2::<ImagoFile, Arc<Image>>::create_builder(storage)
            .size(size)
            .create_open(imago::DenyImplicitOpenGate::default(), |file| {
                Ok(Qcow2::<ImagoFile, Arc<Image>>::builder(file).backing(Some(base)))
            })
            .map_err(|e| format!("a temporary overlay: {e}"))?;
        Ok(ImagoDisk { image: RwLock::new(FormatAccess::new(image)) })
    }

    pub fn size(&self) -> u64 {
        self.image.read().unwrap().size()
    }
}

impl DiskBackend for ImagoDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read().unwrap().read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image.read().unwrap().write(buf, offset)
    }

    /// Metadata cached by imago first, then the file's fsync.
    fn flush(&self) -> io::Result<()> {
        let image = self.image.read().unwrap();
        image.flush()?;
        image.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.image.write().unwrap().discard_to_any(offset, len) {
            // qcow2 v2 has no way to record it: a discard may do nothing.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.image.read().unwrap().write_zeroes(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => super::write_zero_buffers(self, offset, len),
            other => other,
        }
    }
}

/// Opens, checks and locks one file of an image chain.
fn open_file(path: &Path, writable: bool, direct: bool) -> io::Result<ImagoFile> {
    open_checked(path, writable, direct).map(|(file, _)| file)
}

/// `open_file`, also saying whether the file has qcow2's magic.
fn open_checked(path: &Path, writable: bool, direct: bool) -> io::Result<(ImagoFile, bool)> {
    let in_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut options = OpenOptions::new();
    options.read(true).write(writable);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path).map_err(in_path)?;
    let qcow2 = has_magic(&file);
    if qcow2 {
        let mut method = [0u8; 4];
        file.read_exact_at(&mut method, CRYPT_METHOD_OFFSET).map_err(in_path)?;
        if method != [0; 4] {
            return Err(in_path(io::Error::new(
                io::ErrorKind::Unsupported,
                "encrypted qcow2 images are not supported",
            )));
        }
    }
    lock(&file, writable).map_err(in_path)?;
    let options = StorageOpenOptions::new().filename(path).write(writable).direct(direct);
    Ok((ImagoFile::from_open_file(file, options)?, qcow2))
}

/// Backing chains deeper than this are refused: a chain that names itself would never end.
const MAX_CHAIN: usize = 16;

/// Opens one qcow2 image and, read-only, the backing chain its header names (or `backing`).
fn open_qcow2(
    path: &Path,
    writable: bool,
    direct: bool,
    backing: Option<&Path>,
    depth: usize,
) -> Result<Image, String> {
    let storage = open_file(path, writable, direct).map_err(|e| explain(&e))?;
    let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, writable).map_err(|e| explain(&e))?;
    if qcow2.requires_external_data_file() {
        return Err(format!("{}: qcow2 external data files are not supported", path.display()));
    }
    qcow2.set_data_file(None);
    let backing = match backing {
        Some(named) => Some(open_probed(named, direct, depth + 1)?),
        None => open_implicit_backing(&qcow2, path, direct, depth + 1)?,
    };
    qcow2.set_backing(backing);
    Ok(FormatAccess::new(qcow2))
}

/// The backing file a header names, in the format the header records. That format is never
/// probed: a raw backing file that some guest once wrote could claim to be qcow2 and name any
/// host file as its own backing file.
fn open_implicit_backing(
    qcow2: &Qcow2<ImagoFile>,
    path: &Path,
    direct: bool,
    depth: usize,
) -> Result<Option<Image>, String> {
    let Some(name) = qcow2.implicit_backing_file() else { return Ok(None) };
    if depth > MAX_CHAIN {
        return Err(format!(
            "{}: a backing chain of more than {MAX_CHAIN} images (does it name itself?)",
            path.display()
        ));
    }
    // Relative names are resolved beside the image, as QEMU resolves them.
    let file = path.parent().unwrap_or(Path::new(".")).join(name);
    match qcow2.implicit_backing_format().map(String::as_str) {
        Some("qcow2") => open_qcow2(&file, false, direct, None, depth).map(Some),
        Some("raw") | Some("file") => open_raw(&file, direct).map(Some),
        Some(other) => {
            Err(format!("{}: backing file {name} is a {other} image, which lkvm does not serve", path.display()))
        }
        None => {
            let raw = open_raw(&file, direct)?;
            let mut head = [0u8; 4];
            if raw.read(&mut head[..], 0).is_ok() && &head == MAGIC {
                return Err(format!(
                    "{}: its header records no format for backing file {name}, which looks like qcow2; name it with `qemu-img rebase -u -F qcow2 -b {name} {}` (lkvm does not probe backing files)",
                    path.display(),
                    path.display()
                ));
            }
            Ok(Some(raw))
        }
    }
}

/// A file the user named (`backing=`), read-only, in the format its first bytes give.
fn open_probed(path: &Path, direct: bool, depth: usize) -> Result<Image, String> {
    let (storage, qcow2) = open_checked(path, false, direct).map_err(|e| e.to_string())?;
    drop(storage);
    if qcow2 {
        open_qcow2(path, false, direct, None, depth)
    } else {
        open_raw(path, direct)
    }
}

fn open_raw(path: &Path, direct: bool) -> Result<Image, String> {
    let storage = open_file(path, false, direct).map_err(|e| explain(&e))?;
    let raw = Raw::builder(storage).write(false).open(DenyImplicitOpenGate::default()).map_err(|e| explain(&e))?;
    Ok(FormatAccess::new(raw))
}

/// imago's errors carry their context; a missing backing file is the common case to name.
fn explain(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("{e} (a backing file is missing? `,backing=PATH` names another)"),
        io::ErrorKind::InvalidData => format!("not a usable qcow2 image: {e}"),
        _ => e.to_string(),
    }
}

/// Takes QEMU's locks: a reader refuses writers, a writer refuses other writers and readers
/// that refuse writers. Released when the file is closed.
fn lock(file: &File, writable: bool) -> io::Result<()> {
    let conflicts: &[i64] = if writable { &[LOCK_WRITE, LOCK_REFUSE_WRITERS] } else { &[LOCK_WRITE] };
    for &byte in conflicts {
        if ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)? != libc::F_UNLCK as i16 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in use: another process (an lkvm or QEMU) has it open for writing, or refuses writers",
            ));
        }
    }
    let held: &[i64] = if writable {
        &[LOCK_CONSISTENT_READ, LOCK_WRITE, LOCK_REFUSE_WRITERS]
    } else {
        &[LOCK_CONSISTENT_READ, LOCK_REFUSE_WRITERS]
    };
    for &byte in held {
        ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte)?;
    }
    Ok(())
}

/// One byte's open-file-description lock; returns the lock type F_OFD_GETLK reports.
fn ofd_lock(file: &File, command: i32, kind: i32, byte: i64) -> io::Result<i16> {
    // SAFETY: flock is plain data; fcntl reads it, and for GETLK writes it, and nothing else.
    unsafe {
        let mut request: libc::flock = std::mem::zeroed();
        request.l_type = kind as i16;
        request.l_whence = libc::SEEK_SET as i16;
        request.l_start = byte;
        request.l_len = 1;
        if libc::fcntl(file.as_raw_fd(), command, &mut request) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(request.l_type)
    }
}

/// A file in `dir` that no path names (O_TMPFILE, else created and unlinked at once).
fn tempfile_in(dir: &Path) -> io::Result<File> {
    let unnamed = OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir);
    match unnamed {
        Ok(file) => Ok(file),
        Err(_) => {
            let path = dir.join(format!("lkvm-overlay-{}-{:?}", std::process::id(), std::thread::current().id()));
            let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(file)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskSpec;
    use crate::disk::DiskImage;
    use std::path::PathBuf;
    use std::process::Command;

    /// One test at a time: a qemu-img that another test forks holds, until it execs, copies of
    /// this test's descriptors and with them its image locks.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn qemu_img(args: &[&str]) -> String {
        let out = Command::new("qemu-img").args(args).output().expect("qemu-img (qemu-utils) is installed");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "qemu-img {args:?}: {text}");
        text
    }

    /// A qcow2 image at `image` over `backing` in `format` (qemu-img create -b -F).
    fn create_on(backing: &str, format: &str, image: &str, size: Option<&str>) {
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", format, image];
        args.extend(size);
        qemu_img(&args);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lkvm-qcow2-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn open(path: &Path) -> Result<DiskImage, String> {
        DiskImage::open(&DiskSpec::new(path)).map_err(|e| e.to_string())
    }

    fn refusal(path: &Path) -> String {
        open(path).err().expect("refused")
    }

    fn read(disk: &DiskImage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn a_chain_reads_its_backing_and_writes_only_the_top_image_as_qemu_reads_it() {
        let _serial = serial();
        let dir = scratch("chain");
        let base = dir.join("base.raw");
        std::fs::write(&base, pattern(4 << 20, 1)).unwrap();
        // raw <- mid.qcow2 (a relative backing name, resolved beside the image) <- top.qcow2
        create_on("base.raw", "raw", dir.join("mid.qcow2").to_str().unwrap(), None);
        create_on("mid.qcow2", "qcow2", dir.join("top.qcow2").to_str().unwrap(), None);
        {
            let mid = open(&dir.join("mid.qcow2")).unwrap();
            mid.write_at(&pattern(65536, 2), 1 << 20).unwrap();
            mid.flush().unwrap();
        }
        let top = open(&dir.join("top.qcow2")).unwrap();
        assert_eq!(top.size(), 4 << 20);
        assert_eq!(read(&top, 0, 65536), pattern(4 << 20, 1)[..65536], "from the raw base");
        assert_eq!(read(&top, 1 << 20, 65536), pattern(65536, 2), "from the middle image");
        top.write_at(&pattern(8192, 3), 4096).unwrap();
        top.write_zeroes(2 << 20, 65536).unwrap();
        top.flush().unwrap();
        drop(top);

        let mut expected = pattern(4 << 20, 1);
        expected[1 << 20..(1 << 20) + 65536].copy_from_slice(&pattern(65536, 2));
        expected[4096..4096 + 8192].copy_from_slice(&pattern(8192, 3));
        expected[2 << 20..(2 << 20) + 65536].fill(0);
        let want = dir.join("expected.raw");
        std::fs::write(&want, &expected).unwrap();
        qemu_img(&["check", "-q", dir.join("top.qcow2").to_str().unwrap()]);
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            dir.join("top.qcow2").to_str().unwrap(),
            want.to_str().unwrap(),
        ]);
        assert_eq!(std::fs::read(&base).unwrap(), pattern(4 << 20, 1), "the backing file is unchanged");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_backing_chain_goes_only_where_headers_name_it_never_where_a_probe_would() {
        let _serial = serial();
        let dir = scratch("planted");
        let secret = dir.join("secret");
        std::fs::write(&secret, b"the host's secret").unwrap();
        // A raw image a guest once wrote: a qcow2 header naming the secret as its backing file.
        let planted = dir.join("planted.raw");
        create_on(secret.to_str().unwrap(), "raw", planted.to_str().unwrap(), Some("1M"));
        let header = std::fs::read(&planted).unwrap();
        let top = dir.join("top.qcow2");
        create_on("planted.raw", "raw", top.to_str().unwrap(), Some("1M"));
        let disk = open(&top).unwrap();
        assert_eq!(read(&disk, 0, 64), header[..64], "the backing file is served as the raw image it was named as");
        drop(disk);

        // Without a recorded backing format, a backing file with qcow2's magic is refused, not probed.
        // (qemu-img no longer writes such headers: the format's header extension is renamed away.)
        let mut header = std::fs::read(&top).unwrap();
        let at = header.windows(4).position(|w| w == 0xe279_2acau32.to_be_bytes()).expect("a backing format extension");
        header[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        std::fs::write(&top, header).unwrap();
        let refused = refusal(&top);
        assert!(refused.contains("records no format") && refused.contains("qemu-img rebase"), "{refused}");

        let looped = dir.join("loop.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", looped.to_str().unwrap(), "1M"]);
        qemu_img(&["rebase", "-q", "-u", "-b", "loop.qcow2", "-F", "qcow2", looped.to_str().unwrap()]);
        // Read-only, so the locks that stop a writer from being its own backing file allow it.
        let looped =
            DiskImage::open(&DiskSpec { read_only: true, ..DiskSpec::new(&looped) }).err().unwrap().to_string();
        assert!(looped.contains("name itself"), "{looped}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn compressed_clusters_read_and_discard_deallocates() {
        let _serial = serial();
        let dir = scratch("compressed");
        let raw = dir.join("data.raw");
        let mut data = pattern(2 << 20, 4);
        data[..65536].fill(7); // compresses well
        std::fs::write(&raw, &data).unwrap();
        let packed = dir.join("packed.qcow2");
        qemu_img(&["convert", "-q", "-c", "-O", "qcow2", raw.to_str().unwrap(), packed.to_str().unwrap()]);
        let disk = open(&packed).unwrap();
        assert_eq!(read(&disk, 0, 2 << 20), data);
        // Overwriting a compressed cluster moves it; discarding frees what was written.
        disk.write_at(&pattern(65536, 5), 0).unwrap();
        assert_eq!(read(&disk, 0, 65536), pattern(65536, 5));
        disk.punch_hole(0, 1 << 20).unwrap();
        disk.flush().unwrap();
        assert!(read(&disk, 0, 1 << 20).iter().all(|&b| b == 0), "a discarded range reads zeros");
        drop(disk);
        qemu_img(&["check", "-q", packed.to_str().unwrap()]);
        let map = qemu_img(&["map", "--output=json", packed.to_str().unwrap()]);
        let first = map.lines().find(|l| l.contains("\"start\": 0,")).unwrap_or("");
        assert!(first.contains("\"data\": false"), "the first MiB is no longer allocated: {map}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_snapshot_overlay_takes_the_writes_and_the_image_stays_as_it_was() {
        let _serial = serial();
        let dir = scratch("overlay");
        let raw = dir.join("disk.raw");
        std::fs::write(&raw, pattern(1 << 20, 6)).unwrap();
        let qcow2 = dir.join("disk.qcow2");
        qemu_img(&["convert", "-q", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()]);
        let before = std::fs::read(&qcow2).unwrap();
        for image in [&raw, &qcow2] {
            let disk = DiskImage::open(&DiskSpec { snapshot: true, ..DiskSpec::new(image) }).unwrap();
            disk.write_at(&pattern(4096, 9), 8192).unwrap();
            disk.flush().unwrap();
            assert_eq!(read(&disk, 8192, 4096), pattern(4096, 9));
            assert_eq!(read(&disk, 0, 4096), pattern(1 << 20, 6)[..4096]);
            // The image is held as a reader: a writer is refused meanwhile.
            assert!(open(image).is_err() || image == &raw, "{}", image.display());
        }
        assert_eq!(std::fs::read(&raw).unwrap(), pattern(1 << 20, 6));
        assert_eq!(std::fs::read(&qcow2).unwrap(), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn images_lkvm_cannot_serve_safely_are_refused_with_a_reason() {
        let _serial = serial();
        let dir = scratch("refused");
        let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
        // crypt_method 2 (LUKS) in the header; qemu-img's own LUKS creation times its key
        // derivation and fails on a busy machine.
        qemu_img(&["create", "-q", "-f", "qcow2", &path("luks.qcow2"), "1M"]);
        let luks = File::options().write(true).open(dir.join("luks.qcow2")).unwrap();
        luks.write_all_at(&2u32.to_be_bytes(), CRYPT_METHOD_OFFSET).unwrap();
        drop(luks);
        assert!(refusal(&dir.join("luks.qcow2")).contains("encrypted qcow2 images are not supported"));

        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", path("data.raw")),
            &path("ext.qcow2"),
            "1M",
        ]);
        assert!(refusal(&dir.join("ext.qcow2")).contains("external data files are not supported"));

        std::fs::write(dir.join("gone.raw"), vec![0u8; 1 << 20]).unwrap();
        create_on("gone.raw", "raw", &path("orphan.qcow2"), None);
        std::fs::remove_file(dir.join("gone.raw")).unwrap();
        let missing = refusal(&dir.join("orphan.qcow2"));
        assert!(missing.contains("gone.raw") && missing.contains("backing=PATH"), "{missing}");
        std::fs::write(dir.join("other.raw"), vec![3u8; 1 << 20]).unwrap();
        let rebased = DiskImage::open(&DiskSpec {
            backing: Some(dir.join("other.raw")),
            ..DiskSpec::new(dir.join("orphan.qcow2"))
        });
        assert_eq!(read(&rebased.unwrap(), 0, 16), [3u8; 16], "backing= names another file");

        qemu_img(&["create", "-q", "-f", "qcow2", &path("busy.qcow2"), "1M"]);
        let first = open(&dir.join("busy.qcow2")).unwrap();
        assert!(refusal(&dir.join("busy.qcow2")).contains("in use"), "a second writer");
        assert!(
            DiskImage::open(&DiskSpec { read_only: true, ..DiskSpec::new(dir.join("busy.qcow2")) }).is_err(),
            "a reader"
        );
        drop(first);
        assert!(open(&dir.join("busy.qcow2")).is_ok(), "free again once closed");

        let mut header = std::fs::read(dir.join("busy.qcow2")).unwrap();
        header[4..8].copy_from_slice(&9u32.to_be_bytes()); // version 9
        std::fs::write(dir.join("bad.qcow2"), &header).unwrap();
        assert!(refusal(&dir.join("bad.qcow2")).contains("not a usable qcow2 image"));

        qemu_img(&["create", "-q", "-f", "vmdk", &path("disk.vmdk"), "1M"]);
        assert!(refusal(&dir.join("disk.vmdk")).contains("VMDK image"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
