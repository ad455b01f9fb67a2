//! Firecracker's command line (`lkvm firecracker ...`, or this binary invoked as `firecracker`):
//! the API socket, a config file, logging and metrics; the guest console on stdin/stdout.

use crate::thread::Seccomp;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use clap::Args;

use crate::api::{self, Api, VmmRequest};
use crate::config::firecracker::FullConfig;
use crate::config::{Transport, VmConfig};
use crate::vmm::exit::VmExit;
use crate::vmm::{RestoreSpec, Vm};
use crate::{control, logging};

/// Firecracker's default instance id.
const DEFAULT_ID: &str = "anonymous-instance";

#[derive(Args, Debug, Default)]
pub struct FirecrackerArgs {
    /// Path of the API's UNIX socket
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    pub api_sock: PathBuf,
    /// Instance id: letters, digits and '-', at most 64
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Boot the VM this Firecracker JSON configuration describes, without InstanceStart
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file)
    #[arg(long)]
    pub no_api: bool,
    /// Write the log to this file (or FIFO) instead of stderr
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace, Off
    #[arg(long, value_name = "LEVEL", default_value = "Info")]
    pub level: String,
    /// Only log lines from modules whose path starts with this
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Show each line's level
    #[arg(long)]
    pub show_level: bool,
    /// Show each line's source file and line
    #[arg(long)]
    pub show_log_origin: bool,
    /// Append metrics (JSON lines) to this file
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Log the time from start to the guest's boot-timer write (port 0x440 in lkvm)
    #[arg(long)]
    pub boot_timer: bool,
    /// Virtio devices on PCI (without it, virtio-mmio, as in Firecracker)
    #[arg(long)]
    pub enable_pci: bool,
    /// Largest API request body, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = crate::http::DEFAULT_MAX_BODY)]
    pub http_api_max_payload_size: usize,
    /// Run without seccomp filters (lkvm's own per-thread filters are on by default)
    #[arg(long)]
    pub no_seccomp: bool,
    /// A compiled seccomp filter file: refused, lkvm's filters are built in
    #[arg(long, value_name = "FILE", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,
    /// A JSON file: the MMDS document the guest reads from the start
    #[arg(long, value_name = "FILE")]
    pub metadata: Option<PathBuf>,
    /// Largest MMDS document, in bytes (default: --http-api-max-payload-size)
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Print the version and the Firecracker API version lkvm follows
    #[arg(long)]
    pub version: bool,
    /// Accepted for compatibility with tools that pass Firecracker's timing flags
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    #[arg(long, value_name = "US", hide = true)]
    pub start_time_cpu_us: Option<u64>,
    #[arg(long, value_name = "US", hide = true)]
    pub parent_cpu_time_us: Option<u64>,
}

/// Runs Firecracker-style: serves the API and/or boots the config file, until the guest ends.
pub fn run(args: FirecrackerArgs, started: Instant) -> Result<VmExit, String> {
    let mut level = crate::config::parse_log_level(&args.level)
        .ok_or_else(|| format!("--level {}: use Error, Warning, Info, Debug, Trace or Off", args.level))?;
    if args.boot_timer {
        level = level.max(logging::INFO); // the boot timer reports at info level
    }
    let style = logging::FirecrackerStyle {
        instance_id: args.id.clone().unwrap_or_else(|| DEFAULT_ID.to_string()),
        show_level: args.show_level,
        show_origin: args.show_log_origin,
        module: args.module.clone(),
    };
    logging::init_firecracker(level, style);
    if let Some(file) = &args.seccomp_filter {
        return Err(format!(
            "--seccomp-filter {}: custom filter files are not supported; lkvm's per-thread filters are built in \
             (--no-seccomp turns them off)",
            file.display()
        ));
    }
    // As its PID namespace's first process (the jailer's `--new-pid-ns`), lkvm would be
    // shielded from every signal it does not handle.
    if std::process::id() == 1 {
        crate::vmm::exit::handle_termination_signals().map_err(|e| format!("signal handler: {e}"))?;
    }
    crate::thread::confine_with(if args.no_seccomp { Seccomp::Off } else { Seccomp::On })?;
    crate::thread::name_vcpus_as_firecracker();
    if let Some(path) = &args.log_path {
        logging::set_file(path).map_err(|e| format!("--log-path {}: {e}", path.display()))?;
    }
    if args.no_api && args.config_file.is_none() {
        return Err("--no-api needs --config-file: without either there is no way to configure the VM".into());
    }
    crate::mmds::store().set_limit(args.mmds_size_limit.unwrap_or(args.http_api_max_payload_size));
    if let Some(path) = &args.metadata {
        let fail = |e: String| format!("--metadata {}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        crate::mmds::store().put(serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?).map_err(fail)?;
    }
    let id = args.id.clone().unwrap_or_else(|| DEFAULT_ID.to_string());
    api::config_id(&id)?;
    // Several instances may share Firecracker's default id; the control socket needs a unique name.
    let name = if args.id.is_some() { id.clone() } else { format!("fc-{}", std::process::id()) };
    let transport = if args.enable_pci { Transport::Pci } else { Transport::Mmio };
    let (vmm, requests) = mpsc::channel();
    let api = Api::new(&id, &name, transport, vmm, started);
    if let Some(path) = &args.metrics_path {
        api.metrics().open(path).map_err(|e| format!("--metrics-path {}: {e}", path.display()))?;
    }
    let file_config = match &args.config_file {
        Some(path) => Some(api.load_config_file(read_config_file(path)?)?),
        None => None,
    };
    let _socket = match args.no_api {
        true => None,
        false => Some(api::serve(&args.api_sock, api.clone(), args.http_api_max_payload_size)?),
    };
    let vm = match file_config {
        Some(config) => {
            let vm = start(config, started)?;
            api.set_running(vm.client());
            api.metrics().set_vm(vm.client());
            vm
        }
        None => loop {
            let (built, reply, restoring) = match requests.recv() {
                Ok(VmmRequest::Start(config, reply)) => (start(*config, started), reply, false),
                Ok(VmmRequest::Restore { spec, resume, reply }) => (restore(&spec, resume, started), reply, true),
                Ok(VmmRequest::FatalAnswered) | Err(_) => return Err("the API thread ended".into()),
            };
            match built {
                Ok(vm) => {
                    let _ = reply.send(Ok(vm.client()));
                    break vm;
                }
                // As Firecracker, a failed restore ends the process, once the client has its answer.
                Err(e) if restoring => {
                    let _ = reply.send(Err(e.clone()));
                    // Nothing more is built here; others get an error until the answer is out.
                    while let Ok(VmmRequest::Start(_, reply) | VmmRequest::Restore { reply, .. }) = requests.recv() {
                        let _ = reply.send(Err("a snapshot load failed: lkvm is ending".into()));
                    }
                    return Err(format!("snapshot load failed: {e}"));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        },
    };
    crate::thread::confine_current(crate::thread::ThreadKind::Vmm, "firecracker")
        .map_err(|e| format!("seccomp: {e}"))?;
    Ok(vm.wait())
}

fn read_config_file(path: &PathBuf) -> Result<FullConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))
}

/// Builds and starts the VM on this (the VMM) thread, reachable by the control socket too.
fn start(config: VmConfig, started: Instant) -> Result<Vm, String> {
    let name = config.name.clone();
    let mut vm = Vm::build(config, started).map_err(firecracker_error)?;
    serve_control(&mut vm, &name);
    vm.start().map_err(|e| e.to_string())?;
    Ok(vm)
}

/// Restores a snapshot on this thread; it runs at once if `resume`, else stays paused.
fn restore(spec: &RestoreSpec, resume: bool, started: Instant) -> Result<Vm, String> {
    let mut vm = Vm::restore(spec, started).map_err(firecracker_error)?;
    serve_control(&mut vm, &spec.name);
    if resume { vm.start() } else { vm.start_paused() }.map_err(|e| e.to_string())?;
    Ok(vm)
}

/// lkvm's control socket (`lkvm list`, `lkvm stop`...) in ~/.lkvm, where there is one: in
/// Firecracker's jail there is no home, and the API is the way in.
fn serve_control(vm: &mut Vm, name: &str) {
    match control::Server::start(name) {
        Ok(server) => vm.serve(Box::new(server)),
        Err(e) => tracing::info!("no control socket ({e}): lkvm's control commands cannot reach this VM"),
    }
}

/// A VM that cannot be built, in Firecracker's words where clients parse them: a drive's file
/// as its backing-file error puts it (the reason, then the path).
fn firecracker_error(e: crate::vmm::Error) -> String {
    match e {
        crate::vmm::Error::Disk(disk) => format!(
            "Virtio backend error: Error manipulating the backing file: {} {}",
            disk.reason,
            disk.path.display()
        ),
        other => other.to_string(),
    }
}
