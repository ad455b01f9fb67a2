//! Firecracker's REST API over a UNIX socket: configuration before the guest starts, then
//! actions on the running VM. Requests are served one at a time on the API thread; starting
//! the VM is asked of the VMM thread, which owns it.

use crate::http;
mod metrics;
mod routes;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::firecracker::FullConfig;
use crate::config::{Transport, VmConfig};
use crate::thread::{self, ThreadKind};
use crate::vmm::{RestoreSpec, VmmClient};
pub use metrics::Metrics;

/// API connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// The Firecracker API version whose paths, fields and errors lkvm follows.
pub const FIRECRACKER_API_VERSION: &str = "1.10.0";

/// Checks an instance id as Firecracker does.
pub fn config_id(id: &str) -> Result<(), String> {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if id.is_empty() || id.len() > 64 || !plain {
        return Err(format!("--id '{id}': use 1 to 64 letters, digits or '-'"));
    }
    Ok(())
}

/// What the API asks of the VMM thread.
pub enum VmmRequest {
    /// Build and start this VM; answer with its handle or why it could not start.
    Start(Box<VmConfig>, Sender<Result<VmmClient, String>>),
    /// Restore this snapshot, running or paused (`resume`); answer as for `Start`.
    Restore { spec: Box<RestoreSpec>, resume: bool, reply: Sender<Result<VmmClient, String>> },
    /// The client has the answer after which lkvm ends (a failed restore).
    FatalAnswered,
}

enum Phase {
    Configuring,
    /// The VMM thread is building the config file's VM: nothing more to configure or start.
    Starting,
    Running(VmmClient),
}

/// The API's view of one lkvm process: the configuration being put together, then the VM.
pub struct Api {
    /// Firecracker's `--id`, reported by `GET /`.
    id: String,
    /// The VM's name (control socket).
    name: String,
    transport: Transport,
    state: Mutex<(FullConfig, Phase)>,
    vmm: Mutex<Sender<VmmRequest>>,
    metrics: Arc<Metrics>,
}

impl Api {
    pub fn new(id: &str, name: &str, transport: Transport, vmm: Sender<VmmRequest>, started: Instant) -> Arc<Api> {
        Arc::new(Api {
            id: id.to_string(),
            name: name.to_string(),
            transport,
            state: Mutex::new((FullConfig::default(), Phase::Configuring)),
            vmm: Mutex::new(vmm),
            metrics: Arc::new(Metrics::new(started)),
        })
    }

    /// An API for a VM that is already running (`lkvm run --api-sock`).
    pub fn for_running(id: &str, transport: Transport, config: FullConfig, handle: VmmClient) -> Arc<Api> {
        let (vmm, _) = mpsc::channel();
        let api = Api::new(id, id, transport, vmm, Instant::now());
        *api.state.lock().unwrap() = (config, Phase::Running(handle));
        api
    }

    /// Answers one API request (the API thread's work; also what the fuzz target drives).
    pub fn handle(&self, request: http::Request) -> http::Response {
        routes::handle(self, request)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Applies a `--config-file` and returns the VM it describes (the caller starts it).
    pub fn load_config_file(&self, full: FullConfig) -> Result<VmConfig, String> {
        let vm_config = full.to_vm_config(&self.name, self.transport)?;
        routes::apply_logger_and_metrics(self, &full)?;
        *self.state.lock().unwrap() = (full, Phase::Starting);
        Ok(vm_config)
    }

    /// Records that the VMM thread started the VM.
    pub fn set_running(&self, handle: VmmClient) {
        self.state.lock().unwrap().1 = Phase::Running(handle);
    }
}

/// The listening API socket; the file is removed when lkvm ends.
pub struct ApiSocket {
    path: PathBuf,
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` and serves `api` on the API thread.
pub fn serve(path: &Path, api: Arc<Api>, max_body: usize) -> Result<ApiSocket, String> {
    // Firecracker's default, /run/firecracker.socket, in a fresh jail that has no /run.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("API socket {}: {e}", path.display()))?;
    }
    let listener = crate::host::bind_replacing_stale(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => format!("API socket {}: another process is listening on it", path.display()),
        _ => format!("API socket {}: {e}", path.display()),
    })?;
    let open = Arc::new(AtomicUsize::new(0));
    thread::spawn(ThreadKind::Api, "fc_api".into(), move || {
        for mut stream in crate::host::connections(|| listener.accept().map(|(stream, _)| stream)) {
            // A client that keeps its connection open must not block the others; a bounded
            // number are served at once.
            if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::AcqRel);
                let _ = http::Response::fault(503, "too many open API connections").write_to(&mut stream);
                continue;
            }
            let (api, done) = (api.clone(), open.clone());
            let served = thread::spawn(ThreadKind::Api, "fc_api".into(), move || {
                let mut fatal = false;
                let answered = http::serve_connection(&mut stream, max_body, |request| {
                    let response = api.handle(request);
                    fatal |= response.ends_process;
                    response
                });
                if let Err(e) = answered {
                    tracing::debug!("API connection: {e}");
                }
                if fatal {
                    let _ = api.vmm.lock().unwrap().send(VmmRequest::FatalAnswered);
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
            if let Err(e) = served {
                open.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("API connection thread: {e}");
            }
        }
    })
    .map_err(|e| format!("API thread: {e}"))?;
    Ok(ApiSocket { path: path.to_path_buf() })
}
