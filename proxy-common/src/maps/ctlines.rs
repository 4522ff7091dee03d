//! Conntrack's own table: `ct4_lines`/`ct6_lines` hold one flow entry per
//! line (a cache line for IPv4, two for IPv6), `ct4_tags`/`ct6_tags` a
//! 32-bit tag per line, eight lines to a group. A key hashes to one group;
//! its tag says which lines may hold it. A miss reads 32 bytes of tags
//! and no line; a hit one line more. The datapath claims a free tag by
//! compare-and-exchange, so inserts need no lock and no allocation, and
//! both it and the agent (through `mmap`) release a tag the same way.
//! Written once for the datapath and the agent: both must hash a key to
//! the same group and tag.

use super::{Ct4Entry, Ct4Key, Ct6Entry, Ct6Key};

/// Lines per group, and tags per `CtTags`.
pub const CT_GROUP: u32 = 8;
/// A tag whose line holds nothing.
pub const CT_TAG_FREE: u32 = 0;
/// A tag whose line is being written (or released): readers pass it by.
pub const CT_TAG_BUSY: u32 = 1;
/// Every live tag has this bit, so none is `CT_TAG_FREE` or `CT_TAG_BUSY`.
pub const CT_TAG_LIVE: u32 = 0x8000_0000;

/// One group's tags (`ct4_tags`, `ct6_tags`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtTags {
    pub tags: [u32; CT_GROUP as usize],
}

/// An IPv4 flow entry: 64 bytes, one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ct4Line {
    pub key: Ct4Key,
    pub value: Ct4Entry,
    pub _pad: [u32; 5],
}

/// An IPv6 flow entry: 128 bytes, two cache lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct6Line {
    pub key: Ct6Key,
    pub value: Ct6Entry,
    pub _pad: [u32; 12],
}

impl Default for Ct6Line {
    fn default() -> Self {
        Ct6Line {
            key: Ct6Key::default(),
            value: Ct6Entry::default(),
            _pad: [0; 12],
        }
    }
}

/// Lines of a table sized for `entries` flows: twice as many, a power of
/// two, at least one group. At half load a group of eight runs full for
/// about one flow in a hundred, which then goes to the overflow map.
pub const fn ct_lines(entries: u32) -> u32 {
    let lines = entries.saturating_mul(2);
    let lines = if lines < CT_GROUP { CT_GROUP } else { lines };
    if lines.is_power_of_two() {
        lines
    } else {
        match lines.checked_next_power_of_two() {
            Some(n) => n,
            None => 1 << 31,
        }
    }
}

/// A conntrack key as the 32-bit words it hashes and compares by (its
/// padding is zero in every key the datapath and the agent make).
pub trait CtWords: Copy {
    type Words: Copy + PartialEq + AsRef<[u32]>;
    fn words(&self) -> Self::Words;
}

impl CtWords for Ct4Key {
    type Words = [u32; 4];
    #[inline(always)]
    fn words(&self) -> [u32; 4] {
        // SAFETY: 16 bytes of plain data, 4-byte aligned, padding explicit.
        unsafe { core::mem::transmute::<Ct4Key, [u32; 4]>(*self) }
    }
}

impl CtWords for Ct6Key {
    type Words = [u32; 10];
    #[inline(always)]
    fn words(&self) -> [u32; 10] {
        // SAFETY: 40 bytes of plain data, 4-byte aligned, padding explicit.
        unsafe { core::mem::transmute::<Ct6Key, [u32; 10]>(*self) }
    }
}

/// MurmurHash3's 32-bit finalizer.
#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The key's group (of `groups_mask + 1`) and its tag.
#[inline(always)]
pub fn ct_home<K: CtWords>(key: &K, groups_mask: u32) -> (u32, u32) {
    let mut h = 0x9e37_79b9u32;
    for w in key.words().as_ref() {
        h = mix(h ^ *w);
    }
    (h & groups_mask, mix(h ^ 0x5bd1_e995) | CT_TAG_LIVE)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), Copy, explicit padding, no invalid bit patterns.
    unsafe impl aya::Pod for CtTags {}
    unsafe impl aya::Pod for Ct4Line {}
    unsafe impl aya::Pod for Ct6Line {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_whole_cache_lines() {
        assert_eq!(core::mem::size_of::<Ct4Line>(), 64);
        assert_eq!(core::mem::size_of::<Ct6Line>(), 128);
        assert_eq!(core::mem::size_of::<CtTags>(), 32);
    }

    #[test]
    fn a_table_has_twice_its_entries_in_lines_a_power_of_two() {
        assert_eq!(ct_lines(262_144), 524_288);
        assert_eq!(ct_lines(3000), 8192);
        assert_eq!(ct_lines(1), CT_GROUP);
    }

    #[test]
    fn keys_spread_over_groups_and_tags_are_live() {
        let mask = 1023;
        let mut seen = [0u32; 1024];
        for port in 0..8192u16 {
            let key = Ct4Key {
                src_addr: 0x0a00_0001,
                src_port: port,
                proto: 6,
                ..Ct4Key::default()
            };
            let (group, tag) = ct_home(&key, mask);
            assert!(tag & CT_TAG_LIVE != 0);
            seen[group as usize] += 1;
        }
        // Eight keys a group on average: a fair hash leaves hardly any
        // group empty and none near three times that.
        let empty = seen.iter().filter(|n| **n == 0).count();
        assert!(empty <= 4 && seen.iter().all(|n| *n < 24), "{seen:?}");
    }
}
