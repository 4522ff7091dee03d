//! Garbage collection's I/O: reads the pinned conntrack maps (each family's
//! main map and its overflow map, in batches through `batch`), deletes what
//! `expiry` says has expired, hands the open connections it removed back to
//! least-connections balancing through `lb_reaped`, and clears
//! `ct_overflowed` when `overflow` says it may and `ct_paired` when
//! `paired` does.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::maps::{Array, MapData, MapError};
use proxy_common::{CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_MARKS, Ct4Key, Ct6Key, names};

use super::{
    expiry::{self, Deletions, Pressure},
    overflow, paired,
    timeouts::Timeouts,
};
use crate::datapath::{
    conntrack::{CtKey, Record, Table, now},
    ctlines::LineKey,
    ctstore::CtTables,
    pinned::Pins,
};

/// What one pass saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Entries in `ct4_table` when the pass read it.
    pub entries4: usize,
    /// Entries in `ct6_table` when the pass read it.
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

/// True when neither of a family's tables holds an entry that keeps
/// `mark` up: a second read of both, for the rare pass that clears it.
fn none_marked<K: CtKey>(tables: &CtTables<K>, mark: u32) -> anyhow::Result<bool> {
    for table in [Table::Main, Table::Overflow] {
        if marked_in(tables.entries(table)?.iter())[mark as usize] > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The pinned maps garbage collection works on. The conntrack tables are
/// opened (mapped) for each pass and closed after it: kept mapped, their
/// pages would count in the agent's memory between passes.
pub struct Gc {
    pins: Pins,
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
        CtTables::<Ct4Key>::open(&pins)?;
        CtTables::<Ct6Key>::open(&pins)?;
        Ok(Gc {
            reaped: pins.map(names::REAPED)?,
            overflowed: pins.map(names::OVERFLOWED)?,
            paired: pins.optional_map(names::PAIRED)?,
            pins,
            timeouts,
            pending: BTreeMap::new(),
        })
    }

    /// One pass over both families. Entries a pass could not delete stay
    /// for the next one; nothing in the maps makes it panic.
    pub fn pass(&mut self) -> anyhow::Result<Stats> {
        let started = Instant::now();
        let now = now()?;
        let mut tables = (
            CtTables::<Ct4Key>::open(&self.pins)?,
            CtTables::<Ct6Key>::open(&self.pins)?,
        );
        let v4 = sweep(&mut tables.0, now, &self.timeouts, &mut self.pending)
            .context("collecting IPv4 conntrack");
        let v6 = sweep(&mut tables.1, now, &self.timeouts, &mut self.pending)
            .context("collecting IPv6 conntrack");
        // Whatever was deleted is counted, even if one family failed.
        let reaped = self.flush_reaped();
        let (v4, v6) = (v4?, v6?);
        let reaped = reaped?;
        let overflowing = self.settle_overflowed(&tables)?;
        let left = |mark: u32| v4.marked_left[mark as usize] + v6.marked_left[mark as usize];
        let paired = self.settle_mark(&tables, CT_MARK_PAIRS, left(CT_MARK_PAIRS))?;
        let source_nat = self.settle_mark(&tables, CT_MARK_SOURCE_NAT, left(CT_MARK_SOURCE_NAT))?;
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
    fn settle_overflowed(&mut self, (v4, v6): &Tables) -> anyhow::Result<bool> {
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
    fn settle_mark(&mut self, (v4, v6): &Tables, mark: u32, left: usize) -> anyhow::Result<bool> {
        let Some(flag) = &mut self.paired else {
            return Ok(false);
        };
        let name = || format!("{}[{mark}]", names::PAIRED);
        let now = (flag.get(&mark, 0)).with_context(|| format!("reading {}", name()))?;
        paired::settle(
            now,
            left,
            || Ok(none_marked(v4, mark)? && none_marked(v6, mark)?),
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

/// Both families' tables, open for a pass.
type Tables = (CtTables<Ct4Key>, CtTables<Ct6Key>);

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
type Seen<K> = (Table, K, <K as LineKey>::Value);

/// Reads every entry of both maps, then deletes the expired flows (never
/// while walking: a deleted key makes the kernel's walk start over). Open
/// connections deleted are added to `reaped` as they go, so an error part
/// way loses none.
fn sweep<K: CtKey>(
    tables: &mut CtTables<K>,
    now: u32,
    timeouts: &Timeouts,
    reaped: &mut BTreeMap<u32, u32>,
) -> anyhow::Result<Sweep> {
    let main = tables.entries(Table::Main)?;
    let overflow = tables.entries(Table::Overflow)?;
    let mut sweep = Sweep {
        seen_main: main.len(),
        seen_overflow: overflow.len(),
        marked_left: marked_in(main.iter().chain(overflow.iter())),
        ..Sweep::default()
    };
    let pressure = Pressure::of(main.len(), tables.capacity(), !overflow.is_empty());
    let mut plan = plan(main, overflow, now, timeouts, pressure);
    sweep.unconfirmed = plan.unconfirmed;
    // In the order of their groups: the table is mapped a window at a time.
    plan.expired
        .sort_by_key(|flow| flow.first().map(|(_, key, _)| tables.main.home(key)));
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

/// Deletes one expired flow, replies before forwards, unless one of its
/// entries changed since the snapshot (a packet arrived, or a new flow
/// took the key over): then the flow stays (None). Otherwise the number of
/// entries this call deleted.
fn delete_flow<K: CtKey>(
    tables: &mut CtTables<K>,
    flow: &[Seen<K>],
    reaped: &mut BTreeMap<u32, u32>,
) -> anyhow::Result<Option<usize>> {
    for (table, key, seen) in flow {
        let current = (tables.get(*table, key))
            .with_context(|| format!("re-reading an expired entry of {}", table.map_name::<K>()))?;
        if current.is_some_and(|current| !same_state(key, seen, &current)) {
            return Ok(None);
        }
    }
    let mut deleted = 0;
    for (table, key, seen) in flow {
        let name = table.map_name::<K>();
        if !key.record(seen).is_forward() {
            let removed = (tables.remove(*table, key))
                .with_context(|| format!("deleting an expired entry of {name}"))?;
            deleted += usize::from(removed);
            continue;
        }
        // The forward entry's `active` as it was when it went, not as the
        // snapshot saw it: the kernel may have released the connection
        // since, and counting it twice would skew least connections.
        let taken = (tables.take(*table, key))
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
