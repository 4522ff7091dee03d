//! Conntrack's own table: `ct4_table`/`ct6_table` hold the flow entries
//! in groups of eight lines, each line a 32-bit tag, a key and a value,
//! kept apart (the tags first, then the keys, then the values) so that a
//! group's tags share a cache line. A key hashes to one group; its tag
//! says which of the group's lines may hold it. A miss reads the group's
//! tags and no key; a hit the key and its value. A key whose group is
//! full goes to the next group, which a miss then looks in too. The
//! datapath claims a free line by compare-and-exchange on its tag, so
//! inserts need no lock and no allocation, and both it and the agent
//! (through `mmap`) release a line the same way. Written once for the
//! datapath and the agent: both must hash a key to the same group and tag.
//!
//! The hash is keyed by a random seed the agent draws when it makes the
//! table and keeps in the table's last group (past those keys hash to):
//! whoever adopts the table hashes as its maker did, and clients, who do
//! not know the seed, cannot crowd their flows into one group.

use super::{Ct4Entry, Ct4Key, Ct6Entry, Ct6Key};

/// Lines per group.
pub const CT_GROUP: u32 = 8;
/// A tag whose line holds nothing.
pub const CT_TAG_FREE: u32 = 0;
/// A tag whose line is being written (or released): readers pass it by.
pub const CT_TAG_BUSY: u32 = 1;
/// Every live tag has this bit, so none is `CT_TAG_FREE` or `CT_TAG_BUSY`.
pub const CT_TAG_LIVE: u32 = 0x8000_0000;

/// One group of `ct4_table`/`ct6_table`: its lines' tags, keys and
/// values (a line's key and value are valid while its tag is live).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtGroup<K, V> {
    pub tags: [u32; CT_GROUP as usize],
    /// Live keys of this group kept in the next one (wrapping), which took
    /// them while this one was full: a miss here looks there only while
    /// this is not 0. Raised before such a key is written, lowered once it
    /// is released, by whoever released it.
    pub spilled: u32,
    pub _pad: u32,
    pub keys: [K; CT_GROUP as usize],
    pub values: [V; CT_GROUP as usize],
}

pub type Ct4Group = CtGroup<Ct4Key, Ct4Entry>;
pub type Ct6Group = CtGroup<Ct6Key, Ct6Entry>;

/// Lines of a table sized for `entries` flows: twice as many, a power of
/// two, at least one group. At half load (`entries` flows) a group of
/// eight is full for about one new flow in twenty; such a flow takes a
/// line of the next group, and only one in about a hundred and twenty
/// finds both full (and goes to the overflow map).
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
/// padding is zero in every key the datapath and the agent make). Read in
/// place: the datapath has no stack to spare for a copy.
pub trait CtWords: Copy {
    const WORDS: usize;
    #[inline(always)]
    fn words(&self) -> &[u32] {
        // SAFETY: keys are plain data of `WORDS` 4-byte words, 4-byte
        // aligned, padding explicit (checked by the tests below).
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u32>(), Self::WORDS) }
    }
}

impl CtWords for Ct4Key {
    const WORDS: usize = 4;
}

impl CtWords for Ct6Key {
    const WORDS: usize = 10;
}

/// Multipliers of a table's hash: one more than an IPv6 key's words.
pub const CT_HASH_KEYS: usize = 11;
/// Words of the seed the multipliers are drawn from, the first tags of
/// the table's last group (past the groups keys hash to). All zero (a
/// table nobody seeded) draws the object's own multipliers.
pub const CT_SEED_WORDS: usize = 4;

/// The multipliers drawn from `seed` (splitmix64 over it): random and
/// secret as the seed is, so a client cannot aim its flows at one group.
pub const fn ct_hash_keys(seed: [u32; CT_SEED_WORDS]) -> [u64; CT_HASH_KEYS] {
    let mut state = ((seed[0] as u64) << 32 | seed[1] as u64) ^ 0x9e37_79b9_7f4a_7c15;
    let salt = (seed[2] as u64) << 32 | seed[3] as u64;
    let mut keys = [0u64; CT_HASH_KEYS];
    let mut i = 0;
    while i < CT_HASH_KEYS {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state ^ salt;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        keys[i] = z ^ (z >> 31);
        i += 1;
    }
    keys
}

/// The key's group (of `groups_mask + 1`) and its tag, by the multipliers
/// `keys` gives (`ct_hash_keys`): a multilinear hash, whose products do
/// not wait on each other (a chain of mixes, one a word, took most of a
/// hit's time). The sum is linear in the key, so keys in a progression (a
/// client's ports one after another) would fall in groups in a
/// progression, which for some seeds crowds neighbouring groups: one
/// xor-shift and multiply break that.
#[inline(always)]
pub fn ct_home<K: CtWords>(key: &K, keys: impl Fn(usize) -> u64, groups_mask: u32) -> (u32, u32) {
    let mut h = keys(0);
    for (i, w) in key.words().iter().enumerate() {
        h = h.wrapping_add((*w as u64).wrapping_mul(keys(i + 1)));
    }
    let t = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    ((t >> 32) as u32 & groups_mask, t as u32 | CT_TAG_LIVE)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), Copy, explicit padding, no invalid bit patterns.
    unsafe impl aya::Pod for Ct4Group {}
    unsafe impl aya::Pod for Ct6Group {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_whole_words() {
        assert_eq!(core::mem::size_of::<Ct4Key>(), 4 * Ct4Key::WORDS);
        assert_eq!(core::mem::size_of::<Ct6Key>(), 4 * Ct6Key::WORDS);
        assert_eq!(core::mem::align_of::<Ct6Key>(), 4);
    }

    #[test]
    fn groups_have_no_padding_between_tags_keys_and_values() {
        assert_eq!(core::mem::size_of::<Ct4Group>(), 40 + 8 * 16 + 8 * 28);
        assert_eq!(core::mem::size_of::<Ct6Group>(), 40 + 8 * 40 + 8 * 40);
    }

    #[test]
    fn a_table_has_twice_its_entries_in_lines_a_power_of_two() {
        assert_eq!(ct_lines(262_144), 524_288);
        assert_eq!(ct_lines(3000), 8192);
        assert_eq!(ct_lines(1), CT_GROUP);
    }

    /// The socket key of a TCP client's address and port.
    fn client_port(src_addr: u32, src_port: u16) -> Ct4Key {
        Ct4Key {
            src_addr,
            src_port,
            proto: 6,
            direction: 3,
            ..Ct4Key::default()
        }
    }

    #[test]
    fn keys_spread_over_groups_and_tags_are_live() {
        let mask = 1023;
        let keys = ct_hash_keys([1, 2, 3, 4]);
        let mut seen = [0u32; 1024];
        for port in 0..8192u16 {
            let (group, tag) = ct_home(&client_port(0x0a00_0001, port), |i| keys[i], mask);
            assert!(tag & CT_TAG_LIVE != 0);
            seen[group as usize] += 1;
        }
        // Eight keys a group on average: a fair hash leaves hardly any
        // group empty and none near three times that.
        let empty = seen.iter().filter(|n| **n == 0).count();
        assert!(empty <= 4 && seen.iter().all(|n| *n < 24), "{seen:?}");
    }

    /// 5,000 flows of one client, its ports one after another, in 4,096
    /// groups: whatever the seed, no two neighbouring groups are asked for
    /// more than their 16 lines (a purely linear hash crowded them for
    /// about one seed in a hundred).
    #[test]
    fn a_clients_ports_in_a_row_spread_for_every_seed() {
        let groups = 4096u32;
        for s in 0..300u32 {
            let keys = ct_hash_keys([s, s.wrapping_mul(0x9e37_79b9), !s, 7]);
            let mut load = [0u32; 4096];
            for port in 20_000..25_000u16 {
                let key = client_port(0x0100_000a, port);
                load[ct_home(&key, |i| keys[i], groups - 1).0 as usize] += 1;
            }
            let pair = (0..groups as usize).map(|g| load[g] + load[(g + 1) % 4096]);
            assert!(pair.max().is_some_and(|m| m <= 16), "seed {s}");
        }
    }

    #[test]
    fn seeds_draw_different_multipliers() {
        let a = ct_hash_keys([1, 2, 3, 4]);
        let b = ct_hash_keys([1, 2, 3, 5]);
        let c = ct_hash_keys([2, 2, 3, 4]);
        assert!(a.iter().zip(b).all(|(x, y)| *x != y));
        assert!(a.iter().zip(c).all(|(x, y)| *x != y));
        let key = client_port(0x0a00_0001, 40_000);
        let homes = [a, b, c].map(|k| ct_home(&key, |i| k[i], u32::MAX));
        assert!(homes[0] != homes[1] && homes[0] != homes[2]);
    }
}
