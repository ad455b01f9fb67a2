//! Firecracker-style metrics: one JSON object per line, appended to the `metrics_path` file
//! every minute and on the FlushMetrics action.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::thread::{self, ThreadKind};
use crate::vmm::VmmClient;

const FLUSH_PERIOD: Duration = Duration::from_secs(60);

pub struct Metrics {
    started: Instant,
    pub requests: AtomicU64,
    pub failed_requests: AtomicU64,
    pub pause_count: AtomicU64,
    pub resume_count: AtomicU64,
    pub drive_updates: AtomicU64,
    file: Mutex<Option<File>>,
    vm: Mutex<Option<VmmClient>>,
}

impl Metrics {
    pub fn new(started: Instant) -> Self {
        Metrics {
            started,
            requests: AtomicU64::new(0),
            failed_requests: AtomicU64::new(0),
            pause_count: AtomicU64::new(0),
            resume_count: AtomicU64::new(0),
            drive_updates: AtomicU64::new(0),
            file: Mutex::new(None),
            vm: Mutex::new(None),
        }
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_vm(&self, vm: VmmClient) {
        *self.vm.lock().unwrap() = Some(vm);
    }

    /// Opens `path` for appending (as the log: `logging::open_for_lines`) and starts the periodic
    /// flush; once only, as in Firecracker.
    pub fn open(self: &Arc<Self>, path: &Path) -> Result<(), String> {
        let mut file = self.file.lock().unwrap();
        if file.is_some() {
            return Err(
                "Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of \
                 metrics not allowed."
                    .into(),
            );
        }
        let opened = crate::logging::open_for_lines(path);
        *file =
            Some(opened.map_err(|e| {
                format!("Metrics error: Cannot initialize the metrics system due to bad user input: {e}")
            })?);
        let metrics = Arc::downgrade(self);
        thread::spawn(ThreadKind::Metrics, "metrics".into(), move || loop {
            std::thread::sleep(FLUSH_PERIOD);
            match metrics.upgrade() {
                Some(metrics) => {
                    let _ = metrics.flush();
                }
                None => return,
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))?;
        Ok(())
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut value = json!({
            "utc_timestamp_ms": now_ms,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "api_server": {
                "requests": load(&self.requests),
                "failed_requests": load(&self.failed_requests),
            },
            "vmm": {
                "pause_count": load(&self.pause_count),
                "resume_count": load(&self.resume_count),
                "drive_updates": load(&self.drive_updates),
            },
        });
        if let Some(vm) = &*self.vm.lock().unwrap() {
            value["vmm"]["paused"] = json!(vm.paused());
            if let Ok((target, actual)) = vm.balloon_state() {
                value["balloon"] = json!({ "target_mib": target, "actual_mib": actual });
            }
        }
        value
    }

    /// Appends one line of metrics to the file.
    pub fn flush(&self) -> Result<(), String> {
        let mut file = self.file.lock().unwrap();
        // As in Firecracker, flushing metrics nobody asked for does nothing.
        let Some(file) = file.as_mut() else { return Ok(()) };
        let mut line = self.snapshot().to_string();
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(|e| format!("writing metrics: {e}"))
    }
}
