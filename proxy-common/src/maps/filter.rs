//! The lookup filter (`lb_filter`): an array of 64-bit words, one bit per
//! frontend (address, port, protocol) and one per backend (address, port),
//! which the agent sets before any entry names them. A packet whose
//! destination has no frontend bit cannot be a service's, and one whose
//! source has no backend bit cannot be a reply of a tracked flow: the
//! datapath passes it without a hash-map lookup. A bit two items share
//! (or one the agent has not cleared yet) only costs the lookups it would
//! have cost anyway.

use crate::mix::fmix64;

/// Words in `lb_filter`: 2^20 bits, 128 KiB.
pub const FILTER_WORDS: u32 = 1 << 14;
const FILTER_BITS_LOG2: u32 = 20;

/// Which set a bit belongs to: both share the array.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum FilterSet {
    Frontend = 1,
    Backend = 2,
}

/// The bit of an item: `addr` as `filter_addr4`/`filter_addr6` fold it,
/// `port` in network byte order, `proto` 0 for a backend.
#[inline(always)]
pub fn filter_bit(set: FilterSet, addr: u32, port: u16, proto: u8) -> u32 {
    let x = ((addr as u64) << 32) | ((port as u64) << 16) | ((proto as u64) << 8) | set as u64;
    (fmix64(x) >> (64 - FILTER_BITS_LOG2)) as u32
}

/// The word holding `bit`, and its mask there.
#[inline(always)]
pub fn filter_word(bit: u32) -> (u32, u64) {
    (bit >> 6, 1u64 << (bit & 63))
}

#[inline(always)]
pub fn filter_addr4(addr: u32) -> u32 {
    addr
}

#[inline(always)]
pub fn filter_addr6(addr: [u32; 4]) -> u32 {
    let low = (addr[0] as u64) | ((addr[1] as u64) << 32);
    let high = (addr[2] as u64) | ((addr[3] as u64) << 32);
    let h = fmix64(fmix64(low) ^ high);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_fall_inside_the_array_and_sets_differ() {
        let mut same = 0;
        for last in 0..=255u32 {
            let addr = filter_addr4(u32::from_le_bytes([10, 0, 0, last as u8]));
            let f = filter_bit(FilterSet::Frontend, addr, 80u16.to_be(), 6);
            let b = filter_bit(FilterSet::Backend, addr, 80u16.to_be(), 0);
            assert!(filter_word(f).0 < FILTER_WORDS && filter_word(b).0 < FILTER_WORDS);
            same += usize::from(f == b);
        }
        assert!(same < 2, "{same} of 256 frontend and backend bits coincide");
    }

    #[test]
    fn neighbouring_addresses_spread() {
        let mut words = [false; FILTER_WORDS as usize];
        for i in 0..1000u32 {
            let addr = filter_addr6([0xfd00, 0, 0, i.to_be()]);
            let (word, _) = filter_word(filter_bit(FilterSet::Backend, addr, 8080u16.to_be(), 0));
            words[word as usize] = true;
        }
        let used = words.iter().filter(|w| **w).count();
        // 1,000 random picks out of 16,384 words leave about 970 distinct.
        assert!(used > 940, "1,000 neighbours use only {used} words");
    }
}
