//! How a VM ended, and what that means for lkvm's exit status.

use std::fmt;

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
            _ => EXIT_GUEST_FAILED,
        }
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
