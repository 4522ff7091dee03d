//! MurmurHash3's finalizers, shared by what both sides must hash alike
//! (`lb_filter`) and by the datapath's flow hashes and the agent's Maglev
//! names.

/// MurmurHash3's 32-bit finalizer: every input bit affects every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Every input bit flips each output bit with probability close to 1/2.
#[inline(always)]
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
