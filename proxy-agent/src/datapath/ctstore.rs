//! One family's conntrack as garbage collection, `inspect`, upgrades and
//! the tests see it: the datapath's own table (`ct4_table`, mapped) and
//! the overflow map (`ct4_overflow`, a kernel LRU hash), read, written and
//! released through one interface whichever holds an entry.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::Context;
use aya::{
    Ebpf, Pod,
    maps::{HashMap as BpfHashMap, IterableMap, MapData, MapError},
};
use proxy_common::{CT_GROUP, MAX_CT_OVERFLOW};

use super::{
    conntrack::{CtKey, Table},
    ctlines::CtLines,
    pinned::{self, Pins},
};

/// A family's two tables.
pub struct CtTables<K: CtKey> {
    pub main: CtLines<K>,
    pub overflow: BpfHashMap<MapData, K, K::Value>,
}

impl<K: CtKey> CtTables<K> {
    /// The tables pinned under `pins`.
    pub fn open(pins: &Pins) -> anyhow::Result<Self> {
        let path = pins.path(K::GROUPS);
        let groups = MapData::from_pin(&path)
            .with_context(|| format!("opening {} (needs root, or CAP_BPF)", path.display()))?;
        Ok(CtTables {
            main: CtLines::new(&groups)?,
            overflow: pins.map(K::OVERFLOW)?,
        })
    }

    /// The entries of the table the version before the seed pinned
    /// (`LEGACY_GROUPS`), if there is one: what an upgrade copies and
    /// `inspect` lists.
    pub fn legacy_table(pins: &Pins) -> anyhow::Result<Option<HashMap<K, K::Value>>> {
        let path = pins.path(K::LEGACY_GROUPS);
        if !path.exists() {
            return Ok(None);
        }
        let read = || CtLines::<K>::legacy_entries(&MapData::from_pin(&path)?);
        read()
            .map(Some)
            .with_context(|| format!("reading {}", path.display()))
    }

    /// The tables of a loaded object (the tests'): the maps stay in it.
    pub fn of(ebpf: &Ebpf) -> anyhow::Result<Self> {
        let main = match ebpf.map(K::GROUPS) {
            Some(aya::maps::Map::Array(data)) => CtLines::new(data)?,
            _ => anyhow::bail!("the object has no array {}", K::GROUPS),
        };
        let overflow = match ebpf.map(K::OVERFLOW) {
            Some(aya::maps::Map::LruHashMap(data)) => data,
            _ => anyhow::bail!("the object has no LRU hash {}", K::OVERFLOW),
        };
        let fd = overflow.fd().as_fd().try_clone_to_owned()?;
        let overflow = aya::maps::Map::LruHashMap(MapData::from_fd(fd)?);
        Ok(CtTables {
            main,
            overflow: BpfHashMap::try_from(overflow)?,
        })
    }

    /// The entries a full table holds: half its lines (at that load about
    /// one new flow in a hundred and twenty finds its group and the next
    /// full; see `ct_lines`).
    pub fn capacity(&self) -> usize {
        self.main.lines() / 2
    }

    /// Every entry of `table`.
    pub fn entries(&self, table: Table) -> anyhow::Result<HashMap<K, K::Value>> {
        match table {
            Table::Main => self.main.entries(),
            Table::Overflow => {
                let limit = pinned::capacity(self.overflow.map(), MAX_CT_OVERFLOW) * 2;
                pinned::entries(&self.overflow, limit.max(1024))
                    .with_context(|| format!("reading {}", K::OVERFLOW))
            }
        }
    }

    pub fn get(&self, table: Table, key: &K) -> anyhow::Result<Option<K::Value>> {
        match table {
            Table::Main => self.main.get(key),
            Table::Overflow => match self.overflow.get(key, 0) {
                Ok(value) => Ok(Some(value)),
                Err(e) if absent(&e) => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", K::OVERFLOW)),
            },
        }
    }

    pub fn insert(&mut self, table: Table, key: K, value: K::Value) -> anyhow::Result<()> {
        match table {
            Table::Main => self.main.insert(key, value)?.map_err(|_| {
                anyhow::anyhow!("{}: the key's group of {CT_GROUP} lines is full", K::GROUPS)
            }),
            Table::Overflow => (self.overflow.insert(key, value, 0))
                .with_context(|| format!("writing {}", K::OVERFLOW)),
        }
    }

    /// Removes the key; false if it was not there.
    pub fn remove(&mut self, table: Table, key: &K) -> anyhow::Result<bool> {
        match table {
            Table::Main => self.main.remove(key),
            Table::Overflow => match self.overflow.remove(key) {
                Ok(()) => Ok(true),
                Err(e) if absent(&e) => Ok(false),
                Err(e) => Err(e).with_context(|| format!("deleting from {}", K::OVERFLOW)),
            },
        }
    }

    /// Removes the key and returns its value as it was at that moment, in
    /// one step no other removal interleaves with (None: not there).
    pub fn take(&mut self, table: Table, key: &K) -> anyhow::Result<Option<K::Value>> {
        match table {
            Table::Main => self.main.take(key),
            Table::Overflow => take(self.overflow.map(), key)
                .with_context(|| format!("deleting from {}", K::OVERFLOW)),
        }
    }

    /// True if the overflow map holds nothing: its first key, no walk.
    pub fn overflow_empty(&self) -> anyhow::Result<bool> {
        match self.overflow.keys().next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(e).with_context(|| format!("reading {}", K::OVERFLOW)),
        }
    }
}

/// The key was not there (any more): someone else deleted it, which is fine.
pub fn absent(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps: Linux 5.14), which aya 0.14
/// offers for queues and stacks only.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The element-command part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes `key` and returns its value as it was at that moment (None: it
/// was not there), in one step that no other deletion can interleave with.
fn take<K: Pod, V: Pod>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the attribute points at a key and a value buffer of the map's
    // key and value types (aya checked their sizes when the map was typed),
    // both live for the call; the kernel zero-fills the rest of the union.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        // SAFETY: the kernel wrote the whole value; any bytes are a valid V (Pod).
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(error)
}
