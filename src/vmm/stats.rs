//! What a run cost, for the line `--loglevel info` prints when the VM ends: lkvm's own start-up
//! (process start to the first KVM_RUN), the guest's time to its boot marker, and the vCPU exits
//! by kind. Counting is a relaxed atomic add per exit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

/// The exit kinds counted, in the report's order.
const KINDS: [&str; 7] = ["io-in", "io-out", "mmio-read", "mmio-write", "interrupted", "debug", "other"];

pub struct RunStats {
    started: Instant,
    first_run: OnceLock<Duration>,
    boot_marker: OnceLock<Duration>,
    exits: [AtomicU64; KINDS.len()],
}

impl RunStats {
    /// `started` is when the process started.
    pub fn new(started: Instant) -> RunStats {
        RunStats { started, first_run: OnceLock::new(), boot_marker: OnceLock::new(), exits: Default::default() }
    }

    /// Called before every KVM_RUN; only the first one counts.
    pub fn entering_guest(&self) {
        self.first_run.get_or_init(|| self.started.elapsed());
    }

    /// The guest wrote the boot marker; returns the time since start.
    pub fn boot_marker(&self) -> Duration {
        let now = self.started.elapsed();
        let _ = self.boot_marker.set(now); // the first one is the boot
        now
    }

    pub fn count(&self, exit: &VcpuExit) {
        let kind = match exit {
            VcpuExit::IoIn(..) => 0,
            VcpuExit::IoOut(..) => 1,
            VcpuExit::MmioRead(..) => 2,
            VcpuExit::MmioWrite(..) => 3,
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => 4,
            VcpuExit::Debug(..) => 5,
            _ => 6,
        };
        self.exits[kind].fetch_add(1, Ordering::Relaxed);
    }

    /// KVM_RUN came back early for a signal (a pause, a stop, a kick).
    pub fn count_interrupted(&self) {
        self.exits[4].fetch_add(1, Ordering::Relaxed);
    }

    /// `start-up 12.3 ms to the first KVM_RUN; boot marker at 1.234 s; exits: io-in 3, ...`.
    pub fn summary(&self) -> String {
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        let startup =
            self.first_run.get().map_or("no KVM_RUN".into(), |d| format!("{:.1} ms to the first KVM_RUN", ms(d)));
        let marker = self
            .boot_marker
            .get()
            .map_or("no boot marker".into(), |d| format!("boot marker at {:.3} s", d.as_secs_f64()));
        let exits: Vec<String> =
            KINDS.iter().zip(&self.exits).map(|(kind, n)| format!("{kind} {}", n.load(Ordering::Relaxed))).collect();
        format!("start-up {startup}; {marker}; exits: {}", exits.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_exits_by_kind_and_keeps_the_first_times() {
        let stats = RunStats::new(Instant::now());
        assert_eq!(
            stats.summary(),
            "start-up no KVM_RUN; no boot marker; exits: io-in 0, io-out 0, mmio-read 0, mmio-write 0, interrupted 0, \
             debug 0, other 0"
        );
        stats.entering_guest();
        let mut data = [0u8; 1];
        stats.count(&VcpuExit::IoOut(0x3f8, &[1]));
        stats.count(&VcpuExit::IoOut(0x3f8, &[2]));
        stats.count(&VcpuExit::IoIn(0x3f8, &mut data));
        stats.count(&VcpuExit::Hlt);
        let first = stats.boot_marker();
        std::thread::sleep(Duration::from_millis(5));
        assert!(stats.boot_marker() > first);
        let summary = stats.summary();
        assert!(
            summary.starts_with("start-up ") && summary.contains(" ms to the first KVM_RUN; boot marker at 0.0"),
            "{summary}"
        );
        assert!(
            summary.ends_with("exits: io-in 1, io-out 2, mmio-read 0, mmio-write 0, interrupted 0, debug 0, other 1"),
            "{summary}"
        );
    }
}
