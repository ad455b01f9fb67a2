//! Feeds a fuzzed byte stream from "gdb" to lkvm's gdb stub (the `gdbstub` crate's packet
//! parser in front of lkvm's target: registers, memory through page translation, software
//! and hardware breakpoints, watchpoints, resume, step and scheduler locking), with debug exits
//! and the VM's end arriving while the guest runs. The vCPUs are a model of `VcpuControl`;
//! guest memory is real, so ASan sees every access the stub makes. After the session, detaching
//! must leave no int3 behind.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use gdbstub::conn::Connection;
use gdbstub::stub::run_blocking::BlockingEventLoop;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::GdbStub;
use kvm_bindings::{kvm_debug_exit_arch, kvm_fpu, kvm_guest_debug, kvm_regs, kvm_sregs};
use libfuzzer_sys::fuzz_target;
use lkvm::arch::x86_64::gdb::KvmRegisters;
use lkvm::vmm::gdb::{DebuggedVcpus, GdbEventLoop, GuestDebugger};
use lkvm::vmm::vcpu::{DebugEvent, DebugSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: u64 = 0x10000;

#[derive(Default)]
struct ModelVcpus {
    registers: Mutex<Vec<(kvm_regs, kvm_sregs, kvm_fpu, u64)>>,
    sink: Mutex<Option<DebugSink>>,
    ended: AtomicBool,
}

impl DebuggedVcpus for ModelVcpus {
    fn count(&self) -> usize {
        self.registers.lock().unwrap().len()
    }
    fn stopped(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }
    fn pause_if_running(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        Ok(())
    }
    fn run_alone(&self, cpu: usize) {
        assert!(cpu < self.count(), "run_alone({cpu})");
    }
    fn wait_parked(&self) -> Result<(), String> {
        Ok(())
    }
    fn set_debug_sink(&self, sink: Option<DebugSink>) {
        *self.sink.lock().unwrap() = sink;
    }
    fn set_guest_debug(&self, cpu: usize, _debug: kvm_guest_debug) -> Result<(), String> {
        assert!(cpu < self.count(), "set_guest_debug({cpu})");
        Ok(())
    }
    /// Identity below twice the memory: the upper half translates to addresses memory lacks.
    fn translate(&self, cpu: usize, gva: u64) -> Option<u64> {
        assert!(cpu < self.count(), "translate on vCPU {cpu}");
        (gva < 2 * MEMORY).then_some(gva)
    }
    fn registers(&self, cpu: usize) -> Result<KvmRegisters, String> {
        let registers = self.registers.lock().unwrap();
        let (regs, sregs, fpu, k_gs_base) = *registers.get(cpu).ok_or(format!("no vCPU {cpu}"))?;
        Ok(KvmRegisters { regs, sregs, fpu, k_gs_base })
    }
    fn set_registers(&self, cpu: usize, r: KvmRegisters) -> Result<Result<(), String>, String> {
        let mut registers = self.registers.lock().unwrap();
        *registers.get_mut(cpu).ok_or(format!("no vCPU {cpu}"))? = (r.regs, r.sregs, r.fpu, r.k_gs_base);
        Ok(Ok(()))
    }
}

/// gdb's end of the connection: replies are counted, not kept.
struct Replies(usize);
impl Connection for Replies {
    type Error = std::convert::Infallible;
    fn write(&mut self, _byte: u8) -> Result<(), Self::Error> {
        self.0 += 1;
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

fn debug_event(bytes: &mut impl Iterator<Item = u8>) -> DebugEvent {
    let mut word = || u64::from_le_bytes(std::array::from_fn(|_| bytes.next().unwrap_or(0)));
    let (kind, pc, dr6) = (word(), word(), word());
    match kind % 4 {
        0 => DebugEvent::Failed { rip: pc },
        n => DebugEvent::Exit(kvm_debug_exit_arch {
            exception: [1, 3, 14][n as usize - 1],
            pc,
            dr6,
            ..Default::default()
        }),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&cpus, stream)) = input.split_first() else { return };
    let vcpus = Arc::new(ModelVcpus::default());
    *vcpus.registers.lock().unwrap() = vec![Default::default(); usize::from(cpus % 4) + 1];
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap();
    let pattern: Vec<u8> = (0..MEMORY).map(|i| (i * 7 % 251) as u8).collect();
    memory.write_slice(&pattern, GuestAddress(0)).unwrap();
    let mut debugger = GuestDebugger::new(vcpus.clone(), memory.clone()).unwrap();
    debugger.attach().unwrap();

    let mut bytes = stream.iter().copied();
    let Ok(mut stub) = GdbStub::new(Replies(0)).run_state_machine(&mut debugger) else { return };
    while let Some(byte) = bytes.next() {
        stub = match stub {
            GdbStubStateMachine::Idle(idle) => idle.incoming_data(&mut debugger, byte),
            GdbStubStateMachine::Running(running) => match byte {
                // The guest runs until a debug exit (or gdb's Ctrl-C, or the VM's end).
                0 => {
                    let (cpu, event) = (bytes.next().unwrap_or(0), debug_event(&mut bytes));
                    if let Some(sink) = vcpus.sink.lock().unwrap().as_ref() {
                        sink(usize::from(cpu) % vcpus.count(), event);
                    }
                    match debugger.pending_stop() {
                        Ok(Some(reason)) => running.report_stop(&mut debugger, reason),
                        Ok(None) => Ok(GdbStubStateMachine::Running(running)),
                        Err(_) => break,
                    }
                }
                1 => {
                    vcpus.ended.store(true, Ordering::Relaxed);
                    match debugger.pending_stop() {
                        Ok(Some(reason)) => running.report_stop(&mut debugger, reason),
                        _ => break,
                    }
                }
                _ => running.incoming_data(&mut debugger, byte),
            },
            GdbStubStateMachine::CtrlCInterrupt(interrupt) => {
                match GdbEventLoop::<ModelVcpus>::on_interrupt(&mut debugger) {
                    Ok(reason) => interrupt.interrupt_handled(&mut debugger, reason),
                    Err(_) => break,
                }
            }
            GdbStubStateMachine::Disconnected(_) => break,
        }
        .unwrap_or_else(|_| GdbStub::new(Replies(0)).run_state_machine(&mut debugger).unwrap());
    }
    debugger.detach().unwrap();
    // Breakpoints are gone with their original bytes back: without gdb's own memory writes
    // ('M' and 'X' packets), memory is as it was.
    let gdb_wrote = stream.windows(2).any(|w| w[0] == b'$' && (w[1] == b'M' || w[1] == b'X'));
    let mut after = vec![0; MEMORY as usize];
    memory.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(gdb_wrote || after == pattern, "detaching left guest memory changed");
});
