//! Conntrack's own table (see proxy-common's `ctlines`): a key's group of
//! eight lines, each a tag, a key and a value. Lookups, inserts and
//! removals each run as one global function per family, which the
//! verifier walks once, not at every place conntrack is used; they take
//! the key (and value) by pointer, and answer with a line index or an
//! error: a global function returns no pointer. They must keep to a few
//! bytes of stack, as TC's program calls them with nearly all of BPF's
//! 512 taken: one lookup (one call) each, the group's, so that few values
//! live across a call (BPF keeps four in registers).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    btf_maps::Array,
    macros::btf_map,
};
use proxy_common::{
    CT_GROUP, CT_TAG_BUSY, CT_TAG_FREE, Ct4Entry, Ct4Group, Ct4Key, Ct6Entry, Ct6Group, Ct6Key,
    CtGroup, CtWords, MAX_CONNTRACK, ct_home, ct_lines,
};

use crate::{atomic, maps};

/// The agent maps the tables to read and release entries.
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
const GROUPS: usize = (ct_lines(MAX_CONNTRACK) / CT_GROUP) as usize;

/// The kernel's answer to an insert into a full hash map, kept: a full
/// group sends the flow to the overflow map as a full map did.
const E2BIG: i64 = 7;
const EEXIST: i64 = 17;
const ENOENT: i64 = 2;

#[btf_map(name = "ct4_groups")]
pub static CT4_GROUPS: Array<Ct4Group, GROUPS, MMAPABLE> = Array::new();
#[btf_map(name = "ct6_groups")]
pub static CT6_GROUPS: Array<Ct6Group, GROUPS, MMAPABLE> = Array::new();

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

/// No line: what `walk` answers for a key not there, or a group full.
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

/// The address of tag `i` (taken modulo the group's tags) of a group.
#[inline(always)]
fn tag_at<K, V>(group: *mut CtGroup<K, V>, i: u32) -> *mut u32 {
    // SAFETY: within the group's value.
    unsafe {
        (&raw mut (*group).tags)
            .cast::<u32>()
            .add((i % CT_GROUP) as usize)
    }
}

/// The address of key `i` (taken modulo the group's keys) of a group.
#[inline(always)]
fn key_at<K, V>(group: *mut CtGroup<K, V>, i: u32) -> *mut K {
    // SAFETY: within the group's value.
    unsafe {
        (&raw mut (*group).keys)
            .cast::<K>()
            .add((i % CT_GROUP) as usize)
    }
}

/// The address of value `i` (taken modulo the group's values) of a group.
#[inline(always)]
fn value_at<K, V>(group: *mut CtGroup<K, V>, i: u32) -> *mut V {
    // SAFETY: within the group's value.
    unsafe {
        (&raw mut (*group).values)
            .cast::<V>()
            .add((i % CT_GROUP) as usize)
    }
}

/// The key's line (`NONE` if not there) and, when it is not there, the
/// group's first free line (`NONE` if none), as indexes within the group.
#[inline(always)]
fn walk<K: CtWords, V>(group: *mut CtGroup<K, V>, tag: u32, key: &K) -> (u32, u32) {
    let mut free = NONE;
    for i in 0..CT_GROUP {
        // SAFETY: a live array value. The tag is read once, as another
        // CPU may change it; the key is read only under a live tag.
        let seen = unsafe { core::ptr::read_volatile(tag_at(group, i)) };
        if seen == tag && same(unsafe { &*key_at(group, i) }, key) {
            return (i, NONE);
        }
        if seen == CT_TAG_FREE && free == NONE {
            free = i;
        }
    }
    (NONE, free)
}

/// The key's group, its index and the key's tag, looked up with `slot`,
/// the one key on the stack.
#[inline(always)]
fn group_of<K: CtWords, V>(
    groups: &Array<CtGroup<K, V>, GROUPS, MMAPABLE>,
    key: &K,
    slot: &mut u32,
) -> Option<(*mut CtGroup<K, V>, u32, u32)> {
    let (index, tag) = ct_home(key, groups_mask());
    *slot = index;
    // SAFETY: the groups map, whose keys are u32 and values groups.
    let group = unsafe {
        maps::lookup::<CtGroup<K, V>>(core::ptr::from_ref(groups).cast(), &raw const *slot)
    }?;
    Some((group, index, tag))
}

/// The line holding `key`, or -ENOENT.
#[inline(always)]
fn find<K: CtWords, V>(groups: &Array<CtGroup<K, V>, GROUPS, MMAPABLE>, key: &K) -> i64 {
    let mut slot = 0;
    let Some((group, index, tag)) = group_of(groups, key, &mut slot) else {
        return -ENOENT;
    };
    match walk(group, tag, key).0 {
        NONE => -ENOENT,
        i => i64::from(index * CT_GROUP + i),
    }
}

/// Writes `value` at `key`: over the key's entry if it has one (if
/// `REPLACE`, else -EEXIST), else into a free line of its group, claimed
/// from other CPUs by compare-and-exchange on its tag (none, or another
/// CPU took it first: -E2BIG). The key and the value go in before the
/// tag, so no reader sees the line before it is whole; an entry
/// rewritten in place may be seen half old, half new by a racing reader,
/// as a flow's state change may.
#[inline(always)]
fn insert<K: CtWords, V: Copy, const REPLACE: bool>(
    groups: &Array<CtGroup<K, V>, GROUPS, MMAPABLE>,
    key: &K,
    value: &V,
) -> i64 {
    let mut slot = 0;
    let Some((group, _, tag)) = group_of(groups, key, &mut slot) else {
        return -E2BIG;
    };
    let (found, free) = walk(group, tag, key);
    if found != NONE {
        if !REPLACE {
            return -EEXIST;
        }
        // SAFETY: a live array value.
        unsafe { *value_at(group, found) = *value };
        return 0;
    }
    if free == NONE {
        return -E2BIG;
    }
    let at = tag_at(group, free);
    // SAFETY: a live array value; its tag 4-byte aligned. The line is this
    // CPU's while the tag is busy, and read by others once it is set,
    // after the key and the value.
    unsafe {
        if !atomic::compare_exchange(at, CT_TAG_FREE, CT_TAG_BUSY) {
            return -E2BIG;
        }
        *key_at(group, free) = *key;
        *value_at(group, free) = *value;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        core::ptr::write_volatile(at, tag);
    }
    0
}

/// Releases the key's line; -ENOENT if it had none (or another CPU
/// released it first).
#[inline(always)]
fn remove<K: CtWords, V>(groups: &Array<CtGroup<K, V>, GROUPS, MMAPABLE>, key: &K) -> i64 {
    let mut slot = 0;
    let Some((group, _, tag)) = group_of(groups, key, &mut slot) else {
        return -ENOENT;
    };
    match walk(group, tag, key).0 {
        NONE => -ENOENT,
        // SAFETY: a live tag, 4-byte aligned.
        i if unsafe { atomic::compare_exchange(tag_at(group, i), tag, CT_TAG_FREE) } => 0,
        _ => -ENOENT,
    }
}

macro_rules! table {
    ($name:ident, $key:ty, $value:ty, $groups:ident,
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

            /// Writes `value` at `key`: over the key's entry if it has one
            /// (unless `BPF_NOEXIST`: -EEXIST), else into a free line of its
            /// group (none: -E2BIG).
            #[inline(always)]
            pub fn insert(key: &$key, value: &$value, flags: u64) -> Result<(), i64> {
                let written = if flags == u64::from(BPF_NOEXIST) {
                    $insert(key, value)
                } else {
                    $replace(key, value)
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

        /// `Self::insert` with `BPF_NOEXIST`, verified once. The flags
        /// make two functions, not an argument: one more value live across
        /// the lookups would not fit the registers, and spill onto the
        /// stack the callers have little of.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $insert(key: *const $key, value: *const $value) -> i64 {
            // SAFETY: as `find`.
            match unsafe { (key.as_ref(), value.as_ref()) } {
                (Some(key), Some(value)) => insert::<_, _, false>(&$groups, key, value),
                _ => -E2BIG,
            }
        }

        /// `Self::insert` without `BPF_NOEXIST`, verified once.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $replace(key: *const $key, value: *const $value) -> i64 {
            // SAFETY: as `find`.
            match unsafe { (key.as_ref(), value.as_ref()) } {
                (Some(key), Some(value)) => insert::<_, _, true>(&$groups, key, value),
                _ => -E2BIG,
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
    xdproxy_ct6_find,
    xdproxy_ct6_insert,
    xdproxy_ct6_replace,
    xdproxy_ct6_remove
);
