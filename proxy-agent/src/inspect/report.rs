//! Pure functions from decoded records to reports: names for numbers,
//! slots grouped into backends, counters summed. A report is what `-o json`
//! prints (field names are the stable JSON schema) and what the tables are
//! drawn from.

use std::{collections::BTreeMap, net::SocketAddr};

use proxy_common::{
    ALG_LEAST_CONN, ALG_MAGLEV, ALG_RANDOM, ALG_ROUND_ROBIN, ALG_SOURCE_HASH, BACKEND_TERMINATING,
    CT_EGRESS_ONLY, CT_FORWARD, CT_REPLY, CT_REWRITE_DST, CT_SOCKET, CT_STATE_ESTABLISHED,
    CT_STATE_FIN, CT_STATE_OPEN, CT_STATE_RST, CT_STATE_SYN, Counter, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, SCOPE_LOCAL, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_LOCAL_TWIN,
    SVC_REPLY_AT_EGRESS, SVC_SNAT_EXTERNAL, SVC_SOURCE_RANGES, SlotKey,
};
use serde::{Serialize, Serializer, ser::SerializeMap};

use super::records::{BackendActivity, CtRecord, Endpoint, LbRecords, MemberRecord, ServiceRecord};
use crate::datapath::conntrack::Table;

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

impl IpFamily {
    pub fn of(addr: &SocketAddr) -> IpFamily {
        match addr {
            SocketAddr::V4(_) => IpFamily::Ipv4,
            SocketAddr::V6(_) => IpFamily::Ipv6,
        }
    }

    /// As in JSON.
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
        }
    }
}

/// `TCP`, `UDP`, `SCTP`, or the IP protocol number.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

/// `addr:port/PROTO` (`[addr]:port/PROTO` for IPv6).
pub fn endpoint_name(e: &Endpoint) -> String {
    format!("{}/{}", e.addr, protocol_name(e.proto))
}

/// The name of an `ALG_*` value.
pub fn algorithm_name(algorithm: u32) -> String {
    match algorithm {
        ALG_RANDOM => "random".into(),
        ALG_ROUND_ROBIN => "round-robin".into(),
        ALG_LEAST_CONN => "least-connections".into(),
        ALG_MAGLEV => "maglev".into(),
        ALG_SOURCE_HASH => "source-hash".into(),
        other => format!("unknown({other})"),
    }
}

/// Algorithms whose slots hold a lookup table rather than a list.
fn uses_table(algorithm: u32) -> bool {
    matches!(algorithm, ALG_MAGLEV | ALG_SOURCE_HASH)
}

const SERVICE_FLAGS: [(u32, &str); 6] = [
    (SVC_REPLY_AT_EGRESS, "reply-at-egress"),
    (SVC_AFFINITY, "affinity"),
    (SVC_SOURCE_RANGES, "source-ranges"),
    (SVC_DROP_WHEN_EMPTY, "drop-when-empty"),
    (SVC_SNAT_EXTERNAL, "snat-external"),
    (SVC_LOCAL_TWIN, "local-twin"),
];

/// The names of the `SVC_*` bits set, lowest first; bits without a name
/// as hexadecimal numbers, so a newer datapath's flags still show.
pub fn flag_names(flags: u32) -> Vec<String> {
    (0..32)
        .map(|bit| 1u32 << bit)
        .filter(|bit| flags & bit != 0)
        .map(|bit| match SERVICE_FLAGS.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => (*name).to_string(),
            None => format!("{bit:#x}"),
        })
        .collect()
}

/// The name of a `CT_STATE_*` value.
pub fn state_name(state: u8) -> String {
    match state {
        CT_STATE_OPEN => "open".into(),
        CT_STATE_SYN => "syn".into(),
        CT_STATE_ESTABLISHED => "established".into(),
        CT_STATE_FIN => "fin".into(),
        CT_STATE_RST => "rst".into(),
        other => format!("unknown({other})"),
    }
}

/// The direction of a conntrack entry; `dnat-back` is a reply entry that
/// rewrites the destination (back to a client whose source was translated),
/// `egress` one the egress hook applies (a reply's or a source-NATed
/// packet's source), `socket` a flow's only entry (forward and reply in
/// one).
pub fn direction_name(direction: u8, flags: u16) -> String {
    match direction {
        CT_FORWARD => "forward".into(),
        CT_SOCKET => "socket".into(),
        CT_REPLY if flags & CT_EGRESS_ONLY != 0 => "egress".into(),
        CT_REPLY if flags & CT_REWRITE_DST != 0 => "dnat-back".into(),
        CT_REPLY => "reply".into(),
        other => format!("unknown({other})"),
    }
}

/// How a service uses one of its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// A member with slots: new flows go to it.
    Active,
    /// A member marked terminating: its flows stay, new ones go elsewhere.
    Terminating,
    /// A member (not terminating) in no slot: it gets no new flows.
    NoSlot,
    /// In a slot without a member entry: the datapath does not honour its
    /// conntrack entries.
    NotMember,
}

impl MemberState {
    /// As in JSON.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Terminating => "terminating",
            MemberState::NoSlot => "no-slot",
            MemberState::NotMember => "not-member",
        }
    }
}

/// `inspect services -o json`.
#[derive(Debug, Serialize)]
pub struct ServicesReport {
    pub services: Vec<ServiceView>,
}

/// One frontend and how it balances.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// `addr:port`, `[addr]:port` for IPv6.
    pub frontend: SocketAddr,
    /// `TCP`, `UDP`, `SCTP` or the protocol number.
    pub protocol: String,
    pub family: IpFamily,
    /// `all`, or `local`: the entry the socket hooks give this node's own
    /// clients where they get other backends (its `all` twin has the
    /// `local-twin` flag).
    pub clients: &'static str,
    pub service_id: u32,
    /// The `lb_slots` table it reads (frontends with the same backends and
    /// table size share one).
    pub slot_table: u32,
    /// `random`, `round-robin`, `least-connections`, `maglev`, `source-hash`.
    pub algorithm: String,
    /// `reply-at-egress`, `affinity`, `source-ranges`, `drop-when-empty`,
    /// `snat-external`.
    pub flags: Vec<String>,
    /// With the `affinity` flag.
    pub affinity_timeout_seconds: Option<u32>,
    pub backend_count: u32,
    /// With `maglev` and `source-hash`: the lookup table's size.
    pub table_size: Option<u32>,
    /// Slots below the backend count (or table size) that are not written.
    pub missing_slots: u32,
    /// Client-to-service packets and bytes (`lb_svc_stats`, all CPUs, since the service got its id).
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<ServiceBackend>,
}

/// A backend of a frontend.
#[derive(Debug, Serialize)]
pub struct ServiceBackend {
    pub backend_id: u32,
    /// Null when no backends or members map has the id.
    pub address: Option<SocketAddr>,
    /// Listed algorithms: the slots that hold it.
    pub slots: Vec<u32>,
    /// Table algorithms: how many table entries point at it, and which
    /// fraction of the table that is.
    pub table_entries: Option<u32>,
    pub share: Option<f64>,
    pub state: MemberState,
}

/// Members by service id, then backend id.
type MemberIndex<'a> = BTreeMap<u32, BTreeMap<u32, &'a MemberRecord>>;

fn member_index(members: &[MemberRecord]) -> MemberIndex<'_> {
    let mut index = MemberIndex::new();
    for m in members {
        index
            .entry(m.service_id)
            .or_default()
            .insert(m.backend_id, m);
    }
    index
}

/// Every frontend, IPv4 first, by address, port and protocol.
pub fn services(lb: &LbRecords) -> ServicesReport {
    let members = member_index(&lb.members);
    let mut records: Vec<&ServiceRecord> = lb.services.iter().collect();
    records.sort_by_key(|s| (s.frontend, s.scope));
    let services = records
        .into_iter()
        .map(|s| service(s, lb, members.get(&s.entry.id)))
        .collect();
    ServicesReport { services }
}

fn service(
    s: &ServiceRecord,
    lb: &LbRecords,
    members: Option<&BTreeMap<u32, &MemberRecord>>,
) -> ServiceView {
    let e = &s.entry;
    let table = uses_table(e.algorithm);
    let len = if table { e.table_size } else { e.backend_count };
    let slots = service_slots(lb, e.slots_id, len);
    let written = slots.values().map(Vec::len).sum::<usize>();
    let stats = lb.service_stats.get(&e.id).copied().unwrap_or_default();
    let empty = BTreeMap::new();
    ServiceView {
        frontend: s.frontend.addr,
        protocol: protocol_name(s.frontend.proto),
        family: IpFamily::of(&s.frontend.addr),
        clients: match s.scope {
            SCOPE_LOCAL => "local",
            _ => "all",
        },
        service_id: e.id,
        slot_table: e.slots_id,
        algorithm: algorithm_name(e.algorithm),
        flags: flag_names(e.flags),
        affinity_timeout_seconds: (e.flags & SVC_AFFINITY != 0).then_some(e.affinity_timeout),
        backend_count: e.backend_count,
        table_size: table.then_some(e.table_size),
        missing_slots: len.saturating_sub(u32::try_from(written).unwrap_or(u32::MAX)),
        packets: stats.packets,
        bytes: stats.bytes,
        backends: service_backends(&slots, table.then_some(len), lb, members.unwrap_or(&empty)),
    }
}

/// Slots 0..len of a slot table, grouped by backend id.
fn service_slots(lb: &LbRecords, slots_id: u32, len: u32) -> BTreeMap<u32, Vec<u32>> {
    let first = SlotKey {
        service_id: slots_id,
        slot: 0,
    };
    let end = SlotKey {
        service_id: slots_id,
        slot: len,
    };
    let mut by_backend: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (key, backend_id) in lb.slots.range(first..end) {
        by_backend.entry(*backend_id).or_default().push(key.slot);
    }
    by_backend
}

/// The backends in slots (in slot order for lists, by id for tables), then
/// members in no slot.
fn service_backends(
    slots: &BTreeMap<u32, Vec<u32>>,
    table_size: Option<u32>,
    lb: &LbRecords,
    members: &BTreeMap<u32, &MemberRecord>,
) -> Vec<ServiceBackend> {
    let address = |id: u32| {
        (lb.backends.get(&id))
            .or_else(|| members.get(&id).map(|m| &m.backend))
            .map(|e| e.addr)
    };
    let mut slotted: Vec<ServiceBackend> = slots
        .iter()
        .map(|(&id, slots)| {
            let state = match members.get(&id) {
                Some(m) if m.flags & BACKEND_TERMINATING != 0 => MemberState::Terminating,
                Some(_) => MemberState::Active,
                None => MemberState::NotMember,
            };
            let entries = u32::try_from(slots.len()).unwrap_or(u32::MAX);
            ServiceBackend {
                backend_id: id,
                address: address(id),
                slots: if table_size.is_some() {
                    Vec::new()
                } else {
                    slots.clone()
                },
                table_entries: table_size.map(|_| entries),
                share: table_size.map(|size| f64::from(entries) / f64::from(size.max(1))),
                state,
            }
        })
        .collect();
    if table_size.is_none() {
        slotted.sort_by_key(|b| b.slots.first().copied());
    }
    let unslotted = (members.iter())
        .filter(|(id, _)| !slots.contains_key(id))
        .map(|(&id, m)| ServiceBackend {
            backend_id: id,
            address: address(id),
            slots: Vec::new(),
            table_entries: table_size.map(|_| 0),
            share: table_size.map(|_| 0.0),
            state: if m.flags & BACKEND_TERMINATING != 0 {
                MemberState::Terminating
            } else {
                MemberState::NoSlot
            },
        });
    slotted.extend(unslotted);
    slotted
}

/// `inspect backends -o json`.
#[derive(Debug, Serialize)]
pub struct BackendsReport {
    pub backends: Vec<BackendView>,
}

/// One backend and what it carries.
#[derive(Debug, Serialize)]
pub struct BackendView {
    pub backend_id: u32,
    pub address: SocketAddr,
    pub protocol: String,
    pub family: IpFamily,
    /// New flows sent to it (`lb_be_flows`, all CPUs); null when the
    /// datapath does not count them.
    pub new_flows: Option<u64>,
    /// `lb_conns` and `lb_reaped`: flows opened, seen closing, and reaped
    /// idle by the agent; null when the datapath does not count them.
    pub opened: Option<u32>,
    pub closed: Option<u32>,
    pub reaped: Option<u32>,
    /// `opened - closed - reaped`, wrapping as the counters do.
    pub open_connections: Option<u32>,
    /// The services that have it as a member.
    pub services: Vec<Membership>,
}

/// A service a backend is a member of.
#[derive(Debug, Serialize)]
pub struct Membership {
    pub service_id: u32,
    /// `active` or `terminating`.
    pub state: MemberState,
    /// The service's frontends, `addr:port/PROTO`.
    pub frontends: Vec<String>,
}

/// Every backend (of the backends maps, or only of a member entry), by id.
pub fn backends(lb: &LbRecords) -> BackendsReport {
    let mut frontends: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for s in &lb.services {
        frontends
            .entry(s.entry.id)
            .or_default()
            .push(endpoint_name(&s.frontend));
    }
    frontends.values_mut().for_each(|names| names.sort());
    let mut endpoints: BTreeMap<u32, Endpoint> = BTreeMap::new();
    let mut memberships: BTreeMap<u32, Vec<Membership>> = BTreeMap::new();
    for m in &lb.members {
        endpoints.entry(m.backend_id).or_insert(m.backend);
        memberships
            .entry(m.backend_id)
            .or_default()
            .push(Membership {
                service_id: m.service_id,
                state: if m.flags & BACKEND_TERMINATING != 0 {
                    MemberState::Terminating
                } else {
                    MemberState::Active
                },
                frontends: frontends.get(&m.service_id).cloned().unwrap_or_default(),
            });
    }
    // The backends map names the address; a member's copy only fills in.
    endpoints.extend(lb.backends.iter().map(|(id, e)| (*id, *e)));
    let backends = endpoints
        .into_iter()
        .map(|(id, endpoint)| {
            let mut services = memberships.remove(&id).unwrap_or_default();
            services.sort_by_key(|m| m.service_id);
            backend(id, endpoint, lb.activity.get(&id), services)
        })
        .collect();
    BackendsReport { backends }
}

fn backend(
    id: u32,
    endpoint: Endpoint,
    activity: Option<&BackendActivity>,
    services: Vec<Membership>,
) -> BackendView {
    let activity = activity.copied().unwrap_or_default();
    let conns = activity.connections;
    BackendView {
        backend_id: id,
        address: endpoint.addr,
        protocol: protocol_name(endpoint.proto),
        family: IpFamily::of(&endpoint.addr),
        new_flows: activity.flows,
        opened: conns.map(|c| c.opened),
        closed: conns.map(|c| c.closed),
        reaped: activity.reaped,
        open_connections: conns.map(|c| {
            (c.opened)
                .wrapping_sub(c.closed)
                .wrapping_sub(activity.reaped.unwrap_or(0))
        }),
        services,
    }
}

/// `inspect conntrack -o json`.
#[derive(Debug, Serialize)]
pub struct ConntrackReport {
    /// The clock `last_seen` is in (CLOCK_MONOTONIC_COARSE seconds) when
    /// the maps were read.
    pub now: u32,
    pub entries: Vec<CtView>,
    pub totals: CtTotals,
}

/// One conntrack entry.
#[derive(Debug, Serialize)]
pub struct CtView {
    pub family: IpFamily,
    /// `main` (`ct4_table`/`ct6_table`) or `overflow`
    /// (`ct4_overflow`/`ct6_overflow`: a flow that found its groups full;
    /// the LRU may evict it).
    pub table: Table,
    /// `forward`, `reply`, `dnat-back` (a reply entry that rewrites the
    /// destination), `egress`, or `socket` (a flow's only entry: its
    /// client's packets and the backend's replies both find it).
    pub direction: String,
    pub protocol: String,
    /// The packets this entry matches: from `src` to `dst`. A `socket`
    /// entry's are the client's and the frontend's (its key has no
    /// destination: `0.0.0.0:0` or `[::]:0` while the frontend is not
    /// known), and the replies that come back the other way.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// What the entry rewrites to: the backend for `forward` and `socket`,
    /// the frontend for `reply`/`egress` (the new source), the client for
    /// `dnat-back`.
    pub nat: SocketAddr,
    /// `open` (not TCP), `syn`, `established`, `fin`, `rst`: of the
    /// packets this entry matches (a `socket` entry's: the client's).
    pub state: String,
    /// Seconds since the entry's last packet (at most a second stale).
    pub age_seconds: u32,
    pub last_seen: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// The flow counts as an open connection of its backend (forward and
    /// socket entries only).
    pub active: bool,
    /// `socket` entries only (the other entries have no such fields).
    #[serde(flatten)]
    pub socket: Option<SocketView>,
}

/// What only a `socket` entry has.
#[derive(Debug, Serialize)]
pub struct SocketView {
    /// The frontend its service id names in `lb4_rev_nat`/`lb6_rev_nat`
    /// (the replies' new source); null when that names none.
    pub frontend: Option<SocketAddr>,
    /// The state of the backend's packets, as `state` is the client's.
    pub reply_state: String,
    /// A source-NATed flow's node port: its packets leave from the node's
    /// address and this port (null until the first of them picks it, and
    /// for flows without source NAT).
    pub node_port: Option<u16>,
}

/// Entries per family (both tables), and of those in the overflow table.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct CtTotals {
    pub ipv4: usize,
    pub ipv6: usize,
    pub ipv4_overflow: usize,
    pub ipv6_overflow: usize,
}

impl CtTotals {
    fn count(&mut self, e: &CtView) {
        let (all, overflow) = match e.family {
            IpFamily::Ipv4 => (&mut self.ipv4, &mut self.ipv4_overflow),
            IpFamily::Ipv6 => (&mut self.ipv6, &mut self.ipv6_overflow),
        };
        *all += 1;
        if e.table == Table::Overflow {
            *overflow += 1;
        }
    }
}

/// Every entry, by family, table, direction, source and destination. `now`
/// is the coarse monotonic second the ages are counted to.
pub fn conntrack(records: &[CtRecord], now: u32) -> ConntrackReport {
    let mut sorted: Vec<&CtRecord> = records.iter().collect();
    sorted.sort_by_key(|r| {
        let e = &r.entry;
        let family = IpFamily::of(&e.src);
        (family, r.table, e.direction, e.src, e.dst, e.proto)
    });
    let entries: Vec<CtView> = sorted.into_iter().map(|r| ct_view(r, now)).collect();
    let mut totals = CtTotals::default();
    entries.iter().for_each(|e| totals.count(e));
    ConntrackReport {
        now,
        entries,
        totals,
    }
}

fn ct_view(
    &CtRecord {
        table,
        entry: r,
        frontend,
    }: &CtRecord,
    now: u32,
) -> CtView {
    let socket = (r.direction == CT_SOCKET).then(|| SocketView {
        frontend,
        reply_state: state_name(r.reply_state),
        node_port: (r.node_port != 0).then_some(r.node_port),
    });
    CtView {
        family: IpFamily::of(&r.src),
        table,
        direction: direction_name(r.direction, r.flags),
        protocol: protocol_name(r.proto),
        src: r.src,
        dst: match &socket {
            Some(SocketView {
                frontend: Some(f), ..
            }) => *f,
            _ => r.dst,
        },
        nat: r.nat,
        state: state_name(r.state),
        age_seconds: age(now, r.last_seen),
        last_seen: r.last_seen,
        backend_id: r.backend_id,
        service_id: r.service_id,
        active: r.active,
        socket,
    }
}

/// Seconds from `last_seen` to `now` on the wrapping 32-bit clock; 0 for a
/// `last_seen` a tick ahead of our read of the clock.
fn age(now: u32, last_seen: u32) -> u32 {
    let age = now.wrapping_sub(last_seen);
    if age > i32::MAX as u32 { 0 } else { age }
}

/// `inspect counters -o json`: `{"counters": {"no_backend": 0, ...}}`.
#[derive(Debug, Serialize)]
pub struct CountersReport {
    pub counters: Counters,
}

/// Counter names and values, serialized as one object in index order.
#[derive(Debug, PartialEq, Eq)]
pub struct Counters(pub Vec<(String, u64)>);

impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Per-CPU sums by index, named by `Counter::ALL`; an index without a name
/// (a newer datapath's) as `counter_N`.
pub fn counters(values: &[u64]) -> CountersReport {
    let named = values.iter().enumerate().map(|(i, v)| {
        let name = (Counter::ALL.iter())
            .find(|c| **c as usize == i)
            .map_or_else(|| format!("counter_{i}"), |c| c.name().to_string());
        (name, *v)
    });
    CountersReport {
        counters: Counters(named.collect()),
    }
}
