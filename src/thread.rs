//! Every lkvm thread is spawned here, tagged with its kind: the one place where per-kind
//! confinement (seccomp filters) is applied.

use std::io;
use std::thread::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN for one vCPU and dispatches its exits.
    Vcpu,
    /// A virtio device's worker: serves its queues.
    Device,
    /// A network backend's host side (user-mode stack).
    NetBackend,
    /// The Firecracker-compatible HTTP API.
    Api,
    /// The control socket (`lkvm list/stop/...`).
    Control,
    /// Feeds the terminal to the guest console.
    Console,
    /// Writes metrics periodically.
    Metrics,
    /// Relays a command run in the guest (`lkvm exec`, `lkvm sandbox`): stdin to it, its
    /// output and status back.
    Exec,
    /// The gdb stub: serves one gdb at a time.
    Gdb,
}

/// Spawns a thread of `kind` named `name` (shown by `ps -L` and in panics).
pub fn spawn<F, T>(kind: ThreadKind, name: String, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tracing::debug!("starting {kind:?} thread {name}");
    std::thread::Builder::new().name(name).spawn(body)
}
