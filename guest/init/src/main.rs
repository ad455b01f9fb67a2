//! PID 1 of the test guest. Doing every check in this one process matters on hosts where guest
//! kernel code is emulated: each fork+exec costs seconds there.
//!
//! Kernel parameters it reads (from /proc/cmdline):
//! - `lkvm.shell`: run /bin/sh on the console instead of the checks, then reboot.
//! - `lkvm.read=DEV:LEN`: checksum (FNV-1a 64) of the first LEN bytes of DEV.
//! - `lkvm.write=DEV:LEN:SEED`: write LEN bytes of the test pattern for SEED to DEV and fsync.
//! - `lkvm.copy=SRC:DST:LEN`: copy the first LEN bytes of SRC over DST's and fsync.
//! - `lkvm.serial=NAME`: the virtio-blk serial of block device NAME.
//! - `lkvm.hwrng=LEN`: read LEN bytes from /dev/hwrng.
//! - `lkvm.ifaddr=IF`: the IPv4 address of interface IF.
//! - `lkvm.fetch=IP:PORT:PATH`: HTTP/1.0 GET; prints the body's length and checksum.
//! - `lkvm.send=IP:PORT:LEN:SEED`: TCP-connect and send LEN bytes of the test pattern.
//! - `lkvm.serve=PORT:LEN:SEED`: print `listening`, accept one TCP connection, send the pattern.
//! - `lkvm.udp=IP:PORT`: send a datagram and wait for its echo.
//! - `lkvm.ping=IP`: one ICMP echo request, wait for the reply.
//! - `lkvm.netbench=IP:SINKPORT:SOURCEPORT:ECHOPORT:MIB`: TCP throughput to a sink and from a
//!   source on the host (MIB MiB each way), and UDP echo round-trip time (median of 200).
//! - `lkvm.balloon=SECONDS:MIB`: touch 2*MIB MiB of memory and free it again (so the host
//!   backs it), print `balloon_ready`, wait up to SECONDS for MemTotal to shrink by MIB (the host
//!   inflating the balloon), print the new MemTotal, and stay up 8 s more for the host to look.
//! - `lkvm.timedread=DEV:LEN`: read DEV's first LEN bytes (O_DIRECT, 64 KiB requests); print
//!   LEN and the microseconds it took.
//! - `lkvm.blkbench=DEV:MIB`: O_DIRECT throughput of DEV (sequential 1 MiB and random 4 KiB
//!   reads and writes over its first MIB MiB; the data on DEV is overwritten).
//! - `lkvm.9p=TAG:ROTAG`: mount the 9p shares TAG (read-write, msize 512000) and ROTAG
//!   (read-only); print the msize in effect; in TAG
//!   checksum `hostfile`, write `guestfile` (100000 bytes, pattern seed 3), rename `torename` to
//!   `renamed`, delete `todelete`, make directory `newdir` and in it a symlink `link` to
//!   `renamed`; in ROTAG checksum `hostfile` and try
//!   to create a file.
//! - `lkvm.p9bench=TAG:FILES`: mount 9p share TAG; time reading its file `big` (1 MiB reads),
//!   then creating (100 bytes each), stat-ing and deleting FILES files in a new directory, then
//!   walking its directory `tree` as `git status` does (read every directory, lstat every entry).
//! - `lkvm.fsbench=TAG:FILES`: the same over virtio-fs share TAG.
//! - `lkvm.swap=DEV:LEN:SECONDS`: print `swap_ready` with DEV's size, then `LKVM-TICK n` lines
//!   (every 200 ms, so the host can see a pause) until DEV's size changes (the host swapped its
//!   image) or SECONDS pass; print the new size and the checksum of its first LEN bytes, read
//!   after dropping DEV's cached blocks.
//! - `lkvm.cad=SECONDS`: print the keyboard the kernel found and `cad_ready`, wait until the
//!   i8042 raises keyboard interrupts (the host's Ctrl+Alt+Del) and print their count; then
//!   reboot, as an init that handles Ctrl+Alt+Del does (this kernel has no VT to do it).
//! - `lkvm.snapwork=SECONDS`: print `snap_ready` with a random token, then `LKVM-WORK n token`
//!   every 200 ms until the console line `done` (or SECONDS); echo other lines as `echo`.
//! - `lkvm.channels=IF:N`: ask IF's driver to use N queue pairs (`ethtool -L IF combined N`);
//!   print the count in effect.
//! - `lkvm.netstats=IF`: IF's receive queue count and packet counts and byte counts so far
//!   (`rxq:rx_packets:rx_bytes:tx_packets:tx_bytes`; put it after the traffic checks), its
//!   negotiated virtio features and its MAC address.
//! - `lkvm.vsocklisten=PORT:COUNT:LEN`: listen on vsock PORT, print `vsock_listening`, serve
//!   COUNT connections at once: read each to its end, answer `LEN HASH\n` of what came, then LEN
//!   bytes of the pattern for seed 7, and close; print `vsockserved=OK/COUNT`.
//! - `lkvm.agent=PORT`: from now on, in the background, answer each connection on vsock PORT
//!   with every result so far (`key=value` lines) and close it: the results of a VMM whose
//!   console nobody reads (Kata's, daemonized), at the port Kata's agent listens on.
//! - `lkvm.mmds=ADDRESS`: read Firecracker's metadata service at ADDRESS as a V2 client: a read
//!   without a token (`mmds_no_token=STATUS`), a session token (`mmds_token=STATUS`), then with
//!   it `/latest/meta-data/` as text (`mmds_keys=` the keys, comma-separated) and
//!   `/latest/meta-data/ami-id` as JSON (`mmds_json=` the body).
//! - `lkvm.hold=SECONDS`: wait, keeping the VM (and the agent) up until the host ends it.
//! - `lkvm.vsockconnect=PORT:COUNT:LEN`: COUNT connections at once to the host (CID 2) PORT,
//!   each sending LEN bytes of the pattern for its index and expecting `LEN HASH\n` of it back;
//!   print `vsockconnect:PORT=OK/COUNT`, or the first error.
//! - `lkvm.vsockbench=PORT:MIB`: vsock throughput to a host sink on PORT and from a host
//!   source on PORT+1 (MIB MiB each), and the median time to connect to PORT+2 and see it close.
//! It prints `LKVM-RESULT key=value` lines describing what the guest sees, then `LKVM-DONE`,
//! and reboots (with `reboot=k` the VMM sees the i8042 reset and exits 0).

use std::ffi::CString;
use std::fs;
use std::io::Write;

/// lkvm's boot-marker port: lkvm logs the time since it started when the guest writes it.
const BOOT_MARKER_PORT: u16 = 0x440;
const BOOT_MARKER_VALUE: u8 = 123;

fn mount(source: &str, target: &str, fstype: &str) {
    mount_with(source, target, fstype, "");
}

fn mount_with(source: &str, target: &str, fstype: &str, data: &str) -> bool {
    let _ = fs::create_dir_all(target);
    let (s, t, f) = (CString::new(source).unwrap(), CString::new(target).unwrap(), CString::new(fstype).unwrap());
    let d = CString::new(data).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, d.as_ptr().cast()) };
    if rc != 0 {
        result("mount", &format!("{target}:{}", std::io::Error::last_os_error()));
    }
    rc == 0
}

fn boot_marker() {
    // SAFETY: ioperm grants this process the port; the out instruction then touches only it.
    unsafe {
        if libc::ioperm(u64::from(BOOT_MARKER_PORT), 1, 1) != 0 {
            result("boot_marker", "ioperm-failed");
            return;
        }
        std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") BOOT_MARKER_VALUE);
    }
}

/// Every result so far, for `lkvm.agent` to hand out where nobody reads the console.
static RESULTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn result(key: &str, value: &str) {
    RESULTS.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{key}={value}"));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LKVM-RESULT {key}={value}");
    let _ = out.flush();
}

fn meminfo(field: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1).map(str::to_string)
}

fn online_cpus() -> String {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.to_string()
}

fn run_shell() {
    let sh = CString::new("/bin/sh").unwrap();
    let argv = [sh.as_ptr(), std::ptr::null()];
    // SAFETY: fork in a single-threaded process; the child only calls execv/_exit.
    unsafe {
        match libc::fork() {
            0 => {
                libc::execv(sh.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            pid if pid > 0 => {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
            }
            _ => result("shell", "fork-failed"),
        }
    }
}

/// FNV-1a 64: the checksum the host-side tests compute too.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// A vsock stream: `connect` to CID:PORT, or `listen` on PORT.
fn vsock_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: a plain socket call; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is not owned elsewhere.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of that length.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) })?;
    Ok(fs::File::from(fd))
}

/// Reads `stream` to its end: (length, FNV-1a).
fn drain(stream: &mut fs::File) -> std::io::Result<(usize, u64)> {
    let (mut len, mut hash) = (0usize, 0xcbf2_9ce4_8422_2325u64);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = std::io::Read::read(stream, &mut buf)?;
        if n == 0 {
            return Ok((len, hash));
        }
        len += n;
        hash = buf[..n].iter().fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    }
}

fn shutdown_write(stream: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a descriptor we own.
    check(unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) })
}

fn vsock_listen(arg: &str) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let parts: Vec<usize> = arg.split(':').filter_map(|p| p.parse().ok()).collect();
    let [port, count, len] = parts[..] else { return result("vsockserved", "bad-arg") };
    let served = (|| -> std::io::Result<usize> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port as u32);
        let size = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_vm of that length.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), size) })?;
        // SAFETY: listen on a bound socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), count as i32) })?;
        result("vsock_listening", &port.to_string());
        let reply = std::sync::Arc::new(pattern(len, 7));
        let workers: Vec<_> = (0..count)
            .map(|_| {
                // SAFETY: accept on a listening socket we own; the new descriptor is owned below.
                let conn = unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
                let reply = reply.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    check(conn)?;
                    // SAFETY: conn is a fresh descriptor from accept4.
                    let mut stream = unsafe { fs::File::from_raw_fd(conn) };
                    let (got, hash) = drain(&mut stream)?;
                    stream.write_all(format!("{got} {hash:016x}\n").as_bytes())?;
                    stream.write_all(&reply)
                })
            })
            .collect();
        Ok(workers.into_iter().filter_map(|w| w.join().ok()).filter(Result::is_ok).count())
    })();
    match served {
        Ok(ok) => result("vsockserved", &format!("{ok}/{count}")),
        Err(e) => result("vsockserved", &format!("err:{e}")),
    }
}

fn vsock_connect_check(arg: &str) {
    let parts: Vec<usize> = arg.split(':').filter_map(|p| p.parse().ok()).collect();
    let [port, count, len] = parts[..] else { return result("vsockconnect", "bad-arg") };
    let workers: Vec<_> = (0..count)
        .map(|i| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut stream = vsock_connect(libc::VMADDR_CID_HOST, port as u32)?;
                let data = pattern(len, i as u64);
                stream.write_all(&data)?;
                shutdown_write(&stream)?;
                let mut answer = String::new();
                std::io::Read::read_to_string(&mut stream, &mut answer)?;
                let expected = format!("{len} {:016x}\n", fnv1a(&data));
                if answer != expected {
                    return Err(std::io::Error::other(format!("host answered {answer:?}, expected {expected:?}")));
                }
                Ok(())
            })
        })
        .collect();
    let outcomes: Vec<std::io::Result<()>> =
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(std::io::Error::other("panic")))).collect();
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    let value = match outcomes.into_iter().find_map(Result::err) {
        Some(e) if ok == 0 => format!("err:{e}"),
        _ => format!("{ok}/{count}"),
    };
    result(&format!("vsockconnect:{port}"), &value);
}

/// The test pattern for `seed`, as the host-side tests generate it.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(17) ^ (i >> 9)) as u8).collect()
}

fn read_check(arg: &str) {
    let Some((dev, len)) = arg.split_once(':') else { return result("read", "bad-arg") };
    let len: usize = len.parse().unwrap_or(0);
    let key = format!("read:{dev}");
    let mut buf = vec![0u8; len];
    match fs::File::open(dev).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)) {
        Ok(()) => result(&key, &format!("{:016x}", fnv1a(&buf))),
        Err(e) => result(&key, &format!("err:{e}")),
    }
}

fn write_check(arg: &str) {
    let parts: Vec<&str> = arg.split(':').collect();
    let [dev, len, seed] = parts[..] else { return result("write", "bad-arg") };
    let data = pattern(len.parse().unwrap_or(0), seed.parse().unwrap_or(0));
    let key = format!("write:{dev}");
    let outcome = fs::OpenOptions::new().write(true).open(dev).and_then(|mut f| {
        f.write_all(&data)?;
        f.sync_all()
    });
    match outcome {
        Ok(()) => result(&key, "ok"),
        Err(e) => result(&key, &format!("err:{e}")),
    }
}

fn copy_check(arg: &str) {
    let [src, dst, len] = arg.split(':').collect::<Vec<_>>()[..] else { return result("copy", "bad-arg") };
    let mut buf = vec![0u8; len.parse().unwrap_or(0)];
    let copied = fs::File::open(src).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)).and_then(|()| {
        let mut f = fs::OpenOptions::new().write(true).open(dst)?;
        f.write_all(&buf)?;
        f.sync_all()
    });
    result(&format!("copy:{dst}"), &outcome(copied));
}

fn outcome(r: std::io::Result<()>) -> String {
    r.map_or_else(|e| format!("err:{e}"), |()| "ok".into())
}

fn share_check(arg: &str) {
    let Some((tag, ro_tag)) = arg.split_once(':') else { return result("9p", "bad-arg") };
    // The largest msize Linux's virtio transport takes (125 pages).
    let options = "trans=virtio,version=9p2000.L,msize=512000";
    if mount_with(tag, "/mnt/rw", "9p", options) {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let line = mounts.lines().find(|l| l.contains("/mnt/rw")).unwrap_or("");
        let msize = line.split([',', ' ']).find_map(|o| o.strip_prefix("msize=")).unwrap_or("none");
        result("9p_msize", msize);
        let read = fs::read("/mnt/rw/hostfile").map(|b| format!("{:016x}", fnv1a(&b)));
        result("9p_read", &read.unwrap_or_else(|e| format!("err:{e}")));
        let write = fs::File::create("/mnt/rw/guestfile").and_then(|mut f| {
            f.write_all(&pattern(100000, 3))?;
            f.sync_all()
        });
        result("9p_write", &outcome(write));
        result("9p_rename", &outcome(fs::rename("/mnt/rw/torename", "/mnt/rw/renamed")));
        result("9p_unlink", &outcome(fs::remove_file("/mnt/rw/todelete")));
        result("9p_mkdir", &outcome(fs::create_dir("/mnt/rw/newdir")));
        result("9p_symlink", &outcome(std::os::unix::fs::symlink("renamed", "/mnt/rw/newdir/link")));
    }
    if mount_with(ro_tag, "/mnt/ro", "9p", options) {
        let read = fs::read("/mnt/ro/hostfile").map(|b| format!("{:016x}", fnv1a(&b)));
        result("9p_ro_read", &read.unwrap_or_else(|e| format!("err:{e}")));
        result("9p_ro_write", &outcome(fs::write("/mnt/ro/planted", b"x")));
    }
}

fn p9_bench(arg: &str) {
    share_bench("p9bench", "9p", "trans=virtio,version=9p2000.L", arg);
}

fn fs_bench(arg: &str) {
    share_bench("fsbench", "virtiofs", "", arg);
}

/// Reads every directory under `dir` and lstats every entry; returns how many entries.
fn walk(dir: &std::path::Path) -> std::io::Result<usize> {
    let mut entries = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        entries += 1;
        if meta.is_dir() {
            entries += walk(&path)?;
        }
    }
    Ok(entries)
}

/// The share benchmark over `fstype`; results are named `name:read`, `name:meta`, `name:walk`.
fn share_bench(name: &str, fstype: &str, options: &str, arg: &str) {
    let Some((tag, files)) = arg.split_once(':') else { return result(name, "bad-arg") };
    let files: usize = files.parse().unwrap_or(0);
    if !mount_with(tag, "/mnt/bench", fstype, options) {
        return;
    }
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let read = fs::File::open("/mnt/bench/big").and_then(|mut f| loop {
        match std::io::Read::read(&mut f, &mut buf)? {
            0 => return Ok(()),
            n => total += n,
        }
    });
    let secs = start.elapsed().as_secs_f64();
    match read {
        Ok(()) => result(&format!("{name}:read"), &format!("{:.2}MB/s,{total}B", total as f64 / secs / 1e6)),
        Err(e) => result(&format!("{name}:read"), &format!("err:{e}")),
    }
    let dir = "/mnt/bench/small";
    let start = std::time::Instant::now();
    let outcome = fs::create_dir(dir).and_then(|()| {
        for i in 0..files {
            fs::write(format!("{dir}/f{i}"), [7u8; 100])?;
        }
        for i in 0..files {
            fs::metadata(format!("{dir}/f{i}"))?;
        }
        for i in 0..files {
            fs::remove_file(format!("{dir}/f{i}"))?;
        }
        fs::remove_dir(dir)
    });
    let secs = start.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => result(&format!("{name}:meta"), &format!("{:.1}ops/s,{files}files", (3 * files) as f64 / secs)),
        Err(e) => result(&format!("{name}:meta"), &format!("err:{e}")),
    }
    let start = std::time::Instant::now();
    match walk(std::path::Path::new("/mnt/bench/tree")) {
        Ok(entries) => {
            let secs = start.elapsed().as_secs_f64();
            result(&format!("{name}:walk"), &format!("{:.1}entries/s,{entries}entries", entries as f64 / secs))
        }
        Err(e) => result(&format!("{name}:walk"), &format!("err:{e}")),
    }
}

fn hwrng_check(arg: &str) {
    let mut buf = vec![0u8; arg.parse().unwrap_or(0)];
    match fs::File::open("/dev/hwrng").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)) {
        Ok(()) => {
            let distinct = buf.iter().collect::<std::collections::HashSet<_>>().len();
            result("hwrng", &format!("{}:{distinct}", buf.len()));
        }
        Err(e) => result("hwrng", &format!("err:{e}")),
    }
}

/// A page-aligned buffer, as O_DIRECT requires.
fn aligned(len: usize) -> &'static mut [u8] {
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: non-zero size; the zeroed allocation is leaked for the life of this process.
    unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc_zeroed(layout), len) }
}

fn blk_bench(arg: &str) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let Some((dev, mib)) = arg.split_once(':') else { return result("blkbench", "bad-arg") };
    let span: u64 = mib.parse::<u64>().unwrap_or(16) << 20;
    let file = match fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev) {
        Ok(f) => f,
        Err(e) => return result("blkbench", &format!("err:{e}")),
    };
    let big = aligned(1 << 20);
    let small = aligned(4096);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random_offset = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % (span / 4096)) * 4096
    };
    let random_ops = 2000u64;
    let run = |name: &str, bytes: u64, op: &mut dyn FnMut() -> std::io::Result<()>| {
        let start = std::time::Instant::now();
        let outcome = op();
        let secs = start.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => result(&format!("blkbench:{name}"), &format!("{:.2}MB/s,{:.3}s", bytes as f64 / 1e6 / secs, secs)),
            Err(e) => result(&format!("blkbench:{name}"), &format!("err:{e}")),
        }
    };
    run("seq_write", span, &mut || (0..span >> 20).try_for_each(|i| file.write_all_at(big, i << 20)));
    run("seq_read", span, &mut || (0..span >> 20).try_for_each(|i| file.read_exact_at(big, i << 20)));
    run("rand_write_4k", random_ops * 4096, &mut || (0..random_ops).try_for_each(|_| file.write_all_at(small, random_offset())));
    run("rand_read_4k", random_ops * 4096, &mut || (0..random_ops).try_for_each(|_| file.read_exact_at(small, random_offset())));
}

/// Reads the first LEN bytes of DEV with O_DIRECT in 64 KiB requests; prints LEN and the
/// microseconds it took (a rate-limited disk's rate, as the guest sees it).
fn timed_read(arg: &str) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let Some((dev, len)) = arg.split_once(':') else { return result("timedread", "bad-arg") };
    let len: u64 = len.parse().unwrap_or(0);
    let chunk = aligned(64 << 10);
    let outcome = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev).and_then(|file| {
        let start = std::time::Instant::now();
        (0..len / chunk.len() as u64).try_for_each(|i| file.read_exact_at(chunk, i * chunk.len() as u64))?;
        Ok(start.elapsed())
    });
    match outcome {
        Ok(took) => result(&format!("timedread:{dev}"), &format!("{len}:{}", took.as_micros())),
        Err(e) => result(&format!("timedread:{dev}"), &format!("err:{e}")),
    }
}

const NET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn ifaddr(name: &str) {
    // SAFETY: an ioctl on a fresh socket with a zeroed ifreq naming the interface.
    let addr = unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let rc = libc::ioctl(sock, libc::SIOCGIFADDR, &mut req);
        libc::close(sock);
        if rc != 0 {
            return result(&format!("ifaddr:{name}"), "none");
        }
        let sin: libc::sockaddr_in = std::mem::transmute(req.ifr_ifru.ifru_addr);
        std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
    };
    result(&format!("ifaddr:{name}"), &addr.to_string());
}

/// struct ethtool_channels: the ETHTOOL_GCHANNELS and ETHTOOL_SCHANNELS argument.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

fn ethtool_channels(name: &str, set_combined: Option<u32>) -> Result<u32, String> {
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    const ETHTOOL_SCHANNELS: u32 = 0x3d;
    // SAFETY: SIOCETHTOOL on a fresh socket with an ifreq naming the interface and pointing at a
    // live ethtool_channels.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let mut channels = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
        req.ifr_ifru.ifru_data = (&mut channels as *mut EthtoolChannels).cast();
        let mut rc = libc::ioctl(sock, libc::SIOCETHTOOL, &mut req);
        if rc == 0 {
            if let Some(count) = set_combined {
                channels.cmd = ETHTOOL_SCHANNELS;
                channels.combined_count = count;
                rc = libc::ioctl(sock, libc::SIOCETHTOOL, &mut req);
            }
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(format!("err:{err}"));
        }
        Ok(channels.combined_count)
    }
}

fn channels(arg: &str) {
    let Some((name, count)) = arg.split_once(':') else { return result("channels", "err:usage") };
    let Ok(count) = count.parse() else { return result("channels", "err:usage") };
    let value = ethtool_channels(name, Some(count)).and_then(|_| ethtool_channels(name, None));
    result(&format!("channels:{name}"), &value.map_or_else(|e| e, |n| n.to_string()));
}

fn net_stats(name: &str) {
    let base = format!("/sys/class/net/{name}");
    let queues = fs::read_dir(format!("{base}/queues")).map_or(0, |d| {
        d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count()
    });
    let stat = |what: &str| fs::read_to_string(format!("{base}/statistics/{what}")).unwrap_or_default().trim().to_string();
    let values = [stat("rx_packets"), stat("rx_bytes"), stat("tx_packets"), stat("tx_bytes")];
    result(&format!("netstats:{name}"), &format!("{queues}:{}", values.join(":")));
    let features = fs::read_to_string(format!("{base}/device/features")).unwrap_or_default();
    result(&format!("netfeatures:{name}"), features.trim());
    let mac = fs::read_to_string(format!("{base}/address")).unwrap_or_default();
    result(&format!("mac:{name}"), mac.trim());
}

fn connect(addr: &str) -> std::io::Result<std::net::TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|_| std::io::Error::other("bad address"))?;
    let stream = std::net::TcpStream::connect_timeout(&addr, NET_TIMEOUT)?;
    stream.set_read_timeout(Some(NET_TIMEOUT))?;
    Ok(stream)
}

fn fetch(arg: &str) {
    let mut parts = arg.splitn(3, ':');
    let (Some(ip), Some(port), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return result("fetch", "bad-arg");
    };
    let outcome = connect(&format!("{ip}:{port}")).and_then(|mut s| {
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
        let mut response = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut response)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no header end in {} bytes", response.len())))?;
        Ok(response[split + 4..].to_vec())
    });
    match outcome {
        Ok(body) => result("fetch", &format!("{}:{:016x}", body.len(), fnv1a(&body))),
        Err(e) => result("fetch", &format!("err:{e}")),
    }
}

/// Sends `data` and waits for the peer to close: a plain close would let this process move
/// on (and the VM reboot) while the data is still in flight.
fn send_all_and_wait(s: &mut std::net::TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    std::io::Read::read_to_end(s, &mut rest).map(|_| ())
}

fn send(arg: &str) {
    let parts: Vec<&str> = arg.split(':').collect();
    let [ip, port, len, seed] = parts[..] else { return result("send", "bad-arg") };
    let data = pattern(len.parse().unwrap_or(0), seed.parse().unwrap_or(0));
    match connect(&format!("{ip}:{port}")).and_then(|mut s| send_all_and_wait(&mut s, &data)) {
        Ok(()) => result("send", "ok"),
        Err(e) => result("send", &format!("err:{e}")),
    }
}

fn serve(arg: &str) {
    let parts: Vec<&str> = arg.split(':').collect();
    let [port, len, seed] = parts[..] else { return result("serve", "bad-arg") };
    let data = pattern(len.parse().unwrap_or(0), seed.parse().unwrap_or(0));
    let outcome = std::net::TcpListener::bind(format!("0.0.0.0:{port}")).and_then(|listener| {
        result("listening", port);
        // Poll, so a host client that never comes fails the check instead of hanging it.
        listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + NET_TIMEOUT;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(NET_TIMEOUT))?;
        send_all_and_wait(&mut s, &data)
    });
    match outcome {
        Ok(()) => result("serve", "ok"),
        Err(e) => result("serve", &format!("err:{e}")),
    }
}

fn udp(arg: &str) {
    let outcome = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.set_read_timeout(Some(NET_TIMEOUT))?;
        s.send_to(b"lkvm-udp-probe", arg)?;
        let mut buf = [0u8; 64];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok(buf[..n] == b"lkvm-udp-probe"[..])
    });
    match outcome {
        Ok(true) => result("udp", "ok"),
        Ok(false) => result("udp", "wrong-reply"),
        Err(e) => result("udp", &format!("err:{e}")),
    }
}

fn net_bench(arg: &str) {
    let parts: Vec<&str> = arg.split(':').collect();
    let [ip, sink, source, echo, mib] = parts[..] else { return result("netbench", "bad-arg") };
    let bytes = mib.parse::<usize>().unwrap_or(16) << 20;
    let chunk = vec![0x5au8; 64 * 1024];
    let timed = |name: &str, op: &mut dyn FnMut() -> std::io::Result<()>| {
        let start = std::time::Instant::now();
        match op() {
            Ok(()) => result(name, &format!("{:.2}MB/s", bytes as f64 / 1e6 / start.elapsed().as_secs_f64())),
            Err(e) => result(name, &format!("err:{e}")),
        }
    };
    timed("netbench:guest_to_host", &mut || {
        let mut s = connect(&format!("{ip}:{sink}"))?;
        (0..bytes / chunk.len()).try_for_each(|_| s.write_all(&chunk))
    });
    timed("netbench:host_to_guest", &mut || {
        let mut s = connect(&format!("{ip}:{source}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < bytes {
            match std::io::Read::read(&mut s, &mut buf)? {
                0 => return Err(std::io::Error::other("short stream")),
                n => got += n,
            }
        }
        Ok(())
    });
    let rtt = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        s.connect(format!("{ip}:{echo}"))?;
        let mut samples = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..200 {
            let start = std::time::Instant::now();
            s.send(b"rtt")?;
            s.recv(&mut buf)?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        Ok(samples[samples.len() / 2])
    });
    match rtt {
        Ok(us) => result("netbench:udp_rtt", &format!("{us:.0}us")),
        Err(e) => result("netbench:udp_rtt", &format!("err:{e}")),
    }
}

/// vsock throughput both ways and connect latency, against host programs on PORT (sink),
/// PORT+1 (source of MIB MiB) and PORT+2 (closes at once).
fn vsock_bench(arg: &str) {
    let Some((port, mib)) = arg.split_once(':') else { return result("vsockbench", "bad-arg") };
    let port: u32 = port.parse().unwrap_or(0);
    let bytes = mib.parse::<usize>().unwrap_or(16) << 20;
    let rate = |start: std::time::Instant| format!("{:.2}MB/s", bytes as f64 / 1e6 / start.elapsed().as_secs_f64());
    let start = std::time::Instant::now();
    let chunk = vec![0x5au8; 64 * 1024];
    let sent = vsock_connect(libc::VMADDR_CID_HOST, port).and_then(|mut s| {
        (0..bytes / chunk.len()).try_for_each(|_| s.write_all(&chunk))?;
        shutdown_write(&s)?;
        drain(&mut s)
    });
    result("vsockbench:guest_to_host", &sent.map_or_else(|e| format!("err:{e}"), |_| rate(start)));
    let start = std::time::Instant::now();
    let got = vsock_connect(libc::VMADDR_CID_HOST, port + 1).and_then(|mut s| drain(&mut s));
    let value = match got {
        Ok((n, _)) if n == bytes => rate(start),
        Ok((n, _)) => format!("err:short stream ({n} bytes)"),
        Err(e) => format!("err:{e}"),
    };
    result("vsockbench:host_to_guest", &value);
    let mut samples = Vec::new();
    for _ in 0..50 {
        let start = std::time::Instant::now();
        match vsock_connect(libc::VMADDR_CID_HOST, port + 2).and_then(|mut s| drain(&mut s)) {
            Ok(_) => samples.push(start.elapsed().as_secs_f64() * 1e6),
            Err(e) => return result("vsockbench:connect", &format!("err:{e}")),
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    result("vsockbench:connect", &format!("{:.0}us", samples[samples.len() / 2]));
}

fn balloon_wait(arg: &str) {
    let kb = |field: &str| meminfo(field).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let (seconds, mib) = arg.split_once(':').unwrap_or((arg, "1"));
    // Twice the balloon: enough for the host to back what the guest will give back, no more
    // (each first touch is a page fault, which is slow where guest kernel code is emulated).
    let touch = (mib.parse::<u64>().unwrap_or(1) << 21).min(kb("MemFree:") * 1024 * 8 / 10);
    // SAFETY: an anonymous private mapping, written and unmapped here only.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), touch as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        if p != libc::MAP_FAILED {
            std::ptr::write_bytes(p.cast::<u8>(), 0x5a, touch as usize);
            libc::munmap(p, touch as usize);
        }
    }
    let shrink_kb = mib.parse::<u64>().unwrap_or(1) * 1024;
    let before = kb("MemTotal:");
    result("balloon_ready", &before.to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds.parse().unwrap_or(120));
    while kb("MemTotal:") + shrink_kb > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    result("memtotal_after_kb", &kb("MemTotal:").to_string());
    std::thread::sleep(std::time::Duration::from_secs(8));
}

fn checksum16(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping(ip: &str) {
    let Ok(addr) = ip.parse::<std::net::Ipv4Addr>() else { return result("ping", "bad-arg") };
    // SAFETY: raw ICMP socket calls with buffers and addresses owned here.
    let outcome = unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if sock < 0 {
            return result("ping", &format!("err:{}", std::io::Error::last_os_error()));
        }
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        libc::setsockopt(sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of_val(&tv) as u32);
        let mut packet = [8u8, 0, 0, 0, 0x4c, 0x4b, 0, 1, b'l', b'k', b'v', b'm'];
        let sum = checksum16(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        let dest = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
            sin_zero: [0; 8],
        };
        libc::sendto(sock, packet.as_ptr().cast(), packet.len(), 0, (&dest as *const libc::sockaddr_in).cast(), std::mem::size_of_val(&dest) as u32);
        let mut reply = [0u8; 1500];
        let mut outcome = "timeout".to_string();
        // Raw sockets see every ICMP packet: wait for an echo reply (type 0) with our id.
        for _ in 0..16 {
            let n = libc::recv(sock, reply.as_mut_ptr().cast(), reply.len(), 0);
            if n < 0 {
                outcome = format!("err:{}", std::io::Error::last_os_error());
                break;
            }
            let ihl = usize::from(reply[0] & 0xf) * 4;
            if n as usize >= ihl + 8 && reply[ihl] == 0 && reply[ihl + 4..ihl + 6] == [0x4c, 0x4b] {
                outcome = "ok".to_string();
                break;
            }
        }
        libc::close(sock);
        outcome
    };
    result("ping", &outcome);
}

fn block_size_bytes(dev: &str) -> u64 {
    let sectors = fs::read_to_string(format!("/sys/block/{dev}/size")).unwrap_or_default();
    sectors.trim().parse::<u64>().unwrap_or(0) * 512
}

/// Checksum of the first `len` bytes of `dev` after dropping its cached blocks (BLKFLSBUF):
/// the old image's blocks may be cached.
fn fresh_checksum(dev: &str, len: usize) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    let mut file = fs::File::open(format!("/dev/{dev}"))?;
    // SAFETY: BLKFLSBUF takes no argument and acts on our own descriptor.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKFLSBUF, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut data = vec![0u8; len];
    std::io::Read::read_exact(&mut file, &mut data)?;
    Ok(fnv1a(&data))
}

fn agent(port: &str) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let port: u32 = port.parse().unwrap_or(1024);
    let listening = (|| -> std::io::Result<std::os::fd::OwnedFd> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        let size = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_vm of that length.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), size) })?;
        // SAFETY: listen on a bound socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
        Ok(fd)
    })();
    let listener = match listening {
        Ok(fd) => fd,
        Err(e) => return result("agent", &format!("err:{e}")),
    };
    result("agent", "listening");
    std::thread::spawn(move || loop {
        // SAFETY: accept on a listening socket we own; the new descriptor is owned below.
        let conn = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if conn < 0 {
            continue;
        }
        // SAFETY: conn is a fresh descriptor from accept4.
        let mut stream = unsafe { fs::File::from_raw_fd(conn) };
        let results = RESULTS.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
        let _ = writeln!(stream, "{results}");
    });
}

/// One HTTP/1.1 request on a connection of its own: (status, body), or the error.
fn http(address: &str, request: &str) -> Result<(u16, String), String> {
    use std::io::Read;
    let addr = format!("{address}:80");
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, NET_TIMEOUT).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(NET_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("no status: {reply:?}"))?;
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn mmds(address: &str) {
    let get = |path: &str, headers: &str| {
        http(address, &format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Connection: close\r\n\r\n"))
    };
    let status = |r: &Result<(u16, String), String>| match r {
        Ok((status, _)) => status.to_string(),
        Err(e) => format!("err:{e}"),
    };
    result("mmds_no_token", &status(&get("/latest/meta-data/ami-id", "")));
    let token = http(
        address,
        &format!("PUT /latest/api/token HTTP/1.1\r\nHost: {address}\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"),
    );
    result("mmds_token", &status(&token));
    let Ok((200, token)) = token else { return };
    let with_token = format!("X-metadata-token: {token}\r\n");
    match get("/latest/meta-data/", &with_token) {
        Ok((200, body)) => result("mmds_keys", &body.lines().collect::<Vec<_>>().join(",")),
        other => result("mmds_keys", &format!("err:{other:?}")),
    }
    match get("/latest/meta-data/ami-id", &format!("{with_token}Accept: application/json\r\n")) {
        Ok((200, body)) => result("mmds_json", &body),
        other => result("mmds_json", &format!("err:{other:?}")),
    }
}

fn hold(seconds: &str) {
    std::thread::sleep(std::time::Duration::from_secs(seconds.parse().unwrap_or(600)));
}

fn swap_wait(arg: &str) {
    let parts: Vec<&str> = arg.split(':').collect();
    let [dev, len, seconds] = parts[..] else { return result("swap", "bad-arg") };
    let before = block_size_bytes(dev);
    result("swap_ready", &before.to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds.parse().unwrap_or(120));
    let mut tick = 0u64;
    while block_size_bytes(dev) == before && std::time::Instant::now() < deadline {
        println!("LKVM-TICK {tick}");
        tick += 1;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    result("swap_size", &block_size_bytes(dev).to_string());
    match fresh_checksum(dev, len.parse().unwrap_or(0)) {
        Ok(sum) => result("swap_read", &format!("{sum:016x}")),
        Err(e) => result("swap_read", &format!("err:{e}")),
    }
}

fn keyboard_interrupts() -> u64 {
    let interrupts = fs::read_to_string("/proc/interrupts").unwrap_or_default();
    let Some(line) = interrupts.lines().find(|l| l.contains("i8042")) else { return 0 };
    // "  1:   3   0   IO-APIC   1-edge   i8042": the per-CPU counts follow the IRQ number.
    line.split_whitespace().skip(1).map_while(|w| w.parse::<u64>().ok()).sum()
}

fn cad_wait(seconds: &str) {
    let devices = fs::read_to_string("/proc/bus/input/devices").unwrap_or_default();
    let keyboard = devices.lines().find_map(|l| l.strip_prefix("N: Name=")).unwrap_or("none");
    result("keyboard", keyboard.trim_matches('"'));
    let before = keyboard_interrupts();
    result("cad_ready", &before.to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds.parse().unwrap_or(120));
    while keyboard_interrupts() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The four bytes of Ctrl, Alt, Del arrive one interrupt each; give the rest a moment.
    std::thread::sleep(std::time::Duration::from_millis(500));
    result("cad_irqs", &(keyboard_interrupts() - before).to_string());
}

/// State that lives only in this process's memory, for snapshot tests: a random token and a
/// counter, printed every 200 ms; console lines are echoed back; the line `done` ends it.
fn snap_work(seconds: &str) {
    let mut token = [0u8; 8];
    let _ = fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut token));
    let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
    result("snap_ready", &token);
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            let line = line.trim().to_string();
            if line == "done" {
                let _ = done_tx.send(());
                return;
            }
            if !line.is_empty() {
                result("echo", &line);
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds.parse().unwrap_or(600));
    let (mut count, started) = (0u64, std::time::Instant::now());
    while std::time::Instant::now() < deadline && done.try_recv().is_err() {
        // The guest's two clocks, so a test can see that a restore did not move them.
        // SAFETY: rdtsc has no preconditions.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        println!("LKVM-WORK {count} {token} {} {tsc}", started.elapsed().as_millis());
        count += 1;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    result("snap_work_count", &count.to_string());
}

fn serial_check(name: &str) {
    let serial = fs::read_to_string(format!("/sys/block/{name}/serial"));
    result(&format!("serial:{name}"), serial.as_deref().map_or("none", str::trim));
}

/// The checks a test can ask for on the kernel command line, run in the order given.
const CHECKS: &[(&str, fn(&str))] = &[
    ("lkvm.read=", read_check),
    ("lkvm.write=", write_check),
    ("lkvm.copy=", copy_check),
    ("lkvm.serial=", serial_check),
    ("lkvm.hwrng=", hwrng_check),
    ("lkvm.ifaddr=", ifaddr),
    ("lkvm.channels=", channels),
    ("lkvm.fetch=", fetch),
    ("lkvm.vsocklisten=", vsock_listen),
    ("lkvm.vsockconnect=", vsock_connect_check),
    ("lkvm.vsockbench=", vsock_bench),
    ("lkvm.send=", send),
    ("lkvm.serve=", serve),
    ("lkvm.udp=", udp),
    ("lkvm.ping=", ping),
    ("lkvm.balloon=", balloon_wait),
    ("lkvm.netbench=", net_bench),
    ("lkvm.blkbench=", blk_bench),
    ("lkvm.9p=", share_check),
    ("lkvm.netstats=", net_stats),
    ("lkvm.timedread=", timed_read),
    ("lkvm.p9bench=", p9_bench),
    ("lkvm.fsbench=", fs_bench),
    ("lkvm.swap=", swap_wait),
    ("lkvm.agent=", agent),
    ("lkvm.hold=", hold),
    ("lkvm.mmds=", mmds),
    ("lkvm.cad=", cad_wait),
    ("lkvm.snapwork=", snap_work),
];

fn main() {
    boot_marker();
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params: Vec<&str> = cmdline.split_whitespace().collect();

    if params.contains(&"lkvm.shell") {
        run_shell();
    } else {
        result("cpus", &online_cpus());
        result("memtotal_kb", &meminfo("MemTotal:").unwrap_or_default());
        result("cmdline", cmdline.trim());
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        result("kernel", release.trim());
        let interrupts = fs::read_to_string("/proc/interrupts").unwrap_or_default();
        let virtio: Vec<&str> = interrupts.lines().filter(|l| l.contains("virtio")).collect();
        result("virtio_irqs", &virtio.len().to_string());
        result("virtio_msi_irqs", &virtio.iter().filter(|l| l.contains("MSI")).count().to_string());
        for param in &params {
            let check = CHECKS.iter().find_map(|(prefix, run)| param.strip_prefix(prefix).map(|arg| (run, arg)));
            if let Some((run, arg)) = check {
                run(arg);
            }
        }
        println!("LKVM-DONE");
    }
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}
