//! Conntrack entries an earlier version wrote with direction 2, "egress"
//! (a reply's source back to the frontend, or a source-NATed flow's source
//! to the node, both after forwarding), rewritten as the datapath now keeps
//! them: direction `CT_REPLY`, flagged `CT_AT_EGRESS` or `CT_OUTWARD`. The
//! programs of this version never look at direction 2, so without this the
//! connections open across an upgrade would lose their translation at
//! egress. `plan` decides from the entries alone; `rewrite` does it on the
//! pinned maps.

use std::collections::BTreeSet;

use anyhow::Context;
use proxy_common::{CT_AT_EGRESS, CT_FORWARD, CT_OUTWARD, CT_REPLY, CT_SOURCE_NAT, Ct4Key, Ct6Key};

use crate::datapath::{
    conntrack::{AddrPort, CtKey, MapRecord, Table},
    ctstore::CtTables,
    pinned::Pins,
};

/// The direction versions before 2026-12-06 gave egress entries.
pub const LEGACY_EGRESS: u8 = 2;

/// For each entry with the legacy direction, by its index in `records`
/// (one family's entries, both tables): its flags as a `CT_REPLY` entry,
/// or None for an entry no forward entry accounts for (it is deleted). A
/// forward entry names its flow's client and backend: an outward entry
/// has them in that order, a reply at egress the other way round.
pub fn plan<A: Copy + Ord>(records: &[MapRecord<A>]) -> Vec<(usize, Option<u16>)> {
    type Pair<A> = (AddrPort<A>, AddrPort<A>, u8);
    let flows: BTreeSet<Pair<A>> = (records.iter())
        .filter(|r| r.direction == CT_FORWARD)
        .map(|r| (r.src, r.nat, r.proto))
        .collect();
    let legacy = || (records.iter().enumerate()).filter(|(_, r)| r.direction == LEGACY_EGRESS);
    let outward: BTreeSet<Pair<A>> = legacy()
        .map(|(_, r)| (r.src, r.dst, r.proto))
        .filter(|pair| flows.contains(pair))
        .collect();
    legacy()
        .map(|(i, r)| {
            let flags = if outward.contains(&(r.src, r.dst, r.proto)) {
                Some(CT_OUTWARD)
            } else if flows.contains(&(r.dst, r.src, r.proto)) {
                let source_nat = outward.contains(&(r.dst, r.src, r.proto));
                Some(CT_AT_EGRESS | if source_nat { CT_SOURCE_NAT } else { 0 })
            } else {
                None
            };
            (i, flags.map(|f| r.flags | f))
        })
        .collect()
}

/// Rewrites both families' legacy entries in the maps pinned under
/// `bpffs`; how many it rewrote and how many it deleted.
pub fn rewrite(bpffs: &std::path::Path) -> anyhow::Result<(usize, usize)> {
    let pins = Pins::at(bpffs);
    let (a, b) = family::<Ct4Key>(&pins).context("IPv4 conntrack")?;
    let (c, d) = family::<Ct6Key>(&pins).context("IPv6 conntrack")?;
    Ok((a + c, b + d))
}

fn family<K: CtKey>(pins: &Pins) -> anyhow::Result<(usize, usize)> {
    let mut tables = CtTables::<K>::open(pins)?;
    let mut entries = Vec::new();
    for table in [Table::Main, Table::Overflow] {
        let read = tables.entries(table)?;
        entries.extend(read.into_iter().map(|(key, value)| (table, key, value)));
    }
    let records: Vec<_> = entries.iter().map(|(_, k, v)| k.record(v)).collect();
    let (mut rewritten, mut deleted) = (0, 0);
    for (i, flags) in plan(&records) {
        let (table, key, value) = &entries[i];
        match flags {
            Some(flags) => {
                let key = key.with_direction(CT_REPLY);
                tables.insert(*table, key, K::with_flags(value, flags))?;
                rewritten += 1;
            }
            None => deleted += 1,
        }
        tables.remove(*table, key)?;
    }
    Ok((rewritten, deleted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::conntrack::Record;
    use proxy_common::{CT_REWRITE_DST, CT_UNREPLIED, IPPROTO_TCP};

    const C: AddrPort<u32> = (1, 40_000);
    const F: AddrPort<u32> = (2, 80);
    const B: AddrPort<u32> = (3, 8080);
    const N: AddrPort<u32> = (4, 30_000);

    fn record(
        src: AddrPort<u32>,
        dst: AddrPort<u32>,
        direction: u8,
        nat: AddrPort<u32>,
    ) -> MapRecord<u32> {
        Record {
            src,
            dst,
            proto: IPPROTO_TCP,
            direction,
            nat,
            flags: 0,
            backend_id: 1,
            service_id: 1,
            last_seen: 0,
            state: 0,
            reply_state: 0,
            node_port: 0,
            active: false,
        }
    }

    #[test]
    fn a_source_nated_flow_gets_its_outward_entry_and_its_reply_at_egress_back() {
        let records = [
            record(C, F, CT_FORWARD, B),
            record(C, B, LEGACY_EGRESS, N),
            Record {
                flags: CT_UNREPLIED,
                ..record(B, C, LEGACY_EGRESS, F)
            },
            Record {
                flags: CT_REWRITE_DST,
                ..record(B, N, CT_REPLY, C)
            },
        ];
        assert_eq!(
            plan(&records),
            [
                (1, Some(CT_OUTWARD)),
                (2, Some(CT_UNREPLIED | CT_AT_EGRESS | CT_SOURCE_NAT)),
            ]
        );
    }

    #[test]
    fn a_reply_at_egress_without_source_nat_is_only_that() {
        let records = [record(B, C, LEGACY_EGRESS, F), record(C, F, CT_FORWARD, B)];
        assert_eq!(plan(&records), [(0, Some(CT_AT_EGRESS))]);
    }

    #[test]
    fn entries_no_flow_accounts_for_go_and_the_others_stay() {
        let other = (9, 1234);
        let records = [
            record(B, other, LEGACY_EGRESS, F),
            record(C, F, CT_FORWARD, B),
            record(B, C, CT_REPLY, F),
        ];
        assert_eq!(plan(&records), [(0, None)]);
    }
}
