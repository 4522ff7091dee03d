//! Random numbers from the kernel: backend choice (random, round-robin
//! fallback, least-connections start) and source NAT port search.

use aya_ebpf::helpers::bpf_get_prandom_u32;

/// A pseudo-random 32-bit number.
#[inline(always)]
pub fn random() -> u32 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_prandom_u32() }
}
