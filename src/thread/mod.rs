//! Every lkvm thread is spawned here, tagged with its kind, and confined to that kind's
//! system calls (seccomp), and to the VM's files (Landlock, when on), before it runs any of its
//! own code.

mod seccomp;

pub use seccomp::Seccomp;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs KVM_RUN for one vCPU and dispatches its exits.
    Vcpu,
    /// A virtio device's worker: serves its queues with the host resource it names.
    Device(DeviceIo),
    /// A network backend's host side (user-mode stack).
    NetBackend,
    /// The Firecracker-compatible HTTP API.
    Api,
    /// Feeds the terminal to the guest console.
    Console,
    /// Writes metrics periodically.
    Metrics,
    /// Relays a command run in the guest (`lkvm exec`, `lkvm sandbox`): stdin to it, its
    /// output and status back.
    Exec,
    /// The gdb stub: serves one gdb at a time.
    Gdb,
    /// The main thread, confined once it has built the VM (`confine_current`).
    Vmm,
    /// Creates every other thread (a confined thread may not); see `spawner`.
    Spawner,
}

/// What a device worker reaches on the host besides guest memory and its eventfds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceIo {
    /// Nothing more (rng, console, balloon).
    Memory,
    /// A disk image.
    Disk,
    /// A tap or the user-mode stack's socket (and the net control queue, which steers taps).
    Network,
    /// A shared host directory (9p, virtio-fs).
    Files,
    /// Host UNIX sockets (vsock).
    Sockets,
}

impl ThreadKind {
    /// How the kind is named in messages (`device worker (disk)`).
    pub fn describe(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device(DeviceIo::Memory) => "device worker",
            ThreadKind::Device(DeviceIo::Disk) => "disk worker",
            ThreadKind::Device(DeviceIo::Network) => "network worker",
            ThreadKind::Device(DeviceIo::Files) => "shared-directory worker",
            ThreadKind::Device(DeviceIo::Sockets) => "vsock worker",
            ThreadKind::NetBackend => "network backend",
            ThreadKind::Api => "API",
            ThreadKind::Console => "console",
            ThreadKind::Metrics => "metrics",
            ThreadKind::Exec => "exec",
            ThreadKind::Gdb => "gdb",
            ThreadKind::Vmm => "VMM",
            ThreadKind::Spawner => "thread spawner",
        }
    }
}

/// Whether vCPU threads take Firecracker's names (`fc_vcpu N`): Kata finds them by name to
/// pin them and put them in cgroups.
static FIRECRACKER_NAMES: AtomicBool = AtomicBool::new(false);

/// Names vCPU threads as Firecracker does from now on (its frontend calls it).
pub fn name_vcpus_as_firecracker() {
    FIRECRACKER_NAMES.store(true, Ordering::Relaxed);
}

/// The name of vCPU `index`'s thread.
pub fn vcpu_name(index: u8) -> String {
    if FIRECRACKER_NAMES.load(Ordering::Relaxed) {
        format!("fc_vcpu {index}")
    } else {
        format!("vcpu{index}")
    }
}

/// Sets how the threads spawned from now on are confined. Frontends call it once, before the
/// VM is built; until then (library use, unit tests) threads run unconfined.
pub fn confine_with(mode: Seccomp) -> Result<(), String> {
    if mode == Seccomp::Off {
        tracing::warn!("seccomp filters are off: a guest that takes over lkvm can make any system call");
    }
    seccomp::set_mode(mode).map_err(|e| format!("seccomp: {e}"))
}

/// Confines the calling thread as `kind`: the main thread, once the VM is built (it created
/// its host resources unconfined). Threads made after this by `spawn` are unaffected.
pub fn confine_current(kind: ThreadKind, name: &str) -> io::Result<()> {
    if let Some(filter) = seccomp::filter(kind)? {
        // Confined, this thread could no longer start the spawner that later spawns need.
        spawner();
        seccomp::confine(kind, name, &filter);
    }
    Ok(())
}

/// Spawns a thread of `kind` named `name` (shown by `ps -L` and in panics).
///
/// Under seccomp a confined thread may not create threads itself, and a thread inherits its
/// creator's filter, so threads are created by one unconfined spawner thread.
pub fn spawn<F, T>(kind: ThreadKind, name: String, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tracing::debug!("starting {kind:?} thread {name}");
    let domain = crate::jail::landlock::for_new_thread()?;
    // Landlock first: a filter need not allow entering the domain.
    let enter = move |name: &str| {
        if let Some(Err(e)) = domain.map(|d| d.enter()) {
            eprintln!("lkvm: error: the {} thread {name}: {e}", kind.describe());
            std::process::exit(1);
        }
    };
    let Some(filter) = seccomp::filter(kind)? else {
        let thread_name = name.clone();
        return std::thread::Builder::new().name(name).spawn(move || {
            enter(&thread_name);
            body()
        });
    };
    let (sender, receiver) = mpsc::sync_channel(1);
    let start = move || {
        let thread = std::thread::Builder::new().name(name.clone()).spawn(move || {
            enter(&name);
            seccomp::confine(kind, &name, &filter);
            body()
        });
        let _ = sender.send(thread);
    };
    spawner().send(Box::new(start)).map_err(|_| io::Error::other("the thread spawner has ended"))?;
    receiver.recv().map_err(|_| io::Error::other("the thread spawner has ended"))?
}

type Start = Box<dyn FnOnce() + Send>;

/// The spawner is started by the first confined spawn, by a thread not yet confined. A thread
/// inherits its creator's filter and adds its own, so the spawner's filter allows what some
/// kind of thread it makes may call, and creating and confining threads; each thread it makes
/// then narrows that to its own kind's calls before running any of its own code.
fn spawner() -> &'static mpsc::Sender<Start> {
    static SPAWNER: OnceLock<mpsc::Sender<Start>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (sender, starts) = mpsc::channel::<Start>();
        let spawner = std::thread::Builder::new().name("spawner".into()).spawn(move || {
            match seccomp::filter(ThreadKind::Spawner) {
                Ok(Some(filter)) => seccomp::confine(ThreadKind::Spawner, "spawner", &filter),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("lkvm: error: the thread spawner's seccomp filter: {e}");
                    std::process::exit(1);
                }
            }
            starts.iter().for_each(|start| start())
        });
        if let Err(e) = spawner {
            tracing::error!("cannot start the thread spawner: {e}"); // every spawn then fails
        }
        sender
    })
}
