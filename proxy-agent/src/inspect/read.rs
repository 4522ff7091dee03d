//! Opening the maps a running node pinned and decoding them into records:
//! the only I/O of `inspect`. Read-only: nothing here writes a map.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    hash::Hash,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use proxy_common::{
    Backend4, Backend6, BackendStats, Connections, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, Frontend4,
    Frontend6, MemberKey, Service, ServiceStats, SlotKey, names,
};

use super::records::{
    BackendActivity, CtRecord, CtTable, Endpoint, LbRecords, MemberRecord, ServiceRecord, socket4,
    socket6,
};
use crate::{conntrack::gc::CtKey as _, datapath::loader};

/// The pin directory of a node's datapath.
pub struct Pins {
    dir: PathBuf,
}

/// A pinned map and its capacity.
struct Pinned<T> {
    map: T,
    max_entries: u32,
}

impl Pins {
    /// `<bpffs>/xdproxy`, or an error that says why nothing can be read there.
    pub fn open(bpffs: &Path) -> anyhow::Result<Pins> {
        let dir = loader::pin_dir(bpffs);
        match std::fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(Pins { dir }),
            Ok(_) => bail!("{} is not a directory of pinned maps", dir.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "no datapath pinned under {}: is the agent running on this node? \
                 (--bpffs names where bpffs is mounted, default /sys/fs/bpf)",
                dir.display()
            ),
            Err(e) => Err(e).with_context(|| {
                format!("reading {} (inspect needs root, or CAP_BPF)", dir.display())
            }),
        }
    }

    /// A pinned map as `T`; an error when it is not pinned or has another layout.
    fn map<T>(&self, name: &str) -> anyhow::Result<Pinned<T>>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        match self.optional_map(name)? {
            Some(pinned) => Ok(pinned),
            None => bail!(
                "map {name} is not pinned under {}: is the agent running on this node?",
                self.dir.display()
            ),
        }
    }

    /// As `map`, but `None` when it is not pinned: maps a datapath of an
    /// earlier version does not have.
    fn optional_map<T>(&self, name: &str) -> anyhow::Result<Option<Pinned<T>>>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let path = self.dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening {} (needs root, or CAP_BPF)", path.display()))?;
        let max_entries = data
            .info()
            .with_context(|| format!("reading {}", path.display()))?
            .max_entries();
        let map =
            Map::from_map_data(data).with_context(|| format!("opening {}", path.display()))?;
        let map = T::try_from(map).with_context(|| {
            format!(
                "{} does not have the layout this proxy-agent reads: the datapath was \
                 pinned by another version",
                path.display()
            )
        })?;
        Ok(Some(Pinned { map, max_entries }))
    }

    /// Every entry of a hash map (LRU or not).
    fn hash<K, V>(&self, name: &str) -> anyhow::Result<Vec<(K, V)>>
    where
        K: Pod + Eq + Hash,
        V: Pod,
    {
        self.entries(name, self.map(name)?)
    }

    /// As `hash`, but no entries when the map is not pinned: maps a
    /// datapath of an earlier version does not have.
    fn optional_hash<K, V>(&self, name: &str) -> anyhow::Result<Vec<(K, V)>>
    where
        K: Pod + Eq + Hash,
        V: Pod,
    {
        match self.optional_map(name)? {
            Some(pinned) => self.entries(name, pinned),
            None => Ok(Vec::new()),
        }
    }

    /// Every entry of `pinned`, the map pinned as `name`.
    fn entries<K, V>(
        &self,
        name: &str,
        pinned: Pinned<HashMap<MapData, K, V>>,
    ) -> anyhow::Result<Vec<(K, V)>>
    where
        K: Pod + Eq + Hash,
        V: Pod,
    {
        // The kernel restarts a key walk from the first key when the
        // current one is deleted meanwhile (conntrack churns): collecting by
        // key drops the repeats, and the bound ends the walk even under
        // heavy churn.
        let bound = 2 * pinned.max_entries as usize + 1;
        let entries: StdHashMap<K, V> = pinned
            .map
            .iter()
            .take(bound)
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", self.dir.join(name).display()))?;
        Ok(entries.into_iter().collect())
    }

    /// Services, slots, backends, members and their counters, both families.
    pub fn lb(&self) -> anyhow::Result<LbRecords> {
        let mut records = LbRecords {
            services: self.services()?,
            slots: self
                .hash::<SlotKey, u32>(names::SLOTS)?
                .into_iter()
                .collect(),
            backends: self.backends()?,
            members: self.members()?,
            ..LbRecords::default()
        };
        let service_ids: BTreeSet<u32> = records.services.iter().map(|s| s.entry.id).collect();
        records.service_stats = self.service_stats(&service_ids)?;
        let backend_ids = (records.backends.keys().copied())
            .chain(records.members.iter().map(|m| m.backend_id))
            .chain(records.slots.values().copied())
            .collect();
        records.activity = self.activity(&backend_ids)?;
        Ok(records)
    }

    fn services(&self) -> anyhow::Result<Vec<ServiceRecord>> {
        let v4 = self.hash::<Frontend4, Service>(names::SERVICES4)?;
        let v6 = self.hash::<Frontend6, Service>(names::SERVICES6)?;
        let record = |frontend: Endpoint, scope: u8, entry: Service| ServiceRecord {
            frontend,
            scope,
            entry,
        };
        Ok((v4.iter().map(|(f, s)| record(f.into(), f.scope, *s)))
            .chain(v6.iter().map(|(f, s)| record(f.into(), f.scope, *s)))
            .collect())
    }

    fn backends(&self) -> anyhow::Result<BTreeMap<u32, Endpoint>> {
        let v4 = self.hash::<u32, Backend4>(names::BACKENDS4)?;
        let v6 = self.hash::<u32, Backend6>(names::BACKENDS6)?;
        Ok((v4.iter().map(|(id, b)| (*id, b.into())))
            .chain(v6.iter().map(|(id, b)| (*id, b.into())))
            .collect())
    }

    fn members(&self) -> anyhow::Result<Vec<MemberRecord>> {
        let v4 = self.hash::<MemberKey, Backend4>(names::MEMBERS)?;
        let v6 = self.hash::<MemberKey, Backend6>(names::MEMBERS6)?;
        let record = |k: &MemberKey, backend: Endpoint, flags: u8| MemberRecord {
            service_id: k.service_id,
            backend_id: k.backend_id,
            backend,
            flags,
        };
        Ok((v4.iter().map(|(k, b)| record(k, b.into(), b.flags)))
            .chain(v6.iter().map(|(k, b)| record(k, b.into(), b.flags)))
            .collect())
    }

    fn service_stats(&self, ids: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, ServiceStats>> {
        let stats: Pinned<PerCpuArray<MapData, ServiceStats>> = self.map(names::SERVICE_STATS)?;
        let mut out = BTreeMap::new();
        for &id in ids {
            let Some(per_cpu) = at(stats.map.get(&id, 0), names::SERVICE_STATS)? else {
                continue;
            };
            let sum = per_cpu
                .iter()
                .fold(ServiceStats::default(), |sum, s| ServiceStats {
                    packets: sum.packets.wrapping_add(s.packets),
                    bytes: sum.bytes.wrapping_add(s.bytes),
                });
            out.insert(id, sum);
        }
        Ok(out)
    }

    fn activity(&self, ids: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, BackendActivity>> {
        let flows: Option<Pinned<PerCpuArray<MapData, BackendStats>>> =
            self.optional_map(names::BACKEND_STATS)?;
        let conns: Option<Pinned<Array<MapData, Connections>>> =
            self.optional_map(names::CONNECTIONS)?;
        let reaped: Option<Pinned<Array<MapData, u32>>> = self.optional_map(names::REAPED)?;
        let mut out = BTreeMap::new();
        for &id in ids {
            let mut activity = BackendActivity::default();
            if let Some(p) = &flows {
                activity.flows = at(p.map.get(&id, 0), names::BACKEND_STATS)?.map(|per_cpu| {
                    per_cpu
                        .iter()
                        .fold(0u64, |sum, s| sum.wrapping_add(s.flows))
                });
            }
            if let Some(p) = &conns {
                activity.connections = at(p.map.get(&id, 0), names::CONNECTIONS)?;
            }
            if let Some(p) = &reaped {
                activity.reaped = at(p.map.get(&id, 0), names::REAPED)?;
            }
            out.insert(id, activity);
        }
        Ok(out)
    }

    /// Every conntrack entry of both families, main and overflow maps.
    pub fn conntrack(&self) -> anyhow::Result<Vec<CtRecord>> {
        let v4 = self.hash::<Ct4Key, Ct4Entry>(names::CONNTRACK4)?;
        let v6 = self.hash::<Ct6Key, Ct6Entry>(names::CONNTRACK6)?;
        let over4 = self.optional_hash::<Ct4Key, Ct4Entry>(names::OVERFLOW4)?;
        let over6 = self.optional_hash::<Ct6Key, Ct6Entry>(names::OVERFLOW6)?;
        let of4 =
            |table| move |(k, e): &(Ct4Key, Ct4Entry)| CtRecord::new(table, &k.record(e), socket4);
        let of6 = |table| {
            move |(k, e): &(Ct6Key, Ct6Entry)| {
                CtRecord::new(table, &k.record(e), |a, port| socket6(&a, port))
            }
        };
        Ok((v4.iter().map(of4(CtTable::Main)))
            .chain(over4.iter().map(of4(CtTable::Overflow)))
            .chain(v6.iter().map(of6(CtTable::Main)))
            .chain(over6.iter().map(of6(CtTable::Overflow)))
            .collect())
    }

    /// The global `counters`, each summed over CPUs, by index.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        let counters: Pinned<PerCpuArray<MapData, u64>> = self.map(names::COUNTERS)?;
        counters
            .map
            .iter()
            .map(|per_cpu| Ok(per_cpu?.iter().fold(0u64, |sum, v| sum.wrapping_add(*v))))
            .collect::<Result<_, MapError>>()
            .with_context(|| format!("reading {}", self.dir.join(names::COUNTERS).display()))
    }
}

/// An array element; `None` for an index past the end (a backend or
/// service id the array has no room for is shown without counters, not
/// an error).
fn at<V>(result: Result<V, MapError>, name: &str) -> anyhow::Result<Option<V>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(MapError::OutOfBounds { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bpffs_without_pins_is_a_clear_error() {
        let empty = std::env::temp_dir().join(format!("xdproxy-inspect-{}", std::process::id()));
        let error = match Pins::open(&empty) {
            Ok(_) => panic!("nothing is pinned under {}", empty.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            error.contains("no datapath pinned under")
                && error.contains("xdproxy")
                && error.contains("is the agent running on this node?"),
            "{error}"
        );
    }
}
