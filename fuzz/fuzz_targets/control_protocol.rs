//! Feeds fuzzed request lines to the control socket's handler (`lkvm stop/pause/snapshot/...`
//! send one JSON line each), over a VMM thread that checks the actions it is asked. Any panic
//! is a crash; every answer must serialise, and only absolute paths may reach snapshot and dump.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lkvm::control::{self, Response, RunState, SnapshotReport};
use lkvm::vmm::action::{Action, ActionError, Answer};

fn vmm(action: Action) -> Result<Answer, ActionError> {
    Ok(match action {
        Action::Status => Answer::Status { state: RunState::Running, vsock_uds: None },
        Action::Pause => Answer::Changed(true),
        Action::Resume => Answer::Changed(false),
        Action::Registers => Answer::Registers(vec!["rip=0".into()]),
        Action::ResizeBalloon(delta_mib) => Answer::Balloon { target_mib: delta_mib.unsigned_abs(), actual_mib: 0 },
        Action::InjectNmi(cpu) if cpu >= 2 => return Err(ActionError::Failed(format!("no vCPU {cpu}"))),
        Action::SnapshotInto { dir, .. } => {
            assert!(dir.is_absolute(), "snapshot into a relative path: {}", dir.display());
            Answer::Snapshot(SnapshotReport::default())
        }
        Action::Dump(path) => {
            assert!(path.is_absolute(), "dump into a relative path: {}", path.display());
            Answer::Dumped(0)
        }
        _ => Answer::Done,
    })
}

fuzz_target!(|input: &[u8]| {
    let line = String::from_utf8_lossy(input);
    let response = control::handle(&line, "fuzz", &vmm);
    let text = serde_json::to_string(&response).unwrap();
    let back: Response = serde_json::from_str(&text).unwrap();
    assert_eq!(back, response);
});
