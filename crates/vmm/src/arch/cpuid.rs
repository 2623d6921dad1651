//! CPUID for each vCPU: KVM's supported set, with the topology of `-smp` and the vCPU's
//! APIC id filled in, and virtualisation extensions hidden for named models.

use kvm_bindings::CpuId;

use crate::config::{CpuModel, Smp};

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The APIC id of vCPU `index`: thread, core and socket fields as the topology leaves say.
pub fn apic_id(smp: &Smp, index: u32) -> u32 {
    let tbits = bits_for(smp.threads);
    let cbits = bits_for(smp.cores);
    let thread = index % smp.threads;
    let core = (index / smp.threads) % smp.cores;
    let socket = index / (smp.threads * smp.cores);
    (socket << (tbits + cbits)) | (core << tbits) | thread
}

/// Patches KVM's supported CPUID for vCPU `index`.
pub fn vcpu_cpuid(base: &CpuId, smp: &Smp, index: u32, model: &CpuModel) -> CpuId {
    let mut cpuid = base.clone();
    let apic = apic_id(smp, index);
    let per_pkg = smp.cores * smp.threads;
    let tbits = bits_for(smp.threads);
    let pkg_bits = tbits + bits_for(smp.cores);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0xff) | (8 << 8) | (per_pkg.min(255) << 16) | (apic << 24);
                e.ecx |= 1 << 31; // running under a hypervisor
                if per_pkg > 1 {
                    e.edx |= 1 << 28; // HTT: several logical processors per package
                }
                if let CpuModel::Named(_) = model {
                    e.ecx &= !(1 << 5); // VMX
                }
            }
            0x4 => {
                // Intel deterministic cache parameters: cores per package, threads per cache.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { per_pkg } else { smp.threads };
                e.eax = (e.eax & 0x3ff)
                    | ((sharing.saturating_sub(1) & 0xfff) << 14)
                    | ((smp.cores.saturating_sub(1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: SMT level, then core level.
                match e.index {
                    0 => {
                        e.eax = tbits;
                        e.ebx = smp.threads;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = pkg_bits;
                        e.ebx = per_pkg;
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
                e.edx = apic;
            }
            0x8000_0001 => {
                if let CpuModel::Named(_) = model {
                    e.ecx &= !(1 << 2); // SVM
                }
            }
            0x8000_0008 => {
                // AMD: logical processors per package and the APIC id width.
                e.ecx = (e.ecx & !0xf0ff) | (per_pkg.saturating_sub(1) & 0xff) | (pkg_bits << 12);
            }
            0x8000_001e => {
                e.eax = apic;
                e.ebx = ((smp.threads.saturating_sub(1)) << 8) | ((apic >> tbits) & 0xff);
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_follow_the_topology() {
        let smp = Smp {
            cpus: 6,
            sockets: 2,
            cores: 3,
            threads: 1,
            maxcpus: 6,
        };
        let ids: Vec<u32> = (0..6).map(|i| apic_id(&smp, i)).collect();
        assert_eq!(ids, vec![0, 1, 2, 4, 5, 6]);
        let smp = Smp {
            cpus: 4,
            sockets: 1,
            cores: 2,
            threads: 2,
            maxcpus: 4,
        };
        let ids: Vec<u32> = (0..4).map(|i| apic_id(&smp, i)).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }
}
