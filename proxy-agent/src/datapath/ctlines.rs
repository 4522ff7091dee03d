//! The agent's side of conntrack's own table (`ct4_table`, `ct6_table`;
//! see proxy-common's `ctlines`): the map mapped into memory, read in
//! place, and lines claimed and released by
//! compare-and-exchange on their tags, as the datapath does. A system call
//! per entry could not release a line only if it still holds the flow
//! the agent judged: the datapath may have given it to another since.

use std::{
    cell::RefCell,
    collections::HashMap,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context;
use aya::{Pod, maps::MapData};
use proxy_common::{
    CT_GROUP, CT_HASH_KEYS, CT_SEED_WORDS, CT_TAG_BUSY, CT_TAG_FREE, CT_TAG_LIVE, Ct4Entry, Ct4Key,
    Ct6Entry, Ct6Key, CtGroup, CtWords, ct_hash_keys, names,
};

/// The seed of a table's hash (see proxy-common's `ctlines`).
pub type Seed = [u32; CT_SEED_WORDS];

/// A shared, writable mapping of some of an array map's values: groups
/// `first..first + count`. Mapped a window at a time, as mapping a map
/// puts all its pages in the agent's resident memory at once (64 MiB for
/// both default tables).
struct Mapping {
    at: NonNull<u8>,
    len: usize,
    /// The byte of the map the mapping starts at (a page boundary).
    offset: usize,
    stride: usize,
    first: u32,
    count: u32,
}

/// An array map's shape: what mapping a window of it needs.
#[derive(Clone, Copy)]
struct Shape {
    /// Bytes from one value to the next (the kernel's: the value's size
    /// rounded up to 8).
    stride: usize,
    /// Groups keys hash to: all but the last, the seed's.
    count: u32,
}

impl Shape {
    /// The map whole, the seed's group included.
    fn whole(self) -> Shape {
        Shape {
            count: self.count + 1,
            ..self
        }
    }
}

impl Mapping {
    fn window(map: &MapData, shape: Shape, first: u32, count: u32) -> anyhow::Result<Mapping> {
        let count = count.min(shape.count.saturating_sub(first));
        anyhow::ensure!(count > 0, "group {first} is beyond {}", shape.count);
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = first as usize * shape.stride;
        let end = (first + count) as usize * shape.stride;
        let offset = start / page * page;
        let total = (shape.count as usize * shape.stride).next_multiple_of(page);
        let len = (end - offset).next_multiple_of(page).min(total - offset);
        // SAFETY: a fresh shared mapping of the map's fd within its size,
        // checked below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping conntrack's table");
        }
        let at = NonNull::new(at.cast::<u8>()).context("mmap returned null")?;
        Ok(Mapping {
            at,
            len,
            offset,
            stride: shape.stride,
            first,
            count,
        })
    }

    fn holds(&self, index: u32) -> bool {
        (self.first..self.first + self.count).contains(&index)
    }

    /// Value `index`, which must be in the window.
    fn value<V>(&self, index: u32) -> *mut V {
        assert!(self.holds(index), "group {index} outside the window");
        let at = index as usize * self.stride - self.offset;
        // SAFETY: within the mapping, as checked above.
        unsafe { self.at.as_ptr().add(at).cast() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
    }
}

/// A conntrack key whose entries live in the lines of a table.
pub trait LineKey: CtWords + Pod + Eq + std::hash::Hash {
    type Value: Pod;
    /// The table's pinned name.
    const GROUPS: &'static str;
    /// The name the version before the seed pinned its table under.
    const LEGACY_GROUPS: &'static str;
    /// Byte offset of the value's `active` field.
    const ACTIVE: usize;
}

impl LineKey for Ct4Key {
    type Value = Ct4Entry;
    const GROUPS: &'static str = names::CT4_GROUPS;
    const LEGACY_GROUPS: &'static str = names::LEGACY_GROUPS4;
    const ACTIVE: usize = std::mem::offset_of!(Ct4Entry, active);
}

impl LineKey for Ct6Key {
    type Value = Ct6Entry;
    const GROUPS: &'static str = names::CT6_GROUPS;
    const LEGACY_GROUPS: &'static str = names::LEGACY_GROUPS6;
    const ACTIVE: usize = std::mem::offset_of!(Ct6Entry, active);
}

/// One family's table: its map, mapped a window at a time. The window of
/// the last key looked for stays mapped for the next, so that operations
/// in the order of their keys' groups (`home`) map each window once.
pub struct CtLines<K: LineKey> {
    map: MapData,
    shape: Shape,
    /// The hash's multipliers, drawn from the table's seed.
    keys: [u64; CT_HASH_KEYS],
    near: RefCell<Option<View<K>>>,
    _key: PhantomData<K>,
}

/// The groups of a table an operation needs, mapped.
struct View<K: LineKey> {
    windows: Vec<Mapping>,
    /// Groups in the whole table.
    groups: u32,
    keys: [u64; CT_HASH_KEYS],
    _key: PhantomData<K>,
}

// SAFETY: the mappings are shared memory every access to which is atomic
// or volatile; nothing in them is tied to a thread.
unsafe impl<K: LineKey> Send for View<K> {}

/// The key's group had no free line (the datapath sends such a flow to
/// the overflow map).
#[derive(Debug, PartialEq, Eq)]
pub struct GroupFull;

/// Groups a scan maps at a time.
const WINDOW: u32 = 4096;

/// The group (of `groups`) and tag of `key` by the multipliers `keys`, as
/// the datapath hashes it.
fn home<K: CtWords>(keys: &[u64; CT_HASH_KEYS], groups: u32, key: &K) -> (u32, u32) {
    proxy_common::ct_home(key, |i| keys[i], groups - 1)
}

impl<K: LineKey> CtLines<K> {
    /// The table in `groups`, a table's map (its descriptor is kept).
    pub fn new(groups: &MapData) -> anyhow::Result<Self> {
        let mut lines = Self::open(groups, K::GROUPS, 1)?;
        lines.keys = ct_hash_keys(lines.seed()?);
        Ok(lines)
    }

    /// The entries of a table of the version before the seed (`LEGACY`),
    /// whose groups are all its map holds and whose hash was another.
    pub fn legacy_entries(groups: &MapData) -> anyhow::Result<HashMap<K, K::Value>> {
        Self::open(groups, K::LEGACY_GROUPS, 0)?.entries()
    }

    /// The table in `groups`, the last `seeds` of its map's values not
    /// groups keys hash to.
    fn open(groups: &MapData, name: &str, seeds: u32) -> anyhow::Result<Self> {
        let info = (groups.info()).with_context(|| format!("reading {name}'s info"))?;
        let shape = Shape {
            stride: (info.value_size() as usize).next_multiple_of(8),
            count: info.max_entries().saturating_sub(seeds),
        };
        anyhow::ensure!(
            shape.count.is_power_of_two(),
            "{name} holds {} values, not a power of two and {seeds}",
            info.max_entries()
        );
        anyhow::ensure!(
            info.value_size() as usize == size_of::<CtGroup<K, K::Value>>(),
            "{name} has values of another size"
        );
        let fd = (groups.fd().as_fd().try_clone_to_owned())
            .with_context(|| format!("duplicating {name}'s descriptor"))?;
        Ok(CtLines {
            map: MapData::from_fd(fd)?,
            shape,
            keys: ct_hash_keys([0; CT_SEED_WORDS]),
            near: RefCell::new(None),
            _key: PhantomData,
        })
    }

    /// Groups keys hash to.
    pub fn groups(&self) -> u32 {
        self.shape.count
    }

    /// The seed kept in the table's last group.
    pub fn seed(&self) -> anyhow::Result<Seed> {
        let window = self.seed_window()?;
        let group = window.value::<CtGroup<K, K::Value>>(self.shape.count);
        let mut seed = [0; CT_SEED_WORDS];
        for (i, word) in seed.iter_mut().enumerate() {
            // SAFETY: a tag of the seed's group, within the mapping.
            *word = unsafe { (&raw const (*group).tags[i]).read_volatile() };
        }
        Ok(seed)
    }

    /// Keeps `seed` in the table's last group and hashes by it: for a
    /// table whose programs were given the multipliers drawn from it (a
    /// new table, or an adopted one's own seed written again).
    pub fn set_seed(&mut self, seed: Seed) -> anyhow::Result<()> {
        let window = self.seed_window()?;
        let group = window.value::<CtGroup<K, K::Value>>(self.shape.count);
        for (i, word) in seed.iter().enumerate() {
            // SAFETY: as in `seed`; no program reads this group.
            unsafe { (&raw mut (*group).tags[i]).write_volatile(*word) };
        }
        self.keys = ct_hash_keys(seed);
        *self.near.borrow_mut() = None;
        Ok(())
    }

    fn seed_window(&self) -> anyhow::Result<Mapping> {
        Mapping::window(&self.map, self.shape.whole(), self.shape.count, 1)
    }

    /// Lines in all.
    pub fn lines(&self) -> usize {
        (self.shape.count * CT_GROUP) as usize
    }

    /// Groups `first..first + count`, mapped.
    fn view(&self, first: u32, count: u32) -> anyhow::Result<View<K>> {
        Ok(View {
            windows: vec![Mapping::window(&self.map, self.shape, first, count)?],
            groups: self.shape.count,
            keys: self.keys,
            _key: PhantomData,
        })
    }

    /// The group `key` belongs to: operations on keys in this order map
    /// each window of the table once.
    pub fn home(&self, key: &K) -> u32 {
        home(&self.keys, self.shape.count, key).0
    }

    /// `f` on a view holding the key's group and the next one: the window
    /// mapped for the last key if it holds both, else the window from the
    /// key's group on (and the first group, when the table wraps there).
    fn near<T>(&self, key: &K, f: impl FnOnce(&View<K>) -> T) -> anyhow::Result<T> {
        let home = self.home(key);
        let next = home.wrapping_add(1) & (self.shape.count - 1);
        let mut near = self.near.borrow_mut();
        if !near
            .as_ref()
            .is_some_and(|v| v.holds(home) && v.holds(next))
        {
            *near = None;
            let mut view = self.view(home, WINDOW)?;
            if !view.holds(next) {
                view.windows
                    .push(Mapping::window(&self.map, self.shape, next, 1)?);
            }
            *near = Some(view);
        }
        match near.as_ref() {
            Some(view) => Ok(f(view)),
            None => anyhow::bail!("no window mapped for group {home}"),
        }
    }

    /// Every window of the table in turn, mapped.
    fn scan<T>(
        &self,
        mut each: impl FnMut(&View<K>, std::ops::Range<u32>) -> T,
    ) -> anyhow::Result<Vec<T>> {
        let mut out = Vec::new();
        let mut first = 0;
        while first < self.shape.count {
            let count = WINDOW.min(self.shape.count - first);
            let view = self.view(first, count)?;
            out.push(each(&view, first * CT_GROUP..(first + count) * CT_GROUP));
            first += count;
        }
        Ok(out)
    }

    /// Every live entry, each key once, read in place: an entry whose line
    /// changed hands while it was read is left for the next reader.
    pub fn entries(&self) -> anyhow::Result<HashMap<K, K::Value>> {
        let mut out = HashMap::new();
        self.scan(|view, lines| view.collect(lines, &mut out))?;
        Ok(out)
    }

    /// Live keys kept in the group after their own, which was full.
    pub fn spilled_keys(&self) -> anyhow::Result<u64> {
        let each = |view: &View<K>, lines: std::ops::Range<u32>| -> u64 {
            (lines.start / CT_GROUP..lines.end / CT_GROUP)
                .map(|group| u64::from(view.spilled(group).load(Ordering::Relaxed)))
                .sum()
        };
        Ok(self.scan(each)?.into_iter().sum())
    }

    /// Live lines.
    pub fn len(&self) -> anyhow::Result<usize> {
        let each = |view: &View<K>, lines: std::ops::Range<u32>| {
            lines
                .filter(|line| view.tag(*line).load(Ordering::Relaxed) & CT_TAG_LIVE != 0)
                .count()
        };
        Ok(self.scan(each)?.into_iter().sum())
    }

    pub fn is_empty(&self) -> anyhow::Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn get(&self, key: &K) -> anyhow::Result<Option<K::Value>> {
        self.near(key, |view| {
            view.locate(key).map(|found| view.value(found.line))
        })
    }

    /// Writes the entry as the datapath does: over the key's line, or into
    /// a free line of its group, or of the next group if its own is full.
    pub fn insert(&self, key: K, value: K::Value) -> anyhow::Result<Result<(), GroupFull>> {
        self.near(&key, |view| view.insert(key, value))
    }

    /// Releases the key's line; false if it had none.
    pub fn remove(&self, key: &K) -> anyhow::Result<bool> {
        self.near(key, |view| view.remove(key))
    }

    /// Releases the key's line and returns its value with the `active`
    /// it had when it went (see `View::take`).
    pub fn take(&self, key: &K) -> anyhow::Result<Option<K::Value>> {
        self.near(key, |view| view.take(key))
    }
}

impl<K: LineKey> View<K> {
    /// The key's group and tag.
    fn home(&self, key: &K) -> (u32, u32) {
        home(&self.keys, self.groups, key)
    }

    fn holds(&self, group: u32) -> bool {
        self.windows.iter().any(|w| w.holds(group))
    }

    fn group(&self, line: u32) -> *mut CtGroup<K, K::Value> {
        let index = line / CT_GROUP;
        match self.windows.iter().find(|w| w.holds(index)) {
            Some(window) => window.value(index),
            None => panic!("group {index} is not mapped"),
        }
    }

    fn value_ptr(&self, line: u32) -> *mut K::Value {
        let group = self.group(line);
        // SAFETY: within the group.
        unsafe {
            (&raw mut (*group).values)
                .cast::<K::Value>()
                .add((line % CT_GROUP) as usize)
        }
    }

    fn tag(&self, line: u32) -> &AtomicU32 {
        let group = self.group(line);
        // SAFETY: a tag of a group of the mapping, 4-byte aligned; the
        // kernel and the agent only access it atomically.
        unsafe {
            &*(&raw mut (*group).tags)
                .cast::<AtomicU32>()
                .add((line % CT_GROUP) as usize)
        }
    }

    fn key(&self, line: u32) -> K {
        let group = self.group(line);
        // SAFETY: a key of a group of the mapping; any bytes are a key.
        unsafe {
            (&raw const (*group).keys)
                .cast::<K>()
                .add((line % CT_GROUP) as usize)
                .read_volatile()
        }
    }

    fn key_ptr(&self, line: u32) -> *mut K {
        let group = self.group(line);
        // SAFETY: within the group.
        unsafe {
            (&raw mut (*group).keys)
                .cast::<K>()
                .add((line % CT_GROUP) as usize)
        }
    }

    fn value(&self, line: u32) -> K::Value {
        // SAFETY: a value of the mapping; any bytes are a value (Pod).
        unsafe { self.value_ptr(line).read_volatile() }
    }

    fn active(&self, line: u32) -> &AtomicU32 {
        // SAFETY: the 4-byte aligned `active` field of a value of the
        // mapping, which the datapath swaps atomically too.
        unsafe {
            &*self
                .value_ptr(line)
                .cast::<u8>()
                .add(K::ACTIVE)
                .cast::<AtomicU32>()
        }
    }

    /// Where `key` is: its line and tag, and whether it is kept in the
    /// next group (its own group's index, whose count goes down when the
    /// line is released).
    fn locate(&self, key: &K) -> Option<Found> {
        let (home, tag) = self.home(key);
        if let Some(line) = self.walk(home, tag, key) {
            return Some(Found {
                line,
                tag,
                spilled_from: None,
            });
        }
        if self.spilled(home).load(Ordering::Acquire) == 0 {
            return None;
        }
        let line = self.walk(self.next(home), tag, key)?;
        Some(Found {
            line,
            tag,
            spilled_from: Some(home),
        })
    }

    /// The line of `group` holding `key` under `tag`.
    fn walk(&self, group: u32, tag: u32, key: &K) -> Option<u32> {
        (group * CT_GROUP..(group + 1) * CT_GROUP).find(|line| {
            self.tag(*line).load(Ordering::Acquire) == tag && self.key(*line).words() == key.words()
        })
    }

    /// The first free line of `group`.
    fn free_in(&self, group: u32) -> Option<u32> {
        (group * CT_GROUP..(group + 1) * CT_GROUP)
            .find(|line| self.tag(*line).load(Ordering::Acquire) == CT_TAG_FREE)
    }

    fn next(&self, group: u32) -> u32 {
        group.wrapping_add(1) & (self.groups - 1)
    }

    /// The count of `group`'s keys kept in the next group.
    fn spilled(&self, group: u32) -> &AtomicU32 {
        let group = self.group(group * CT_GROUP);
        // SAFETY: a 4-byte aligned field of a group of the mapping, which
        // the datapath changes atomically too.
        unsafe { &*(&raw mut (*group).spilled).cast::<AtomicU32>() }
    }

    /// Adds the live entries of `lines` to `out`, each key once: an entry
    /// whose line changed hands while it was read is left for the next
    /// reader.
    fn collect(&self, lines: std::ops::Range<u32>, out: &mut HashMap<K, K::Value>) {
        for line in lines {
            let tag = self.tag(line).load(Ordering::Acquire);
            if tag & CT_TAG_LIVE == 0 {
                continue;
            }
            let (key, value) = (self.key(line), self.value(line));
            if self.tag(line).load(Ordering::Acquire) == tag {
                out.entry(key).or_insert(value);
            }
        }
    }

    /// Writes the entry as the datapath does: over the key's line, or into
    /// a free line of its group, or of the next group if its own is full.
    fn insert(&self, key: K, value: K::Value) -> Result<(), GroupFull> {
        if let Some(found) = self.locate(&key) {
            // SAFETY: a value of the mapping.
            unsafe { self.value_ptr(found.line).write_volatile(value) };
            return Ok(());
        }
        let (home, tag) = self.home(&key);
        if let Some(line) = self.free_in(home) {
            return self.claim(line, tag, key, value);
        }
        let line = self.free_in(self.next(home)).ok_or(GroupFull)?;
        // Raised before the key can be found, as the datapath does.
        self.spilled(home).fetch_add(1, Ordering::AcqRel);
        let claimed = self.claim(line, tag, key, value);
        if claimed.is_err() {
            self.spilled(home).fetch_sub(1, Ordering::AcqRel);
        }
        claimed
    }

    /// Claims free `line` for the entry; `GroupFull` if the datapath took
    /// it first.
    fn claim(&self, line: u32, tag: u32, key: K, value: K::Value) -> Result<(), GroupFull> {
        let claimed = self.tag(line).compare_exchange(
            CT_TAG_FREE,
            CT_TAG_BUSY,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        if claimed.is_err() {
            return Err(GroupFull);
        }
        // SAFETY: a key and a value of the mapping, this call's own while
        // its tag is busy.
        unsafe {
            self.key_ptr(line).write_volatile(key);
            self.value_ptr(line).write_volatile(value);
        }
        self.tag(line).store(tag, Ordering::Release);
        Ok(())
    }

    /// Releases the key's line; false if it had none.
    fn remove(&self, key: &K) -> bool {
        let Some(found) = self.locate(key) else {
            return false;
        };
        let released = self.tag(found.line).compare_exchange(
            found.tag,
            CT_TAG_FREE,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        self.released(&found, released.is_ok())
    }

    /// Lowers the count of the group a released key was kept for; whether
    /// it was released.
    fn released(&self, found: &Found, released: bool) -> bool {
        if let (true, Some(home)) = (released, found.spilled_from) {
            self.spilled(home).fetch_sub(1, Ordering::AcqRel);
        }
        released
    }

    /// Releases the key's line and returns its value with the `active`
    /// it had when it went: the line is held busy (no packet finds it)
    /// while `active` is swapped out, so the datapath cannot release the
    /// connection as well.
    fn take(&self, key: &K) -> Option<K::Value> {
        let found = self.locate(key)?;
        let (line, tag) = (found.line, found.tag);
        self.tag(line)
            .compare_exchange(tag, CT_TAG_BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        let was = self.active(line).swap(0, Ordering::AcqRel);
        let mut value = self.value(line);
        self.tag(line).store(CT_TAG_FREE, Ordering::Release);
        self.released(&found, true);
        // SAFETY: `ACTIVE` is the offset of a u32 field within the value.
        unsafe {
            std::ptr::from_mut(&mut value)
                .cast::<u8>()
                .add(K::ACTIVE)
                .cast::<u32>()
                .write_unaligned(was)
        };
        Some(value)
    }
}

/// Where a key was found.
struct Found {
    line: u32,
    tag: u32,
    /// Its group, when it is kept in the next one.
    spilled_from: Option<u32>,
}
