//! Garbage collection's I/O: reads the pinned conntrack maps (each family's
//! main map and its overflow map, in batches through `batch`), deletes what
//! `expiry` says has expired, hands the open connections it removed back to
//! least-connections balancing through `lb_reaped`, and clears
//! `ct_overflowed` when `overflow` says it may and `ct_paired` when
//! `paired` does.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, IterableMap, MapData, MapError},
};
use proxy_common::{
    CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_MARKS, Ct4Key, Ct6Key, MAX_CONNTRACK, names,
};

use super::{
    expiry::{self, Deletions, Pressure},
    overflow, paired,
    timeouts::Timeouts,
};
use crate::datapath::{
    conntrack::{CtKey, Record, Table, now},
    pinned::{self, Pins},
};

/// What one pass saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Entries in `ct4` when the pass read it.
    pub entries4: usize,
    /// Entries in `ct6` when the pass read it.
    pub entries6: usize,
    /// Entries in `ct4_overflow` when the pass read it.
    pub overflow4: usize,
    /// Entries in `ct6_overflow` when the pass read it.
    pub overflow6: usize,
    /// Entries deleted (both families).
    pub deleted: usize,
    /// Expired flows left in place because a packet arrived while the pass
    /// ran.
    pub revived: usize,
    /// Open connections handed back to `lb_reaped`.
    pub reaped: u64,
    /// Unconfirmed flows deleted early because a table ran full.
    pub unconfirmed: usize,
    pub duration: Duration,
    /// The overflow maps still held entries after the pass, so
    /// `ct_overflowed` stays set.
    pub overflowing: bool,
    /// Forward and reply entries were left after the pass, so
    /// `ct_paired[CT_MARK_PAIRS]` stays set.
    pub paired: bool,
    /// Source NAT entries were left after the pass, so
    /// `ct_paired[CT_MARK_SOURCE_NAT]` stays set.
    pub source_nat: bool,
}

/// One family's conntrack maps. Both are swept together: a flow is judged
/// by all its entries, wherever the datapath put each of them.
struct CtMaps<K: CtKey> {
    main: BpfHashMap<MapData, K, K::Value>,
    overflow: BpfHashMap<MapData, K, K::Value>,
}

impl<K: CtKey> CtMaps<K> {
    fn open(pins: &Pins) -> anyhow::Result<Self> {
        Ok(CtMaps {
            main: pins.map(Table::Main.map_name::<K>())?,
            overflow: pins.map(Table::Overflow.map_name::<K>())?,
        })
    }

    fn map(&mut self, table: Table) -> &mut BpfHashMap<MapData, K, K::Value> {
        match table {
            Table::Main => &mut self.main,
            Table::Overflow => &mut self.overflow,
        }
    }

    fn name(&self, table: Table) -> &'static str {
        table.map_name::<K>()
    }

    /// True when neither map holds an entry that keeps `mark` up: a
    /// second read of both, in batches, for the rare pass that clears it.
    fn none_marked(&self, mark: u32) -> anyhow::Result<bool> {
        for table in [Table::Main, Table::Overflow] {
            let entries = read_all(self.map_ref(table))
                .with_context(|| format!("reading {}", self.name(table)))?;
            if marked_in(entries.iter())[mark as usize] > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn map_ref(&self, table: Table) -> &BpfHashMap<MapData, K, K::Value> {
        match table {
            Table::Main => &self.main,
            Table::Overflow => &self.overflow,
        }
    }

    fn overflow_empty(&self) -> anyhow::Result<bool> {
        // The first key, if any: no walk of the map.
        match self.overflow.keys().next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => {
                Err(e).with_context(|| format!("reading {}", self.name(Table::Overflow)))
            }
        }
    }
}

/// The pinned maps garbage collection works on.
pub struct Gc {
    v4: CtMaps<Ct4Key>,
    v6: CtMaps<Ct6Key>,
    reaped: Array<MapData, u32>,
    overflowed: Array<MapData, u32>,
    /// None: a datapath without `ct_paired` (every flow a pair).
    paired: Option<Array<MapData, u32>>,
    timeouts: Timeouts,
    /// Reaped counts not yet written to `lb_reaped` (a write failed): the
    /// next pass tries again, as the entries they came from are gone.
    pending: BTreeMap<u32, u32>,
}

impl Gc {
    /// Opens the conntrack maps, `lb_reaped`, `ct_overflowed` and
    /// `ct_paired` where the agent pinned them under `bpffs`.
    pub fn open(bpffs: &Path, timeouts: Timeouts) -> anyhow::Result<Gc> {
        let pins = Pins::at(bpffs);
        Ok(Gc {
            v4: CtMaps::<Ct4Key>::open(&pins)?,
            v6: CtMaps::<Ct6Key>::open(&pins)?,
            reaped: pins.map(names::REAPED)?,
            overflowed: pins.map(names::OVERFLOWED)?,
            paired: pins.optional_map(names::PAIRED)?,
            timeouts,
            pending: BTreeMap::new(),
        })
    }

    /// One pass over both families. Entries a pass could not delete stay
    /// for the next one; nothing in the maps makes it panic.
    pub fn pass(&mut self) -> anyhow::Result<Stats> {
        let started = Instant::now();
        let now = now()?;
        let v4 = sweep(&mut self.v4, now, &self.timeouts, &mut self.pending)
            .context("collecting IPv4 conntrack");
        let v6 = sweep(&mut self.v6, now, &self.timeouts, &mut self.pending)
            .context("collecting IPv6 conntrack");
        // Whatever was deleted is counted, even if one family failed.
        let reaped = self.flush_reaped();
        let (v4, v6) = (v4?, v6?);
        let reaped = reaped?;
        let overflowing = self.settle_overflowed()?;
        let left = |mark: u32| v4.marked_left[mark as usize] + v6.marked_left[mark as usize];
        let paired = self.settle_mark(CT_MARK_PAIRS, left(CT_MARK_PAIRS))?;
        let source_nat = self.settle_mark(CT_MARK_SOURCE_NAT, left(CT_MARK_SOURCE_NAT))?;
        Ok(Stats {
            entries4: v4.seen_main,
            entries6: v6.seen_main,
            overflow4: v4.seen_overflow,
            overflow6: v6.seen_overflow,
            deleted: v4.deleted + v6.deleted,
            revived: v4.revived + v6.revived,
            reaped,
            unconfirmed: v4.unconfirmed + v6.unconfirmed,
            duration: started.elapsed(),
            overflowing,
            paired,
            source_nat,
        })
    }

    /// Clears `ct_overflowed` once both overflow maps are empty (see
    /// `overflow`); whether it stays set.
    fn settle_overflowed(&mut self) -> anyhow::Result<bool> {
        let (v4, v6) = (&self.v4, &self.v6);
        let flag = &mut self.overflowed;
        overflow::settle(
            || Ok(v4.overflow_empty()? && v6.overflow_empty()?),
            |value| {
                (flag.set(0, value, 0)).with_context(|| format!("writing {}", names::OVERFLOWED))
            },
        )
    }

    /// Clears `mark` of `ct_paired` once no map holds an entry that keeps
    /// it up (see `paired`), given the `left` the pass counted; whether it
    /// stays set.
    fn settle_mark(&mut self, mark: u32, left: usize) -> anyhow::Result<bool> {
        let Some(flag) = &mut self.paired else {
            return Ok(false);
        };
        let name = || format!("{}[{mark}]", names::PAIRED);
        let now = (flag.get(&mark, 0)).with_context(|| format!("reading {}", name()))?;
        let (v4, v6) = (&self.v4, &self.v6);
        paired::settle(
            now,
            left,
            || Ok(v4.none_marked(mark)? && v6.none_marked(mark)?),
            |value| (flag.set(mark, value, 0)).with_context(|| format!("writing {}", name())),
        )
    }

    /// Adds the pending reaped counts to `lb_reaped`; the count written.
    fn flush_reaped(&mut self) -> anyhow::Result<u64> {
        let mut written = 0;
        let mut failure = None;
        for (id, count) in std::mem::take(&mut self.pending) {
            // Only the agent writes lb_reaped and one pass runs at a time:
            // read, add, write is safe.
            let result = (self.reaped.get(&id, 0))
                .and_then(|old| self.reaped.set(id, old.wrapping_add(count), 0));
            match result {
                Ok(()) => written += u64::from(count),
                Err(MapError::OutOfBounds { .. }) => log::warn!(
                    "conntrack names backend id {id}, beyond {}: {count} closed connections \
                     not recorded",
                    names::REAPED
                ),
                Err(e) => {
                    self.pending.insert(id, count);
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e).with_context(|| format!("writing {}", names::REAPED)),
            None => Ok(written),
        }
    }
}

/// One family's part of a pass.
#[derive(Default)]
struct Sweep {
    /// Entries read from the main map and from the overflow map.
    seen_main: usize,
    seen_overflow: usize,
    deleted: usize,
    revived: usize,
    unconfirmed: usize,
    /// Entries that keep each mark of `ct_paired` up (see `paired`), that
    /// the pass read and did not delete.
    marked_left: [usize; CT_MARKS as usize],
}

/// An entry as a pass saw it: where, its key, its value.
type Seen<K> = (Table, K, <K as CtKey>::Value);

/// Reads every entry of both maps, then deletes the expired flows (never
/// while walking: a deleted key makes the kernel's walk start over). Open
/// connections deleted are added to `reaped` as they go, so an error part
/// way loses none.
fn sweep<K: CtKey>(
    tables: &mut CtMaps<K>,
    now: u32,
    timeouts: &Timeouts,
    reaped: &mut BTreeMap<u32, u32>,
) -> anyhow::Result<Sweep> {
    let main =
        read_all(&tables.main).with_context(|| format!("reading {}", tables.name(Table::Main)))?;
    let overflow = read_all(&tables.overflow)
        .with_context(|| format!("reading {}", tables.name(Table::Overflow)))?;
    let mut sweep = Sweep {
        seen_main: main.len(),
        seen_overflow: overflow.len(),
        marked_left: marked_in(main.iter().chain(overflow.iter())),
        ..Sweep::default()
    };
    let pressure = Pressure::of(main.len(), capacity(&tables.main), !overflow.is_empty());
    let plan = plan(main, overflow, now, timeouts, pressure);
    sweep.unconfirmed = plan.unconfirmed;
    for flow in &plan.expired {
        match delete_flow(tables, flow, reaped)? {
            Some(deleted) => {
                sweep.deleted += deleted;
                let gone = marked_in(flow.iter().map(|(_, key, value)| (key, value)));
                for (left, gone) in sweep.marked_left.iter_mut().zip(gone) {
                    *left = left.saturating_sub(gone);
                }
            }
            None => sweep.revived += 1,
        }
    }
    Ok(sweep)
}

/// How many of the entries keep up each mark of `ct_paired`: counted as
/// the pass goes, so that settling it needs no walk of its own while such
/// entries remain.
fn marked_in<'a, K: CtKey + 'a>(
    entries: impl IntoIterator<Item = (&'a K, &'a K::Value)>,
) -> [usize; CT_MARKS as usize] {
    paired::count(
        entries
            .into_iter()
            .map(|(key, value)| (key.direction(), K::flags(value))),
    )
}

/// The expired flows among the entries of both maps, grouped across them.
fn plan<K: CtKey>(
    main: HashMap<K, K::Value>,
    overflow: HashMap<K, K::Value>,
    now: u32,
    timeouts: &Timeouts,
    pressure: Pressure,
) -> Deletions<Seen<K>> {
    let tagged = |table| move |(k, v): (K, K::Value)| ((table, k, v), k.record(&v));
    let records = (main.into_iter().map(tagged(Table::Main)))
        .chain(overflow.into_iter().map(tagged(Table::Overflow)));
    expiry::plan_under(records, now, timeouts, pressure)
}

/// The map's size as created (the default size if the kernel will not say).
fn capacity<K: CtKey>(map: &BpfHashMap<MapData, K, K::Value>) -> usize {
    pinned::capacity(map.map(), MAX_CONNTRACK)
}

/// Every entry, each once; a read stops after twice the map's capacity,
/// and the next pass sees the rest.
fn read_all<K: CtKey>(
    map: &BpfHashMap<MapData, K, K::Value>,
) -> anyhow::Result<HashMap<K, K::Value>> {
    let limit = capacity(map).saturating_mul(2).max(1024);
    pinned::entries(map, limit)
}

/// Deletes one expired flow, replies before forwards, unless one of its
/// entries changed since the snapshot (a packet arrived, or a new flow
/// took the key over): then the flow stays (None). Otherwise the number of
/// entries this call deleted.
fn delete_flow<K: CtKey>(
    tables: &mut CtMaps<K>,
    flow: &[Seen<K>],
    reaped: &mut BTreeMap<u32, u32>,
) -> anyhow::Result<Option<usize>> {
    for (table, key, seen) in flow {
        match tables.map(*table).get(key, 0) {
            Ok(current) if !same_state(key, seen, &current) => return Ok(None),
            Ok(_) => {}
            Err(e) if absent(&e) => {}
            Err(e) => {
                let name = tables.name(*table);
                return Err(e).with_context(|| format!("re-reading an expired entry of {name}"));
            }
        }
    }
    let mut deleted = 0;
    for (table, key, seen) in flow {
        let name = tables.name(*table);
        let map = tables.map(*table);
        if !key.record(seen).is_forward() {
            match map.remove(key) {
                Ok(()) => deleted += 1,
                Err(e) if absent(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting an expired entry of {name}"));
                }
            }
            continue;
        }
        // The forward entry's `active` as it was when it went, not as the
        // snapshot saw it: the kernel may have released the connection
        // since, and counting it twice would skew least connections.
        let taken = take(map.map(), key)
            .with_context(|| format!("deleting an expired forward entry of {name}"))?;
        if let Some(value) = taken {
            deleted += 1;
            expiry::add_reaped(reaped, [&key.record(&value)]);
        }
    }
    Ok(Some(deleted))
}

/// Equal but for `active`, which the kernel clears without a packet being
/// counted as activity.
fn same_state<K: CtKey>(key: &K, a: &K::Value, b: &K::Value) -> bool {
    let quiet = |v: &K::Value| Record {
        active: false,
        ..key.record(v)
    };
    quiet(a) == quiet(b)
}

/// The key was not there (any more): someone else deleted it, which is fine.
pub(super) fn absent(error: &MapError) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{
        CT_FORWARD, CT_OUTWARD, CT_REPLY, CT_SOCKET, CT_STATE_ESTABLISHED, CT_STATE_FIN, Ct4Entry,
        IPPROTO_TCP,
    };

    const NOW: u32 = 1_000_000;

    /// An entry of `direction` from `src` to `dst`, rewritten to `nat`,
    /// of backend 7.
    fn entry(
        direction: u8,
        (src_addr, src_port): (u32, u16),
        (dst_addr, dst_port): (u32, u16),
        (nat_addr, nat_port): (u32, u16),
        idle: u32,
        state: u8,
    ) -> (Ct4Key, Ct4Entry) {
        let key = Ct4Key {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto: IPPROTO_TCP,
            direction,
            _pad: 0,
        };
        let value = Ct4Entry {
            nat_addr,
            nat_port,
            backend_id: 7,
            last_seen: NOW - idle,
            state,
            ..Ct4Entry::default()
        };
        (key, value)
    }

    const CLIENT: (u32, u16) = (1, 40_000);
    const FRONTEND: (u32, u16) = (2, 80);
    const BACKEND: (u32, u16) = (3, 8080);

    /// Client to frontend, sent to the backend.
    fn forward(idle: u32, state: u8) -> (Ct4Key, Ct4Entry) {
        entry(CT_FORWARD, CLIENT, FRONTEND, BACKEND, idle, state)
    }

    /// Its reply: backend to client, source back to the frontend.
    fn reply(idle: u32, state: u8) -> (Ct4Key, Ct4Entry) {
        entry(CT_REPLY, BACKEND, CLIENT, FRONTEND, idle, state)
    }

    /// The expired flows' entries, as (map, direction), in deletion order.
    fn expired(
        main: &[(Ct4Key, Ct4Entry)],
        overflow: &[(Ct4Key, Ct4Entry)],
    ) -> Vec<Vec<(Table, u8)>> {
        let main = main.iter().copied().collect();
        let overflow = overflow.iter().copied().collect();
        let plan = plan(main, overflow, NOW, &Timeouts::default(), Pressure::Normal);
        let entries =
            |flow: Vec<Seen<Ct4Key>>| flow.iter().map(|(t, k, _)| (*t, k.direction)).collect();
        plan.expired.into_iter().map(entries).collect()
    }

    #[test]
    fn overflow_entries_expire_as_main_ones_do() {
        let closed = [forward(11, CT_STATE_FIN), reply(20, CT_STATE_FIN)];
        let half_closed = [forward(11, CT_STATE_FIN), reply(3, CT_STATE_ESTABLISHED)];
        assert_eq!(
            expired(&[], &closed),
            [[(Table::Overflow, CT_REPLY), (Table::Overflow, CT_FORWARD)]]
        );
        assert!(expired(&[], &half_closed).is_empty());
    }

    /// A flow with entries in both maps is one flow: a live entry in either
    /// keeps the other, and an expired flow goes from both, forward last.
    #[test]
    fn a_flow_is_judged_across_both_maps() {
        let (forward_idle, reply_idle) = (forward(11, CT_STATE_FIN), reply(20, CT_STATE_FIN));
        let reply_live = reply(3, CT_STATE_ESTABLISHED);
        assert!(expired(&[forward_idle], &[reply_live]).is_empty());
        assert!(expired(&[reply_live], &[forward_idle]).is_empty());
        assert_eq!(
            expired(&[forward_idle], &[reply_idle]),
            [[(Table::Overflow, CT_REPLY), (Table::Main, CT_FORWARD)]]
        );
    }

    /// The client's only entry: client in the key, backend in the value.
    fn socket(idle: u32, state: u8, reply_state: u8) -> (Ct4Key, Ct4Entry) {
        let (key, value) = entry(CT_SOCKET, CLIENT, (0, 0), BACKEND, idle, state);
        (
            key,
            Ct4Entry {
                reply_state,
                ..value
            },
        )
    }

    #[test]
    fn a_socket_entry_is_a_flow_of_its_own() {
        let closed = socket(11, CT_STATE_FIN, CT_STATE_FIN);
        let half_closed = socket(11, CT_STATE_FIN, CT_STATE_ESTABLISHED);
        assert_eq!(expired(&[closed], &[]), [[(Table::Main, CT_SOCKET)]]);
        assert!(expired(&[half_closed], &[]).is_empty());
        // Beside an overflowed pair of the same client port and backend:
        // one group, the socket entry deleted last.
        assert_eq!(
            expired(&[closed], &[reply(20, CT_STATE_FIN)]),
            [[(Table::Overflow, CT_REPLY), (Table::Main, CT_SOCKET)]]
        );
    }

    #[test]
    fn entries_are_counted_by_the_mark_they_keep_up() {
        let outward = (
            reply(0, CT_STATE_ESTABLISHED).0,
            Ct4Entry {
                flags: CT_OUTWARD,
                ..reply(0, CT_STATE_ESTABLISHED).1
            },
        );
        let entries = [
            socket(0, CT_STATE_ESTABLISHED, CT_STATE_ESTABLISHED),
            forward(0, CT_STATE_ESTABLISHED),
            reply(0, CT_STATE_ESTABLISHED),
            outward,
        ];
        let all = entries.iter().map(|(k, v)| (k, v));
        assert_eq!(marked_in(all), [2, 1]);
        assert_eq!(marked_in(entries[..1].iter().map(|(k, v)| (k, v))), [0, 0]);
    }
}
