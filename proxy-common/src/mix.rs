//! MurmurHash3's 64-bit finalizer, shared by what both sides must hash
//! alike (`lb_filter`) and by the agent's Maglev names.

/// Every input bit flips each output bit with probability close to 1/2.
#[inline(always)]
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
