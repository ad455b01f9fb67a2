//! What frontends ask of a running VM, as values the VMM thread answers one at a time
//! (Firecracker's `VmmAction`). The API's threads hold a `VmmClient`: each request is an
//! `Action` sent to the VMM thread, which runs it against the VM and sends the answer back.
//! The control socket, which the VMM thread serves itself, runs its actions directly; device
//! transports post theirs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use serde::{Deserialize, Serialize};

use super::exit::{ExitSender, VmmMessage};
use super::handle::{ForkImage, VmHandle};
use crate::config::{RateLimit, VmConfig};
use crate::devices::virtio::balloon::BalloonControl;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// What a snapshot wrote: state and memory file sizes in bytes, and how long it took.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub millis: u64,
}

pub enum Action {
    /// Whether the VM runs, and the UNIX socket its vsock is reached through.
    Status,
    Stop,
    Pause,
    Resume,
    IsPaused,
    Config,
    /// Writes a paused VM's state and memory files.
    Snapshot {
        state: PathBuf,
        memory: PathBuf,
    },
    /// Pauses (if running), writes a snapshot into `dir`, then resumes or, with `stop`, ends
    /// the VM.
    SnapshotInto {
        dir: PathBuf,
        stop: bool,
    },
    /// Shares the guest's state and memory, as they are now, with children to be started
    /// (`lkvm fork`); the guest goes on.
    Fork,
    /// Pauses (if running), writes an ELF core of the guest to the file, resumes.
    Dump(PathBuf),
    /// One register dump per vCPU.
    Registers,
    InjectNmi(u32),
    /// Magic SysRq through the serial console.
    Sysrq(char),
    UpdateDrive {
        id: String,
        path: Option<PathBuf>,
        limit: Option<RateLimit>,
    },
    UpdateNic {
        id: String,
        rx: Option<RateLimit>,
        tx: Option<RateLimit>,
    },
    SetBalloonTarget(u64),
    /// A transport's device is to be reset and/or activated (`VirtioDevices[index]`), as its
    /// driver asked: posted by the transport, so that no vCPU waits on a device's threads.
    CompleteDeviceStatus(usize),
    /// Moves the balloon's target by this many MiB (positive inflates).
    ResizeBalloon(i64),
    BalloonState,
    /// The balloon's control: the asking thread waits for the guest's statistics, not the VMM
    /// thread.
    BalloonControl,
    CtrlAltDel,
}

/// Why an action failed, in lkvm's words; each frontend says it in its own (the API in
/// Firecracker's, which its clients match).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("the VM has ended")]
    Ended,
    #[error("the guest has no balloon device")]
    NoBalloon,
    #[error("no drive '{0}'")]
    NoDrive(String),
    #[error("no network interface '{0}'")]
    NoNic(String),
    /// A drive swap's new image cannot be opened.
    #[error(transparent)]
    DriveImage(#[from] crate::disk::OpenError),
    #[error("{0}")]
    Failed(String),
}

impl From<String> for ActionError {
    fn from(reason: String) -> ActionError {
        ActionError::Failed(reason)
    }
}

impl From<&str> for ActionError {
    fn from(reason: &str) -> ActionError {
        ActionError::Failed(reason.into())
    }
}

pub enum Answer {
    Done,
    /// Whether the VM's run state changed.
    Changed(bool),
    Status {
        state: RunState,
        vsock_uds: Option<PathBuf>,
    },
    Registers(Vec<String>),
    /// Bytes written.
    Dumped(u64),
    Paused(bool),
    Config(Box<VmConfig>),
    Snapshot(SnapshotReport),
    Forked(ForkImage),
    Balloon {
        target_mib: u64,
        actual_mib: u64,
    },
    BalloonControl(Arc<BalloonControl>),
}

/// The VMM thread's side: runs `action` on the VM.
pub(super) fn execute(vm: &VmHandle, action: Action) -> Result<Answer, ActionError> {
    Ok(match action {
        Action::Status => Answer::Status { state: vm.run_state(), vsock_uds: vm.vsock_uds() },
        Action::Stop => {
            vm.stop();
            Answer::Done
        }
        // Asking for the state the VM is in changes nothing; each frontend says whether that is
        // an error (kvmtool's CLI) or not (Firecracker's API).
        Action::Pause if vm.paused() => Answer::Changed(false),
        Action::Pause => Answer::Changed(true).after(vm.pause())?,
        Action::Resume if !vm.paused() => Answer::Changed(false),
        Action::Resume => Answer::Changed(true).after(vm.resume())?,
        Action::IsPaused => Answer::Paused(vm.paused()),
        Action::Config => Answer::Config(Box::new(vm.config())),
        Action::Snapshot { state, memory } => Answer::Snapshot(vm.write_snapshot(&state, &memory)?),
        Action::SnapshotInto { dir, stop } => Answer::Snapshot(vm.snapshot_into(&dir, stop)?),
        Action::Dump(path) => Answer::Dumped(vm.dump(&path)?),
        Action::Fork => Answer::Forked(vm.fork()?),
        Action::Registers => Answer::Registers(vm.registers()?),
        Action::InjectNmi(cpu) => Answer::Done.after(vm.nmi(cpu))?,
        Action::Sysrq(key) => Answer::Done.after(vm.sysrq(key))?,
        Action::UpdateDrive { id, path, limit } => {
            Answer::Done.after(vm.update_drive(&id, path.as_deref(), limit.as_ref()))?
        }
        Action::UpdateNic { id, rx, tx } => Answer::Done.after(vm.update_nic(&id, rx.as_ref(), tx.as_ref()))?,
        Action::CompleteDeviceStatus(index) => {
            vm.complete_device_status(index);
            Answer::Done
        }
        Action::SetBalloonTarget(mib) => Answer::Done.after(vm.set_balloon_target(mib))?,
        Action::ResizeBalloon(delta_mib) => {
            let (target_mib, actual_mib) = vm.resize_balloon(delta_mib)?;
            Answer::Balloon { target_mib, actual_mib }
        }
        Action::BalloonState => {
            let (target_mib, actual_mib) = vm.balloon_state()?;
            Answer::Balloon { target_mib, actual_mib }
        }
        Action::BalloonControl => Answer::BalloonControl(vm.balloon_control()?.clone()),
        Action::CtrlAltDel => Answer::Done.after(vm.send_ctrl_alt_del())?,
    })
}

impl Answer {
    fn after(self, done: Result<(), impl Into<ActionError>>) -> Result<Answer, ActionError> {
        done.map(|()| self).map_err(Into::into)
    }
}

/// Another thread's way to the VMM thread of one VM.
#[derive(Clone)]
pub struct VmmClient {
    vmm: ExitSender,
}

impl VmmClient {
    pub(super) fn new(vmm: ExitSender) -> Self {
        VmmClient { vmm }
    }

    /// Sends `action` to the VMM thread and waits for its answer.
    pub fn ask(&self, action: Action) -> Result<Answer, ActionError> {
        let (reply, answer) = mpsc::channel();
        if !self.vmm.post(VmmMessage::Act(action, reply)) {
            return Err(ActionError::Ended);
        }
        answer.recv().map_err(|_| ActionError::Ended)?
    }

    fn done(&self, action: Action) -> Result<(), ActionError> {
        self.ask(action).map(|_| ())
    }

    pub fn pause(&self) -> Result<(), ActionError> {
        self.done(Action::Pause)
    }

    pub fn resume(&self) -> Result<(), ActionError> {
        self.done(Action::Resume)
    }

    /// Whether the VM is paused; false once it has ended.
    pub fn paused(&self) -> bool {
        matches!(self.ask(Action::IsPaused), Ok(Answer::Paused(true)))
    }

    pub fn config(&self) -> Result<VmConfig, ActionError> {
        match self.ask(Action::Config)? {
            Answer::Config(config) => Ok(*config),
            _ => Err(unexpected("Config")),
        }
    }

    pub fn write_snapshot(&self, state: PathBuf, memory: PathBuf) -> Result<SnapshotReport, ActionError> {
        match self.ask(Action::Snapshot { state, memory })? {
            Answer::Snapshot(report) => Ok(report),
            _ => Err(unexpected("Snapshot")),
        }
    }

    pub fn update_drive(&self, id: &str, path: Option<PathBuf>, limit: Option<RateLimit>) -> Result<(), ActionError> {
        self.done(Action::UpdateDrive { id: id.to_string(), path, limit })
    }

    pub fn update_nic(&self, id: &str, rx: Option<RateLimit>, tx: Option<RateLimit>) -> Result<(), ActionError> {
        self.done(Action::UpdateNic { id: id.to_string(), rx, tx })
    }

    pub fn set_balloon_target(&self, mib: u64) -> Result<(), ActionError> {
        self.done(Action::SetBalloonTarget(mib))
    }

    /// The balloon's (target, actual) in MiB.
    pub fn balloon_state(&self) -> Result<(u64, u64), ActionError> {
        match self.ask(Action::BalloonState)? {
            Answer::Balloon { target_mib, actual_mib } => Ok((target_mib, actual_mib)),
            _ => Err(unexpected("BalloonState")),
        }
    }

    /// Asks the guest for its memory statistics (waiting here for its answer).
    pub fn balloon_stats(&self) -> Result<BTreeMap<String, u64>, ActionError> {
        match self.ask(Action::BalloonControl)? {
            Answer::BalloonControl(balloon) => Ok(balloon.stats()?),
            _ => Err(unexpected("BalloonControl")),
        }
    }

    pub fn send_ctrl_alt_del(&self) -> Result<(), ActionError> {
        self.done(Action::CtrlAltDel)
    }
}

fn unexpected(action: &str) -> ActionError {
    ActionError::Failed(format!("the VMM thread gave the wrong kind of answer to {action}"))
}
