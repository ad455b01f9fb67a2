//! The guest as gdb's target: threads are vCPUs, memory is read through the vCPU's own page
//! tables, breakpoints and steps are KVM guest debugging.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint,
    SwBreakpointOps, WatchKind,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::vcpus::DebuggedVcpus;
use super::{readable, Stream, POLL_INTERVAL};
use crate::arch::x86_64::gdb::{self, HwPoint, VcpuRegisters, X86_64Kvm, DEBUG_SLOTS};
use crate::vmm::vcpu::DebugEvent;

const BP_VECTOR: u32 = 3;
const DB_VECTOR: u32 = 1;
/// DR6: the single-step bit, and one bit per debug address register that fired.
const DR6_BS: u64 = 1 << 14;
const INT3: u8 = 0xcc;
const PAGE: u64 = 4096;

/// A debug event as the vCPU thread reported it.
type DebugExit = (usize, DebugEvent);

pub struct GuestDebugger<V> {
    vcpus: Arc<V>,
    mem: GuestMemoryMmap,
    /// Inserted software breakpoints: guest virtual address -> (guest physical, original byte).
    sw_breakpoints: BTreeMap<u64, (u64, u8)>,
    hw_slots: [Option<(u64, HwPoint)>; DEBUG_SLOTS],
    /// What the next resume does: step this vCPU alone, run only `locked_to` (gdb's scheduler
    /// locking, as when it steps over a breakpoint), or run them all.
    step: Option<usize>,
    locked_to: Option<usize>,
    continued: Option<usize>,
    exits: Receiver<DebugExit>,
    exit_sender: Sender<DebugExit>,
    exit_ready: Arc<EventFd>,
}

impl<V: DebuggedVcpus> GuestDebugger<V> {
    pub fn new(vcpus: Arc<V>, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let (exit_sender, exits) = channel();
        Ok(GuestDebugger {
            vcpus,
            mem,
            sw_breakpoints: BTreeMap::new(),
            hw_slots: [None; DEBUG_SLOTS],
            step: None,
            locked_to: None,
            continued: None,
            exits,
            exit_sender,
            exit_ready: Arc::new(crate::host::eventfd()?),
        })
    }

    /// Stops the guest for a newly connected gdb and starts hearing its debug exits.
    pub fn attach(&mut self) -> Result<(), String> {
        while self.exits.try_recv().is_ok() {}
        let (sender, ready) = (self.exit_sender.clone(), self.exit_ready.clone());
        self.vcpus.set_debug_sink(Some(Box::new(move |cpu, exit| {
            let _ = sender.send((cpu, exit));
            let _ = ready.write(1);
        })));
        self.vcpus.pause_if_running()
    }

    /// Removes every breakpoint, turns guest debugging off and lets the guest run.
    pub fn detach(&mut self) -> Result<(), String> {
        self.vcpus.set_debug_sink(None);
        self.vcpus.pause_if_running()?;
        for (_, (gpa, original)) in std::mem::take(&mut self.sw_breakpoints) {
            let _ = self.mem.write_obj(original, GuestAddress(gpa));
        }
        self.hw_slots = [None; DEBUG_SLOTS];
        self.step = None;
        self.set_guest_debug(None)?;
        self.vcpus.resume()
    }

    fn cpu(tid: Tid) -> usize {
        tid.get() - 1
    }

    fn tid(cpu: usize) -> Tid {
        NonZeroUsize::new(cpu + 1).expect("cpu + 1 is never zero")
    }

    /// Programs every vCPU's guest debugging from the breakpoints; `step` single-steps one.
    fn set_guest_debug(&self, step: Option<usize>) -> Result<(), String> {
        let mut control = 0;
        if !self.sw_breakpoints.is_empty() {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        let mut debugreg = [0u64; 8];
        if self.hw_slots.iter().any(Option::is_some) {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            for (reg, slot) in debugreg.iter_mut().zip(&self.hw_slots) {
                *reg = slot.map_or(0, |(addr, _)| addr);
            }
            debugreg[7] = gdb::dr7(&self.hw_slots);
        }
        for cpu in 0..self.vcpus.count() {
            let mut control = control;
            if step == Some(cpu) {
                // Interrupts stay pending during the step, so it lands on the next instruction.
                control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ;
            }
            let debug = kvm_guest_debug { control, arch: kvm_guest_debug_arch { debugreg }, ..Default::default() };
            self.vcpus.set_guest_debug(cpu, debug)?;
        }
        Ok(())
    }

    /// Calls `access` on each page-sized piece of [gva, gva + len) at its guest physical
    /// address, until one cannot be reached; returns how many bytes were reached.
    fn each_page(&self, cpu: usize, gva: u64, len: usize, mut access: impl FnMut(u64, usize, usize) -> bool) -> usize {
        let mut done = 0;
        while done < len {
            let addr = gva.wrapping_add(done as u64);
            let piece = ((PAGE - addr % PAGE) as usize).min(len - done);
            match self.vcpus.translate(cpu, addr) {
                Some(gpa) if access(gpa, done, piece) => done += piece,
                _ => break,
            }
        }
        done
    }

    /// What gdb is told about a debug exit; `None` if it was not gdb's (the guest's own int3,
    /// handed back to it) and the guest runs on.
    fn stop_reason(&mut self, (cpu, event): DebugExit) -> Result<Option<MultiThreadStopReason<u64>>, String> {
        let tid = Self::tid(cpu);
        let exit = match event {
            DebugEvent::Exit(exit) => exit,
            // Where KVM's instruction emulator runs guest code, it may fail on gdb's int3
            // instead of raising #BP: that is still the breakpoint.
            DebugEvent::Failed { rip } if self.sw_breakpoints.contains_key(&rip) => {
                return self.stopped(MultiThreadStopReason::SwBreak(tid));
            }
            DebugEvent::Failed { rip } => {
                tracing::warn!("vCPU {cpu}: KVM cannot run the instruction at {rip:#x}; stopped for gdb");
                return self.stopped(MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGILL });
            }
        };
        let reason = match exit.exception {
            BP_VECTOR if self.sw_breakpoints.contains_key(&exit.pc) => MultiThreadStopReason::SwBreak(tid),
            BP_VECTOR => {
                let inject = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP | KVM_GUESTDBG_INJECT_BP;
                self.vcpus
                    .set_guest_debug(cpu, kvm_guest_debug { control: inject, ..Default::default() })
                    .map_err(|e| format!("handing int3 back to the guest: {e}"))?;
                self.set_guest_debug(None)?;
                self.vcpus.resume()?;
                return Ok(None);
            }
            DB_VECTOR if exit.dr6 & DR6_BS != 0 => MultiThreadStopReason::DoneStep,
            DB_VECTOR => match (0..DEBUG_SLOTS).find(|slot| exit.dr6 & (1 << slot) != 0).and_then(|s| self.hw_slots[s])
            {
                Some((_, HwPoint::Execute)) => MultiThreadStopReason::HwBreak(tid),
                Some((addr, HwPoint::Watch(kind, _))) => MultiThreadStopReason::Watch { tid, kind, addr },
                None => MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP },
            },
            _ => MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP },
        };
        self.stopped(reason)
    }

    /// The guest stopped for gdb: every vCPU parks before gdb hears why.
    fn stopped(&mut self, reason: MultiThreadStopReason<u64>) -> Result<Option<MultiThreadStopReason<u64>>, String> {
        (self.step, self.locked_to) = (None, None);
        self.vcpus.wait_parked()?;
        Ok(Some(reason))
    }

    /// Why the running guest stopped for gdb, if it has: a debug exit that was gdb's, or the
    /// VM's end.
    pub fn pending_stop(&mut self) -> Result<Option<MultiThreadStopReason<u64>>, String> {
        while let Ok(exit) = self.exits.try_recv() {
            if let Some(reason) = self.stop_reason(exit)? {
                return Ok(Some(reason));
            }
        }
        Ok(self.vcpus.stopped().then_some(MultiThreadStopReason::Exited(0)))
    }

    fn exit_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd lives as long as `self`, which the borrow ties the result to.
        unsafe { BorrowedFd::borrow_raw(self.exit_ready.as_raw_fd()) }
    }
}

impl<V: DebuggedVcpus> Target for GuestDebugger<V> {
    type Arch = X86_64Kvm;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, X86_64Kvm, String> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl<V: DebuggedVcpus> MultiThreadBase for GuestDebugger<V> {
    fn read_registers(&mut self, regs: &mut VcpuRegisters, tid: Tid) -> TargetResult<(), Self> {
        *regs = VcpuRegisters::from(&self.vcpus.registers(Self::cpu(tid)).map_err(TargetError::Fatal)?);
        Ok(())
    }

    fn write_registers(&mut self, regs: &VcpuRegisters, tid: Tid) -> TargetResult<(), Self> {
        let mut current = self.vcpus.registers(Self::cpu(tid)).map_err(TargetError::Fatal)?;
        regs.apply(&mut current);
        self.vcpus.set_registers(Self::cpu(tid), current).map_err(TargetError::Fatal)?.map_err(|e| {
            tracing::warn!("gdb: writing registers: {e}");
            TargetError::NonFatal
        })
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let mem = self.mem.clone();
        let read = self.each_page(Self::cpu(tid), start, data.len(), |gpa, at, len| {
            mem.read_slice(&mut data[at..at + len], GuestAddress(gpa)).is_ok()
        });
        if read == 0 && !data.is_empty() {
            return Err(TargetError::NonFatal);
        }
        Ok(read)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let mem = self.mem.clone();
        let written = self.each_page(Self::cpu(tid), start, data.len(), |gpa, at, len| {
            mem.write_slice(&data[at..at + len], GuestAddress(gpa)).is_ok()
        });
        if written < data.len() {
            return Err(TargetError::NonFatal);
        }
        Ok(())
    }

    fn list_active_threads(&mut self, register_thread: &mut dyn FnMut(Tid)) -> Result<(), String> {
        (0..self.vcpus.count()).for_each(|cpu| register_thread(Self::tid(cpu)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl<V: DebuggedVcpus> MultiThreadResume for GuestDebugger<V> {
    fn resume(&mut self) -> Result<(), String> {
        self.set_guest_debug(self.step)?;
        // A step runs its vCPU alone whatever gdb asked of the others, as QEMU's stub does.
        match self.step.or(self.locked_to) {
            Some(cpu) => {
                self.vcpus.run_alone(cpu);
                Ok(())
            }
            None => self.vcpus.resume(),
        }
    }

    fn clear_resume_actions(&mut self) -> Result<(), String> {
        (self.step, self.locked_to, self.continued) = (None, None, None);
        Ok(())
    }

    fn set_resume_action_continue(&mut self, tid: Tid, signal: Option<Signal>) -> Result<(), String> {
        if let Some(signal) = signal {
            return Err(format!("cannot deliver {signal} to a vCPU"));
        }
        self.continued = Some(Self::cpu(tid));
        Ok(())
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl<V: DebuggedVcpus> MultiThreadSingleStep for GuestDebugger<V> {
    fn set_resume_action_step(&mut self, tid: Tid, signal: Option<Signal>) -> Result<(), String> {
        self.set_resume_action_continue(tid, signal)?;
        self.step = Some(Self::cpu(tid));
        Ok(())
    }
}

impl<V: DebuggedVcpus> MultiThreadSchedulerLocking for GuestDebugger<V> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), String> {
        self.locked_to = self.continued;
        Ok(())
    }
}

impl<V: DebuggedVcpus> Breakpoints for GuestDebugger<V> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl<V: DebuggedVcpus> GuestDebugger<V> {
    /// Puts `point` in a free debug register slot; false when all four are taken.
    fn take_slot(&mut self, addr: u64, point: HwPoint) -> bool {
        match self.hw_slots.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => {
                *slot = Some((addr, point));
                true
            }
            None => false,
        }
    }

    fn free_slot(&mut self, addr: u64, point: HwPoint) -> bool {
        match self.hw_slots.iter_mut().find(|slot| **slot == Some((addr, point))) {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }
}

impl<V: DebuggedVcpus> SwBreakpoint for GuestDebugger<V> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.sw_breakpoints.contains_key(&addr) {
            return Ok(true);
        }
        // gdb inserts breakpoints with the vCPU it last stopped on; kernel text maps alike on all.
        let Some(gpa) = self.vcpus.translate(0, addr) else { return Ok(false) };
        let Ok(original) = self.mem.read_obj::<u8>(GuestAddress(gpa)) else { return Ok(false) };
        if self.mem.write_obj(INT3, GuestAddress(gpa)).is_err() {
            return Ok(false);
        }
        self.sw_breakpoints.insert(addr, (gpa, original));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some((gpa, original)) = self.sw_breakpoints.remove(&addr) else { return Ok(false) };
        Ok(self.mem.write_obj(original, GuestAddress(gpa)).is_ok())
    }
}

impl<V: DebuggedVcpus> HwBreakpoint for GuestDebugger<V> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.take_slot(addr, HwPoint::Execute))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.free_slot(addr, HwPoint::Execute))
    }
}

impl<V: DebuggedVcpus> HwWatchpoint for GuestDebugger<V> {
    fn add_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        Ok(gdb::watchable(addr, len) && self.take_slot(addr, HwPoint::Watch(kind, len)))
    }

    fn remove_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        Ok(self.free_slot(addr, HwPoint::Watch(kind, len)))
    }
}

pub struct GdbEventLoop<V>(std::marker::PhantomData<V>);

impl<V: DebuggedVcpus> BlockingEventLoop for GdbEventLoop<V> {
    type Target = GuestDebugger<V>;
    type Connection = Stream;
    type StopReason = MultiThreadStopReason<u64>;

    /// Waits for a debug exit, a byte from gdb (Ctrl-C) or the VM's end.
    fn wait_for_stop_reason(
        target: &mut GuestDebugger<V>,
        conn: &mut Stream,
    ) -> Result<Event<Self::StopReason>, WaitForStopReasonError<String, std::io::Error>> {
        loop {
            if let Some(reason) = target.pending_stop().map_err(WaitForStopReasonError::Target)? {
                return Ok(Event::TargetStopped(reason));
            }
            // SAFETY: the connection's fd stays open for the call.
            let conn_fd = unsafe { BorrowedFd::borrow_raw(conn.as_raw_fd()) };
            let ready =
                readable(&[conn_fd, target.exit_fd()], POLL_INTERVAL).map_err(WaitForStopReasonError::Connection)?;
            if ready[1] {
                let _ = target.exit_ready.read();
            }
            if ready[0] {
                return Ok(Event::IncomingData(conn.read().map_err(WaitForStopReasonError::Connection)?));
            }
        }
    }

    fn on_interrupt(target: &mut GuestDebugger<V>) -> Result<Option<Self::StopReason>, String> {
        target.vcpus.pause_if_running()?;
        // A breakpoint hit while gdb's Ctrl-C was on its way is the better answer.
        while let Ok(exit) = target.exits.try_recv() {
            if let Some(reason) = target.stop_reason(exit)? {
                return Ok(Some(reason));
            }
            target.vcpus.pause_if_running()?;
        }
        (target.step, target.locked_to) = (None, None);
        Ok(Some(MultiThreadStopReason::SignalWithThread { tid: GuestDebugger::<V>::tid(0), signal: Signal::SIGINT }))
    }
}
