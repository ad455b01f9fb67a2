//! Per-vCPU CPUID: what KVM supports, with the topology of this VM and the features the user
//! masked out.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A CPUID feature bit that `--disable-cpuid` can clear, named as in /proc/cpuinfo.
#[derive(Debug)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn feature(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature { name, leaf, subleaf, reg, bit }
}

pub const FEATURES: &[Feature] = &[
    feature("fma", 1, 0, Reg::Ecx, 12),
    feature("cx16", 1, 0, Reg::Ecx, 13),
    feature("pcid", 1, 0, Reg::Ecx, 17),
    feature("sse4_1", 1, 0, Reg::Ecx, 19),
    feature("sse4_2", 1, 0, Reg::Ecx, 20),
    feature("x2apic", 1, 0, Reg::Ecx, 21),
    feature("movbe", 1, 0, Reg::Ecx, 22),
    feature("popcnt", 1, 0, Reg::Ecx, 23),
    feature("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    feature("aes", 1, 0, Reg::Ecx, 25),
    feature("xsave", 1, 0, Reg::Ecx, 26),
    feature("avx", 1, 0, Reg::Ecx, 28),
    feature("f16c", 1, 0, Reg::Ecx, 29),
    feature("rdrand", 1, 0, Reg::Ecx, 30),
    feature("fsgsbase", 7, 0, Reg::Ebx, 0),
    feature("bmi1", 7, 0, Reg::Ebx, 3),
    feature("avx2", 7, 0, Reg::Ebx, 5),
    feature("smep", 7, 0, Reg::Ebx, 7),
    feature("bmi2", 7, 0, Reg::Ebx, 8),
    feature("erms", 7, 0, Reg::Ebx, 9),
    feature("invpcid", 7, 0, Reg::Ebx, 10),
    feature("avx512f", 7, 0, Reg::Ebx, 16),
    feature("rdseed", 7, 0, Reg::Ebx, 18),
    feature("adx", 7, 0, Reg::Ebx, 19),
    feature("smap", 7, 0, Reg::Ebx, 20),
    feature("sha_ni", 7, 0, Reg::Ebx, 29),
    feature("umip", 7, 0, Reg::Ecx, 2),
    feature("pku", 7, 0, Reg::Ecx, 3),
    feature("la57", 7, 0, Reg::Ecx, 16),
    feature("rdpid", 7, 0, Reg::Ecx, 22),
    feature("kvmclock", 0x4000_0001, 0, Reg::Eax, 3),
    feature("pv_eoi", 0x4000_0001, 0, Reg::Eax, 6),
    feature("pv_unhalt", 0x4000_0001, 0, Reg::Eax, 7),
    feature("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    feature("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    feature("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    feature("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

pub fn find_feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name.eq_ignore_ascii_case(name))
}

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const CLFLUSH_LINE_QWORDS: u32 = 8;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Adapts KVM's supported CPUID for vCPU `cpu_index` of `cpu_count`: one core per vCPU in one
/// package, APIC ID = vCPU index, hypervisor bit set, `disabled` features cleared.
pub fn for_vcpu(supported: &CpuId, cpu_index: u8, cpu_count: u8, disabled: &[&Feature]) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    // Bits needed to number every core: the x2APIC ID shift of the core level.
    let core_shift = 32 - (count - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_LINE_QWORDS << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                let (shift, processors, level) = match entry.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (core_shift, count, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = processors;
                entry.ecx = (level << 8) | (entry.index & 0xff);
            }
            _ => {}
        }
        for feature in disabled {
            if feature.leaf == entry.function && feature.subleaf == entry.index {
                *reg_mut(entry, feature.reg) &= !(1 << feature.bit);
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ecx, ..Default::default() }
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0),
            entry(1, 0, (1 << 23) | (1 << 21)),
            entry(7, 0, 0),
            entry(0xb, 0, 0),
            entry(0xb, 1, 0),
            entry(0x4000_0001, 0, 0),
        ])
        .unwrap()
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_cpu_count() {
        let base = supported();
        for cpu in 0..4u8 {
            let cpuid = for_vcpu(&base, cpu, 4, &[]);
            let leaf1 = get(&cpuid, 1, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(cpu));
            assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(leaf1.edx & EDX_HTT, 0);
            assert_eq!(get(&cpuid, 0xb, 0).edx, u32::from(cpu));
            let core = get(&cpuid, 0xb, 1);
            assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, TOPOLOGY_LEVEL_CORE));
        }
        let single = get(&for_vcpu(&base, 0, 1, &[]), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn disabled_features_are_cleared_and_others_kept() {
        let popcnt = find_feature("POPCNT").unwrap();
        let cpuid = for_vcpu(&supported(), 0, 1, &[popcnt]);
        let leaf1 = get(&cpuid, 1, 0);
        assert_eq!(leaf1.ecx & (1 << 23), 0);
        assert_ne!(leaf1.ecx & (1 << 21), 0, "x2apic must stay");
        assert!(find_feature("no-such-flag").is_none());
    }
}
