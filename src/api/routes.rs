//! One handler per Firecracker endpoint. Pre-boot requests change the configuration; after
//! InstanceStart they get a 400, as do malformed or unknown bodies; nothing here panics on what
//! a client sends.

use std::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::{Api, Metrics, Phase, VmmRequest, FIRECRACKER_API_VERSION};
use crate::config::firecracker::{
    check_id, Balloon, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, DriveUpdate, Entropy, FullConfig, Logger,
    MachineConfiguration, MachineConfigurationUpdate, Metrics as MetricsConfig, NetworkInterface,
    NetworkInterfaceUpdate, SnapshotCreate, SnapshotLoad, Vsock, VSOCK_ID,
};
use crate::http::{Method, Request, Response};
use crate::logging;
use crate::vmm::action::ActionError;
use crate::vmm::{RestoreSpec, VmmClient};

type Reply = Result<Response, String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: State,
}

#[derive(Deserialize)]
enum State {
    Paused,
    Resumed,
}

/// Firecracker's wording, which clients match on.
const NOT_BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";
const NOT_AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const NO_BALLOON: &str = "Balloon config error: No balloon device found.";
const NO_BALLOON_RUNNING: &str = "Balloon update error: Failed perform action on device: Device not found";
const STATS_DISABLED: &str = "Balloon update error: Received stats query when stats are disabled.";

fn body<T: DeserializeOwned>(request: &Request) -> Result<T, String> {
    if request.body.is_empty() {
        return Err(format!("Empty {} request.", method_name(&request.method)));
    }
    serde_json::from_slice(&request.body)
        .map_err(|e| format!("An error occurred when deserializing the json body of a request: {e}."))
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}

/// Answers one request; every failure is a 400 with a fault_message.
pub fn handle(api: &Api, request: Request) -> Response {
    Metrics::count(&api.metrics.requests);
    let reply = route(api, &request);
    reply.unwrap_or_else(|message| refused(api, &message))
}

/// A 400 for a refused request, counted and logged as Firecracker does.
fn refused(api: &Api, message: &str) -> Response {
    Metrics::count(&api.metrics.failed_requests);
    tracing::error!("Received Error. Status code: 400 Bad Request. Message: {message}");
    Response::fault(400, message)
}

/// Resources named by two path segments; any other is named by its first, as Firecracker
/// routes (`/vsock/vsock0` is `/vsock`).
const TWO_SEGMENT_RESOURCES: &[&str] =
    &["vm/config", "balloon/statistics", "snapshot/create", "snapshot/load", "mmds/config"];

fn route(api: &Api, request: &Request) -> Reply {
    let path = request.path.trim_end_matches('/');
    let path = path.strip_prefix('/').unwrap_or(path);
    let (first, rest) = path.split_once('/').map_or((path, None), |(first, rest)| (first, Some(rest)));
    let (resource, id) = match rest {
        Some(id) if matches!(first, "drives" | "network-interfaces") => (first, Some(id)),
        Some(_) if TWO_SEGMENT_RESOURCES.contains(&path) => (path, None),
        _ => (first, None),
    };
    match (&request.method, resource, id) {
        (Method::Get, "", None) => Ok(instance_info(api)),
        (Method::Get, "version", None) => {
            Ok(Response::json(200, &json!({ "firecracker_version": FIRECRACKER_API_VERSION })))
        }
        (Method::Get, "vm/config", None) => Ok(Response::json(200, &full_config(api))),
        (Method::Get, "machine-config", None) => {
            Ok(Response::json(200, &full_config(api).machine_config.unwrap_or_default()))
        }
        (Method::Put, "machine-config", None) => {
            let machine: MachineConfiguration = body(request)?;
            machine.check()?;
            configure(api, |c| {
                c.machine_config = Some(machine);
                Ok(())
            })
        }
        (Method::Patch, "machine-config", None) => {
            let patch: MachineConfigurationUpdate = body(request)?;
            configure(api, |c| {
                let machine = c.machine_config.clone().unwrap_or_default().update(patch);
                machine.check()?;
                c.machine_config = Some(machine);
                Ok(())
            })
        }
        (Method::Put, "boot-source", None) => {
            let boot: BootSource = body(request)?;
            // As Firecracker, the files are opened now: a client learns of a bad path here.
            std::fs::File::open(&boot.kernel_image_path)
                .map_err(|e| format!("Boot source error: The kernel file cannot be opened: {e}"))?;
            if let Some(initrd) = &boot.initrd_path {
                std::fs::File::open(initrd).map_err(|e| {
                    format!(
                        "Boot source error: The initrd file cannot be opened due to invalid path or invalid \
                         permissions. {e}"
                    )
                })?;
            }
            configure(api, |c| {
                c.boot_source = Some(boot);
                Ok(())
            })
        }
        (Method::Put, "drives", Some(id)) => {
            let drive: Drive = body(request)?;
            same_id(id, &drive.drive_id)?;
            // Firecracker opens a drive's file when it is put: a client learns of a bad path then.
            if let Some(path) = &drive.path_on_host {
                let opened = std::fs::OpenOptions::new().read(true).write(!drive.is_read_only).open(path);
                opened.map_err(|e| {
                    format!(
                        "Drive config error: Unable to create the virtio block device: Virtio backend error: \
                         Error manipulating the backing file: {e} {}",
                        path.display()
                    )
                })?;
            }
            configure(api, |c| c.put_drive(drive))
        }
        (Method::Patch, "drives", Some(id)) => update_drive(api, id, body(request)?),
        (Method::Put, "network-interfaces", Some(id)) => {
            let iface: NetworkInterface = body(request)?;
            same_iface_id(id, &iface.iface_id)?;
            configure(api, |c| c.put_network_interface(iface))
        }
        (Method::Patch, "network-interfaces", Some(id)) => {
            let update: NetworkInterfaceUpdate = body(request)?;
            same_iface_id(id, &update.iface_id)?;
            let vm = running(api)?;
            vm.update_nic(id, update.rx_rate_limiter, update.tx_rate_limiter).map_err(fault)?;
            Ok(Response::no_content())
        }
        (Method::Put, "balloon", None) => {
            let balloon: Balloon = body(request)?;
            balloon.check()?;
            configure(api, |c| {
                c.balloon = Some(balloon);
                Ok(())
            })
        }
        (Method::Patch, "balloon", None) => update_balloon(api, body(request)?),
        (Method::Get, "balloon", None) => {
            let full = full_config(api);
            let balloon = full.balloon.ok_or(NO_BALLOON)?;
            Ok(Response::json(200, &balloon))
        }
        (Method::Get, "balloon/statistics", None) => balloon_statistics(api),
        (Method::Patch, "balloon/statistics", None) => update_balloon_statistics(api, body(request)?),
        (Method::Put, "entropy", None) => {
            let entropy: Entropy = body(request)?;
            configure(api, |c| {
                c.entropy = Some(entropy);
                Ok(())
            })
        }
        (Method::Put, "logger", None) => {
            let logger: Logger = body(request)?;
            let full = FullConfig { logger: Some(logger.clone()), ..FullConfig::default() };
            configure(api, |c| {
                apply_logger_and_metrics(api, &full)?;
                c.logger = Some(logger);
                Ok(())
            })
        }
        (Method::Put, "metrics", None) => {
            let metrics: MetricsConfig = body(request)?;
            let full = FullConfig { metrics: Some(metrics.clone()), ..FullConfig::default() };
            configure(api, |c| {
                apply_logger_and_metrics(api, &full)?;
                c.metrics = Some(metrics);
                Ok(())
            })
        }
        (Method::Put, "actions", None) => action(api, body(request)?),
        (Method::Patch, "vm", None) => vm_state(api, body(request)?),
        (Method::Put, "vsock", None) => {
            let vsock: Vsock = body(request)?;
            crate::config::VmConfig::check_vsock_cid(vsock.guest_cid)?;
            configure(api, |c| {
                // As Firecracker: the socket exists once the device is configured.
                crate::vsock::bind_ahead(&vsock.uds_path).map_err(|e| {
                    format!(
                        "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side \
                         Unix socket: {e}"
                    )
                })?;
                c.vsock = Some(vsock);
                Ok(())
            })
        }
        (Method::Put, "snapshot/create", None) => create_snapshot(api, body(request)?),
        (Method::Put, "snapshot/load", None) => load_snapshot(api, body(request)?),
        (Method::Put, "mmds/config", None) => {
            let mmds: crate::config::MmdsConfig = body(request)?;
            configure(api, |c| {
                mmds.check(&c.network_interfaces.iter().map(|n| n.iface_id.as_str()).collect::<Vec<_>>())?;
                c.mmds_config = Some(mmds);
                Ok(())
            })
        }
        (Method::Put, "mmds", None) => {
            crate::mmds::store().put(body(request)?)?;
            Ok(Response::no_content())
        }
        (Method::Patch, "mmds", None) => {
            crate::mmds::store().patch(&body(request)?)?;
            Ok(Response::no_content())
        }
        (Method::Get, "mmds", None) => Ok(Response::json(200, &crate::mmds::store().get())),
        (Method::Put, "cpu-config" | "serial", None) => Err(format!("/{resource} is not supported by lkvm")),
        (method, resource, _) => {
            Err(format!("Invalid request method and/or path: {} {resource}.", method_name(method)))
        }
    }
}

/// A drive's path and body ids agree (Firecracker's words for drives).
fn same_id(path_id: &str, body_id: &str) -> Result<(), String> {
    check_id(path_id)?;
    if path_id != body_id {
        return Err("The id from the path does not match the id from the body!".into());
    }
    Ok(())
}

/// A network interface's path and body ids agree (Firecracker's words for interfaces).
fn same_iface_id(path_id: &str, body_id: &str) -> Result<(), String> {
    check_id(path_id)?;
    if path_id != body_id {
        return Err(format!("The id from the path [{path_id}] does not match the id from the body [{body_id}]!"));
    }
    Ok(())
}

fn instance_info(api: &Api) -> Response {
    let state = match &api.state.lock().unwrap().1 {
        Phase::Configuring | Phase::Starting => "Not started",
        Phase::Running(vm) if vm.paused() => "Paused",
        Phase::Running(_) => "Running",
    };
    Response::json(
        200,
        &json!({ "id": api.id, "state": state, "vmm_version": FIRECRACKER_API_VERSION, "app_name": "Firecracker" }),
    )
}

fn full_config(api: &Api) -> FullConfig {
    let state = api.state.lock().unwrap();
    match &state.1 {
        Phase::Configuring | Phase::Starting => state.0.clone(),
        // A VM that has just ended no longer answers: what the API last knew.
        Phase::Running(vm) => vm.config().map_or_else(|_| state.0.clone(), |running| state.0.with_running(&running)),
    }
}

/// Changes the configuration, which only exists before InstanceStart.
fn configure(api: &Api, change: impl FnOnce(&mut FullConfig) -> Result<(), String>) -> Reply {
    let mut state = api.state.lock().unwrap();
    if !matches!(state.1, Phase::Configuring) {
        return Err(NOT_AFTER_START.into());
    }
    change(&mut state.0)?;
    Ok(Response::no_content())
}

/// The running VM, for requests that only make sense once it started.
fn running(api: &Api) -> Result<VmmClient, String> {
    match &api.state.lock().unwrap().1 {
        Phase::Running(vm) => Ok(vm.clone()),
        Phase::Configuring | Phase::Starting => Err(NOT_BEFORE_START.into()),
    }
}

/// Applies the logger and metrics parts of a configuration at once.
pub fn apply_logger_and_metrics(api: &Api, full: &FullConfig) -> Result<(), String> {
    if let Some(logger) = &full.logger {
        let level = logger.level.as_deref().and_then(crate::config::parse_log_level);
        if let Some(path) = &logger.log_path {
            logging::set_file(path).map_err(|e| format!("Logger error: Failed to open target file: {e}"))?;
        }
        // Firecracker: a logger request without a level goes back to the default, Info.
        logging::set_level(level.unwrap_or(logging::INFO));
        logging::update_firecracker_style(logger.show_level, logger.show_log_origin, logger.module.clone());
    }
    if let Some(metrics) = &full.metrics {
        api.metrics.open(&metrics.metrics_path)?;
    }
    Ok(())
}

/// A failed action in Firecracker's words: its clients match them (and Kata takes a drive
/// swap's path from the end).
fn fault(e: ActionError) -> String {
    match e {
        ActionError::NoDrive(_) => "Drive config error: Unable to patch the block device: Failed perform action on \
                                    device: Device not found Please verify the request arguments."
            .into(),
        ActionError::DriveImage(open) => format!(
            "Drive config error: Unable to patch the block device: Block: Virtio backend error: Error manipulating \
             the backing file: {} {} Please verify the request arguments.",
            open.reason,
            open.path.display()
        ),
        ActionError::NoNic(_) => {
            "Network config error: Unable to update the net device: Failed perform action on device: Device not found"
                .into()
        }
        ActionError::NoBalloon => NO_BALLOON_RUNNING.into(),
        other => other.to_string(),
    }
}

fn update_drive(api: &Api, id: &str, update: DriveUpdate) -> Reply {
    same_id(id, &update.drive_id)?;
    let vm = running(api)?;
    if update.path_on_host.is_none() && update.rate_limiter.is_none() {
        return Err("nothing to update: give path_on_host or rate_limiter".into());
    }
    vm.update_drive(id, update.path_on_host, update.rate_limiter).map_err(fault)?;
    Metrics::count(&api.metrics.drive_updates);
    Ok(Response::no_content())
}

fn update_balloon(api: &Api, update: BalloonUpdate) -> Reply {
    let mut state = api.state.lock().unwrap();
    let (config, phase) = &mut *state;
    let Phase::Running(vm) = phase else { return Err(NOT_BEFORE_START.into()) };
    let balloon = config.balloon.as_mut().ok_or(NO_BALLOON_RUNNING)?;
    vm.set_balloon_target(update.amount_mib).map_err(fault)?;
    balloon.amount_mib = update.amount_mib;
    Ok(Response::no_content())
}

/// lkvm asks the guest for statistics when they are read: the interval is kept for
/// `GET /balloon`; as in Firecracker, statistics cannot be turned on or off once running.
fn update_balloon_statistics(api: &Api, update: BalloonStatsUpdate) -> Reply {
    let mut state = api.state.lock().unwrap();
    let (config, phase) = &mut *state;
    let Phase::Running(_) = phase else { return Err(NOT_BEFORE_START.into()) };
    let balloon = config.balloon.as_mut().ok_or(NO_BALLOON_RUNNING)?;
    if (balloon.stats_polling_interval_s == 0) != (update.stats_polling_interval_s == 0) {
        return Err("Balloon update error: Statistics cannot be enabled/disabled after activation.".into());
    }
    balloon.stats_polling_interval_s = update.stats_polling_interval_s;
    Ok(Response::no_content())
}

fn balloon_statistics(api: &Api) -> Reply {
    let vm = running(api)?;
    let interval = full_config(api).balloon.map(|b| b.stats_polling_interval_s);
    match interval {
        None => return Err("Internal VMM error: Failed perform action on device: Device not found".into()),
        Some(0) => return Err(STATS_DISABLED.into()),
        Some(_) => {}
    }
    let (target_mib, actual_mib) = vm.balloon_state().map_err(fault)?;
    let mut stats = json!({
        "target_pages": target_mib * 256,
        "actual_pages": actual_mib * 256,
        "target_mib": target_mib,
        "actual_mib": actual_mib,
    });
    for (name, value) in vm.balloon_stats().map_err(fault)? {
        stats[name] = json!(value);
    }
    Ok(Response::json(200, &stats))
}

fn action(api: &Api, action: Action) -> Reply {
    match action.action_type {
        ActionType::InstanceStart => start(api),
        ActionType::SendCtrlAltDel => {
            running(api)?.send_ctrl_alt_del().map_err(fault)?;
            Ok(Response::no_content())
        }
        ActionType::FlushMetrics => {
            running(api)?;
            api.metrics.flush()?;
            Ok(Response::no_content())
        }
    }
}

/// Asks the VMM thread to build and start the VM; the API thread waits for its answer.
fn start(api: &Api) -> Reply {
    let mut state = api.state.lock().unwrap();
    if !matches!(state.1, Phase::Configuring) {
        return Err(NOT_AFTER_START.into());
    }
    let config = state.0.to_vm_config(&api.name, api.transport)?;
    let (reply, answer) = mpsc::channel();
    api.vmm.lock().unwrap().send(VmmRequest::Start(Box::new(config), reply)).map_err(|_| "the VMM thread is gone")?;
    let vm = answer.recv().map_err(|_| "the VMM thread did not answer".to_string())??;
    api.metrics.set_vm(vm.clone());
    state.1 = Phase::Running(vm);
    Ok(Response::no_content())
}

/// Firecracker's rule: only a paused VM is snapshotted, and the API says so rather than pausing.
fn create_snapshot(api: &Api, request: SnapshotCreate) -> Reply {
    let vm = running(api)?;
    if let Some(kind) = request.snapshot_type.as_deref().filter(|k| *k != "Full") {
        return Err(format!("snapshot_type '{kind}' is not supported by lkvm (Full)"));
    }
    if !vm.paused() {
        return Err("Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore \
                    unavailable while running"
            .into());
    }
    let written = vm.write_snapshot(request.snapshot_path, request.mem_file_path).map_err(fault)?;
    tracing::info!(
        "snapshot: {} bytes of state, {} MiB of memory in {} ms",
        written.state_bytes,
        written.memory_bytes >> 20,
        written.millis
    );
    Ok(Response::no_content())
}

/// Restores a snapshot in this fresh process: allowed only before anything about the VM was
/// configured, as in Firecracker.
fn load_snapshot(api: &Api, request: SnapshotLoad) -> Reply {
    let mut state = api.state.lock().unwrap();
    if !matches!(state.1, Phase::Configuring) {
        return Err(NOT_AFTER_START.into());
    }
    if state.0.configures_vm() {
        return Err(
            "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
                .into(),
        );
    }
    let memory = request.memory_backend()?;
    let mut overrides: Vec<_> =
        request.network_overrides.iter().map(|o| (o.iface_id.clone(), o.host_dev_name.clone())).collect();
    if let Some(vsock) = &request.vsock_override {
        overrides.push((VSOCK_ID.to_string(), vsock.uds_path.display().to_string()));
    }
    let spec = RestoreSpec {
        state: request.snapshot_path,
        memory,
        name: api.name.clone(),
        overrides,
        share_views: Vec::new(),
        vsock_uds: None,
    };
    let (reply, answer) = mpsc::channel();
    let restore = VmmRequest::Restore { spec: Box::new(spec), resume: request.resume_vm, reply };
    api.vmm.lock().unwrap().send(restore).map_err(|_| "the VMM thread is gone")?;
    let restored = answer.recv().map_err(|_| "the VMM thread did not answer".to_string())?;
    // Firecracker: a failed restore leaves the process too dirty to go on; it ends.
    let vm = match restored {
        Ok(vm) => vm,
        Err(e) => {
            let message = format!("Load snapshot error: Failed to restore from snapshot: {e}");
            return Ok(Response { ends_process: true, ..refused(api, &message) });
        }
    };
    api.metrics.set_vm(vm.clone());
    // Running before anything else can fail: the VMM thread no longer takes a start.
    let config = vm.config();
    state.1 = Phase::Running(vm);
    if let Ok(config) = config {
        state.0 = FullConfig::describe(&config);
    }
    Ok(Response::no_content())
}

fn vm_state(api: &Api, state: VmState) -> Reply {
    let vm = running(api)?;
    // Pausing a paused VM (or resuming a running one) is no error, as in Firecracker.
    match state.state {
        State::Paused => {
            vm.pause().map_err(fault)?;
            Metrics::count(&api.metrics.pause_count);
        }
        State::Resumed => {
            vm.resume().map_err(fault)?;
            Metrics::count(&api.metrics.resume_count);
        }
    }
    Ok(Response::no_content())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Transport;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    fn request(method: Method, path: &str, body: &str) -> Request {
        Request { method, path: path.into(), body: body.as_bytes().to_vec(), keep_alive: true, headers: Vec::new() }
    }

    fn call(api: &Api, method: Method, path: &str, body: &str) -> (u16, String) {
        let response = handle(api, request(method, path, body));
        (response.status, String::from_utf8(response.body.unwrap_or_default()).unwrap())
    }

    fn api() -> (std::sync::Arc<Api>, mpsc::Receiver<VmmRequest>) {
        let (tx, rx) = mpsc::channel();
        (Api::new("test-id", "test", Transport::Mmio, tx, Instant::now()), rx)
    }

    #[test]
    fn pre_boot_configuration_is_kept_and_reported() {
        let (api, _vmm) = api();
        assert_eq!(
            call(&api, Method::Put, "/boot-source", r#"{"kernel_image_path": "/dev/null", "boot_args": "quiet"}"#).0,
            204
        );
        assert_eq!(call(&api, Method::Put, "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).0, 204);
        assert_eq!(call(&api, Method::Patch, "/machine-config", r#"{"mem_size_mib": 512}"#).0, 204);
        let image = std::env::temp_dir().join(format!("lkvm-api-drive-{}", std::process::id()));
        std::fs::write(&image, [0u8; 512]).unwrap();
        let drive = format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
            image.display()
        );
        assert_eq!(call(&api, Method::Put, "/drives/rootfs", &drive).0, 204);
        std::fs::remove_file(&image).unwrap();
        let (status, body) = call(&api, Method::Get, "/vm/config", "");
        assert_eq!(status, 200);
        let config: FullConfig = serde_json::from_str(&body).unwrap();
        assert_eq!(config.machine_config.unwrap().mem_size_mib, 512);
        assert_eq!(config.drives[0].drive_id, "rootfs");
        let (status, info) = call(&api, Method::Get, "/", "");
        assert!(status == 200 && info.contains("Not started") && info.contains("test-id"), "{info}");
    }

    #[test]
    fn machine_config_reads_firecrackers_defaults_before_any_put() {
        let (api, _vmm) = api();
        let (status, body) = call(&api, Method::Get, "/machine-config", "");
        let machine: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200);
        assert_eq!((machine["vcpu_count"].as_u64(), machine["mem_size_mib"].as_u64()), (Some(1), Some(128)), "{body}");
    }

    #[test]
    fn bad_requests_get_400_with_a_fault_message() {
        let (api, vmm) = api();
        let fault = |(status, body): (u16, String)| {
            assert_eq!(status, 400, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["fault_message"].as_str().unwrap().to_string()
        };
        assert!(fault(call(&api, Method::Put, "/boot-source", "{"))
            .contains("An error occurred when deserializing the json body of a request: "));
        assert!(fault(call(&api, Method::Put, "/boot-source", r#"{"kernel_image_path": "/dev/null", "x": 1}"#))
            .contains("unknown field"));
        assert!(fault(call(&api, Method::Put, "/boot-source", "")).contains("Empty PUT request."));
        assert!(fault(call(&api, Method::Put, "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 1}"#))
            .contains("number of vCPUs"));
        let drive = r#"{"drive_id": "b", "path_on_host": "/r.img", "is_root_device": false}"#;
        assert!(fault(call(&api, Method::Put, "/drives/a", drive)).contains("does not match the id from the body"));
        assert!(fault(call(&api, Method::Put, "/drives/..", drive)).contains("id"));
        // As in Firecracker: the file is opened when the drive is put, and the fault names it.
        let missing = fault(call(&api, Method::Put, "/drives/b", drive));
        assert!(
            missing.starts_with("Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2)")
                && missing.ends_with(" /r.img"),
            "{missing}"
        );
        assert_eq!(
            fault(call(&api, Method::Put, "/nonsense", "{}")),
            "Invalid request method and/or path: PUT nonsense."
        );
        assert!(fault(call(&api, Method::Put, "/actions", r#"{"action_type": "Explode"}"#))
            .contains("unknown variant `Explode`, expected one of"));
        assert!(fault(call(&api, Method::Put, "/actions", r#"{"action_type": "InstanceStart"}"#))
            .contains("without kernel configuration"));
        assert_eq!(fault(call(&api, Method::Patch, "/vm", r#"{"state": "Paused"}"#)), NOT_BEFORE_START);
        assert!(fault(call(&api, Method::Put, "/actions", r#"{"action_type": "SendCtrlAltDel"}"#)) == NOT_BEFORE_START);
        assert_eq!(fault(call(&api, Method::Put, "/actions", r#"{"action_type": "FlushMetrics"}"#)), NOT_BEFORE_START);
        // The socket exists once the device is put (clients wait for it); a second put moves it.
        let uds = std::env::temp_dir().join(format!("lkvm-routes-{}.vsock", std::process::id()));
        let vsock = |path: &std::path::Path| format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, path.display());
        assert_eq!(call(&api, Method::Put, "/vsock", &vsock(&uds.with_extension("first"))).0, 204);
        assert!(uds.with_extension("first").exists());
        // Firecracker routes on the first segment: clients name the device in the path.
        assert_eq!(call(&api, Method::Put, "/vsock/vsock0", &vsock(&uds)).0, 204);
        assert!(std::fs::metadata(&uds).unwrap().file_type().is_socket() && !uds.with_extension("first").exists());
        let _ = std::fs::remove_file(&uds);
        assert!(fault(call(&api, Method::Put, "/vsock", r#"{"guest_cid": 3}"#)).contains("uds_path"));
        assert!(fault(call(&api, Method::Put, "/vsock", r#"{"guest_cid": 1, "uds_path": "/v"}"#)).contains("reserved"));
        // A VMM that cannot start the VM: InstanceStart fails cleanly and the API stays usable.
        drop(vmm);
        assert_eq!(call(&api, Method::Put, "/boot-source", r#"{"kernel_image_path": "/dev/null"}"#).0, 204);
        assert!(fault(call(&api, Method::Put, "/actions", r#"{"action_type": "InstanceStart"}"#)).contains("VMM"));
        assert!(call(&api, Method::Get, "/", "").1.contains("Not started"));
        assert_eq!(api.metrics.failed_requests.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn snapshot_load_goes_to_the_vmm_thread_only_on_a_fresh_process() {
        let (api, vmm) = api();
        let load = r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"},
            "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}"#;
        let both = r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#;
        assert!(call(&api, Method::Put, "/snapshot/load", both).1.contains("exactly one"));
        let vmm = std::thread::spawn(move || match vmm.recv().unwrap() {
            VmmRequest::Restore { spec, resume, reply } => {
                let _ = reply.send(Err("no KVM in this test".into()));
                (spec, resume)
            }
            _ => panic!("a load asked for something else"),
        });
        let (status, body) = call(&api, Method::Put, "/snapshot/load", load);
        assert!(status == 400 && body.contains("no KVM in this test"), "{body}");
        let (spec, resume) = vmm.join().unwrap();
        assert!(resume);
        assert_eq!(spec.state.to_str(), Some("/s"));
        assert_eq!(spec.memory, crate::config::MemoryBackend::File("/m".into()));
        assert_eq!(spec.overrides, vec![("eth0".to_string(), "tap9".to_string())]);
        assert_eq!(call(&api, Method::Put, "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 32}"#).0, 204);
        let (status, body) = call(&api, Method::Put, "/snapshot/load", load);
        assert!(status == 400 && body.contains("after configuring boot-specific resources"), "{body}");
        let (status, body) =
            call(&api, Method::Put, "/snapshot/create", r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#);
        assert!(status == 400 && body.contains(NOT_BEFORE_START), "{body}");
    }

    #[test]
    fn instance_start_hands_the_config_to_the_vmm_thread() {
        let (api, vmm) = api();
        call(&api, Method::Put, "/boot-source", r#"{"kernel_image_path": "/dev/null", "boot_args": "console=ttyS0"}"#);
        let vmm = std::thread::spawn(move || match vmm.recv().unwrap() {
            VmmRequest::Start(config, reply) => {
                let _ = reply.send(Err("no KVM in this test".into()));
                config
            }
            _ => panic!("InstanceStart asked for something else"),
        });
        let (status, body) = call(&api, Method::Put, "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert!(status == 400 && body.contains("no KVM in this test"), "{body}");
        let config = vmm.join().unwrap();
        assert_eq!(config.boot.kernel, std::path::PathBuf::from("/dev/null"));
        assert_eq!(config.transport, Transport::Mmio);
    }
}
