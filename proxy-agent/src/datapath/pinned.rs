//! The maps a node's datapath pinned under `<bpffs>/xdproxy`: opening them
//! by name, and reading a whole hash map. Every reader of pinned maps (the
//! conntrack GC, the stale-socket sweep, `inspect`) goes through here.

use std::{
    collections::HashMap as StdHashMap,
    hash::Hash,
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, bail};
use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use proxy_common::{Backend4, Backend6};

use super::{batch, loader};

/// The pin directory of a node's datapath.
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    /// `<bpffs>/xdproxy`, whether or not anything is pinned there yet.
    pub fn at(bpffs: &Path) -> Pins {
        Pins {
            dir: loader::pin_dir(bpffs),
        }
    }

    /// `<bpffs>/xdproxy`, or an error that says why nothing can be read
    /// there.
    pub fn existing(bpffs: &Path) -> anyhow::Result<Pins> {
        let pins = Pins::at(bpffs);
        let dir = &pins.dir;
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok(pins),
            Ok(_) => bail!("{} is not a directory of pinned maps", dir.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "no datapath pinned under {}: is the agent running on this node? \
                 (--bpffs names where bpffs is mounted, default /sys/fs/bpf)",
                dir.display()
            ),
            Err(e) => Err(e)
                .with_context(|| format!("reading {} (needs root, or CAP_BPF)", dir.display())),
        }
    }

    /// Where map `name` is pinned.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The map pinned as `name`, as `T`; an error when it is not pinned or
    /// has another layout.
    pub fn map<T: TryFrom<Map, Error = MapError>>(&self, name: &str) -> anyhow::Result<T> {
        match self.optional_map(name)? {
            Some(map) => Ok(map),
            None => bail!(
                "map {name} is not pinned under {}: is the agent running on this node?",
                self.dir.display()
            ),
        }
    }

    /// As `map`, but None when it is not pinned: a map a datapath of an
    /// earlier version does not have.
    pub fn optional_map<T: TryFrom<Map, Error = MapError>>(
        &self,
        name: &str,
    ) -> anyhow::Result<Option<T>> {
        let path = self.path(name);
        if !path.exists() {
            return Ok(None);
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening {} (needs root, or CAP_BPF)", path.display()))?;
        let map =
            Map::from_map_data(data).with_context(|| format!("opening {}", path.display()))?;
        let map = T::try_from(map).with_context(|| {
            format!(
                "{} does not have the layout this proxy-agent reads: the datapath was \
                 pinned by another version",
                path.display()
            )
        })?;
        Ok(Some(map))
    }
}

/// The entries `map` was created to hold (`fallback` if the kernel will
/// not say).
pub fn capacity(map: &MapData, fallback: u32) -> usize {
    map.info().map_or(fallback, |info| info.max_entries()) as usize
}

/// Set once the kernel has refused `BPF_MAP_LOOKUP_BATCH`: it will not
/// learn it while the agent runs, so later reads go straight to the walk.
static NO_BATCH: AtomicBool = AtomicBool::new(false);

/// Every entry of a hash map (LRU or not), each once: in batches where the
/// kernel offers them (see `batch`), else key by key. A key-by-key walk
/// starts over from the first key when the current one is deleted under it
/// (conntrack churns), so it may meet entries twice (kept once) and stops
/// after `limit` steps; so does a batch read. An entry deleted between
/// listing and reading is simply gone.
pub fn entries<K, V>(map: &HashMap<MapData, K, V>, limit: usize) -> anyhow::Result<StdHashMap<K, V>>
where
    K: Pod + Eq + Hash,
    V: Pod,
{
    if !NO_BATCH.load(Ordering::Relaxed) {
        match batch::lookup_all(map, limit).context("reading in batches")? {
            Some(all) => {
                if all.len() >= limit {
                    log::debug!("map read stopped after {} entries", all.len());
                }
                return Ok(all.into_iter().collect());
            }
            None => {
                if !NO_BATCH.swap(true, Ordering::Relaxed) {
                    log::debug!("the kernel lacks BPF_MAP_LOOKUP_BATCH: reading maps key by key");
                }
            }
        }
    }
    let mut out = StdHashMap::new();
    for (step, item) in map.iter().enumerate() {
        if step >= limit {
            log::debug!("map walk stopped after {step} steps (entries churning)");
            break;
        }
        match item {
            Ok((key, value)) => {
                out.insert(key, value);
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("walking the map"),
        }
    }
    Ok(out)
}

/// Element `index` of a per-CPU array, folded over the CPUs with `add`;
/// None for an index past the end.
pub fn per_cpu_sum<V: Pod, S>(
    map: &PerCpuArray<MapData, V>,
    index: u32,
    zero: S,
    add: impl Fn(S, &V) -> S,
) -> Result<Option<S>, MapError> {
    match map.get(&index, 0) {
        Ok(per_cpu) => Ok(Some(per_cpu.iter().fold(zero, add))),
        Err(MapError::OutOfBounds { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The first `len` values of an array, in few syscalls where the kernel
/// batches.
pub fn read_array<V: Pod + Default>(
    map: &Array<MapData, V>,
    len: u32,
    name: &str,
) -> anyhow::Result<Vec<V>> {
    let mut values = vec![V::default(); len as usize];
    let read = || format!("reading {name}");
    match batch::lookup_array(map).with_context(read)? {
        Some(entries) => {
            for (index, value) in entries {
                if let Some(v) = values.get_mut(index as usize) {
                    *v = value;
                }
            }
        }
        None => {
            for (index, v) in (0u32..).zip(values.iter_mut()) {
                *v = map.get(&index, 0).with_context(read)?;
            }
        }
    }
    Ok(values)
}

/// A value of `lb4_backends_v2` or `lb6_backends_v2`.
pub trait BackendSlot: Pod + Default {
    /// False for an id no backend holds.
    fn present(&self) -> bool;
}

impl BackendSlot for Backend4 {
    fn present(&self) -> bool {
        Backend4::present(self)
    }
}

impl BackendSlot for Backend6 {
    fn present(&self) -> bool {
        Backend6::present(self)
    }
}

/// The backends `lb4_backends_v2` or `lb6_backends_v2` holds, by id.
pub fn backends<B: BackendSlot>(
    map: &Array<MapData, B>,
    name: &str,
) -> anyhow::Result<Vec<(u32, B)>> {
    let all = read_array(map, map.len(), name)?;
    Ok((0u32..).zip(all).filter(|(_, b)| b.present()).collect())
}
