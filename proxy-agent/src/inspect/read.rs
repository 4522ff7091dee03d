//! Opening the maps a running node pinned and decoding them into records:
//! the only I/O of `inspect`. Read-only: nothing here writes a map.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hash,
    net::SocketAddr,
    path::Path,
};

use anyhow::Context;
use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray},
};
use proxy_common::{
    Backend4, Backend6, BackendStatsEntry, CT_SOCKET, Connections, Ct4Key, Ct6Key, Frontend4,
    Frontend6, MemberKey, Service, ServiceStats, ServiceStatsEntry, SlotKey, names, stats_slot,
};

use super::records::{BackendActivity, CtRecord, Endpoint, LbRecords, MemberRecord, ServiceRecord};
use crate::datapath::{
    conntrack::{CtKey, Table},
    ctstore::CtTables,
    pinned::{self, BackendSlot, Pins},
};

/// What `inspect` reads: the maps a node's datapath pinned.
pub struct Pinned {
    pins: Pins,
}

impl Pinned {
    /// The maps pinned under `<bpffs>/xdproxy`, or an error that says why
    /// nothing can be read there.
    pub fn open(bpffs: &Path) -> anyhow::Result<Pinned> {
        Ok(Pinned {
            pins: Pins::existing(bpffs)?,
        })
    }

    /// Every entry of a hash map (LRU or not).
    fn hash<K, V>(&self, name: &str) -> anyhow::Result<Vec<(K, V)>>
    where
        K: Pod + Eq + Hash,
        V: Pod,
    {
        self.entries(name, self.pins.map(name)?)
    }

    /// As `hash`, but no entries when the map is not pinned: maps a
    /// datapath of an earlier version does not have.
    fn optional_hash<K, V>(&self, name: &str) -> anyhow::Result<Vec<(K, V)>>
    where
        K: Pod + Eq + Hash,
        V: Pod,
    {
        match self.pins.optional_map(name)? {
            Some(map) => self.entries(name, map),
            None => Ok(Vec::new()),
        }
    }

    /// Every entry of `map`, pinned as `name`, read at most twice over
    /// (the kernel's walk restarts when entries churn).
    fn entries<K, V>(&self, name: &str, map: HashMap<MapData, K, V>) -> anyhow::Result<Vec<(K, V)>>
    where
        K: Pod + Eq + Hash,
        V: Pod,
    {
        let bound = 2 * pinned::capacity(map.map(), 0) + 1;
        let entries = pinned::entries(&map, bound)
            .with_context(|| format!("reading {}", self.pins.path(name).display()))?;
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
        let v4 = self.backend_array::<Backend4>(names::BACKENDS4, names::LEGACY_BACKENDS4)?;
        let v6 = self.backend_array::<Backend6>(names::BACKENDS6, names::LEGACY_BACKENDS6)?;
        Ok((v4.iter().map(|(id, b)| (*id, b.into())))
            .chain(v6.iter().map(|(id, b)| (*id, b.into())))
            .collect())
    }

    /// A family's backends by id: from its array, or from the hash map a
    /// datapath of a version before them pinned.
    fn backend_array<B: BackendSlot>(
        &self,
        name: &str,
        legacy: &str,
    ) -> anyhow::Result<Vec<(u32, B)>> {
        if let Some(array) = self.pins.optional_map::<Array<MapData, B>>(name)? {
            return pinned::backends(&array, name);
        }
        match self.pins.optional_map::<HashMap<MapData, u32, B>>(legacy)? {
            Some(map) => self.entries(legacy, map),
            // Neither: the error names the map this version pins.
            None => pinned::backends(&self.pins.map::<Array<MapData, B>>(name)?, name),
        }
    }

    fn members(&self) -> anyhow::Result<Vec<MemberRecord>> {
        let v4 = self.hash::<MemberKey, Backend4>(names::MEMBERS4)?;
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
        let stats: PerCpuArray<MapData, ServiceStatsEntry> = self.pins.map(names::SERVICE_STATS)?;
        let base: Array<MapData, ServiceStats> = self.pins.map(names::SERVICE_STATS_BASE)?;
        let mut out = BTreeMap::new();
        for &id in ids {
            let (entry, place) = stats_slot(id);
            let sum = pinned::per_cpu_sum(&stats, entry, ServiceStats::default(), |sum, e| {
                sum.plus(&e.by_id[place])
            });
            if let Some(sum) = read(sum, names::SERVICE_STATS)? {
                let since = at(base.get(&id, 0), names::SERVICE_STATS_BASE)?;
                out.insert(id, sum.since(since.unwrap_or_default()));
            }
        }
        Ok(out)
    }

    fn activity(&self, ids: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, BackendActivity>> {
        let flows: Option<PerCpuArray<MapData, BackendStatsEntry>> =
            self.pins.optional_map(names::BACKEND_STATS)?;
        let conns: Option<Array<MapData, Connections>> =
            self.pins.optional_map(names::CONNECTIONS)?;
        let reaped: Option<Array<MapData, u32>> = self.pins.optional_map(names::REAPED)?;
        let mut out = BTreeMap::new();
        for &id in ids {
            let mut activity = BackendActivity::default();
            if let Some(map) = &flows {
                let (entry, place) = stats_slot(id);
                let sum = pinned::per_cpu_sum(map, entry, 0u64, |sum, e| {
                    sum.wrapping_add(e.by_id[place].flows)
                });
                activity.flows = read(sum, names::BACKEND_STATS)?;
            }
            if let Some(map) = &conns {
                activity.connections = at(map.get(&id, 0), names::CONNECTIONS)?;
            }
            if let Some(map) = &reaped {
                activity.reaped = at(map.get(&id, 0), names::REAPED)?;
            }
            out.insert(id, activity);
        }
        Ok(out)
    }

    /// Every conntrack entry of both families, main and overflow maps,
    /// socket entries with their frontends.
    pub fn conntrack(&self) -> anyhow::Result<Vec<CtRecord>> {
        let mut v4 = self.conntrack_of::<Ct4Key>()?;
        let frontends = self.frontends::<Frontend4>(names::REV_NAT4, &socket_ids(&v4))?;
        name_frontends(&mut v4, &frontends);
        let mut v6 = self.conntrack_of::<Ct6Key>()?;
        let frontends = self.frontends::<Frontend6>(names::REV_NAT6, &socket_ids(&v6))?;
        name_frontends(&mut v6, &frontends);
        v4.extend(v6);
        Ok(v4)
    }

    /// The frontends of service ids `ids` in the reverse-NAT array `name`:
    /// none for an index never written (protocol 0) or past the end, or
    /// when the array is not pinned (a datapath older than it).
    fn frontends<F: Pod>(
        &self,
        name: &str,
        ids: &BTreeSet<u32>,
    ) -> anyhow::Result<BTreeMap<u32, SocketAddr>>
    where
        for<'a> &'a F: Into<Endpoint>,
    {
        let Some(map) = self.pins.optional_map::<Array<MapData, F>>(name)? else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for &id in ids {
            let endpoint: Option<Endpoint> = at(map.get(&id, 0), name)?.map(|f| (&f).into());
            if let Some(e) = endpoint.filter(|e| e.proto != 0) {
                out.insert(id, e.addr);
            }
        }
        Ok(out)
    }

    /// The entries of one family's own table and overflow map.
    fn conntrack_of<K: CtKey>(&self) -> anyhow::Result<Vec<CtRecord>> {
        let record = |table| {
            move |(k, v): (&K, &K::Value)| CtRecord {
                table,
                entry: k.decode(v),
                frontend: None,
            }
        };
        if !self.pins.path(K::GROUPS).exists() {
            let main = self.legacy_flows::<K>()?;
            let overflow = self.optional_hash::<K, K::Value>(K::OVERFLOW)?;
            return Ok((main.iter().map(|(k, v)| record(Table::Main)((k, v))))
                .chain(
                    overflow
                        .iter()
                        .map(|(k, v)| record(Table::Overflow)((k, v))),
                )
                .collect());
        }
        let tables = CtTables::<K>::open(&self.pins)?;
        let mut out = Vec::new();
        for table in [Table::Main, Table::Overflow] {
            out.extend(tables.entries(table)?.iter().map(record(table)));
        }
        Ok(out)
    }

    /// The main conntrack entries of a datapath an earlier version pinned:
    /// in its table hashed without a seed, or, before that table, in a
    /// hash map.
    fn legacy_flows<K: CtKey>(&self) -> anyhow::Result<Vec<(K, K::Value)>> {
        match CtTables::<K>::legacy_table(&self.pins)? {
            Some(table) => Ok(table.into_iter().collect()),
            None => self.hash::<K, K::Value>(K::LEGACY),
        }
    }

    /// The global `counters`, each summed over CPUs, by index.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        let counters: PerCpuArray<MapData, u64> = self.pins.map(names::COUNTERS)?;
        counters
            .iter()
            .map(|per_cpu| Ok(per_cpu?.iter().fold(0u64, |sum, v| sum.wrapping_add(*v))))
            .collect::<Result<_, MapError>>()
            .with_context(|| format!("reading {}", self.pins.path(names::COUNTERS).display()))
    }
}

/// The service ids of the socket entries among `records`, each once.
fn socket_ids(records: &[CtRecord]) -> BTreeSet<u32> {
    (records.iter())
        .filter(|r| r.entry.direction == CT_SOCKET)
        .map(|r| r.entry.service_id)
        .collect()
}

/// Gives each socket entry among `records` its service id's frontend.
fn name_frontends(records: &mut [CtRecord], frontends: &BTreeMap<u32, SocketAddr>) {
    for r in records
        .iter_mut()
        .filter(|r| r.entry.direction == CT_SOCKET)
    {
        r.frontend = frontends.get(&r.entry.service_id).copied();
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

/// A per-CPU sum (see `pinned::per_cpu_sum`), with the map's name on an
/// error.
fn read<V>(result: Result<Option<V>, MapError>, name: &str) -> anyhow::Result<Option<V>> {
    result.with_context(|| format!("reading {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::conntrack::Record;
    use proxy_common::{CT_FORWARD, IPPROTO_TCP};

    fn record(direction: u8, service_id: u32) -> CtRecord {
        let any = SocketAddr::from(([10, 0, 0, 1], 1));
        CtRecord {
            table: Table::Main,
            entry: Record {
                src: any,
                dst: any,
                proto: IPPROTO_TCP,
                direction,
                nat: any,
                flags: 0,
                backend_id: 1,
                service_id,
                last_seen: 0,
                state: 0,
                reply_state: 0,
                node_port: 0,
                active: false,
            },
            frontend: None,
        }
    }

    /// Only socket entries look their frontend up, once per service id.
    #[test]
    fn socket_entries_get_the_frontend_of_their_service_id() {
        let mut records = [
            record(CT_SOCKET, 3),
            record(CT_FORWARD, 3),
            record(CT_SOCKET, 3),
            record(CT_SOCKET, 4),
        ];
        assert_eq!(socket_ids(&records), BTreeSet::from([3, 4]));
        let vip = SocketAddr::from(([10, 96, 0, 10], 80));
        name_frontends(&mut records, &BTreeMap::from([(3, vip)]));
        let frontends: Vec<_> = records.iter().map(|r| r.frontend).collect();
        assert_eq!(frontends, [Some(vip), None, Some(vip), None]);
    }

    #[test]
    fn a_bpffs_without_pins_is_a_clear_error() {
        let empty = std::env::temp_dir().join(format!("xdproxy-inspect-{}", std::process::id()));
        let error = match Pinned::open(&empty) {
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
