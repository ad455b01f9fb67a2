//! What KVM holds of a running x86 VM, for snapshots: each vCPU's architectural state and the
//! VM-wide irqchip (PIC pair, IOAPIC), PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSR_IA32_TSC: restored before the MSRs that are relative to it (the TSC deadline).
const MSR_IA32_TSC: u32 = 0x10;

#[derive(Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// The TSC first, then every other MSR KVM lets user space save.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

#[derive(Default, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The MSRs to save, TSC first: `index_list` is KVM_GET_MSR_INDEX_LIST.
pub fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = index_list.iter().copied().filter(|&m| m != MSR_IA32_TSC).collect();
    list.insert(0, MSR_IA32_TSC);
    list
}

/// Reads `indices`, dropping the ones this vCPU cannot report (KVM stops at the first).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut wanted: Vec<kvm_msr_entry> =
        indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut saved = Vec::with_capacity(wanted.len());
    while !wanted.is_empty() {
        let mut msrs = Msrs::from_entries(&wanted).map_err(|e| format!("MSR list: {e:?}"))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Entry `read` failed: skip it and go on after it.
        wanted.drain(..(read + 1).min(wanted.len()));
    }
    Ok(saved)
}

/// Saves a vCPU that is not running (parked on its thread).
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, String> {
    Ok(VcpuState {
        cpuid: vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_CPUID2"))?.as_slice().to_vec(),
        mp_state: vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msrs)?,
        events: vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Restores a vCPU before it first runs, in the order KVM needs (CPUID before anything that
/// depends on features; the LAPIC before MSRs like the TSC deadline; events last).
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), String> {
    if let Some(khz) = state.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            vcpu.set_tsc_khz(khz).map_err(err("KVM_SET_TSC_KHZ (the snapshot's TSC rate)"))?;
        }
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| format!("CPUID: {e:?}"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state).map_err(err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
    // SAFETY: a kvm_xsave read back from KVM_GET_XSAVE, of the size KVM_SET_XSAVE takes.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs).map_err(err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
    // Only the MSRs whose saved value differs from the new vCPU's: writing some (the PMU's)
    // reprograms host perf events, which made KVM_SET_MSRS half of a restore's time.
    let indices: Vec<u32> = state.msrs.iter().map(|m| m.index).collect();
    let current = read_msrs(vcpu, &indices)?;
    let changed: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .filter(|saved| !current.iter().any(|c| c.index == saved.index && c.data == saved.data))
        .copied()
        .collect();
    let msrs = Msrs::from_entries(&changed).map_err(|e| format!("MSRs: {e:?}"))?;
    let written = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if written != changed.len() {
        return Err(format!("KVM_SET_MSRS: MSR {:#x} refused", changed[written].index));
    }
    vcpu.set_vcpu_events(&state.events).map_err(err("KVM_SET_VCPU_EVENTS"))
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, String> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, String> {
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
    })
}

/// Restores the VM-wide state, before the vCPUs'.
pub fn restore_vm(vm: &VmFd, state: &KvmVmState) -> Result<(), String> {
    vm.set_pit2(&state.pit).map_err(err("KVM_SET_PIT2"))?;
    // KVM_SET_CLOCK takes only the clock value: the flags KVM_GET_CLOCK reports are not input.
    let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
