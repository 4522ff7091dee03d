//! Which conntrack entries garbage collection deletes: a pure function of
//! the entries and the time, so that it is tested with tables.
//!
//! A flow's entries (forward, reply, and with source NAT the egress entry
//! and the reply towards the node port) all join the same two endpoints,
//! the client's and the backend's. Entries are grouped by that unordered
//! pair (and protocol), and a group goes only when every entry in it is past
//! its deadline, all of it at once: a direction that still carries packets
//! keeps the other one alive, and no flow is left with half its
//! translation. Two flows from one client port to two frontends of the same
//! backend share a group; they are expired together, which costs nothing
//! but a little longer life.
//!
//! Most flows have a single `CT_SOCKET` entry instead: the forward entry
//! and the reply entry in one, with a TCP state for each side and one
//! `last_seen` for both. It joins the same pair (client in the key, backend
//! in the value, as a forward entry), holds the backend count, and lives
//! for the longer of its two sides' timeouts.
//!
//! A flow nothing has answered yet (its reply or socket entry carries
//! `CT_UNREPLIED`) is unconfirmed: it gets at most the SYN timeout, whatever
//! the TCP state its first packet claimed, and when the table runs full
//! (`Pressure::High`) it goes as soon as it has been idle for
//! `UNCONFIRMED_GRACE`, before any confirmed flow would be touched.
//!
//! Time is the datapath's: coarse monotonic seconds since boot, as u32.
//! They wrap after 136 years of uptime, so deadlines are computed in u64
//! and never wrap; an entry stamped after `now` (written while a pass ran)
//! is simply not expired.

use std::collections::BTreeMap;

use proxy_common::{
    CT_FORWARD, CT_REPLY, CT_REWRITE_DST, CT_SOCKET, CT_STATE_RST, CT_UNREPLIED, IPPROTO_TCP,
};

use super::timeouts::Timeouts;
pub use crate::datapath::conntrack::{AddrPort, MapRecord, Record};

/// The flow an entry belongs to: its protocol and its two endpoints, the
/// lower one first so that both directions agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId<A> {
    pub proto: u8,
    pub low: AddrPort<A>,
    pub high: AddrPort<A>,
}

impl<A: Copy + Ord> MapRecord<A> {
    /// The flow's endpoints: a forward or socket entry, and a reply that
    /// restores the client's address, name the client in the key and the
    /// backend (or client) in the value; other replies and egress entries
    /// name both in the key.
    pub fn flow(&self) -> FlowId<A> {
        let rewrites_to_peer =
            self.is_forward() || (self.direction == CT_REPLY && self.flags & CT_REWRITE_DST != 0);
        let peer = if rewrites_to_peer { self.nat } else { self.dst };
        FlowId {
            proto: self.proto,
            low: self.src.min(peer),
            high: self.src.max(peer),
        }
    }

    /// The last second the entry is still alive, with its idle timeout
    /// (u64: never wraps).
    fn deadline(&self, timeout: u32) -> u64 {
        u64::from(self.last_seen) + u64::from(timeout)
    }
}

impl<E> Record<E> {
    /// True for the entry that holds the flow's backend count: a forward
    /// entry, or a socket entry (forward and reply in one).
    pub fn is_forward(&self) -> bool {
        self.direction == CT_FORWARD || self.direction == CT_SOCKET
    }

    /// True for a reply (or socket) entry that has not seen a packet from
    /// the backend yet.
    pub fn unreplied(&self) -> bool {
        self.flags & CT_UNREPLIED != 0
    }

    /// The TCP states the entry keeps: its direction's, and a socket
    /// entry's also the backend side's.
    fn states(&self) -> impl Iterator<Item = u8> {
        let reply = (self.direction == CT_SOCKET).then_some(self.reply_state);
        std::iter::once(self.state).chain(reply)
    }

    /// True once either side of the entry's connection sent a RST.
    fn reset(&self) -> bool {
        self.proto == IPPROTO_TCP && self.states().any(|s| s == CT_STATE_RST)
    }
}

/// Seconds an unconfirmed flow may stay idle while the table runs full: a
/// handshake in progress retransmits its SYN within a second or three, and
/// one whose entries go early simply starts over.
pub const UNCONFIRMED_GRACE: u32 = 2;

/// How full the conntrack table is, as a pass judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    Normal,
    /// Most of the table is taken (or new flows already overflow):
    /// unconfirmed flows go first.
    High,
}

impl Pressure {
    /// High from three quarters of `capacity` on, or while the overflow
    /// table is in use.
    pub fn of(entries: usize, capacity: usize, overflowing: bool) -> Pressure {
        if overflowing || entries.saturating_mul(4) >= capacity.saturating_mul(3) {
            Pressure::High
        } else {
            Pressure::Normal
        }
    }
}

/// What a pass deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletions<K> {
    /// Each expired flow's entries (whatever the caller attached to each
    /// record: its map key), forward and socket entries last: deleting the forward
    /// entry first could let a new packet of the flow start a new flow
    /// whose fresh reply entry the rest of this deletion would then remove.
    pub expired: Vec<Vec<K>>,
    /// Per backend id: the deleted forward and socket entries that still
    /// counted as an open connection (what to add to `lb_reaped`).
    pub reaped: BTreeMap<u32, u32>,
    /// Flows kept.
    pub kept: usize,
    /// Unconfirmed flows deleted before their deadline because the table
    /// ran full.
    pub unconfirmed: usize,
}

impl<K> Deletions<K> {
    /// The number of entries the plan deletes.
    pub fn entries(&self) -> usize {
        self.expired.iter().map(Vec::len).sum()
    }
}

/// Groups `entries` by flow and returns the flows whose every entry is past
/// its deadline at `now`, in flow order (deterministic). `K` is carried
/// through untouched: the caller's key, or anything it needs to delete the
/// entry.
pub fn plan<K, A: Copy + Ord>(
    entries: impl IntoIterator<Item = (K, MapRecord<A>)>,
    now: u32,
    timeouts: &Timeouts,
) -> Deletions<K> {
    plan_under(entries, now, timeouts, Pressure::Normal)
}

/// As `plan`, and under `Pressure::High` also the unconfirmed flows idle
/// for longer than `UNCONFIRMED_GRACE`.
pub fn plan_under<K, A: Copy + Ord>(
    entries: impl IntoIterator<Item = (K, MapRecord<A>)>,
    now: u32,
    timeouts: &Timeouts,
    pressure: Pressure,
) -> Deletions<K> {
    let mut flows: BTreeMap<FlowId<A>, Vec<(K, MapRecord<A>)>> = BTreeMap::new();
    for (key, record) in entries {
        flows.entry(record.flow()).or_default().push((key, record));
    }
    let mut plan = Deletions {
        expired: Vec::new(),
        reaped: BTreeMap::new(),
        kept: 0,
        unconfirmed: 0,
    };
    for (_, mut group) in flows {
        let records = group.iter().map(|(_, r)| r);
        if !expired(records.clone(), now, timeouts) {
            if pressure == Pressure::Normal || !evictable(records, now) {
                plan.kept += 1;
                continue;
            }
            plan.unconfirmed += 1;
        }
        // Stable: the entries' order among themselves stays the caller's.
        group.sort_by_key(|(_, r)| r.is_forward());
        add_reaped(&mut plan.reaped, group.iter().map(|(_, r)| r));
        plan.expired
            .push(group.into_iter().map(|(k, _)| k).collect());
    }
    plan
}

/// True when every entry of one flow is past its deadline at `now`.
///
/// An unconfirmed flow's entries get at most the SYN timeout (see
/// `Timeouts::unconfirmed`).
///
/// A RST, in either direction, ends a TCP connection in both: the other
/// side never sends again, so its entry would otherwise keep the flow for
/// the established timeout. Once a group has seen a RST, each of its
/// entries is judged by the RST timeout (from its own last packet, so a
/// side still sending keeps it for that long).
///
/// A socket entry has one `last_seen` for both sides: it is judged by the
/// longer of its two states' timeouts, so a side still open keeps it as
/// that side's own entry would.
pub fn expired<'a, A: Copy + Ord + 'a>(
    group: impl IntoIterator<Item = &'a MapRecord<A>> + Clone,
    now: u32,
    timeouts: &Timeouts,
) -> bool {
    let reset = group.clone().into_iter().any(Record::reset);
    let unconfirmed = group.clone().into_iter().any(Record::unreplied);
    group.into_iter().all(|r| {
        let timeout = if reset {
            timeouts.tcp_rst
        } else {
            let of = |state| {
                if unconfirmed {
                    timeouts.unconfirmed(r.proto, state)
                } else {
                    timeouts.of(r.proto, state)
                }
            };
            r.states().map(of).max().unwrap_or(0)
        };
        u64::from(now) > r.deadline(timeout)
    })
}

/// True for an unconfirmed flow whose every entry has been idle for longer
/// than `UNCONFIRMED_GRACE`: what a table under pressure gives up first.
fn evictable<'a, A: Copy + Ord + 'a>(
    group: impl IntoIterator<Item = &'a MapRecord<A>> + Clone,
    now: u32,
) -> bool {
    group.clone().into_iter().any(Record::unreplied)
        && group
            .into_iter()
            .all(|r| u64::from(now) > r.deadline(UNCONFIRMED_GRACE))
}

/// Adds the forward and socket entries among `records` that still count as
/// open connections to `reaped`, per backend id.
pub fn add_reaped<'a, A: 'a>(
    reaped: &mut BTreeMap<u32, u32>,
    records: impl IntoIterator<Item = &'a MapRecord<A>>,
) {
    for r in records {
        if r.is_forward() && r.active {
            let count = reaped.entry(r.backend_id).or_default();
            *count = count.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{
        CT_AT_EGRESS, CT_OUTWARD, CT_STATE_ESTABLISHED, CT_STATE_FIN, CT_STATE_OPEN, CT_STATE_SYN,
        IPPROTO_SCTP, IPPROTO_UDP,
    };

    /// Addresses by role (IPv4 in network order does not matter here).
    const C: u32 = 1;
    const F: u32 = 2;
    const B: u32 = 3;
    const N: u32 = 4;
    const C2: u32 = 5;
    const B2: u32 = 6;
    const CP: u16 = 40_000;
    const FP: u16 = 80;
    const BP: u16 = 8080;
    const NP: u16 = 61_234;
    const NOW: u32 = 1_000_000;

    fn t() -> Timeouts {
        Timeouts::default()
    }

    #[allow(clippy::too_many_arguments)]
    fn record<A>(
        src: AddrPort<A>,
        dst: AddrPort<A>,
        proto: u8,
        direction: u8,
        nat: AddrPort<A>,
        flags: u16,
        idle: u32,
        state: u8,
    ) -> MapRecord<A> {
        Record {
            src,
            dst,
            proto,
            direction,
            nat,
            flags,
            backend_id: 7,
            service_id: 3,
            last_seen: NOW - idle,
            state,
            reply_state: 0,
            node_port: 0,
            active: false,
        }
    }

    /// C -> F, sent to B.
    fn forward(proto: u8, idle: u32, state: u8) -> MapRecord<u32> {
        Record {
            active: true,
            ..record((C, CP), (F, FP), proto, CT_FORWARD, (B, BP), 0, idle, state)
        }
    }

    /// C's only entry for a flow to F sent to B: the client in the key, the
    /// backend in the value, both sides' states.
    fn socket(proto: u8, idle: u32, state: u8, reply_state: u8) -> MapRecord<u32> {
        Record {
            active: true,
            reply_state,
            ..record((C, CP), (0, 0), proto, CT_SOCKET, (B, BP), 0, idle, state)
        }
    }

    /// B -> C, source back to F.
    fn reply(proto: u8, flags: u16, idle: u32, state: u8) -> MapRecord<u32> {
        record(
            (B, BP),
            (C, CP),
            proto,
            CT_REPLY,
            (F, FP),
            flags,
            idle,
            state,
        )
    }

    /// With source NAT: C -> B leaves as N:NP.
    fn snat_out(proto: u8, idle: u32, state: u8) -> MapRecord<u32> {
        record(
            (C, CP),
            (B, BP),
            proto,
            CT_REPLY,
            (N, NP),
            CT_OUTWARD,
            idle,
            state,
        )
    }

    /// With source NAT: B -> N:NP goes back to C.
    fn snat_back(proto: u8, idle: u32, state: u8) -> MapRecord<u32> {
        record(
            (B, BP),
            (N, NP),
            proto,
            CT_REPLY,
            (C, CP),
            CT_REWRITE_DST,
            idle,
            state,
        )
    }

    fn names(plan: &Deletions<&'static str>) -> Vec<Vec<&'static str>> {
        plan.expired.clone()
    }

    #[test]
    fn every_entry_of_a_flow_names_the_same_pair() {
        let id = forward(IPPROTO_TCP, 0, CT_STATE_SYN).flow();
        for (name, r) in [
            ("reply", reply(IPPROTO_TCP, 0, 0, CT_STATE_SYN)),
            (
                "reply at egress",
                reply(IPPROTO_TCP, CT_AT_EGRESS, 0, CT_STATE_SYN),
            ),
            ("snat out", snat_out(IPPROTO_TCP, 0, CT_STATE_SYN)),
            ("snat back", snat_back(IPPROTO_TCP, 0, CT_STATE_SYN)),
        ] {
            assert_eq!(r.flow(), id, "{name}");
        }
        assert_eq!(id.low, (C, CP).min((B, BP)));
        let udp = forward(IPPROTO_UDP, 0, CT_STATE_OPEN).flow();
        assert_ne!(udp, id, "the protocol is part of the flow");
    }

    /// One entry alone (an orphan): deleted exactly when idle past the
    /// timeout of its protocol and state.
    #[test]
    fn each_protocol_and_state_has_its_timeout() {
        let d = t();
        let table = [
            (IPPROTO_TCP, CT_STATE_SYN, d.tcp_syn),
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, d.tcp_established),
            (IPPROTO_TCP, CT_STATE_FIN, d.tcp_fin),
            (IPPROTO_TCP, CT_STATE_RST, d.tcp_rst),
            (IPPROTO_TCP, 99, d.tcp_established),
            (IPPROTO_UDP, CT_STATE_OPEN, d.udp),
            (IPPROTO_SCTP, CT_STATE_OPEN, d.other),
            (47, CT_STATE_OPEN, d.other),
        ];
        for (proto, state, timeout) in table {
            for (direction, entry) in [
                ("forward", forward(proto, 0, state)),
                ("reply", reply(proto, 0, 0, state)),
                ("egress", reply(proto, CT_AT_EGRESS, 0, state)),
            ] {
                for (idle, gone) in [(0, false), (timeout, false), (timeout + 1, true)] {
                    let entry = Record {
                        last_seen: NOW - idle,
                        ..entry
                    };
                    let plan = plan([("e", entry)], NOW, &d);
                    let want: Vec<Vec<&str>> = if gone { vec![vec!["e"]] } else { vec![] };
                    assert_eq!(
                        names(&plan),
                        want,
                        "{direction} proto {proto} state {state} idle {idle}"
                    );
                    assert_eq!(plan.kept, usize::from(!gone));
                }
            }
        }
    }

    /// A forward entry and its reply: (forward idle, state), (reply idle,
    /// state), deleted?
    #[test]
    fn a_pair_lives_while_either_side_does() {
        use CT_STATE_ESTABLISHED as EST;
        use CT_STATE_FIN as FIN;
        use CT_STATE_RST as RST;
        use CT_STATE_SYN as SYN;
        /// (idle seconds, state) of one side.
        type Side = (u32, u8);
        let table: [(u8, Side, Side, bool); 14] = [
            (IPPROTO_TCP, (0, EST), (0, EST), false),
            (IPPROTO_TCP, (100, EST), (90_000, EST), false),
            (IPPROTO_TCP, (90_000, EST), (90_000, EST), true),
            // The client closed; the backend is still sending.
            (IPPROTO_TCP, (30, FIN), (5, EST), false),
            // Both closed, recently.
            (IPPROTO_TCP, (5, FIN), (8, FIN), false),
            // Both closed, long enough ago.
            (IPPROTO_TCP, (11, FIN), (20, FIN), true),
            // Half-closed and idle: the open side waits its full timeout.
            (IPPROTO_TCP, (11, FIN), (3_600, EST), false),
            // A handshake the backend never answered.
            (IPPROTO_TCP, (61, SYN), (61, SYN), true),
            (IPPROTO_TCP, (61, SYN), (59, SYN), false),
            // A RST ends both directions: the established side is judged
            // by the RST timeout too.
            (IPPROTO_TCP, (11, RST), (3_600, EST), true),
            (IPPROTO_TCP, (3_600, EST), (11, RST), true),
            // ... but not while a side still sends.
            (IPPROTO_TCP, (11, RST), (5, EST), false),
            (IPPROTO_UDP, (61, 0), (30, 0), false),
            (IPPROTO_UDP, (61, 0), (61, 0), true),
        ];
        for (proto, (f_idle, f_state), (r_idle, r_state), gone) in table {
            for flags in [0, CT_AT_EGRESS] {
                let entries = [
                    ("forward", forward(proto, f_idle, f_state)),
                    ("reply", reply(proto, flags, r_idle, r_state)),
                ];
                // Either order in: forward out last.
                for entries in [entries, [entries[1], entries[0]]] {
                    let plan = plan(entries, NOW, &t());
                    let want: Vec<Vec<&str>> = if gone {
                        vec![vec!["reply", "forward"]]
                    } else {
                        vec![]
                    };
                    assert_eq!(
                        names(&plan),
                        want,
                        "proto {proto} forward ({f_idle}, {f_state}) reply ({r_idle}, {r_state}) \
                         flags {flags}"
                    );
                }
            }
        }
    }

    /// Source NAT's four entries: any one alive keeps all four.
    #[test]
    fn source_nat_groups_go_together() {
        // Which entry is fresh (4: none).
        for alive in 0..=4 {
            let idle = |i: u32| if i == alive { 3 } else { 61 };
            let entries = [
                ("snat back", snat_back(IPPROTO_UDP, idle(0), CT_STATE_OPEN)),
                ("forward", forward(IPPROTO_UDP, idle(1), CT_STATE_OPEN)),
                (
                    "reply",
                    reply(IPPROTO_UDP, CT_AT_EGRESS, idle(2), CT_STATE_OPEN),
                ),
                ("snat out", snat_out(IPPROTO_UDP, idle(3), CT_STATE_OPEN)),
            ];
            let plan = plan(entries, NOW, &t());
            if alive == 4 {
                assert_eq!(
                    names(&plan),
                    vec![vec!["snat back", "reply", "snat out", "forward"]]
                );
                assert_eq!(plan.reaped, BTreeMap::from([(7, 1)]));
            } else {
                assert!(plan.expired.is_empty(), "entry {alive} is alive");
                assert!(plan.reaped.is_empty());
                assert_eq!(plan.kept, 1);
            }
        }
    }

    /// A reply entry nothing has come back through yet.
    fn unreplied(r: MapRecord<u32>) -> MapRecord<u32> {
        Record {
            flags: r.flags | CT_UNREPLIED,
            ..r
        }
    }

    /// Bare ACKs that claim an established connection, never answered:
    /// the SYN timeout, not the established one.
    #[test]
    fn an_unanswered_flow_gets_the_syn_timeout_whatever_it_claims() {
        for (idle, gone) in [(59, false), (61, true)] {
            let entries = [
                ("forward", forward(IPPROTO_TCP, idle, CT_STATE_ESTABLISHED)),
                (
                    "reply",
                    unreplied(reply(IPPROTO_TCP, 0, idle, CT_STATE_ESTABLISHED)),
                ),
            ];
            let plan = plan(entries, NOW, &t());
            assert_eq!(plan.expired.len(), usize::from(gone), "idle {idle}");
        }
        // Once answered, the same flow is an established connection.
        let entries = [
            ("forward", forward(IPPROTO_TCP, 61, CT_STATE_ESTABLISHED)),
            ("reply", reply(IPPROTO_TCP, 0, 61, CT_STATE_ESTABLISHED)),
        ];
        assert!(plan(entries, NOW, &t()).expired.is_empty());
        // A source-NATed flow is confirmed only once its replies came back.
        let entries = [
            ("forward", forward(IPPROTO_UDP, 59, CT_STATE_OPEN)),
            ("snat out", snat_out(IPPROTO_UDP, 59, CT_STATE_OPEN)),
            (
                "snat back",
                unreplied(snat_back(IPPROTO_UDP, 59, CT_STATE_OPEN)),
            ),
        ];
        let udp = Timeouts { udp: 300, ..t() };
        assert_eq!(plan(entries, NOW, &udp).expired.len(), 0);
        assert_eq!(plan(entries, NOW + 2, &udp).expired.len(), 1);
    }

    /// Under pressure, unconfirmed flows idle past the grace go first;
    /// confirmed ones and fresh handshakes stay.
    #[test]
    fn a_full_table_gives_up_unconfirmed_flows_first() {
        let idle = UNCONFIRMED_GRACE + 1;
        let from = |c: u32, r: MapRecord<u32>| Record { src: (c, CP), ..r };
        let to = |c: u32, r: MapRecord<u32>| Record { dst: (c, CP), ..r };
        let entries = [
            ("ack", forward(IPPROTO_TCP, idle, CT_STATE_ESTABLISHED)),
            (
                "ack reply",
                unreplied(reply(IPPROTO_TCP, 0, idle, CT_STATE_ESTABLISHED)),
            ),
            ("syn", from(C2, forward(IPPROTO_TCP, 0, CT_STATE_SYN))),
            (
                "syn reply",
                to(C2, unreplied(reply(IPPROTO_TCP, 0, 0, CT_STATE_SYN))),
            ),
            (
                "open",
                from(N, forward(IPPROTO_TCP, 500, CT_STATE_ESTABLISHED)),
            ),
            (
                "open reply",
                to(N, reply(IPPROTO_TCP, 0, 500, CT_STATE_ESTABLISHED)),
            ),
        ];
        let normal = plan_under(entries, NOW, &t(), Pressure::Normal);
        assert!(normal.expired.is_empty());
        assert_eq!(normal.unconfirmed, 0);
        let high = plan_under(entries, NOW, &t(), Pressure::High);
        assert_eq!(names(&high), vec![vec!["ack reply", "ack"]]);
        assert_eq!((high.unconfirmed, high.kept), (1, 2));
    }

    #[test]
    fn pressure_starts_at_three_quarters_or_with_overflow() {
        assert_eq!(Pressure::of(767, 1024, false), Pressure::Normal);
        assert_eq!(Pressure::of(768, 1024, false), Pressure::High);
        assert_eq!(Pressure::of(0, 1024, true), Pressure::High);
    }

    /// A reply without its forward entry, and a forward entry without its
    /// reply: each its own group, expiring alone.
    #[test]
    fn orphans_expire_alone() {
        let other_flow = Record {
            src: (C2, CP),
            ..forward(IPPROTO_TCP, 0, CT_STATE_ESTABLISHED)
        };
        let entries = [
            ("orphan reply", reply(IPPROTO_TCP, 0, 11, CT_STATE_FIN)),
            ("other flow", other_flow),
            (
                "orphan snat back",
                Record {
                    nat: (C2, 1),
                    ..snat_back(IPPROTO_UDP, 61, CT_STATE_OPEN)
                },
            ),
        ];
        let plan = plan(entries, NOW, &t());
        assert_eq!(
            names(&plan),
            vec![vec!["orphan reply"], vec!["orphan snat back"]]
        );
        assert_eq!(plan.kept, 1);
        assert!(plan.reaped.is_empty(), "no forward entry went");
    }

    /// Flows that differ in any endpoint are separate, even when they
    /// share the client or the backend.
    #[test]
    fn flows_are_told_apart_by_both_endpoints() {
        let to = |b: u32, idle: u32| Record {
            nat: (b, BP),
            ..forward(IPPROTO_TCP, idle, CT_STATE_ESTABLISHED)
        };
        let back = |b: u32, idle: u32| Record {
            src: (b, BP),
            ..reply(IPPROTO_TCP, 0, idle, CT_STATE_ESTABLISHED)
        };
        let entries = [
            ("to B", to(B, 90_000)),
            ("to B2", to(B2, 90_000)),
            ("back from B", back(B, 90_000)),
            ("back from B2", back(B2, 5)),
        ];
        let plan = plan(entries, NOW, &t());
        assert_eq!(names(&plan), vec![vec!["back from B", "to B"]]);
        assert_eq!(plan.kept, 1);
    }

    #[test]
    fn only_active_forward_entries_are_reaped() {
        let mut inactive = forward(IPPROTO_TCP, 20, CT_STATE_FIN);
        inactive.active = false;
        inactive.src = (C2, CP);
        let mut other_backend = forward(IPPROTO_UDP, 61, CT_STATE_OPEN);
        other_backend.backend_id = 9;
        let mut alive = forward(IPPROTO_UDP, 0, CT_STATE_OPEN);
        alive.src = (C2, 1);
        // A reply marked active (it never is) does not count.
        let mut odd_reply = reply(IPPROTO_SCTP, 0, 301, CT_STATE_OPEN);
        odd_reply.active = true;
        let entries = [
            ("active", forward(IPPROTO_TCP, 90_000, CT_STATE_ESTABLISHED)),
            (
                "active too",
                Record {
                    src: (C, CP + 1),
                    ..forward(IPPROTO_TCP, 61, CT_STATE_SYN)
                },
            ),
            ("inactive", inactive),
            ("other backend", other_backend),
            ("alive", alive),
            ("odd reply", odd_reply),
        ];
        let plan = plan(entries, NOW, &t());
        assert_eq!(plan.entries(), 5);
        assert_eq!(plan.reaped, BTreeMap::from([(7, 2), (9, 1)]));
        assert_eq!(plan.kept, 1);
    }

    /// Seconds since boot as u32 wrap after 136 years: deadlines near
    /// u32::MAX do not wrap to the past, and entries stamped after `now`
    /// (written during the pass) are alive.
    #[test]
    fn time_near_the_ends_of_u32_does_not_wrap() {
        let d = t();
        let late = Record {
            last_seen: u32::MAX - 5,
            ..forward(IPPROTO_TCP, 0, CT_STATE_ESTABLISHED)
        };
        assert!(plan([("late", late)], u32::MAX, &d).expired.is_empty());
        let future = Record {
            last_seen: NOW + 3,
            ..forward(IPPROTO_UDP, 0, CT_STATE_OPEN)
        };
        assert!(plan([("future", future)], NOW, &d).expired.is_empty());
        let boot = Record {
            last_seen: 0,
            ..forward(IPPROTO_UDP, 0, CT_STATE_OPEN)
        };
        assert!(plan([("boot", boot)], 30, &d).expired.is_empty());
        assert_eq!(plan([("boot", boot)], 61, &d).expired.len(), 1);
    }

    #[test]
    fn ipv6_records_group_the_same_way() {
        let c = [0x2001_0db8, 0, 0, 1];
        let b = [0x2001_0db8, 0, 0, 2];
        let f = [0xfd00, 0, 0, 0x10];
        let fwd = Record {
            active: true,
            ..record(
                (c, CP),
                (f, FP),
                IPPROTO_TCP,
                CT_FORWARD,
                (b, BP),
                0,
                20,
                CT_STATE_FIN,
            )
        };
        let back = record(
            (b, BP),
            (c, CP),
            IPPROTO_TCP,
            CT_REPLY,
            (f, FP),
            CT_AT_EGRESS,
            11,
            CT_STATE_FIN,
        );
        let plan = plan([(1, back), (0, fwd)], NOW, &t());
        assert_eq!(plan.expired, vec![vec![1, 0]]);
        assert_eq!(plan.reaped, BTreeMap::from([(7, 1)]));
    }

    /// A socket entry alone is a whole flow: (flags, idle, client state,
    /// backend state), deleted?
    #[test]
    fn a_socket_entry_lives_for_the_longer_of_its_two_sides() {
        use CT_STATE_ESTABLISHED as EST;
        use CT_STATE_FIN as FIN;
        use CT_STATE_RST as RST;
        use CT_STATE_SYN as SYN;
        let d = t();
        let table: [(&str, u8, u16, u32, u8, u8, bool); 20] = [
            ("established", IPPROTO_TCP, 0, 100, EST, EST, false),
            (
                "established",
                IPPROTO_TCP,
                0,
                d.tcp_established,
                EST,
                EST,
                false,
            ),
            ("established", IPPROTO_TCP, 0, 90_000, EST, EST, true),
            // The client closed; the backend may still send.
            ("client fin", IPPROTO_TCP, 0, 3_600, FIN, EST, false),
            ("client fin", IPPROTO_TCP, 0, 90_000, FIN, EST, true),
            ("backend fin", IPPROTO_TCP, 0, 3_600, EST, FIN, false),
            ("both fin", IPPROTO_TCP, 0, 5, FIN, FIN, false),
            ("both fin", IPPROTO_TCP, 0, 11, FIN, FIN, true),
            // A RST from either side ends both.
            ("backend rst", IPPROTO_TCP, 0, 5, EST, RST, false),
            ("backend rst", IPPROTO_TCP, 0, 11, EST, RST, true),
            ("client rst", IPPROTO_TCP, 0, 11, RST, EST, true),
            // Answered handshake still in progress.
            ("syn both", IPPROTO_TCP, 0, 59, SYN, SYN, false),
            ("syn both", IPPROTO_TCP, 0, 61, SYN, SYN, true),
            // Nothing came back: the SYN timeout, whatever the client claims.
            ("unconfirmed", IPPROTO_TCP, CT_UNREPLIED, 59, EST, 0, false),
            ("unconfirmed", IPPROTO_TCP, CT_UNREPLIED, 61, EST, 0, true),
            (
                "unconfirmed syn",
                IPPROTO_TCP,
                CT_UNREPLIED,
                61,
                SYN,
                0,
                true,
            ),
            ("udp", IPPROTO_UDP, 0, 59, 0, 0, false),
            ("udp", IPPROTO_UDP, 0, 61, 0, 0, true),
            // States mean nothing outside TCP: no RST rule.
            ("udp odd state", IPPROTO_UDP, 0, 30, 0, RST, false),
            ("sctp", IPPROTO_SCTP, 0, 299, 0, 0, false),
        ];
        for (name, proto, flags, idle, state, reply_state, gone) in table {
            let entry = Record {
                flags,
                ..socket(proto, idle, state, reply_state)
            };
            let plan = plan([("socket", entry)], NOW, &d);
            let want: Vec<Vec<&str>> = if gone { vec![vec!["socket"]] } else { vec![] };
            assert_eq!(names(&plan), want, "{name}: idle {idle}");
            let reaped = if gone {
                BTreeMap::from([(7, 1)])
            } else {
                BTreeMap::new()
            };
            assert_eq!(
                plan.reaped, reaped,
                "{name}: an active socket entry is reaped"
            );
        }
    }

    /// A socket entry is the forward entry and the reply in one: it names
    /// the flow's pair as they do, and holds the backend count.
    #[test]
    fn a_socket_entry_joins_the_pair_of_its_client_and_backend() {
        let s = socket(IPPROTO_TCP, 0, CT_STATE_ESTABLISHED, CT_STATE_ESTABLISHED);
        assert_eq!(s.flow(), forward(IPPROTO_TCP, 0, CT_STATE_SYN).flow());
        assert!(s.is_forward());
        assert!(!reply(IPPROTO_TCP, 0, 0, CT_STATE_SYN).is_forward());
        // A pair from the same client port to the same backend through
        // another frontend shares its group: the socket entry goes last.
        let entries = [
            (
                "socket",
                socket(IPPROTO_TCP, 11, CT_STATE_FIN, CT_STATE_FIN),
            ),
            ("reply", reply(IPPROTO_TCP, 0, 20, CT_STATE_FIN)),
        ];
        let plan = plan(entries, NOW, &t());
        assert_eq!(names(&plan), vec![vec!["reply", "socket"]]);
        let inactive = Record {
            active: false,
            ..socket(IPPROTO_UDP, 61, 0, 0)
        };
        assert!(super::plan([((), inactive)], NOW, &t()).reaped.is_empty());
    }

    /// Under pressure an unanswered socket entry goes once past the grace.
    #[test]
    fn a_full_table_gives_up_unconfirmed_socket_entries() {
        let unconfirmed = |idle| Record {
            flags: CT_UNREPLIED,
            ..socket(IPPROTO_TCP, idle, CT_STATE_SYN, 0)
        };
        let entries = [
            ("old", unconfirmed(UNCONFIRMED_GRACE + 1)),
            (
                "new",
                Record {
                    src: (C2, CP),
                    ..unconfirmed(0)
                },
            ),
        ];
        let high = plan_under(entries, NOW, &t(), Pressure::High);
        assert_eq!(names(&high), vec![vec!["old"]]);
        assert_eq!((high.unconfirmed, high.kept), (1, 1));
    }

    #[test]
    fn nothing_in_nothing_out() {
        let plan = plan(Vec::<((), MapRecord<u32>)>::new(), NOW, &t());
        assert!(plan.expired.is_empty() && plan.reaped.is_empty() && plan.kept == 0);
    }
}
