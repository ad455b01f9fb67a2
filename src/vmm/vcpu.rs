//! vCPU threads: run KVM_RUN, dispatch exits to the buses, and stop without a lost wake-up.
//!
//! Stopping: the VMM sets the shared stop flag, then signals each vCPU thread. The signal
//! handler sets `immediate_exit` in that thread's kvm_run, so a signal that lands after the
//! flag check but before KVM_RUN still makes KVM_RUN return EINTR at once (kvmtool's hang).

use std::any::Any;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_debug_exit_arch, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::exit::{ExitSender, VmExit};
use super::stats::RunStats;
use crate::arch::x86_64::state::{self, VcpuState};
use crate::devices::bus::Bus;

/// The real-time signal (offset from SIGRTMIN) that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;
const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CODE_BYTES: usize = 16;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run, set for as long as the
        // thread runs its vCPU; a byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler; once per process, before any vCPU thread starts.
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// Why a vCPU must stop, before the diagnostics (RIP, code bytes) are added.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    Reset,
    Poweroff,
    TripleFault,
    InternalError,
    FailEntry(u64),
    Unhandled(String),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Handles one exit; I/O goes to the buses, anything that ends the VM comes back as `Stop`.
/// `io_size` is a port access's size (kvm_run's `io.size`): a string instruction (`rep outsb`,
/// `rep insw`) brings several accesses at once, which the devices get one by one.
pub fn handle_exit(exit: VcpuExit, io_size: u8, pio: &Bus, mmio: &Bus) -> Result<(), Stop> {
    let each = |len: usize| match usize::from(io_size) {
        size @ (1 | 2 | 4) if len.is_multiple_of(size) => size,
        _ => len.max(1),
    };
    match exit {
        VcpuExit::IoIn(port, data) => {
            let size = each(data.len());
            data.chunks_mut(size).for_each(|access| pio.read(u64::from(port), access));
        }
        VcpuExit::IoOut(port, data) => {
            data.chunks(each(data.len())).for_each(|access| pio.write(u64::from(port), access))
        }
        VcpuExit::MmioRead(addr, data) => mmio.read(addr, data),
        VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data),
        VcpuExit::Shutdown => return Err(Stop::TripleFault),
        VcpuExit::InternalError => return Err(Stop::InternalError),
        VcpuExit::FailEntry(reason, _) => return Err(Stop::FailEntry(reason)),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => return Err(Stop::Poweroff),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => return Err(Stop::Reset),
        // KVM returns to user space for these only to let it look at pending signals.
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        other => return Err(Stop::Unhandled(format!("{other:?}"))),
    }
    Ok(())
}

/// How long pause and register dumps wait for every vCPU to stop.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Work for parked vCPU threads, each on its own vCPU (KVM wants vCPU ioctls from the thread
/// that runs the vCPU).
type Job = Box<dyn Fn(&Vcpu) -> Box<dyn Any + Send> + Send>;

struct Task {
    job: Job,
    /// One slot per vCPU: `None` while still to do, `Some` once done; vCPUs not asked are done.
    reports: Vec<Option<Box<dyn Any + Send>>>,
    asked: Vec<bool>,
}

/// Why a vCPU stopped for the debugger.
#[derive(Clone, Copy, Debug)]
pub enum DebugEvent {
    /// KVM intercepted a debug exception (breakpoint, watchpoint, single step).
    Exit(kvm_debug_exit_arch),
    /// KVM could not run the instruction at `rip` (an internal error): with a debugger
    /// attached the guest stops for it instead of ending.
    Failed { rip: u64 },
}

/// Told of every debug event, by vCPU index; the guest is paused by then.
pub type DebugSink = Box<dyn Fn(usize, DebugEvent) + Send + Sync>;

#[derive(Default)]
struct Parking {
    paused: bool,
    parked: usize,
    /// The one vCPU that runs while the others stay parked (a debugger's single step).
    solo: Option<usize>,
    task: Option<Task>,
}

/// Stop, pause and register dumps, shared by the VMM, the control socket and the vCPU threads.
/// A request sets a flag and kicks the threads out of KVM_RUN (see `kick_signal`); they act
/// on it before re-entering.
pub struct VcpuControl {
    stop: AtomicBool,
    pause: AtomicBool,
    parking: Mutex<Parking>,
    changed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// An NMI to inject into each vCPU before it next enters the guest.
    nmi: Vec<AtomicBool>,
    /// Told of every debug exit; the VM is paused by then.
    debug_sink: Mutex<Option<DebugSink>>,
    count: usize,
}

impl VcpuControl {
    pub fn new(count: usize) -> Self {
        VcpuControl {
            nmi: (0..count).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            parking: Mutex::new(Parking::default()),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            debug_sink: Mutex::new(None),
            count,
        }
    }

    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.threads.lock().unwrap() = threads;
    }

    fn kick_all(&self) {
        for thread in self.threads.lock().unwrap().iter() {
            // SAFETY: the vCPU threads are joined only after the last kick; a thread that has
            // already left its run loop just runs the no-op handler.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
    }

    /// Injects an NMI into vCPU `cpu` (KVM_NMI must come from the vCPU's own thread).
    pub fn inject_nmi(&self, cpu: usize) -> Result<(), String> {
        let flag = self.nmi.get(cpu).ok_or_else(|| format!("no vCPU {cpu} (the guest has {})", self.count))?;
        flag.store(true, Ordering::Release);
        if let Some(thread) = self.threads.lock().unwrap().get(cpu) {
            // SAFETY: as in kick_all.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
        Ok(())
    }

    /// Makes every vCPU leave its run loop (parked ones included).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.parking.lock().unwrap();
        self.changed.notify_all();
        drop(_guard);
        self.kick_all();
    }

    /// Whether the VM is ending (its vCPUs have left or are leaving their run loops).
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn paused(&self) -> bool {
        self.parking.lock().unwrap().paused
    }

    /// Parks every vCPU; returns once all are parked.
    pub fn pause(&self) -> Result<(), String> {
        self.request_pause()?;
        self.kick_all();
        self.wait_parked()
    }

    /// Makes vCPUs park before they next enter the guest (or before they first do).
    pub fn request_pause(&self) -> Result<(), String> {
        let mut parking = self.parking.lock().unwrap();
        if parking.paused {
            return Err("the guest is already paused".into());
        }
        parking.paused = true;
        self.pause.store(true, Ordering::Release);
        Ok(())
    }

    pub fn wait_parked(&self) -> Result<(), String> {
        let parking = self.parking.lock().unwrap();
        let (_parking, timeout) = self
            .changed
            .wait_timeout_while(parking, PARK_TIMEOUT, |p| p.parked < self.count && !self.stop.load(Ordering::Acquire))
            .unwrap();
        if timeout.timed_out() {
            return Err("the vCPUs did not stop within 5 s".into());
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), String> {
        let mut parking = self.parking.lock().unwrap();
        if !parking.paused {
            return Err("the guest is not paused".into());
        }
        parking.paused = false;
        self.pause.store(false, Ordering::Release);
        self.changed.notify_all();
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Pauses the guest unless it already is (by the user, or a debug exit just now).
    pub fn pause_if_running(&self) -> Result<(), String> {
        self.parking.lock().unwrap().solo = None;
        let _ = self.request_pause();
        self.kick_all();
        self.wait_parked()
    }

    /// Every vCPU's registers and code bytes, taken while they are parked.
    pub fn registers(&self) -> Result<Vec<String>, String> {
        let was_paused = self.paused();
        if !was_paused {
            self.pause()?;
        }
        let reports = self.on_vcpus(0..self.count, Vcpu::dump);
        if !was_paused {
            self.resume()?;
        }
        reports
    }

    /// Every vCPU's state, in vCPU order; the VM must be paused.
    pub fn save(&self) -> Result<Vec<VcpuState>, String> {
        if !self.paused() {
            return Err("the guest is not paused".into());
        }
        self.on_vcpus(0..self.count, |vcpu| state::save_vcpu(&vcpu.fd, &vcpu.msrs))?
            .into_iter()
            .enumerate()
            .map(|(cpu, state)| state.map_err(|e| format!("vCPU {cpu}: {e}")))
            .collect()
    }

    /// Has each parked vCPU in `cpus` run `job` on its own thread; returns the results in
    /// vCPU order. The guest must be paused.
    pub fn on_vcpus<T: Send + 'static>(
        &self,
        cpus: impl IntoIterator<Item = usize>,
        job: impl Fn(&Vcpu) -> T + Send + 'static,
    ) -> Result<Vec<T>, String> {
        let mut asked = vec![false; self.count];
        for cpu in cpus {
            *asked.get_mut(cpu).ok_or_else(|| format!("no vCPU {cpu} (the guest has {})", self.count))? = true;
        }
        let mut parking = self.parking.lock().unwrap();
        let reports = asked.iter().map(|&a| if a { None } else { Some(Box::new(()) as Box<dyn Any + Send>) }).collect();
        let job: Job = Box::new(move |vcpu| Box::new(job(vcpu)));
        parking.task = Some(Task { job, reports, asked: asked.clone() });
        self.changed.notify_all();
        let (mut parking, timeout) = self
            .changed
            .wait_timeout_while(parking, PARK_TIMEOUT, |p| {
                p.task.as_ref().is_some_and(|t| t.reports.iter().any(Option::is_none))
                    && !self.stop.load(Ordering::Acquire)
            })
            .unwrap();
        let reports = parking.task.take().map(|t| t.reports).unwrap_or_default();
        if timeout.timed_out() || reports.iter().any(Option::is_none) {
            return Err("the vCPUs did not report within 5 s".into());
        }
        Ok(reports
            .into_iter()
            .zip(asked)
            .filter(|(_, asked)| *asked)
            .filter_map(|(report, _)| report.and_then(|r| r.downcast::<T>().ok()).map(|r| *r))
            .collect())
    }

    /// Lets vCPU `cpu` alone run while the guest stays paused, until its next debug exit.
    pub fn run_alone(&self, cpu: usize) {
        self.parking.lock().unwrap().solo = Some(cpu);
        self.changed.notify_all();
    }

    /// Who hears about debug exits (the gdb stub); `None` when no debugger is attached.
    pub fn set_debug_sink(&self, sink: Option<DebugSink>) {
        *self.debug_sink.lock().unwrap() = sink;
    }

    fn must_park(&self, cpu: usize) -> bool {
        self.pause.load(Ordering::Acquire) && self.parking.lock().unwrap().solo != Some(cpu)
    }

    /// A vCPU hit a breakpoint, watchpoint or finished a step: stop the whole guest, then tell
    /// the debugger, which resumes it.
    fn debug_event(&self, cpu: usize, event: DebugEvent) {
        self.parking.lock().unwrap().solo = None;
        let _ = self.request_pause();
        self.kick_all();
        match self.debug_sink.lock().unwrap().as_ref() {
            Some(sink) => sink(cpu, event),
            None => {
                tracing::warn!("vCPU {cpu}: debug exit with no debugger attached; resuming");
                let _ = self.resume();
            }
        }
    }
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    /// The MSRs a snapshot saves.
    pub msrs: Arc<Vec<u32>>,
    pub stats: Arc<RunStats>,
}

impl Vcpu {
    /// Runs until the guest ends or `control` says stop; reports an ending the guest caused.
    pub fn run(mut self, control: &VcpuControl, events: &ExitSender) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        while !control.stop.load(Ordering::Acquire) {
            if control.must_park(usize::from(self.index)) {
                self.park(control);
                continue;
            }
            if control.nmi[usize::from(self.index)].swap(false, Ordering::AcqRel) {
                if let Err(e) = self.fd.nmi() {
                    tracing::warn!("NMI to vCPU {}: {e}", self.index);
                }
            }
            self.stats.entering_guest();
            let exit = self.fd.run();
            if let Ok(exit) = &exit {
                self.stats.count(exit);
            }
            // SAFETY: kvm_run stays mapped for the vCPU's life; an I/O exit's data lies past
            // this field. Read for every exit, used for I/O exits only.
            let io_size = unsafe { (*run_ptr).__bindgen_anon_1.io.size };
            let result = match exit {
                Ok(VcpuExit::Debug(exit)) => {
                    control.debug_event(usize::from(self.index), DebugEvent::Exit(exit));
                    Ok(())
                }
                Ok(exit) => handle_exit(exit, io_size, &self.pio, &self.mmio).map_err(Some),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.stats.count_interrupted();
                    self.fd.set_kvm_immediate_exit(0);
                    Ok(())
                }
                Err(e) => {
                    events.send(VmExit::RunFailed { cpu: self.index, error: e.to_string() });
                    Err(None)
                }
            };
            match result {
                Ok(()) => {}
                Err(Some(Stop::InternalError)) if control.debug_sink.lock().unwrap().is_some() => {
                    let rip = self.fd.get_regs().map_or(0, |r| r.rip);
                    control.debug_event(usize::from(self.index), DebugEvent::Failed { rip });
                }
                Err(Some(reason)) => {
                    events.send(self.describe(reason));
                    break;
                }
                Err(None) => break,
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    /// Waits while the VM is paused, doing the tasks asked of parked vCPUs meanwhile.
    fn park(&mut self, control: &VcpuControl) {
        let mut parking = control.parking.lock().unwrap();
        parking.parked += 1;
        control.changed.notify_all();
        let index = usize::from(self.index);
        while parking.paused && parking.solo != Some(index) && !control.stop.load(Ordering::Acquire) {
            if let Some(task) = parking.task.as_mut().filter(|t| t.asked[index] && t.reports[index].is_none()) {
                task.reports[index] = Some((task.job)(self));
                control.changed.notify_all();
            }
            parking = control.changed.wait(parking).unwrap();
        }
        parking.parked -= 1;
    }

    /// Registers and the code at RIP, as one line.
    fn dump(&self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return format!("vCPU {}: registers unavailable", self.index);
        };
        let (_, code) = self.code_at_rip();
        let code: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "vCPU {}: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
             rbp={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} code: {}",
            self.index,
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            s.cs.selector,
            s.cr0,
            s.cr3,
            s.cr4,
            s.efer,
            code.join(" ")
        )
    }

    fn describe(&mut self, stop: Stop) -> VmExit {
        let cpu = self.index;
        match stop {
            Stop::Reset => VmExit::Reset,
            Stop::Poweroff => VmExit::Poweroff,
            Stop::FailEntry(reason) => VmExit::FailEntry { cpu, reason },
            Stop::Unhandled(exit) => VmExit::Unhandled { cpu, exit },
            Stop::TripleFault => VmExit::TripleFault { cpu, rip: self.fd.get_regs().map_or(0, |r| r.rip) },
            Stop::InternalError => {
                // SAFETY: after an internal-error exit the `internal` member of the union is the
                // one KVM filled in.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let (rip, code) = self.code_at_rip();
                VmExit::InternalError { cpu, suberror, rip, code }
            }
        }
    }

    /// RIP and up to 16 instruction bytes there, for a crash report.
    fn code_at_rip(&self) -> (u64, Vec<u8>) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return (0, Vec::new());
        };
        let linear = if sregs.cr0 & CR0_PE == 0 {
            sregs.cs.base + (regs.rip & 0xffff)
        } else {
            sregs.cs.base.wrapping_add(regs.rip)
        };
        let physical = if sregs.cr0 & CR0_PG != 0 {
            match self.fd.translate_gva(linear) {
                Ok(t) if t.valid != 0 => t.physical_address,
                _ => return (regs.rip, Vec::new()),
            }
        } else {
            linear
        };
        let code =
            (0..CODE_BYTES as u64).map_while(|i| self.mem.read_obj::<u8>(GuestAddress(physical + i)).ok()).collect();
        (regs.rip, code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::Mutex;

    struct Latch(Vec<u8>);
    impl BusDevice for Latch {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[..data.len()]);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data.to_vec();
        }
    }

    #[test]
    fn io_exits_reach_the_bus() {
        let mut pio = Bus::default();
        let latch = Arc::new(Mutex::new(Latch(vec![0; 4])));
        pio.insert(latch.clone(), 0x3f8, 8).unwrap();
        let mmio = Bus::default();
        assert_eq!(handle_exit(VcpuExit::IoOut(0x3f8, &[1, 2]), 2, &pio, &mmio), Ok(()));
        let mut data = [0u8; 2];
        assert_eq!(handle_exit(VcpuExit::IoIn(0x3f9, &mut data), 2, &pio, &mmio), Ok(()));
        assert_eq!(data, [1, 2]);
        let mut unmapped = [0u8; 4];
        assert_eq!(handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut unmapped), 0, &pio, &mmio), Ok(()));
        assert_eq!(unmapped, [0xff; 4]);
        // `rep outsb` of four bytes: four one-byte writes to the port, the last one latched.
        assert_eq!(handle_exit(VcpuExit::IoOut(0x3f8, &[5, 6, 7, 8]), 1, &pio, &mmio), Ok(()));
        assert_eq!(latch.lock().unwrap().0, [8]);
        // `rep insb` of three bytes: three one-byte reads of the port, each filled.
        let mut bytes = [0u8; 3];
        assert_eq!(handle_exit(VcpuExit::IoIn(0x3f8, &mut bytes), 1, &pio, &mmio), Ok(()));
        assert_eq!(bytes, [8, 8, 8]);
    }

    #[test]
    fn fatal_exits_stop_the_vm() {
        let (pio, mmio) = (Bus::default(), Bus::default());
        assert_eq!(handle_exit(VcpuExit::Shutdown, 0, &pio, &mmio), Err(Stop::TripleFault));
        assert_eq!(handle_exit(VcpuExit::InternalError, 0, &pio, &mmio), Err(Stop::InternalError));
        assert_eq!(handle_exit(VcpuExit::FailEntry(0x21, 0), 0, &pio, &mmio), Err(Stop::FailEntry(0x21)));
        assert_eq!(handle_exit(VcpuExit::SystemEvent(1, &[]), 0, &pio, &mmio), Err(Stop::Poweroff));
        assert_eq!(handle_exit(VcpuExit::SystemEvent(2, &[]), 0, &pio, &mmio), Err(Stop::Reset));
        assert!(matches!(handle_exit(VcpuExit::Hlt, 0, &pio, &mmio), Err(Stop::Unhandled(s)) if s == "Hlt"));
        assert_eq!(handle_exit(VcpuExit::Intr, 0, &pio, &mmio), Ok(()));
    }
}
