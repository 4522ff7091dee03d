//! Conntrack's own table (see proxy-common's `ctlines`): a key's group of
//! eight tags, and the line of the tag that matches it. Lookups, inserts
//! and removals each run as one global function per family, which the
//! verifier walks once, not at every place conntrack is used; they find
//! the key in this CPU's scratch buffer and answer with a line index or
//! an error, so no pointer crosses the call.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    btf_maps::Array,
    macros::btf_map,
};
use proxy_common::{
    CT_GROUP, CT_TAG_BUSY, CT_TAG_FREE, Ct4Line, Ct6Line, CtTags, CtWords, MAX_CONNTRACK,
    ct_home, ct_lines,
};

use crate::{
    atomic,
    maps::{CT_SCRATCH, CtScratch},
};

/// The agent maps the tables to read and release entries.
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
const LINES: usize = ct_lines(MAX_CONNTRACK) as usize;
const GROUPS: usize = LINES / CT_GROUP as usize;

/// The kernel's answer to an insert into a full hash map, kept: a full
/// group sends the flow to the overflow map as a full map did.
const E2BIG: i64 = 7;
const EEXIST: i64 = 17;
const ENOENT: i64 = 2;

#[btf_map(name = "ct4_lines")]
pub static CT4_LINES: Array<Ct4Line, LINES, MMAPABLE> = Array::new();
#[btf_map(name = "ct4_tags")]
pub static CT4_TAGS: Array<CtTags, GROUPS, MMAPABLE> = Array::new();
#[btf_map(name = "ct6_lines")]
pub static CT6_LINES: Array<Ct6Line, LINES, MMAPABLE> = Array::new();
#[btf_map(name = "ct6_tags")]
pub static CT6_TAGS: Array<CtTags, GROUPS, MMAPABLE> = Array::new();

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

/// A family's table.
trait Lines {
    type Key: CtWords;
    type Line: 'static;
    fn tags() -> &'static Array<CtTags, GROUPS, MMAPABLE>;
    fn lines() -> &'static Array<Self::Line, LINES, MMAPABLE>;
    /// The scratch buffer's key.
    fn staged(s: &CtScratch) -> &Self::Key;
    /// # Safety
    /// `line` is a live value of `lines()`.
    unsafe fn key_at(line: *const Self::Line) -> Self::Key;
    /// Copies the staged value into the line.
    ///
    /// # Safety
    /// As `key_at`.
    unsafe fn write(line: *mut Self::Line, key: &Self::Key, s: &CtScratch, with_key: bool);
}

/// A line's value type.
pub trait LineValue {
    type Value;
}

impl LineValue for Ct4Line {
    type Value = proxy_common::Ct4Entry;
}

impl LineValue for Ct6Line {
    type Value = proxy_common::Ct6Entry;
}

/// True if both keys have the same words. Every word is compared, with no
/// early exit, so that no loop becomes a `memcmp` the BPF target lacks.
#[inline(always)]
fn same<K: CtWords>(a: &K, b: &K) -> bool {
    let (a, b) = (a.words(), b.words());
    let mut diff = 0;
    for (x, y) in a.as_ref().iter().zip(b.as_ref()) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Where a key is: its tag's address, the tag, and its line's index.
struct At {
    tag_at: *mut u32,
    tag: u32,
    index: u32,
}

/// The key's place, or its group's first free tag (`Err`), or neither
/// (`Err(None)`: the group is full, or beyond the map).
#[inline(always)]
fn locate<T: Lines>(key: &T::Key) -> Result<At, Option<At>> {
    let (group, tag) = ct_home(key, groups_mask());
    let Some(tags) = T::tags().get_ptr_mut(group) else {
        return Err(None);
    };
    let mut free = None;
    for i in 0..CT_GROUP {
        // SAFETY: a live array value; `i` is within its tags.
        let tag_at = unsafe { (&raw mut (*tags).tags).cast::<u32>().add(i as usize) };
        // SAFETY: as above; read once, as another CPU may change it.
        let seen = unsafe { core::ptr::read_volatile(tag_at) };
        let index = group * CT_GROUP + i;
        if seen == tag && holds::<T>(index, key) {
            return Ok(At { tag_at, tag, index });
        }
        if seen == CT_TAG_FREE && free.is_none() {
            free = Some(At { tag_at, tag, index });
        }
    }
    Err(free)
}

#[inline(always)]
fn holds<T: Lines>(index: u32, key: &T::Key) -> bool {
    T::lines()
        .get_ptr(index)
        // SAFETY: a live array value.
        .is_some_and(|line| same(&unsafe { T::key_at(line) }, key))
}

#[inline(always)]
fn scratch() -> Option<&'static CtScratch> {
    // SAFETY: per-CPU; the caller staged the key (and value) just before.
    CT_SCRATCH.get_ptr(0).map(|s| unsafe { &*s })
}

/// The line holding the staged key, or -ENOENT.
#[inline(always)]
fn find<T: Lines>() -> i64 {
    let Some(s) = scratch() else {
        return -ENOENT;
    };
    match locate::<T>(T::staged(s)) {
        Ok(at) => i64::from(at.index),
        Err(_) => -ENOENT,
    }
}

/// Writes the staged value at the staged key: over the key's line if it
/// has one (unless `BPF_NOEXIST`: -EEXIST), else into a free line of its
/// group, claimed from other CPUs (none: -E2BIG).
#[inline(always)]
fn insert<T: Lines>(flags: u64) -> i64 {
    let Some(s) = scratch() else {
        return -E2BIG;
    };
    let key = T::staged(s);
    let (at, with_key) = match locate::<T>(key) {
        Ok(_) if flags == u64::from(BPF_NOEXIST) => return -EEXIST,
        Ok(at) => (at, false),
        Err(Some(free)) => {
            // SAFETY: a live tag, 4-byte aligned.
            if !unsafe { atomic::compare_exchange(free.tag_at, CT_TAG_FREE, CT_TAG_BUSY) } {
                return -E2BIG;
            }
            (free, true)
        }
        Err(None) => return -E2BIG,
    };
    let Some(line) = T::lines().get_ptr_mut(at.index) else {
        if with_key {
            // SAFETY: the tag this call claimed.
            unsafe { core::ptr::write_volatile(at.tag_at, CT_TAG_FREE) };
        }
        return -E2BIG;
    };
    // SAFETY: a live array value. A claimed line is written only by this
    // CPU and read by others once its tag is set, after it.
    unsafe {
        T::write(line, key, s, with_key);
        if with_key {
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
            core::ptr::write_volatile(at.tag_at, at.tag);
        }
    }
    0
}

/// Releases the staged key's line; -ENOENT if it had none (or another CPU
/// released it first).
#[inline(always)]
fn remove<T: Lines>() -> i64 {
    let Some(s) = scratch() else {
        return -ENOENT;
    };
    match locate::<T>(T::staged(s)) {
        // SAFETY: a live tag, 4-byte aligned.
        Ok(at) if unsafe { atomic::compare_exchange(at.tag_at, at.tag, CT_TAG_FREE) } => 0,
        _ => -ENOENT,
    }
}

macro_rules! table {
    ($name:ident, $key:ty, $line:ty, $tags:ident, $lines:ident, $k:ident, $v:ident,
     $find:ident, $insert:ident, $remove:ident) => {
        pub struct $name;

        impl Lines for $name {
            type Key = $key;
            type Line = $line;
            #[inline(always)]
            fn tags() -> &'static Array<CtTags, GROUPS, MMAPABLE> {
                &$tags
            }
            #[inline(always)]
            fn lines() -> &'static Array<$line, LINES, MMAPABLE> {
                &$lines
            }
            #[inline(always)]
            fn staged(s: &CtScratch) -> &$key {
                &s.$k
            }
            #[inline(always)]
            unsafe fn key_at(line: *const $line) -> $key {
                // SAFETY: the caller's.
                unsafe { (*line).key }
            }
            #[inline(always)]
            unsafe fn write(line: *mut $line, key: &$key, s: &CtScratch, with_key: bool) {
                // SAFETY: the caller's.
                unsafe {
                    if with_key {
                        (*line).key = *key;
                    }
                    (*line).value = s.$v;
                }
            }
        }

        impl $name {
            /// The value of the line holding the staged key.
            #[inline(always)]
            pub fn find_value() -> Option<*mut <$line as LineValue>::Value> {
                let index = u32::try_from($find()).ok()?;
                // SAFETY: a live array value.
                $lines.get_ptr_mut(index).map(|line| unsafe { &raw mut (*line).value })
            }

            /// See `insert`.
            #[inline(always)]
            pub fn insert_staged(flags: u64) -> Result<(), i64> {
                match $insert(flags) {
                    0 => Ok(()),
                    e => Err(e),
                }
            }

            /// See `remove`.
            #[inline(always)]
            pub fn remove_staged() {
                $remove();
            }
        }

        /// `find` for this family, verified once.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $find() -> i64 {
            find::<$name>()
        }

        /// `insert` for this family, verified once.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $insert(flags: u64) -> i64 {
            insert::<$name>(flags)
        }

        /// `remove` for this family, verified once.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $remove() -> i64 {
            remove::<$name>()
        }
    };
}

table!(
    Lines4,
    proxy_common::Ct4Key,
    Ct4Line,
    CT4_TAGS,
    CT4_LINES,
    key4,
    value4,
    xdproxy_ct4_find,
    xdproxy_ct4_insert,
    xdproxy_ct4_remove
);
table!(
    Lines6,
    proxy_common::Ct6Key,
    Ct6Line,
    CT6_TAGS,
    CT6_LINES,
    key6,
    value6,
    xdproxy_ct6_find,
    xdproxy_ct6_insert,
    xdproxy_ct6_remove
);
