//! How a VM ended, what that means for lkvm's exit status, and how other threads reach the
//! VMM thread: the VM's end, and actions to run on it (`action`).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use rustix::event::{EventfdFlags, PollFd, PollFlags};

use super::action::{Action, ActionError, Answer};

/// Exit status when the guest crashed or KVM could not run it.
pub const EXIT_GUEST_FAILED: i32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (i8042 reset or a KVM reset event): lkvm ends, as kvmtool does.
    Reset,
    /// The guest powered itself off.
    Poweroff,
    /// The user quit with Ctrl-A x.
    UserQuit,
    /// `lkvm stop` asked it to end.
    Stopped,
    /// lkvm got this termination signal (SIGTERM, SIGINT, SIGHUP) and ended the VM as `lkvm stop`
    /// does; it exits with 128 + the signal, as a process the signal killed would.
    Signal(i32),
    InternalError {
        cpu: u8,
        suberror: u32,
        rip: u64,
        code: Vec<u8>,
    },
    TripleFault {
        cpu: u8,
        rip: u64,
    },
    FailEntry {
        cpu: u8,
        reason: u64,
    },
    Unhandled {
        cpu: u8,
        exit: String,
    },
    RunFailed {
        cpu: u8,
        error: String,
    },
}

impl VmExit {
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Poweroff | VmExit::UserQuit | VmExit::Stopped => 0,
            VmExit::Signal(signal) => 128 + signal,
            _ => EXIT_GUEST_FAILED,
        }
    }
}

/// What reaches the VMM thread.
pub(super) enum VmmMessage {
    Exit(VmExit),
    /// An action to run on the VM, and where its answer goes.
    Act(Action, Sender<Result<Answer, ActionError>>),
    /// An action no one waits for.
    Post(Action),
}

/// Tells the VMM thread that the VM ended, or asks it to act: the message on a channel, and a
/// count on an eventfd that the VMM thread polls.
#[derive(Clone)]
pub struct ExitSender {
    messages: Sender<VmmMessage>,
    signal: Arc<OwnedFd>,
}

impl ExitSender {
    /// False once the VMM thread no longer listens.
    pub fn send(&self, reason: VmExit) -> bool {
        self.post(VmmMessage::Exit(reason))
    }

    pub(super) fn post(&self, message: VmmMessage) -> bool {
        let sent = self.messages.send(message).is_ok();
        if sent {
            let _ = rustix::io::write(&*self.signal, &1u64.to_ne_bytes());
        }
        sent
    }
}

/// The VMM thread's end of the `ExitSender`s.
pub struct Exits {
    messages: Receiver<VmmMessage>,
    signal: Arc<OwnedFd>,
}

pub fn channel() -> std::io::Result<(ExitSender, Exits)> {
    let signal = Arc::new(rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?);
    let (sender, messages) = mpsc::channel();
    Ok((ExitSender { messages: sender, signal: signal.clone() }, Exits { messages, signal }))
}

/// The termination signal that came (0: none), and the eventfd its handler wakes the VMM
/// thread with (-1: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);
static SIGNAL_WAKES: AtomicI32 = AtomicI32::new(-1);

/// Handles SIGTERM, SIGINT and SIGHUP: while a VM's VMM thread listens
/// (`Exits::end_on_termination_signals`) they end that VM as `lkvm stop` does; otherwise lkvm
/// exits 128 + the signal, as their default action would (which a PID namespace's first process,
/// the jailer's `--new-pid-ns`, does not get).
pub fn handle_termination_signals() -> std::io::Result<()> {
    extern "C" fn record(signal: libc::c_int) {
        let fd = SIGNAL_WAKES.load(Ordering::SeqCst);
        if fd < 0 {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(128 + signal) };
        }
        SIGNALLED.store(signal, Ordering::SeqCst);
        // SAFETY: write is async-signal-safe; the buffer is a local of 8 bytes.
        unsafe { libc::write(fd, 1u64.to_ne_bytes().as_ptr().cast(), 8) };
    }
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler that touches only atomics.
        if unsafe { libc::signal(signal, record as extern "C" fn(libc::c_int) as libc::sighandler_t) } == libc::SIG_ERR
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Exits {
    /// From now on SIGTERM, SIGINT and SIGHUP end the VM as `lkvm stop` does (drives flushed,
    /// sockets removed) instead of killing lkvm in the middle of a write.
    pub fn end_on_termination_signals(&self) -> std::io::Result<()> {
        SIGNAL_WAKES.store(self.signal.as_raw_fd(), Ordering::SeqCst);
        handle_termination_signals()
    }

    fn signalled() -> Option<VmExit> {
        match SIGNALLED.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(VmExit::Signal(signal)),
        }
    }

    /// Runs the actions that have arrived with `act`; the VM's end if it came.
    pub fn try_recv(&self, act: &impl Fn(Action) -> Result<Answer, ActionError>) -> Option<VmExit> {
        if let Some(signalled) = Self::signalled() {
            return Some(signalled);
        }
        loop {
            match self.messages.try_recv() {
                Ok(VmmMessage::Exit(reason)) => return Some(reason),
                Ok(VmmMessage::Act(action, reply)) => {
                    let _ = reply.send(act(action));
                }
                Ok(VmmMessage::Post(action)) => {
                    if let Err(e) = act(action) {
                        tracing::warn!("{e}");
                    }
                }
                Err(TryRecvError::Disconnected) => return Some(VmExit::Stopped),
                Err(TryRecvError::Empty) => return None,
            }
        }
    }

    /// Waits for the VM's end, running actions with `act` and serving `frontends` meanwhile.
    pub fn recv_serving(
        &self,
        frontends: &mut [Box<dyn Frontend>],
        act: &impl Fn(Action) -> Result<Answer, ActionError>,
    ) -> VmExit {
        loop {
            if let Some(reason) = self.try_recv(act) {
                return reason;
            }
            let mut fds = vec![PollFd::new(&*self.signal, PollFlags::IN)];
            fds.extend(frontends.iter().map(|frontend| PollFd::from_borrowed_fd(frontend.as_fd(), PollFlags::IN)));
            if rustix::event::poll(&mut fds, None).is_err() {
                continue; // interrupted
            }
            let ready: Vec<bool> = fds[1..].iter().map(|fd| !fd.revents().is_empty()).collect();
            drop(fds);
            let _ = rustix::io::read(&*self.signal, &mut [0u8; 8]);
            for (frontend, _) in frontends.iter_mut().zip(ready).filter(|(_, ready)| *ready) {
                frontend.serve_waiting(act);
            }
        }
    }
}

/// A socket the VMM thread serves while it waits for the VM's end (the control socket): it
/// translates what arrives into actions, which it runs with `act`.
pub trait Frontend: AsFd + Send {
    /// Answers what is waiting, without blocking for more.
    fn serve_waiting(&mut self, act: &dyn Fn(Action) -> Result<Answer, ActionError>);
}

impl Drop for Exits {
    fn drop(&mut self) {
        // The eventfd closes with the last Exits; the handler must not write to a reused number.
        let _ = SIGNAL_WAKES.compare_exchange(self.signal.as_raw_fd(), -1, Ordering::SeqCst, Ordering::SeqCst);
    }
}

fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest rebooted"),
            VmExit::Poweroff => write!(f, "guest powered off"),
            VmExit::UserQuit => write!(f, "stopped from the console (Ctrl-A x)"),
            VmExit::Stopped => write!(f, "stopped by lkvm stop"),
            VmExit::Signal(signal) => write!(f, "ended by signal {signal}"),
            VmExit::InternalError { cpu, suberror, rip, code } => {
                let bytes: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
                let code = if bytes.is_empty() { "unreadable".to_string() } else { bytes.join(" ") };
                write!(
                    f,
                    "KVM internal error on vCPU {cpu}: suberror {suberror} ({}), RIP {rip:#x}, code: {code}",
                    suberror_name(*suberror)
                )
            }
            VmExit::TripleFault { cpu, rip } => write!(f, "guest triple fault on vCPU {cpu} (shutdown), RIP {rip:#x}"),
            VmExit::FailEntry { cpu, reason } => {
                write!(f, "KVM could not enter vCPU {cpu}: hardware entry failure reason {reason:#x}")
            }
            VmExit::Unhandled { cpu, exit } => write!(f, "unhandled KVM exit on vCPU {cpu}: {exit}"),
            VmExit::RunFailed { cpu, error } => write!(f, "KVM_RUN failed on vCPU {cpu}: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_endings_exit_zero_and_crashes_do_not() {
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Poweroff.exit_code(), 0);
        assert_eq!(VmExit::UserQuit.exit_code(), 0);
        assert_eq!(VmExit::Signal(libc::SIGTERM).exit_code(), 143, "as if the signal had killed lkvm");
        assert_eq!(VmExit::TripleFault { cpu: 0, rip: 0 }.exit_code(), EXIT_GUEST_FAILED);
        assert_eq!(VmExit::FailEntry { cpu: 0, reason: 7 }.exit_code(), EXIT_GUEST_FAILED);
        assert_eq!(VmExit::Unhandled { cpu: 1, exit: "Hypercall".into() }.exit_code(), EXIT_GUEST_FAILED);
    }

    #[test]
    fn internal_error_names_rip_and_code_bytes() {
        let exit = VmExit::InternalError { cpu: 1, suberror: 1, rip: 0x1000a, code: vec![0x0f, 0xc7, 0x0e] };
        assert_ne!(exit.exit_code(), 0);
        let line = exit.to_string();
        assert!(line.contains("emulation failure"), "{line}");
        assert!(line.contains("RIP 0x1000a"), "{line}");
        assert!(line.contains("0f c7 0e"), "{line}");
        assert!(!line.contains('\n'));
    }
}
