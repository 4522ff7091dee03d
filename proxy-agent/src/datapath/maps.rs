//! The service maps, owned and typed, behind the reconciler's `Maps` trait.

use anyhow::Context;
use std::net::{IpAddr, Ipv4Addr};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
};
use proxy_common::{
    Backend4, Counter, Frontend4, MemberKey, NodeConfig, Service, ServiceStats, SlotKey,
    SourceRange4, names,
};

use crate::{
    cidr::Cidr,
    reconcile::{Maps, Snapshot},
};

pub struct MapSet {
    pub services: HashMap<MapData, Frontend4, Service>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend4>,
    pub members: HashMap<MapData, MemberKey, Backend4>,
    pub source_ranges: LpmTrie<MapData, SourceRange4, u32>,
    pub config: Array<MapData, NodeConfig>,
    pub stats: PerCpuArray<MapData, ServiceStats>,
    pub counters: PerCpuArray<MapData, u64>,
    cpus: usize,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl MapSet {
    /// Takes the service maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<MapSet> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(MapSet {
            services: take(ebpf, names::SERVICES4)?,
            slots: take(ebpf, names::SLOTS)?,
            backends: take(ebpf, names::BACKENDS4)?,
            members: take(ebpf, names::MEMBERS)?,
            source_ranges: take(ebpf, names::SOURCE_RANGES4)?,
            config: take(ebpf, names::CONFIG)?,
            stats: take(ebpf, names::SERVICE_STATS)?,
            counters: take(ebpf, names::COUNTERS)?,
            cpus,
        })
    }

    /// Everything the service maps hold, for a restarted agent to adopt.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            services: collect(self.services.iter(), names::SERVICES4)?,
            slots: collect(self.slots.iter(), names::SLOTS)?,
            backends: collect(self.backends.iter(), names::BACKENDS4)?,
            members: collect(self.members.iter(), names::MEMBERS)?,
            source_ranges: collect(self.source_ranges.iter(), names::SOURCE_RANGES4)?
                .into_iter()
                .filter_map(|(key, _)| source_range(&key))
                .collect(),
            config: Some(self.config.get(&0, 0).context("reading lb_config")?),
        })
    }

    /// A service id's traffic summed over CPUs.
    pub fn service_stats(&self, id: u32) -> anyhow::Result<ServiceStats> {
        let per_cpu = self.stats.get(&id, 0).context("reading lb_stats")?;
        Ok(per_cpu
            .iter()
            .fold(ServiceStats::default(), |sum, s| ServiceStats {
                packets: sum.packets + s.packets,
                bytes: sum.bytes + s.bytes,
            }))
    }

    /// A counter summed over CPUs.
    pub fn counter(&self, counter: Counter) -> anyhow::Result<u64> {
        let per_cpu = self
            .counters
            .get(&(counter as u32), 0)
            .context("reading counters")?;
        Ok(per_cpu.iter().sum())
    }
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    name: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    iter.collect::<Result<_, _>>()
        .with_context(|| format!("reading {name}"))
}

/// The trie key of a service's IPv4 source range: the service id is
/// matched whole, then the range's prefix of the address.
fn range_key(service_id: u32, range: Cidr) -> anyhow::Result<Key<SourceRange4>> {
    let IpAddr::V4(addr) = range.addr else {
        anyhow::bail!("{range} is not an IPv4 range");
    };
    Ok(Key::new(
        32 + u32::from(range.prefix),
        SourceRange4 {
            service_id_be: service_id.to_be(),
            addr: u32::from(addr).to_be(),
        },
    ))
}

/// The service id and range an adopted trie key stands for.
fn source_range(key: &Key<SourceRange4>) -> Option<(u32, Cidr)> {
    let prefix = key.prefix_len().checked_sub(32).filter(|p| *p <= 32)?;
    let data = key.data();
    let addr = Ipv4Addr::from(u32::from_be(data.addr));
    let range = format!("{addr}/{prefix}").parse().ok()?;
    Some((u32::from_be(data.service_id_be), range))
}

/// Removing what is already gone is not an error: removal is idempotent.
fn removed(result: Result<(), MapError>, what: &str) -> anyhow::Result<()> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other.with_context(|| format!("removing from {what}")),
    }
}

impl Maps for MapSet {
    fn set_backend(&mut self, id: u32, backend: Backend4) -> anyhow::Result<()> {
        self.backends
            .insert(id, backend, 0)
            .context("writing lb4_backends")
    }

    fn remove_backend(&mut self, id: u32) -> anyhow::Result<()> {
        removed(self.backends.remove(&id), names::BACKENDS4)
    }

    fn set_slot(&mut self, key: SlotKey, backend_id: u32) -> anyhow::Result<()> {
        self.slots
            .insert(key, backend_id, 0)
            .context("writing lb_slots")
    }

    fn remove_slot(&mut self, key: SlotKey) -> anyhow::Result<()> {
        removed(self.slots.remove(&key), names::SLOTS)
    }

    fn set_service(&mut self, frontend: Frontend4, service: Service) -> anyhow::Result<()> {
        self.services
            .insert(frontend, service, 0)
            .context("writing lb4_services")
    }

    fn remove_service(&mut self, frontend: Frontend4) -> anyhow::Result<()> {
        removed(self.services.remove(&frontend), names::SERVICES4)
    }

    fn set_member(&mut self, key: MemberKey, backend: Backend4) -> anyhow::Result<()> {
        self.members
            .insert(key, backend, 0)
            .context("writing lb_members")
    }

    fn remove_member(&mut self, key: MemberKey) -> anyhow::Result<()> {
        removed(self.members.remove(&key), names::MEMBERS)
    }

    fn set_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()> {
        self.source_ranges
            .insert(&range_key(service_id, range)?, 1, 0)
            .context("writing lb4_src_ranges")
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()> {
        let key = range_key(service_id, range)?;
        removed(self.source_ranges.remove(&key), names::SOURCE_RANGES4)
    }

    fn set_config(&mut self, config: NodeConfig) -> anyhow::Result<()> {
        self.config.set(0, config, 0).context("writing lb_config")
    }

    fn reset_stats(&mut self, service_id: u32) -> anyhow::Result<()> {
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); self.cpus])
            .context("building per-CPU zeros")?;
        self.stats
            .set(service_id, zeros, 0)
            .context("resetting lb_stats")
    }
}
