//! The service maps, owned and typed, behind the reconciler's `Maps` trait.
//!
//! Each service entry has its frontend in the family's reverse-NAT array
//! at the entry's id (`lb4_rev_nat`/`lb6_rev_nat`), where the datapath
//! finds the source of a `CT_SOCKET` flow's replies. It is written once,
//! when the id is taken (`fresh_service_id`, before the service entry, so
//! a packet never finds a service whose flows could not be answered), not
//! with every write of the service entry, and left in place when the entry
//! goes (an array).

use anyhow::Context;
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, IterableMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use proxy_common::{
    BACKEND_TERMINATING, Backend4, Backend6, Counter, FILTER_WORDS, Frontend4, Frontend6,
    MAX_SERVICES, MemberKey, NodeConfig, STATS_PER_ENTRY, SVC_LISTED, Service, ServiceStats,
    ServiceStatsEntry, SlotKey, SourceRange4, SourceRange6, names, stats_slot,
};

use super::{
    batch,
    filter::{self, Bits, FilterKey},
    keys::{self, BackendValue, FrontendKey},
    pinned,
};
use crate::{
    cidr::Cidr,
    model::Frontend,
    reconcile::{BackendKey, Maps, Member, NodeEntry, Partial, ServiceEntry, Slot, Snapshot, each},
};

/// One family's maps.
pub struct FamilyMaps<F: Pod, B: Pod, R> {
    pub services: HashMap<MapData, F, Service>,
    /// Service id -> the frontend of its entry.
    pub rev_nat: Array<MapData, F>,
    /// Backend id -> backend; zeroes where no backend is.
    pub backends: Array<MapData, B>,
    pub members: HashMap<MapData, MemberKey, B>,
    pub source_ranges: LpmTrie<MapData, R, u32>,
}

pub struct MapSet {
    pub v4: FamilyMaps<Frontend4, Backend4, SourceRange4>,
    pub v6: FamilyMaps<Frontend6, Backend6, SourceRange6>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub config: Array<MapData, NodeConfig>,
    pub stats: PerCpuArray<MapData, ServiceStatsEntry>,
    pub stats_base: Array<MapData, ServiceStats>,
    pub counters: PerCpuArray<MapData, u64>,
    /// See `names::MEMBER_GONE`.
    pub member_gone: Array<MapData, u32>,
    /// The second last written there for each service id this agent
    /// removed a member of: a Service losing many members in one second
    /// costs one write.
    gone_written: std::collections::HashMap<u32, u32>,
    /// See `names::SERVICES_BY_ID`.
    pub by_id: Array<MapData, Service>,
    /// See `proxy_common::filter`; `filter_bits` says what it holds.
    pub filter: Array<MapData, u64>,
    filter_bits: Bits,
    /// `lb_svc_stats` entries summed over CPUs, as read since a service
    /// entry last went: an unused id's counts do not move until its service
    /// entry is written, so one read serves the 64 ids of an entry.
    stats_read: std::collections::HashMap<u32, [ServiceStats; STATS_PER_ENTRY as usize]>,
    /// Backends that stopped being a member of some service since the last
    /// `take_left`: sockets connected to them may have to go.
    left: Vec<BackendKey>,
    /// True while the backend arrays were created by this agent and no
    /// backend was written since: a snapshot need not read their 131,072
    /// ids each (tens of milliseconds at every start).
    no_backends: bool,
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
    /// Takes the service maps out of a loaded object. `longest_life`:
    /// how long a conntrack entry may outlive its last packet, which is
    /// how long a backend that went keeps its `lb_filter` bit. `adopted`:
    /// the maps were pinned before (a datapath created just now has no
    /// flow whose backend may be gone).
    pub fn take(ebpf: &mut Ebpf, longest_life: Duration, adopted: bool) -> anyhow::Result<MapSet> {
        let filter: Array<MapData, u64> = take(ebpf, names::FILTER)?;
        let found = read_filter(&filter)?;
        let set = MapSet {
            v4: FamilyMaps {
                services: take(ebpf, names::SERVICES4)?,
                rev_nat: take(ebpf, names::REV_NAT4)?,
                backends: take(ebpf, names::BACKENDS4)?,
                members: take(ebpf, names::MEMBERS4)?,
                source_ranges: take(ebpf, names::SOURCE_RANGES4)?,
            },
            v6: FamilyMaps {
                services: take(ebpf, names::SERVICES6)?,
                rev_nat: take(ebpf, names::REV_NAT6)?,
                backends: take(ebpf, names::BACKENDS6)?,
                members: take(ebpf, names::MEMBERS6)?,
                source_ranges: take(ebpf, names::SOURCE_RANGES6)?,
            },
            slots: take(ebpf, names::SLOTS)?,
            config: take(ebpf, names::CONFIG)?,
            stats: take(ebpf, names::SERVICE_STATS)?,
            stats_base: take(ebpf, names::SERVICE_STATS_BASE)?,
            counters: take(ebpf, names::COUNTERS)?,
            member_gone: take(ebpf, names::MEMBER_GONE)?,
            gone_written: Default::default(),
            by_id: take(ebpf, names::SERVICES_BY_ID)?,
            filter,
            filter_bits: Bits::new(found, longest_life, Instant::now()),
            stats_read: Default::default(),
            left: Vec::new(),
            no_backends: !adopted,
        };
        match adopted {
            true => set.members_may_be_gone(),
            false => Ok(set),
        }
    }

    /// `lb_filter` bits raised.
    pub fn filter_bits_raised(&self) -> u32 {
        self.filter_bits.raised()
    }

    /// Raises the `lb_filter` bits of `bits`, before the entries that need
    /// them are written.
    fn raise(&mut self, bits: impl IntoIterator<Item = u32>) -> anyhow::Result<()> {
        let words = self.filter_bits.raise(bits);
        if words.is_empty() {
            return Ok(());
        }
        write_array(&mut self.filter, &words, names::FILTER)?;
        self.filter_bits.written(&words);
        Ok(())
    }

    /// Every established flow checks its backend's membership once more:
    /// members may have changed before this agent took the maps (a
    /// datapath from a version without `lb_member_gone`, or one whose
    /// agent failed between its writes).
    fn members_may_be_gone(mut self) -> anyhow::Result<MapSet> {
        let from = gone_from()?;
        let all: Vec<(u32, u32)> = (0..MAX_SERVICES).map(|id| (id, from)).collect();
        write_array(&mut self.member_gone, &all, names::MEMBER_GONE)?;
        Ok(self)
    }

    /// Writes the reverse-NAT entry of every service entry the maps hold,
    /// `lb_svc_by_id` whole (each entry at its id, nothing elsewhere), and
    /// raises the `lb_filter` bits of every frontend and backend they
    /// hold; how many service entries. For a datapath adopted before its
    /// programs are replaced: one pinned by a version without these arrays
    /// (or by an older agent after a downgrade, which kept none of them)
    /// has entries nobody wrote there, and a pass rewrites only the entries
    /// that change.
    pub fn restore_by_id(&mut self) -> anyhow::Result<usize> {
        let (mut services, mut bits) =
            self.v4
                .restore_rev_nat((names::SERVICES4, names::REV_NAT4, names::BACKENDS4))?;
        let (v6, bits6) =
            (self.v6).restore_rev_nat((names::SERVICES6, names::REV_NAT6, names::BACKENDS6))?;
        services.extend(v6);
        bits.extend(bits6);
        self.raise(bits)?;
        let mut by_id = vec![Service::default(); MAX_SERVICES as usize];
        for service in &services {
            if let Some(at) = by_id.get_mut(service.id as usize) {
                *at = listed(service);
            }
        }
        let entries: Vec<(u32, Service)> = (0u32..).zip(by_id).collect();
        write_array(&mut self.by_id, &entries, names::SERVICES_BY_ID)?;
        Ok(services.len())
    }

    /// Zeroes the `lb_svc_by_id` entry of the service entry at `key`,
    /// before that goes: an established packet then looks its frontend up.
    fn unlist<K: Pod>(
        services: &HashMap<MapData, K, Service>,
        by_id: &mut Array<MapData, Service>,
        key: &K,
    ) -> anyhow::Result<()> {
        match services.get(key, 0) {
            Ok(service) => written(
                by_id.set(service.id, Service::default(), 0),
                names::SERVICES_BY_ID,
            ),
            Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("reading a service entry"),
        }
    }

    /// The backends that left a service since the last call, once each.
    pub fn take_left(&mut self) -> Vec<BackendKey> {
        let mut left = std::mem::take(&mut self.left);
        left.sort();
        left.dedup();
        left
    }

    /// Everything the service maps of both families hold, for a restarted
    /// agent to adopt.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut snapshot = Snapshot {
            slots: (collect(self.slots.iter(), names::SLOTS)?.iter())
                .map(|(key, backend)| (keys::slot_of(key), *backend))
                .collect(),
            config: Some(keys::node_entry(
                &self.config.get(&0, 0).context("reading lb_config")?,
            )),
            ..Snapshot::default()
        };
        let services4 = collect(self.v4.services.iter(), names::SERVICES4)?;
        let services6 = collect(self.v6.services.iter(), names::SERVICES6)?;
        let services = (services4.into_iter())
            .map(|(f, s)| (FrontendKey::V4(f), s))
            .chain(services6.into_iter().map(|(f, s)| (FrontendKey::V6(f), s)));
        snapshot.services = services
            .filter_map(|(key, s)| Some((keys::frontend_of(&key)?, keys::service_entry(&s))))
            .collect();
        let (backends4, backends6) = match self.no_backends {
            true => (Vec::new(), Vec::new()),
            false => (
                pinned::backends(&self.v4.backends, names::BACKENDS4)?,
                pinned::backends(&self.v6.backends, names::BACKENDS6)?,
            ),
        };
        snapshot.backends = (backends4.into_iter())
            .map(|(id, b)| (id, BackendValue::V4(b)))
            .chain(
                backends6
                    .into_iter()
                    .map(|(id, b)| (id, BackendValue::V6(b))),
            )
            .filter_map(|(id, b)| Some((id, keys::backend_of(&b)?)))
            .collect();
        let members4 = collect(self.v4.members.iter(), names::MEMBERS4)?;
        let members6 = collect(self.v6.members.iter(), names::MEMBERS6)?;
        let flagged4 = members4
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_TERMINATING != 0);
        let flagged6 = members6
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_TERMINATING != 0);
        snapshot.terminating_members = (flagged4.map(|(k, _)| keys::member_of(k)))
            .chain(flagged6.map(|(k, _)| keys::member_of(k)))
            .collect();
        snapshot.members = (members4.into_iter())
            .map(|(k, b)| (k, BackendValue::V4(b)))
            .chain(members6.into_iter().map(|(k, b)| (k, BackendValue::V6(b))))
            .filter_map(|(k, b)| Some((keys::member_of(&k), keys::backend_of(&b)?)))
            .collect();
        let ranges4 = collect(self.v4.source_ranges.iter(), names::SOURCE_RANGES4)?;
        let ranges6 = collect(self.v6.source_ranges.iter(), names::SOURCE_RANGES6)?;
        snapshot.source_ranges = (ranges4.iter().filter_map(|(k, _)| range_of4(k)))
            .chain(ranges6.iter().filter_map(|(k, _)| range_of6(k)))
            .collect();
        Ok(snapshot)
    }

    /// A service id's traffic summed over CPUs, since the id was given to
    /// its service.
    pub fn service_stats(&self, id: u32) -> anyhow::Result<ServiceStats> {
        let base = self
            .stats_base
            .get(&id, 0)
            .context("reading lb_stats_base")?;
        Ok(self.stats_total(id)?.since(base))
    }

    /// As `stats_total`, for an id no service entry has (see `stats_read`).
    fn unused_total(&mut self, id: u32) -> anyhow::Result<ServiceStats> {
        let (entry, place) = stats_slot(id);
        if let Some(sums) = self.stats_read.get(&entry) {
            return Ok(sums[place]);
        }
        let per_cpu = self.stats.get(&entry, 0).context("reading lb_svc_stats")?;
        let mut sums = [ServiceStats::default(); STATS_PER_ENTRY as usize];
        for cpu in per_cpu.iter() {
            for (sum, counted) in sums.iter_mut().zip(&cpu.by_id) {
                *sum = sum.plus(counted);
            }
        }
        self.stats_read.insert(entry, sums);
        Ok(sums[place])
    }

    /// Where a fresh id's counts start. Not reset: the datapath alone
    /// writes lb_svc_stats, whose entries 64 ids share. Nothing counted,
    /// nothing to write (a base never exceeds its total).
    fn write_base(&mut self, service_id: u32) -> anyhow::Result<()> {
        let total = self.unused_total(service_id)?;
        if total == ServiceStats::default() {
            return Ok(());
        }
        written(
            self.stats_base.set(service_id, total, 0),
            names::SERVICE_STATS_BASE,
        )
    }

    /// Everything counted under service id `id`, summed over CPUs.
    fn stats_total(&self, id: u32) -> anyhow::Result<ServiceStats> {
        let (entry, at) = stats_slot(id);
        let per_cpu = self.stats.get(&entry, 0).context("reading lb_svc_stats")?;
        Ok(per_cpu
            .iter()
            .fold(ServiceStats::default(), |sum, e| sum.plus(&e.by_id[at])))
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

impl<F, B, R> FamilyMaps<F, B, R>
where
    F: Pod + Eq + std::hash::Hash + FilterKey,
    B: pinned::BackendSlot + FilterKey,
{
    /// `MapSet::restore_by_id`'s reverse NAT for one family, in batches
    /// where the kernel has them; the service entries, and the filter bits
    /// of every frontend and backend.
    fn restore_rev_nat(
        &mut self,
        names: (&str, &str, &str),
    ) -> anyhow::Result<(Vec<Service>, Vec<u32>)> {
        let (services, rev_nat, backends) = names;
        let limit = 2 * pinned::capacity(self.services.map(), MAX_SERVICES);
        let entries = pinned::entries(&self.services, limit)
            .with_context(|| format!("reading {services}"))?;
        let held = pinned::backends(&self.backends, backends)?;
        let bits = (entries.keys().map(FilterKey::filter_bit))
            .chain(held.iter().map(|(_, b)| b.filter_bit()))
            .collect();
        let values = entries.values().copied().collect();
        let entries = rev_nat_entries(entries);
        write_array(&mut self.rev_nat, &entries, rev_nat)?;
        Ok((values, bits))
    }
}

/// A service entry as `lb_svc_by_id` holds it.
fn listed(service: &Service) -> Service {
    Service {
        flags: service.flags | SVC_LISTED,
        ..*service
    }
}

/// Every word of `lb_filter`.
fn read_filter(map: &Array<MapData, u64>) -> anyhow::Result<Vec<u64>> {
    pinned::read_array(map, FILTER_WORDS, names::FILTER)
}

/// The second `lb_member_gone` is given for a change now: the next
/// one, so that a datapath clock a tick ahead still counts this second.
fn gone_from() -> anyhow::Result<u32> {
    Ok(super::conntrack::now()?.wrapping_add(1))
}

/// Writes `entries` (index, value) into an array in few syscalls (one
/// each where the kernel has no batches), stopping at the first failure.
pub(super) fn write_array<T: std::borrow::BorrowMut<MapData>, V: Pod>(
    map: &mut Array<T, V>,
    entries: &[(u32, V)],
    name: &str,
) -> anyhow::Result<()> {
    write_all(map, entries, name).map_err(|p| p.error)
}

/// The reverse-NAT entries of service entries: each frontend at its
/// entry's id, by id (ids past the array are left out: the reconciler does
/// not adopt them either).
fn rev_nat_entries<F>(services: impl IntoIterator<Item = (F, Service)>) -> Vec<(u32, F)> {
    let mut entries: Vec<(u32, F)> = (services.into_iter())
        .filter(|(_, s)| s.id < MAX_SERVICES)
        .map(|(f, s)| (s.id, f))
        .collect();
    entries.sort_by_key(|(id, _)| *id);
    entries
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    name: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    iter.collect::<Result<_, _>>()
        .with_context(|| format!("reading {name}"))
}

/// The trie keys of a service's source range: the service id is matched
/// whole, then the range's prefix of the address.
enum RangeKey {
    V4(Key<SourceRange4>),
    V6(Key<SourceRange6>),
}

fn range_key(service_id: u32, range: Cidr) -> RangeKey {
    let prefix = 32 + u32::from(range.prefix);
    let service_id_be = service_id.to_be();
    match range.addr {
        IpAddr::V4(a) => RangeKey::V4(Key::new(
            prefix,
            SourceRange4 {
                service_id_be,
                addr: keys::v4(&a),
            },
        )),
        IpAddr::V6(a) => RangeKey::V6(Key::new(
            prefix,
            SourceRange6 {
                service_id_be,
                addr: keys::v6(&a),
            },
        )),
    }
}

/// The service id and range an adopted trie key stands for.
fn range_of4(key: &Key<SourceRange4>) -> Option<(u32, Cidr)> {
    let prefix = key.prefix_len().checked_sub(32).filter(|p| *p <= 32)?;
    let data = key.data();
    let range = format!("{}/{prefix}", keys::from_v4(data.addr))
        .parse()
        .ok()?;
    Some((u32::from_be(data.service_id_be), range))
}

fn range_of6(key: &Key<SourceRange6>) -> Option<(u32, Cidr)> {
    let prefix = key.prefix_len().checked_sub(32).filter(|p| *p <= 128)?;
    let data = key.data();
    let range = format!("{}/{prefix}", keys::from_v6(&data.addr))
        .parse()
        .ok()?;
    Some((u32::from_be(data.service_id_be), range))
}

/// Removing what is already gone is not an error: removal is idempotent.
fn removed(result: Result<(), MapError>, what: &str) -> anyhow::Result<()> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other.with_context(|| format!("removing from {what}")),
    }
}

fn written(result: Result<(), MapError>, what: &str) -> anyhow::Result<()> {
    result.with_context(|| format!("writing {what}"))
}

/// Writes `entries` into `map` in order, in few syscalls (one each where
/// the kernel has no batches), stopping at the first failure.
fn write_all<K: Pod, V: Pod>(
    map: &mut impl Writable<K, V>,
    entries: &[(K, V)],
    name: &str,
) -> Result<(), Partial> {
    match map.write_batch(entries) {
        Ok(true) => Ok(()),
        Ok(false) => each(entries, |(k, v)| written(map.write(k, v), name)),
        Err(stopped) => Err(Partial {
            written: stopped.written,
            error: anyhow::Error::new(stopped.error).context(format!("writing {name}")),
        }),
    }
}

/// A map `write_all` writes: a hash map, or an array (keys are indices).
trait Writable<K, V> {
    fn write_batch(&mut self, entries: &[(K, V)]) -> Result<bool, batch::Stopped>;
    fn write(&mut self, key: &K, value: &V) -> Result<(), MapError>;
}

impl<K: Pod, V: Pod> Writable<K, V> for HashMap<MapData, K, V> {
    fn write_batch(&mut self, entries: &[(K, V)]) -> Result<bool, batch::Stopped> {
        batch::update_all(self, entries)
    }

    fn write(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }
}

impl<T: std::borrow::BorrowMut<MapData>, V: Pod> Writable<u32, V> for Array<T, V> {
    fn write_batch(&mut self, entries: &[(u32, V)]) -> Result<bool, batch::Stopped> {
        batch::update_array(self, entries)
    }

    fn write(&mut self, key: &u32, value: &V) -> Result<(), MapError> {
        self.set(*key, value, 0)
    }
}

/// Writes (key, backend) pairs into the map of each backend's family.
fn write_backends<K: Pod>(
    items: &[(K, BackendValue)],
    v4: (&mut impl Writable<K, Backend4>, &str),
    v6: (&mut impl Writable<K, Backend6>, &str),
) -> Result<(), Partial> {
    write_by_family(
        items,
        |(k, v)| match v {
            BackendValue::V4(b) => Family::V4((*k, *b)),
            BackendValue::V6(b) => Family::V6((*k, *b)),
        },
        |entries| write_all(v4.0, entries, v4.1),
        |entries| write_all(v6.0, entries, v6.1),
    )
}

/// An entry for one family's map or the other's.
#[derive(Clone, Copy)]
enum Family<A, B> {
    V4(A),
    V6(B),
}

/// Writes `items` into the map of each one's family (`split`), runs of
/// one family at a time in order, stopping at the first failure.
fn write_by_family<T, A: Copy, B: Copy>(
    items: &[T],
    split: impl Fn(&T) -> Family<A, B>,
    mut write4: impl FnMut(&[A]) -> Result<(), Partial>,
    mut write6: impl FnMut(&[B]) -> Result<(), Partial>,
) -> Result<(), Partial> {
    let split: Vec<Family<A, B>> = items.iter().map(split).collect();
    let v6 = |e: &Family<A, B>| matches!(e, Family::V6(_));
    let mut offset = 0;
    for run in split.chunk_by(|a, b| v6(a) == v6(b)) {
        let result = match run[0] {
            Family::V4(_) => write4(&only(run, |e| match e {
                Family::V4(a) => Some(a),
                Family::V6(_) => None,
            })),
            Family::V6(_) => write6(&only(run, |e| match e {
                Family::V6(b) => Some(b),
                Family::V4(_) => None,
            })),
        };
        result.map_err(|p| Partial {
            written: offset + p.written,
            error: p.error,
        })?;
        offset += run.len();
    }
    Ok(())
}

fn only<A: Copy, B: Copy, C>(
    run: &[Family<A, B>],
    pick: impl Fn(Family<A, B>) -> Option<C>,
) -> Vec<C> {
    run.iter().filter_map(|e| pick(*e)).collect()
}

/// A member's value: its backend, flagged if it is terminating.
fn member_value(backend: &BackendKey, terminating: bool) -> BackendValue {
    let flags = if terminating { BACKEND_TERMINATING } else { 0 };
    match keys::backend(backend) {
        BackendValue::V4(b) => BackendValue::V4(Backend4 { flags, ..b }),
        BackendValue::V6(b) => BackendValue::V6(Backend6 { flags, ..b }),
    }
}

impl Maps for MapSet {
    fn set_backends(&mut self, backends: &[(u32, BackendKey)]) -> Result<(), Partial> {
        self.raise(backends.iter().map(|(_, b)| filter::backend_bit(b)))
            .map_err(Partial::none)?;
        self.no_backends = false;
        let items: Vec<(u32, BackendValue)> = (backends.iter())
            .map(|(id, b)| (*id, keys::backend(b)))
            .collect();
        write_backends(
            &items,
            (&mut self.v4.backends, names::BACKENDS4),
            (&mut self.v6.backends, names::BACKENDS6),
        )
    }

    fn set_slots(&mut self, table: u32, backends: &[u32]) -> Result<(), Partial> {
        let slots: Vec<(Slot, u32)> = (0u32..)
            .zip(backends)
            .map(|(index, b)| (Slot { table, index }, *b))
            .collect();
        self.set_slots_of(&slots)
    }

    fn set_members(
        &mut self,
        service_id: u32,
        members: &[(u32, BackendKey, bool)],
    ) -> Result<(), Partial> {
        let members: Vec<(Member, BackendKey, bool)> = (members.iter())
            .map(|(backend_id, b, terminating)| {
                let member = Member {
                    service_id,
                    backend_id: *backend_id,
                };
                (member, *b, *terminating)
            })
            .collect();
        self.set_members_of(&members)
    }

    fn set_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()> {
        self.raise([filter::backend_bit(backend)])?;
        self.no_backends = false;
        match keys::backend(backend) {
            BackendValue::V4(b) => written(self.v4.backends.set(id, b, 0), names::BACKENDS4),
            BackendValue::V6(b) => written(self.v6.backends.set(id, b, 0), names::BACKENDS6),
        }
    }

    fn remove_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()> {
        (self.filter_bits).backend_gone(filter::backend_bit(backend), Instant::now());
        if backend.addr.is_ipv6() {
            written(
                self.v6.backends.set(id, Backend6::default(), 0),
                names::BACKENDS6,
            )
        } else {
            written(
                self.v4.backends.set(id, Backend4::default(), 0),
                names::BACKENDS4,
            )
        }
    }

    fn set_slot(&mut self, slot: Slot, backend_id: u32) -> anyhow::Result<()> {
        written(
            self.slots.insert(keys::slot(slot), backend_id, 0),
            names::SLOTS,
        )
    }

    fn remove_slot(&mut self, slot: Slot) -> anyhow::Result<()> {
        removed(self.slots.remove(&keys::slot(slot)), names::SLOTS)
    }

    fn set_service(&mut self, frontend: &Frontend, entry: &ServiceEntry) -> anyhow::Result<()> {
        self.raise([filter::frontend_bit(frontend)])?;
        let service = keys::service(entry);
        match keys::frontend(frontend) {
            FrontendKey::V4(f) => written(self.v4.services.insert(f, service, 0), names::SERVICES4),
            FrontendKey::V6(f) => written(self.v6.services.insert(f, service, 0), names::SERVICES6),
        }?;
        written(
            self.by_id.set(service.id, listed(&service), 0),
            names::SERVICES_BY_ID,
        )
    }

    fn remove_service(&mut self, frontend: &Frontend) -> anyhow::Result<()> {
        // Its id's counts may have moved since they were read.
        self.stats_read.clear();
        self.filter_bits.frontend_gone();
        match keys::frontend(frontend) {
            FrontendKey::V4(f) => Self::unlist(&self.v4.services, &mut self.by_id, &f),
            FrontendKey::V6(f) => Self::unlist(&self.v6.services, &mut self.by_id, &f),
        }?;
        match keys::frontend(frontend) {
            FrontendKey::V4(f) => removed(self.v4.services.remove(&f), names::SERVICES4),
            FrontendKey::V6(f) => removed(self.v6.services.remove(&f), names::SERVICES6),
        }
    }

    fn set_member(
        &mut self,
        member: Member,
        backend: &BackendKey,
        terminating: bool,
    ) -> anyhow::Result<()> {
        let key = keys::member(member);
        match member_value(backend, terminating) {
            BackendValue::V4(b) => written(self.v4.members.insert(key, b, 0), names::MEMBERS4),
            BackendValue::V6(b) => written(self.v6.members.insert(key, b, 0), names::MEMBERS6),
        }
    }

    fn remove_member(&mut self, member: Member, backend: &BackendKey) -> anyhow::Result<()> {
        let key = keys::member(member);
        // Before the removal: a flow whose packet comes after it then
        // checks its backend.
        let from = gone_from()?;
        if self.gone_written.get(&key.service_id) != Some(&from) {
            written(
                self.member_gone.set(key.service_id, from, 0),
                names::MEMBER_GONE,
            )?;
            self.gone_written.insert(key.service_id, from);
        }
        if backend.addr.is_ipv6() {
            removed(self.v6.members.remove(&key), names::MEMBERS6)?;
        } else {
            removed(self.v4.members.remove(&key), names::MEMBERS4)?;
        }
        self.left.push(*backend);
        Ok(())
    }

    fn set_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()> {
        match range_key(service_id, range) {
            RangeKey::V4(k) => written(
                self.v4.source_ranges.insert(&k, 1, 0),
                names::SOURCE_RANGES4,
            ),
            RangeKey::V6(k) => written(
                self.v6.source_ranges.insert(&k, 1, 0),
                names::SOURCE_RANGES6,
            ),
        }
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()> {
        match range_key(service_id, range) {
            RangeKey::V4(k) => removed(self.v4.source_ranges.remove(&k), names::SOURCE_RANGES4),
            RangeKey::V6(k) => removed(self.v6.source_ranges.remove(&k), names::SOURCE_RANGES6),
        }
    }

    fn set_config(&mut self, node: &NodeEntry) -> anyhow::Result<()> {
        written(
            self.config.set(0, keys::node_config(node), 0),
            names::CONFIG,
        )
    }

    fn fresh_service_id(&mut self, service_id: u32, frontend: &Frontend) -> anyhow::Result<()> {
        self.write_base(service_id)?;
        match keys::frontend(frontend) {
            FrontendKey::V4(f) => written(self.v4.rev_nat.set(service_id, f, 0), names::REV_NAT4),
            FrontendKey::V6(f) => written(self.v6.rev_nat.set(service_id, f, 0), names::REV_NAT6),
        }
    }

    /// `fresh_service_id` for each (id, frontend): the bases, then the
    /// reverse-NAT entries in a batch per family.
    fn fresh_service_ids(&mut self, ids: &[(u32, Frontend)]) -> anyhow::Result<()> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (id, frontend) in ids {
            self.write_base(*id)?;
            match keys::frontend(frontend) {
                FrontendKey::V4(f) => v4.push((*id, f)),
                FrontendKey::V6(f) => v6.push((*id, f)),
            }
        }
        write_array(&mut self.v4.rev_nat, &v4, names::REV_NAT4)?;
        write_array(&mut self.v6.rev_nat, &v6, names::REV_NAT6)
    }

    fn settle(
        &mut self,
        frontends: &mut dyn Iterator<Item = &Frontend>,
        backends: &mut dyn Iterator<Item = &BackendKey>,
    ) -> anyhow::Result<()> {
        let live = (frontends.map(filter::frontend_bit)).chain(backends.map(filter::backend_bit));
        let words = self.filter_bits.rebuild(live, Instant::now());
        if words.is_empty() {
            return Ok(());
        }
        if let Err(e) = write_array(&mut self.filter, &words, names::FILTER) {
            // Bits it could not lower only cost lookups until the next try.
            self.filter_bits.unsettled();
            return Err(e);
        }
        self.filter_bits.written(&words);
        Ok(())
    }

    fn set_slots_of(&mut self, slots: &[(Slot, u32)]) -> Result<(), Partial> {
        let entries: Vec<(SlotKey, u32)> = (slots.iter())
            .map(|(slot, backend)| (keys::slot(*slot), *backend))
            .collect();
        write_all(&mut self.slots, &entries, names::SLOTS)
    }

    /// Member entries: (member, its backend, terminating).
    fn set_members_of(&mut self, members: &[(Member, BackendKey, bool)]) -> Result<(), Partial> {
        let items: Vec<(MemberKey, BackendValue)> = (members.iter())
            .map(|(member, b, terminating)| (keys::member(*member), member_value(b, *terminating)))
            .collect();
        write_backends(
            &items,
            (&mut self.v4.members, names::MEMBERS4),
            (&mut self.v6.members, names::MEMBERS6),
        )
    }

    /// Service entries, runs of one family at a time.
    fn set_services(&mut self, entries: &[(Frontend, ServiceEntry)]) -> Result<(), Partial> {
        self.raise(entries.iter().map(|(f, _)| filter::frontend_bit(f)))
            .map_err(Partial::none)?;
        let (v4, v6) = (&mut self.v4.services, &mut self.v6.services);
        let result = write_by_family(
            entries,
            |(f, e)| match keys::frontend(f) {
                FrontendKey::V4(f) => Family::V4((f, keys::service(e))),
                FrontendKey::V6(f) => Family::V6((f, keys::service(e))),
            },
            |entries| write_all(v4, entries, names::SERVICES4),
            |entries| write_all(v6, entries, names::SERVICES6),
        );
        // The entries written, listed by id (an unwritten one must not be).
        let written = result.as_ref().err().map_or(entries.len(), |p| p.written);
        let by_id: Vec<(u32, Service)> = (entries[..written].iter())
            .map(|(_, e)| {
                let service = keys::service(e);
                (service.id, listed(&service))
            })
            .collect();
        write_array(&mut self.by_id, &by_id, names::SERVICES_BY_ID).map_err(Partial::none)?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32) -> Service {
        Service {
            id,
            ..Service::default()
        }
    }

    #[test]
    fn each_service_entry_names_its_frontend_at_its_id() {
        let frontend = |port: u16| Frontend4 {
            addr: 0x0a60_000a,
            port: port.to_be(),
            proto: 6,
            scope: 0,
        };
        let services = [
            (frontend(443), entry(9)),
            (frontend(80), entry(2)),
            // Beyond the array: not adoptable, not written.
            (frontend(8080), entry(MAX_SERVICES)),
        ];
        assert_eq!(
            rev_nat_entries(services),
            [(2, frontend(80)), (9, frontend(443))]
        );
        assert!(rev_nat_entries(Vec::<(Frontend6, Service)>::new()).is_empty());
    }
}
