//! The agent's side of conntrack's own table (`ct4_lines`/`ct4_tags`,
//! `ct6_lines`/`ct6_tags`; see proxy-common's `ctlines`): both maps
//! mapped into memory, read in place, and lines claimed and released by
//! compare-and-exchange on their tags, as the datapath does. A system call
//! per entry could not release a line only if it still holds the flow
//! the agent judged: the datapath may have given it to another since.

use std::{
    collections::HashMap,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context;
use aya::{Pod, maps::MapData};
use proxy_common::{CT_GROUP, CT_TAG_BUSY, CT_TAG_FREE, CT_TAG_LIVE, CtWords, ct_home};

/// A shared, writable mapping of a map's values.
struct Mapping {
    at: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn of(map: &MapData, name: &str) -> anyhow::Result<(Mapping, u32)> {
        let info = map.info().with_context(|| format!("reading {name}'s info"))?;
        let stride = (info.value_size() as usize).next_multiple_of(8);
        let len = stride * info.max_entries() as usize;
        // SAFETY: a fresh shared mapping of the map's fd, checked below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} into memory"));
        }
        let at = NonNull::new(at.cast::<u8>()).context("mmap returned null")?;
        Ok((Mapping { at, len }, info.max_entries()))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
    }
}

/// A conntrack key whose entries live in lines.
pub trait LineKey: CtWords + Pod + Eq + std::hash::Hash {
    type Value: Pod;
    type Line: Pod;
    /// The pinned names of the lines and of the tags.
    const NAMES: (&'static str, &'static str);
    fn split(line: &Self::Line) -> (Self, Self::Value);
    fn join(key: Self, value: Self::Value) -> Self::Line;
    /// Byte offset of the value's `active` field in a line.
    const ACTIVE: usize;
}

/// One family's table, mapped.
pub struct CtLines<K: LineKey> {
    tags: Mapping,
    lines: Mapping,
    groups: u32,
    _key: PhantomData<K>,
}

// SAFETY: the mappings are shared memory every access to which is atomic
// or volatile; nothing in them is tied to a thread.
unsafe impl<K: LineKey> Send for CtLines<K> {}

/// The group a full table sent a flow away from (the datapath sends it to
/// the overflow map).
#[derive(Debug, PartialEq, Eq)]
pub struct GroupFull;

impl<K: LineKey> CtLines<K> {
    /// Maps `tags` and `lines`, which must be a table's two maps.
    pub fn new(tags: &MapData, lines: &MapData) -> anyhow::Result<Self> {
        let (tag_map, groups) = Mapping::of(tags, K::NAMES.1)?;
        let (line_map, count) = Mapping::of(lines, K::NAMES.0)?;
        anyhow::ensure!(
            groups.is_power_of_two() && count == groups * CT_GROUP,
            "{} holds {count} lines for {groups} groups of {CT_GROUP} in {}",
            K::NAMES.0,
            K::NAMES.1
        );
        Ok(CtLines {
            tags: tag_map,
            lines: line_map,
            groups,
            _key: PhantomData,
        })
    }

    /// Lines in all.
    pub fn lines(&self) -> usize {
        (self.groups * CT_GROUP) as usize
    }

    fn tag(&self, index: u32) -> &AtomicU32 {
        debug_assert!(index < self.groups * CT_GROUP);
        // SAFETY: within the mapping (`index` is below groups * 8), 4-byte
        // aligned; the kernel and the agent only access it atomically.
        unsafe { &*self.tags.at.as_ptr().cast::<AtomicU32>().add(index as usize) }
    }

    fn line_ptr(&self, index: u32) -> *mut K::Line {
        // SAFETY: within the mapping, as `tag`.
        unsafe { self.lines.at.as_ptr().cast::<K::Line>().add(index as usize) }
    }

    fn read_line(&self, index: u32) -> (K, K::Value) {
        // SAFETY: a line of the mapping; any bytes are a valid line (Pod).
        K::split(&unsafe { self.line_ptr(index).read_volatile() })
    }

    /// The live line holding `key`, with its tag; or the group's first
    /// free line (`Err(Some)`), or nothing (`Err(None)`).
    fn locate(&self, key: &K) -> Result<(u32, u32), Option<(u32, u32)>> {
        let (group, tag) = ct_home(key, self.groups - 1);
        let mut free = None;
        for i in 0..CT_GROUP {
            let index = group * CT_GROUP + i;
            let seen = self.tag(index).load(Ordering::Acquire);
            if seen == tag && self.read_line(index).0.words() == key.words() {
                return Ok((index, tag));
            }
            if seen == CT_TAG_FREE && free.is_none() {
                free = Some((index, tag));
            }
        }
        Err(free)
    }

    /// Every live entry, each key once, read in place: an entry whose line
    /// changed hands while it was read is left for the next reader.
    pub fn entries(&self) -> HashMap<K, K::Value> {
        let mut out = HashMap::new();
        for index in 0..self.groups * CT_GROUP {
            let tag = self.tag(index).load(Ordering::Acquire);
            if tag & CT_TAG_LIVE == 0 {
                continue;
            }
            let (key, value) = self.read_line(index);
            if self.tag(index).load(Ordering::Acquire) == tag {
                out.entry(key).or_insert(value);
            }
        }
        out
    }

    /// Live lines.
    pub fn len(&self) -> usize {
        (0..self.groups * CT_GROUP)
            .filter(|i| self.tag(*i).load(Ordering::Relaxed) & CT_TAG_LIVE != 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &K) -> Option<K::Value> {
        let (index, _) = self.locate(key).ok()?;
        Some(self.read_line(index).1)
    }

    /// Writes the entry: over the key's line, or into a free line of its
    /// group claimed as the datapath claims one.
    pub fn insert(&self, key: K, value: K::Value) -> Result<(), GroupFull> {
        let (index, tag) = match self.locate(&key) {
            Ok((index, _)) => {
                // SAFETY: a line of the mapping.
                unsafe { self.line_ptr(index).write_volatile(K::join(key, value)) };
                return Ok(());
            }
            Err(Some(free)) => free,
            Err(None) => return Err(GroupFull),
        };
        let claimed = self.tag(index).compare_exchange(
            CT_TAG_FREE,
            CT_TAG_BUSY,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        if claimed.is_err() {
            return Err(GroupFull);
        }
        // SAFETY: a line of the mapping, this call's own while its tag is
        // busy.
        unsafe { self.line_ptr(index).write_volatile(K::join(key, value)) };
        self.tag(index).store(tag, Ordering::Release);
        Ok(())
    }

    /// Releases the key's line; false if it had none.
    pub fn remove(&self, key: &K) -> bool {
        let Ok((index, tag)) = self.locate(key) else {
            return false;
        };
        self.tag(index)
            .compare_exchange(tag, CT_TAG_FREE, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Releases the key's line and returns its value with the `active`
    /// it had when it went: the line is held busy (no packet finds it)
    /// while `active` is swapped out, so the datapath cannot release the
    /// connection as well.
    pub fn take(&self, key: &K) -> Option<K::Value> {
        let (index, tag) = self.locate(key).ok()?;
        self.tag(index)
            .compare_exchange(tag, CT_TAG_BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        // SAFETY: the `active` field of a line of the mapping, 4-byte
        // aligned, which the datapath swaps atomically too.
        let active = unsafe {
            &*self
                .line_ptr(index)
                .cast::<u8>()
                .add(K::ACTIVE)
                .cast::<AtomicU32>()
        };
        let was = active.swap(0, Ordering::AcqRel);
        let (_, value) = self.read_line(index);
        self.tag(index).store(CT_TAG_FREE, Ordering::Release);
        let mut line = K::join(*key, value);
        // SAFETY: `ACTIVE` is within the line and 4-byte aligned.
        unsafe {
            std::ptr::from_mut(&mut line)
                .cast::<u8>()
                .add(K::ACTIVE)
                .cast::<u32>()
                .write_unaligned(was)
        };
        Some(K::split(&line).1)
    }
}

macro_rules! line_key {
    ($key:ty, $value:ty, $line:ident, $names:expr) => {
        impl LineKey for $key {
            type Value = $value;
            type Line = proxy_common::$line;
            const NAMES: (&'static str, &'static str) = $names;
            const ACTIVE: usize = std::mem::offset_of!(proxy_common::$line, value)
                + std::mem::offset_of!($value, active);
            fn split(line: &proxy_common::$line) -> (Self, $value) {
                (line.key, line.value)
            }
            fn join(key: Self, value: $value) -> proxy_common::$line {
                proxy_common::$line {
                    key,
                    value,
                    ..Default::default()
                }
            }
        }
    };
}

line_key!(
    proxy_common::Ct4Key,
    proxy_common::Ct4Entry,
    Ct4Line,
    (proxy_common::names::CT4_LINES, proxy_common::names::CT4_TAGS)
);
line_key!(
    proxy_common::Ct6Key,
    proxy_common::Ct6Entry,
    Ct6Line,
    (proxy_common::names::CT6_LINES, proxy_common::names::CT6_TAGS)
);
