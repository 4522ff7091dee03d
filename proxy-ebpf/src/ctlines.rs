//! Conntrack's own table (see proxy-common's `ctlines`): a key's group of
//! eight lines, each a tag, a key and a value, and the next group for
//! keys whose own group was full. Lookups, inserts and removals each run
//! as one global function per family, which the verifier walks once, not
//! at every place conntrack is used; they answer with a line index or an
//! error (a global function returns no pointer). They must keep to a few
//! bytes of stack, as TC's programs call them with nearly all of BPF's
//! 512 taken: few values live across a group's lookup (BPF keeps four in
//! registers), and loops keep little besides their own.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    btf_maps::Array,
    macros::btf_map,
};
use proxy_common::{
    CT_GROUP, CT_HASH_KEYS, CT_TAG_BUSY, CT_TAG_FREE, Ct4Entry, Ct4Group, Ct4Key, Ct6Entry,
    Ct6Group, Ct6Key, CtGroup, CtWords, MAX_CONNTRACK, ct_hash_keys, ct_lines,
};

use crate::{
    atomic,
    maps::{self, CtScratch},
};

/// The agent maps the tables to read and release entries.
pub const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
pub const GROUPS: usize = (ct_lines(MAX_CONNTRACK) / CT_GROUP) as usize;
/// Groups keys hash to, and the group holding the hash's seed (the agent's
/// alone).
pub const ARRAY: usize = GROUPS + 1;

/// The kernel's answer to an insert into a full hash map, kept: a full
/// group sends the flow to the overflow map as a full map did.
const E2BIG: i64 = 7;
const EEXIST: i64 = 17;
const ENOENT: i64 = 2;

#[btf_map(name = "ct4_table")]
pub static CT4_GROUPS: Array<Ct4Group, ARRAY, MMAPABLE> = Array::new();
#[btf_map(name = "ct6_table")]
pub static CT6_GROUPS: Array<Ct6Group, ARRAY, MMAPABLE> = Array::new();

/// Groups of each table, less one. The loader sets it to match the sizes
/// it gives the maps (a constant to the verifier); an index beyond a map
/// would find nothing and insert nothing, never another key's line.
#[unsafe(no_mangle)]
static CT_GROUPS_MASK: u32 = GROUPS as u32 - 1;

#[inline(always)]
fn groups_mask() -> u32 {
    // SAFETY: a read of a static; volatile so that the loader's value, not
    // the compiler's, is the one read.
    unsafe { core::ptr::read_volatile(&raw const CT_GROUPS_MASK) }
}

/// The hash's multipliers, drawn from the tables' seed: the loader sets
/// them (a read-only global, so each read is a load, not a lookup).
#[unsafe(no_mangle)]
static CT_HASH: [u64; CT_HASH_KEYS] = ct_hash_keys([0; 4]);

/// The key's group and tag (see `proxy_common::ct_home`).
#[inline(always)]
fn ct_home<K: CtWords>(key: &K) -> (u32, u32) {
    // SAFETY: reads of a static, within it; volatile so that the loader's
    // values, not the compiler's, are the ones read.
    let keys = |i: usize| unsafe {
        core::ptr::read_volatile((&raw const CT_HASH).cast::<u64>().add(i % CT_HASH_KEYS))
    };
    proxy_common::ct_home(key, keys, groups_mask())
}

/// No line: what a walk answers for a key not there, or a group full.
const NONE: u32 = u32::MAX;

/// True if both keys have the same words, read in place. Every word is
/// compared, with no early exit, so that no loop becomes a `memcmp` the
/// BPF target lacks.
#[inline(always)]
fn same<K: CtWords>(a: &K, b: &K) -> bool {
    let mut diff = 0;
    for (x, y) in a.words().iter().zip(b.words()) {
        diff |= x ^ y;
    }
    diff == 0
}

/// The address of element `i` (taken modulo a group's lines) of one of a
/// group's arrays.
#[inline(always)]
fn nth<T>(array: *mut [T; CT_GROUP as usize], i: u32) -> *mut T {
    // SAFETY: within the array: the index is taken modulo its length.
    unsafe { array.cast::<T>().add((i % CT_GROUP) as usize) }
}

/// The address of tag `i` of a group.
#[inline(always)]
fn tag_at<K, V>(group: *mut CtGroup<K, V>, i: u32) -> *mut u32 {
    // SAFETY: a field of a live group.
    nth(unsafe { &raw mut (*group).tags }, i)
}

/// The address of key `i` of a group.
#[inline(always)]
fn key_at<K, V>(group: *mut CtGroup<K, V>, i: u32) -> *mut K {
    // SAFETY: a field of a live group.
    nth(unsafe { &raw mut (*group).keys }, i)
}

/// The address of value `i` of a group.
#[inline(always)]
fn value_at<K, V>(group: *mut CtGroup<K, V>, i: u32) -> *mut V {
    // SAFETY: a field of a live group.
    nth(unsafe { &raw mut (*group).values }, i)
}

/// The address of a group's count of keys kept in the next group.
#[inline(always)]
fn spilled_at<K, V>(group: *mut CtGroup<K, V>) -> *mut u32 {
    // SAFETY: within the group's value.
    unsafe { &raw mut (*group).spilled }
}

/// True while some of the group's keys are kept in the next group.
#[inline(always)]
fn spills<K, V>(group: *mut CtGroup<K, V>) -> bool {
    // SAFETY: a live array value; read once.
    unsafe { core::ptr::read_volatile(spilled_at(group)) != 0 }
}

/// The key's line in `group` (`NONE` if not there). Free lines are looked
/// for apart (`free_in`): each loop keeps fewer values in registers. The
/// key is read anew at each compare (a fence between them): held in
/// registers across the loop, an IPv6 key's ten words spilled onto the
/// stack the callers do not have.
#[inline(always)]
fn walk<K: CtWords, V>(group: *mut CtGroup<K, V>, tag: u32, key: *const K) -> u32 {
    for i in 0..CT_GROUP {
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: a live array value. The tag is read once, as another
        // CPU may change it; the key is read only under a live tag. `key`
        // points to a live key.
        let seen = unsafe { core::ptr::read_volatile(tag_at(group, i)) };
        if seen == tag && same(unsafe { &*key_at(group, i) }, unsafe { &*key }) {
            return i;
        }
    }
    NONE
}

/// The first free line of `group` (`NONE` if none).
#[inline(always)]
fn free_in<K, V>(group: *mut CtGroup<K, V>) -> u32 {
    for i in 0..CT_GROUP {
        // SAFETY: a live array value, its tag read once.
        if unsafe { core::ptr::read_volatile(tag_at(group, i)) } == CT_TAG_FREE {
            return i;
        }
    }
    NONE
}

/// Group `index`, looked up with `slot`, the one key on the stack.
#[inline(always)]
fn group_at<K, V>(
    groups: &Array<CtGroup<K, V>, ARRAY, MMAPABLE>,
    index: u32,
    slot: &mut u32,
) -> Option<*mut CtGroup<K, V>> {
    *slot = index;
    // SAFETY: the groups map, whose keys are u32 and values groups.
    unsafe { maps::lookup::<CtGroup<K, V>>(core::ptr::from_ref(groups).cast(), &raw const *slot) }
}

/// The group after `index`, wrapping.
#[inline(always)]
fn next(index: u32) -> u32 {
    index.wrapping_add(1) & groups_mask()
}

/// The line holding `key`, or -ENOENT: in its group, or in the next one
/// while its group has keys there.
#[inline(always)]
pub fn find<K: CtWords, V>(groups: &Array<CtGroup<K, V>, ARRAY, MMAPABLE>, key: &K) -> i64 {
    let mut slot = 0;
    let (index, tag) = ct_home(key);
    let Some(group) = group_at(groups, index, &mut slot) else {
        return -ENOENT;
    };
    if let i @ 0..CT_GROUP = walk(group, tag, key) {
        return i64::from(index * CT_GROUP + i);
    }
    if !spills(group) {
        return -ENOENT;
    }
    let index = next(index);
    let Some(group) = group_at(groups, index, &mut slot) else {
        return -ENOENT;
    };
    match walk(group, tag, key) {
        i @ 0..CT_GROUP => i64::from(index * CT_GROUP + i),
        _ => -ENOENT,
    }
}

/// Writes `value` at `key`: over the key's entry if it has one (if
/// `REPLACE`, else -EEXIST), else into a free line of its group, or of the
/// next group when its own is full (none, or another CPU took it first:
/// -E2BIG). Lines are claimed from other CPUs by compare-and-exchange on
/// their tags. An entry rewritten in place may be seen half old, half new
/// by a racing reader, as a flow's state change may.
#[inline(always)]
pub fn insert<K: CtWords, V: Copy, const REPLACE: bool>(
    groups: &Array<CtGroup<K, V>, ARRAY, MMAPABLE>,
    key: &K,
    value: &V,
) -> i64 {
    let mut slot = 0;
    let (index, tag) = ct_home(key);
    let Some(group) = group_at(groups, index, &mut slot) else {
        return -E2BIG;
    };
    if let i @ 0..CT_GROUP = walk(group, tag, key) {
        return replace::<_, _, REPLACE>(group, i, value);
    }
    if !spills(group)
        && let i @ 0..CT_GROUP = free_in(group)
    {
        return claim(group, i, tag, key, value);
    }
    spill::<_, _, REPLACE>(groups, group, key, value, &mut slot)
}

/// `insert` for a key whose group is full or keeps keys in the next group:
/// the key may be there, and its line must be if its own group has none
/// free. The group's index and the key's tag are worked out again rather
/// than kept across the lookup.
#[inline(always)]
fn spill<K: CtWords, V: Copy, const REPLACE: bool>(
    groups: &Array<CtGroup<K, V>, ARRAY, MMAPABLE>,
    group: *mut CtGroup<K, V>,
    key: &K,
    value: &V,
    slot: &mut u32,
) -> i64 {
    let (index, _) = ct_home(key);
    let Some(after) = group_at(groups, next(index), slot) else {
        return -E2BIG;
    };
    let (_, tag) = ct_home(key);
    if let i @ 0..CT_GROUP = walk(after, tag, key) {
        return replace::<_, _, REPLACE>(after, i, value);
    }
    if let i @ 0..CT_GROUP = free_in(group) {
        return claim(group, i, tag, key, value);
    }
    let i = free_in(after);
    if i == NONE {
        return -E2BIG;
    }
    let spilled = spilled_at(group);
    // SAFETY: a live array value's 4-byte aligned field. Raised before the
    // key can be found, so that a miss in its group looks on.
    unsafe { atomic::fetch_add(spilled, 1) };
    let claimed = claim(after, i, tag, key, value);
    if claimed != 0 {
        // SAFETY: as above; the raise this call made.
        unsafe { atomic::fetch_add(spilled, u32::MAX) };
    }
    claimed
}

/// Rewrites line `i` of `group` with `value` if `REPLACE`; -EEXIST if not.
#[inline(always)]
fn replace<K, V: Copy, const REPLACE: bool>(group: *mut CtGroup<K, V>, i: u32, value: &V) -> i64 {
    if !REPLACE {
        return -EEXIST;
    }
    // SAFETY: a live array value.
    unsafe { *value_at(group, i) = *value };
    0
}

/// Claims free line `i` of `group` for `key` and `value`; -E2BIG if
/// another CPU took it first. The key and the value go in before the tag,
/// so no reader sees the line before it is whole.
#[inline(always)]
fn claim<K: Copy, V: Copy>(group: *mut CtGroup<K, V>, i: u32, tag: u32, key: &K, value: &V) -> i64 {
    let at = tag_at(group, i);
    // SAFETY: a live array value; its tag 4-byte aligned. The line is this
    // CPU's while the tag is busy.
    unsafe {
        if !atomic::compare_exchange(at, CT_TAG_FREE, CT_TAG_BUSY) {
            return -E2BIG;
        }
        *key_at(group, i) = *key;
        *value_at(group, i) = *value;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        core::ptr::write_volatile(at, tag);
    }
    0
}

/// Releases the key's line; -ENOENT if it had none (or another CPU
/// released it first). A key kept in the next group lowers its own
/// group's count once released.
#[inline(always)]
fn remove<K: CtWords, V>(groups: &Array<CtGroup<K, V>, ARRAY, MMAPABLE>, key: &K) -> i64 {
    let mut slot = 0;
    let (index, tag) = ct_home(key);
    let Some(group) = group_at(groups, index, &mut slot) else {
        return -ENOENT;
    };
    if let i @ 0..CT_GROUP = walk(group, tag, key) {
        return release(group, i, tag);
    }
    if !spills(group) {
        return -ENOENT;
    }
    let Some(after) = group_at(groups, next(index), &mut slot) else {
        return -ENOENT;
    };
    let i = walk(after, tag, key);
    if i == NONE || release(after, i, tag) != 0 {
        return -ENOENT;
    }
    // SAFETY: a live array value's 4-byte aligned field.
    unsafe { atomic::fetch_add(spilled_at(group), u32::MAX) };
    0
}

/// Frees line `i` of `group` if it still has `tag`; -ENOENT if not.
#[inline(always)]
fn release<K, V>(group: *mut CtGroup<K, V>, i: u32, tag: u32) -> i64 {
    // SAFETY: a live tag, 4-byte aligned.
    match unsafe { atomic::compare_exchange(tag_at(group, i), tag, CT_TAG_FREE) } {
        true => 0,
        false => -ENOENT,
    }
}

macro_rules! table {
    ($name:ident, $key:ty, $value:ty, $groups:ident, $k:ident, $v:ident,
     $find:ident, $insert:ident, $replace:ident, $remove:ident) => {
        pub struct $name;

        impl $name {
            /// The entry of `key`.
            #[inline(always)]
            pub fn find(key: &$key) -> Option<*mut $value> {
                let line = u32::try_from($find(key)).ok()?;
                let group = $groups.get_ptr_mut(line / CT_GROUP)?;
                Some(value_at(group, line))
            }

            /// Writes the scratch buffer's value at its key: over the key's
            /// entry if it has one (unless `BPF_NOEXIST`: -EEXIST), else
            /// into a free line (none: -E2BIG).
            #[inline(always)]
            pub fn insert(s: &CtScratch, flags: u64) -> Result<(), i64> {
                let written = if flags == u64::from(BPF_NOEXIST) {
                    $insert(s)
                } else {
                    $replace(s)
                };
                match written {
                    0 => Ok(()),
                    e => Err(e),
                }
            }

            /// Removes `key`'s entry, if it has one.
            #[inline(always)]
            pub fn remove(key: &$key) {
                $remove(key);
            }
        }

        /// `find` for this family, verified once. Its arguments are
        /// pointers the verifier checks at each call (a key in the scratch
        /// buffer); it reads no more than their types' sizes.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $find(key: *const $key) -> i64 {
            // SAFETY: the verifier lets only a live key of its size in;
            // null is refused.
            match unsafe { key.as_ref() } {
                Some(key) => find(&$groups, key),
                None => -ENOENT,
            }
        }

        /// `Self::insert` with `BPF_NOEXIST`, verified once. The key and
        /// the value come in one pointer, and the flags make two functions,
        /// not an argument: one more value live across the lookups would
        /// not fit the registers, and spill onto the stack the callers have
        /// little of.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $insert(s: *const CtScratch) -> i64 {
            // SAFETY: as `find`.
            match unsafe { s.as_ref() } {
                Some(s) => insert::<_, _, false>(&$groups, &s.$k, &s.$v),
                None => -E2BIG,
            }
        }

        /// `Self::insert` without `BPF_NOEXIST`, verified once.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $replace(s: *const CtScratch) -> i64 {
            // SAFETY: as `find`.
            match unsafe { s.as_ref() } {
                Some(s) => insert::<_, _, true>(&$groups, &s.$k, &s.$v),
                None => -E2BIG,
            }
        }

        /// `Self::remove`, verified once.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $remove(key: *const $key) -> i64 {
            // SAFETY: as `find`.
            match unsafe { key.as_ref() } {
                Some(key) => remove(&$groups, key),
                None => -ENOENT,
            }
        }
    };
}

table!(
    Lines4,
    Ct4Key,
    Ct4Entry,
    CT4_GROUPS,
    key4,
    value4,
    xdproxy_ct4_find,
    xdproxy_ct4_insert,
    xdproxy_ct4_replace,
    xdproxy_ct4_remove
);
table!(
    Lines6,
    Ct6Key,
    Ct6Entry,
    CT6_GROUPS,
    key6,
    value6,
    xdproxy_ct6_find,
    xdproxy_ct6_insert,
    xdproxy_ct6_replace,
    xdproxy_ct6_remove
);
