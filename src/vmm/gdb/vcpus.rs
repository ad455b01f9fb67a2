//! What the stub asks of the vCPUs. `VcpuControl` does it with KVM on the vCPU threads; the
//! fuzz target (`fuzz/fuzz_targets/gdb_packets.rs`) has a model of it, so that gdb's packets
//! can be fuzzed without a guest.

use kvm_bindings::{kvm_guest_debug, kvm_msr_entry, Msrs, KVM_GUESTDBG_BLOCKIRQ};

use crate::arch::x86_64::gdb::{KvmRegisters, MSR_KERNEL_GS_BASE};
use crate::vmm::vcpu::{DebugSink, VcpuControl};

pub trait DebuggedVcpus: Send + Sync {
    fn count(&self) -> usize;
    /// Whether the VM has ended.
    fn stopped(&self) -> bool;
    fn pause_if_running(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// Lets vCPU `cpu` alone run until its next debug exit.
    fn run_alone(&self, cpu: usize);
    fn wait_parked(&self) -> Result<(), String>;
    fn set_debug_sink(&self, sink: Option<DebugSink>);
    /// KVM_SET_GUEST_DEBUG on vCPU `cpu`; the guest is paused.
    fn set_guest_debug(&self, cpu: usize, debug: kvm_guest_debug) -> Result<(), String>;
    /// The guest physical address of `gva` in vCPU `cpu`'s address space.
    fn translate(&self, cpu: usize, gva: u64) -> Option<u64>;
    fn registers(&self, cpu: usize) -> Result<KvmRegisters, String>;
    /// Sets them; a `NonFatal` error is the vCPU refusing the values.
    fn set_registers(&self, cpu: usize, registers: KvmRegisters) -> Result<Result<(), String>, String>;
}

impl VcpuControl {
    fn on_vcpu<T: Send + 'static>(
        &self,
        cpu: usize,
        job: impl Fn(&crate::vmm::vcpu::Vcpu) -> T + Send + 'static,
    ) -> Result<T, String> {
        self.on_vcpus([cpu], job)?.pop().ok_or_else(|| format!("vCPU {cpu} did not answer"))
    }
}

impl DebuggedVcpus for VcpuControl {
    fn count(&self) -> usize {
        VcpuControl::count(self)
    }

    fn stopped(&self) -> bool {
        VcpuControl::stopped(self)
    }

    fn pause_if_running(&self) -> Result<(), String> {
        VcpuControl::pause_if_running(self)
    }

    fn resume(&self) -> Result<(), String> {
        VcpuControl::resume(self)
    }

    fn run_alone(&self, cpu: usize) {
        VcpuControl::run_alone(self, cpu)
    }

    fn wait_parked(&self) -> Result<(), String> {
        VcpuControl::wait_parked(self)
    }

    fn set_debug_sink(&self, sink: Option<DebugSink>) {
        VcpuControl::set_debug_sink(self, sink)
    }

    fn set_guest_debug(&self, cpu: usize, debug: kvm_guest_debug) -> Result<(), String> {
        self.on_vcpu(cpu, move |vcpu| {
            let mut debug = debug;
            vcpu.fd.set_guest_debug(&debug).or_else(|_| {
                // Kernels before 5.16 lack BLOCKIRQ; a step may then enter an interrupt handler.
                debug.control &= !KVM_GUESTDBG_BLOCKIRQ;
                vcpu.fd.set_guest_debug(&debug)
            })
        })?
        .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))
    }

    fn translate(&self, cpu: usize, gva: u64) -> Option<u64> {
        self.on_vcpu(cpu, move |vcpu| vcpu.fd.translate_gva(gva).ok().filter(|t| t.valid != 0))
            .ok()
            .flatten()
            .map(|t| t.physical_address)
    }

    fn registers(&self, cpu: usize) -> Result<KvmRegisters, String> {
        self.on_vcpu(cpu, |vcpu| {
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_KERNEL_GS_BASE, ..Default::default() }])
                .map_err(|e| format!("{e:?}"))?;
            vcpu.fd.get_msrs(&mut msrs).map_err(|e| e.to_string())?;
            Ok(KvmRegisters {
                regs: vcpu.fd.get_regs().map_err(|e| e.to_string())?,
                sregs: vcpu.fd.get_sregs().map_err(|e| e.to_string())?,
                fpu: vcpu.fd.get_fpu().map_err(|e| e.to_string())?,
                k_gs_base: msrs.as_slice()[0].data,
            })
        })?
    }

    fn set_registers(&self, cpu: usize, registers: KvmRegisters) -> Result<Result<(), String>, String> {
        self.on_vcpu(cpu, move |vcpu| {
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_KERNEL_GS_BASE,
                data: registers.k_gs_base,
                ..Default::default()
            }])
            .map_err(|e| format!("{e:?}"))?;
            vcpu.fd.set_regs(&registers.regs).map_err(|e| e.to_string())?;
            vcpu.fd.set_sregs(&registers.sregs).map_err(|e| e.to_string())?;
            vcpu.fd.set_fpu(&registers.fpu).map_err(|e| e.to_string())?;
            vcpu.fd.set_msrs(&msrs).map(drop).map_err(|e| e.to_string())
        })
    }
}
