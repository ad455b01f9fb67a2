//! Feeds fuzzed request lines to the control socket's handler (`lkvm stop/pause/snapshot/...`
//! send one JSON line each), over a VM that records what it was asked. Any panic is a crash;
//! every answer must serialise, and only absolute paths may reach snapshot and dump.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use lkvm::control::{self, Controller, Response, RunState, SnapshotReport};

struct Recorder;

impl Controller for Recorder {
    fn state(&self) -> RunState {
        RunState::Running
    }
    fn stop(&self) {}
    fn pause(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        Err("not paused".into())
    }
    fn registers(&self) -> Result<Vec<String>, String> {
        Ok(vec!["rip=0".into()])
    }
    fn balloon(&self, delta_mib: i64) -> Result<(u64, u64), String> {
        Ok((delta_mib.unsigned_abs(), 0))
    }
    fn stats(&self) -> Result<BTreeMap<String, u64>, String> {
        Ok(BTreeMap::new())
    }
    fn nmi(&self, cpu: u32) -> Result<(), String> {
        if cpu < 2 {
            Ok(())
        } else {
            Err(format!("no vCPU {cpu}"))
        }
    }
    fn sysrq(&self, _key: char) -> Result<(), String> {
        Ok(())
    }
    fn snapshot(&self, dir: &Path, _stop: bool) -> Result<SnapshotReport, String> {
        assert!(dir.is_absolute(), "snapshot into a relative path: {}", dir.display());
        Ok(SnapshotReport::default())
    }
    fn vsock_uds(&self) -> Option<PathBuf> {
        None
    }
    fn dump(&self, path: &Path) -> Result<u64, String> {
        assert!(path.is_absolute(), "dump into a relative path: {}", path.display());
        Ok(0)
    }
}

fuzz_target!(|input: &[u8]| {
    let line = String::from_utf8_lossy(input);
    let response = control::handle(&line, "fuzz", &Recorder);
    let text = serde_json::to_string(&response).unwrap();
    let back: Response = serde_json::from_str(&text).unwrap();
    assert_eq!(back, response);
});
