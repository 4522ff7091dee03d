//! Conntrack: the entries that keep a flow's translation in both
//! directions, including source NAT.
//!
//! A flow to a frontend F from client C, sent to backend B, has one entry,
//! `CT_SOCKET`, keyed by C alone: C's packets find it by their source (the
//! destination becomes B), B's by their destination (the source becomes
//! F, which the entry names by service id, see `lb4_rev_nat`), at ingress,
//! or at egress (`CT_AT_EGRESS`) for frontends that may be the node's own
//! addresses. A new flow writes that one entry.
//!
//! A flow with source NAT to node address N and port p is one of these too,
//! with `CT_SOURCE_NAT` and `CT_AT_EGRESS`, and p in its `node_port`: C's
//! packets, once forwarded to B, find it by their source at egress and
//! leave from N:p (p picked on the first of them, see `snat`). One more
//! entry, `CT_REWRITE_DST` (B -> N:p, direction `CT_REPLY`), written with
//! the port, takes B's answers back to C at ingress; the reply, on its way
//! to C, gets its source F at egress from the socket entry. Packets look
//! for either only while `ct_paired[CT_MARK_SOURCE_NAT]` is up (see
//! `ctmap::source_nat`), and for the second only when addressed to N.
//!
//! A flow whose client port holds another live flow, to another frontend
//! and backend (a client may reuse a port towards other destinations), has
//! a pair of entries instead, found only while `ct_paired[CT_MARK_PAIRS]`
//! is up (see `ctmap::paired`): FORWARD (C -> F, destination becomes B)
//! and REPLY (B -> C, source becomes F, at ingress or egress as above).
//! With source NAT, it also has `CT_OUTWARD` (C -> B, at egress: source
//! becomes N:p), written here with port 0 and given its port at egress,
//! and the node-port entry above.
//!
//! A new flow looks for stale entries only while pairs may exist: an
//! earlier pair between the same client port and backend is over (the
//! backend has one connection per client port), and its reply entry,
//! under the key the new flow's would have, goes first (`forget_reply`).

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{
    CT_AT_EGRESS, CT_EGRESS_ONLY, CT_FORWARD, CT_OUTWARD, CT_REAP_WAIT, CT_REPLY, CT_REWRITE_DST,
    CT_SOCKET, CT_SOURCE_NAT, CT_STATE_ESTABLISHED, CT_STATE_FIN, CT_STATE_OPEN, CT_STATE_RST,
    CT_STATE_SYN, CT_UNREPLIED, ClosedFlow, Counter, IPPROTO_TCP, SVC_REPLY_AT_EGRESS,
    SVC_SNAT_EXTERNAL, Service,
};

use crate::{
    atomic, closed,
    ctmap::{self, CtMaps, Entry, Found, Seen, Table, now},
    family::{self, Family, Target, V4, V6},
    maps::{self, CONFIG, CONNECTIONS},
    parse::{Flow, TCP_SYN, Tuple},
    snat::{self, Holder},
    verdict::{Rewrite, Side, Verdict},
};

/// The kernel's answer to an insert into a full hash map.
const E2BIG: i64 = 7;
/// The kernel's answer to a `BPF_NOEXIST` insert of a key that is there.
const EEXIST: i64 = 17;
/// Most closed flows one new connection reclaims: each frees two entries
/// or more, and twice what a connection takes keeps ahead of a churn.
const RECLAIM_BATCH: u32 = 2;

/// Why a new flow has no conntrack entries.
pub enum Untracked {
    /// The table is full: the flow must be steered without state.
    Full,
    /// Another error (counted).
    Failed,
    /// The flow needs source NAT and the node has no address for it
    /// (counted): it must not leave with the client's address.
    NoSourceNat,
}

/// The state a new entry starts in, from the flow's first packet.
#[inline(always)]
fn first_state<A>(flow: &Flow<A>) -> u8 {
    if flow.proto != IPPROTO_TCP {
        CT_STATE_OPEN
    } else if flow.tcp_flags & TCP_SYN != 0 {
        CT_STATE_SYN
    } else {
        CT_STATE_ESTABLISHED
    }
}

/// True once either side of a TCP flow began closing it.
#[inline(always)]
pub fn closing(state: u8) -> bool {
    state == CT_STATE_FIN || state == CT_STATE_RST
}

/// The flow stops counting as an open connection of its backend (least
/// connections), once, whichever CPU gets here first: true for the call
/// that released it.
#[inline(always)]
pub fn release<F: Family>(flow: &impl Tuple<F::Addr>, entry: &Entry<F::Addr>) -> bool {
    if entry.active == 0 {
        return false;
    }
    let key = match entry.is_socket() {
        true => socket_key::<F>(flow.saddr(), flow.sport(), flow.proto()),
        false => of::<F>(flow, CT_FORWARD),
    };
    release_at::<F>(key)
}

/// `release` of the entry at `key`, whatever it says.
#[inline(always)]
fn release_at<F: Family>(key: F::CtKey) -> bool {
    let Some(backend_id) = F::ct_deactivate(key) else {
        return false;
    };
    // SAFETY: a field of the array value the closure is given.
    connections(backend_id, |c| unsafe { &raw mut (*c).closed });
    true
}

/// Adds one to a backend's `lb_conns` field, atomically (all CPUs share it).
#[inline(always)]
fn connections(backend_id: u32, field: impl Fn(*mut proxy_common::Connections) -> *mut u32) {
    if let Some(c) = CONNECTIONS.get_ptr_mut(backend_id) {
        // SAFETY: a field of a live array value, 32-bit aligned.
        unsafe { atomic::fetch_add(field(c), 1) };
    }
}

/// A family's conntrack value.
pub type CtValue<F> = <<F as Family>::Ct as CtMaps>::Value;

/// The key of the `CT_SOCKET` entry of a client's address and port.
#[inline(always)]
pub fn socket_key<F: Family>(client: F::Addr, port: u16, proto: u8) -> F::CtKey {
    F::Ct::key(client, port, F::Addr::default(), 0, proto, CT_SOCKET)
}

#[inline(always)]
fn of<F: Family>(flow: &impl Tuple<F::Addr>, direction: u8) -> F::CtKey {
    F::Ct::key(
        flow.saddr(),
        flow.sport(),
        flow.daddr(),
        flow.dport(),
        flow.proto(),
        direction,
    )
}

/// What a packet to a frontend found at its client port's `CT_SOCKET`
/// entry, before any service lookup. Every field is written whatever the
/// kind: a value left undefined may be copied through a register the
/// verifier has not seen written.
pub struct Prior<V> {
    pub kind: PriorKind,
    /// With `PriorKind::Flow`: the entry's value, with the packet taken in
    /// as `forward` takes it in (a null pointer otherwise), and its second
    /// from before the packet.
    pub value: *mut V,
    pub last_seen: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PriorKind {
    /// A flow to this frontend, whose service is listed by id.
    Flow,
    /// No entry: `forward` need not look there again.
    NoSocketEntry,
    /// An entry of another frontend (or of a service not listed by id).
    Other,
}

/// The packet's flow and service from its client port's entry, if it is a
/// flow to the packet's frontend (`lb4_rev_nat` names it at the entry's
/// service id) whose service is listed by id: an established packet then
/// costs one hash lookup, not two.
#[inline(always)]
pub fn prior<F: Family>(flow: &Flow<F::Addr>) -> Prior<CtValue<F>> {
    let seen = Seen::Client(flow.tcp_flags);
    let key = socket_key::<F>(flow.saddr, flow.sport, flow.proto);
    let this_frontend = |e: &Entry<F::Addr>| {
        (F::frontend_is(e.service_id, flow.daddr, flow.dport, flow.proto)
            && maps::service_by_id(e.service_id).is_some())
        .then_some(true)
    };
    let (kind, value, last_seen) = match ctmap::find_where::<F::Ct>(key, seen, this_frontend) {
        Found::Entry(value, last_seen) => (PriorKind::Flow, value, last_seen),
        Found::NotOurs => (PriorKind::Other, core::ptr::null_mut(), 0),
        Found::Absent => (PriorKind::NoSocketEntry, core::ptr::null_mut(), 0),
    };
    Prior {
        kind,
        value,
        last_seen,
    }
}

/// The service `prior`'s entry names, if it found this frontend's flow
/// and the service is still listed by id.
#[inline(always)]
pub fn prior_service<F: Family>(prior: &Prior<CtValue<F>>) -> Option<Service> {
    if prior.kind != PriorKind::Flow || prior.value.is_null() {
        return None;
    }
    // SAFETY: a live map value `prior` found in this run of the program.
    maps::service_by_id(F::Ct::service_id(unsafe { &*prior.value }))
}

/// The entry `prior` found, if it found this frontend's.
#[inline(always)]
fn prior_entry<F: Family>(prior: &Prior<CtValue<F>>) -> Option<Entry<F::Addr>> {
    if prior.kind != PriorKind::Flow || prior.value.is_null() {
        return None;
    }
    let key = socket_key::<F>(F::Addr::default(), 0, 0);
    // SAFETY: a live map value `prior` found in this run of the program.
    let mut entry = unsafe { ctmap::entry_at::<F::Ct>(prior.value, &key) };
    entry.last_seen = prior.last_seen;
    Some(entry)
}

/// The flow's entry towards `service`, if it has one (its client port's
/// `CT_SOCKET` entry, looked for unless `prior` found none there, or its
/// forward entry), with this packet taken in.
#[inline(always)]
pub fn forward<F: Family>(
    flow: &Flow<F::Addr>,
    service: &Service,
    prior: Prior<CtValue<F>>,
) -> Option<Entry<F::Addr>> {
    let seen = Seen::Client(flow.tcp_flags);
    let this_frontend = |e: &Entry<F::Addr>| e.service_id == service.id;
    let found = match prior.kind {
        // `prior` saw the frontend at the entry's id, and a frontend keeps
        // its id for as long as it has an entry: `service` is that id's.
        PriorKind::Flow => return prior_entry::<F>(&prior).map(|e| taken::<F>(flow, e)),
        PriorKind::Other => {
            let key = socket_key::<F>(flow.saddr, flow.sport, flow.proto);
            F::ct_get_where(key, seen, this_frontend)
        }
        PriorKind::NoSocketEntry => None,
    };
    let entry = match found {
        Some(entry) => entry,
        None if ctmap::paired() => F::ct_get(of::<F>(flow, CT_FORWARD), seen)?,
        None => return None,
    };
    Some(taken::<F>(flow, entry))
}

/// A connection the client began closing stops counting as open, and
/// joins the closed flows the datapath may reclaim.
#[inline(always)]
fn taken<F: Family>(flow: &Flow<F::Addr>, entry: Entry<F::Addr>) -> Entry<F::Addr> {
    if closing(entry.state) && release::<F>(flow, &entry) {
        closed::push::<F>(flow, now());
    }
    entry
}

/// Called by each ingress hook after the packet's own work: while new
/// flows have found the table full (the overflow maps are in use, until
/// the agent's garbage collection has emptied them), closed flows that are
/// due give their entries up, so that they never crowd out new ones, agent
/// or not. At the end, nothing else is on the stack any more, and the
/// verifier walks it once per way out of the program: before the packet's
/// work, every way through the reclaim would have walked that work anew.
#[inline(always)]
pub fn make_room() {
    if ctmap::overflowed() {
        reclaim::<V4>();
        reclaim::<V6>();
    }
}

/// Frees the entries of up to `RECLAIM_BATCH` closed flows that are due
/// (`CtReclaimed` counts them). A flow whose port a new connection took,
/// or that already went, is passed over; one that is not quiet in both
/// directions yet (a half-closed connection still sending, a
/// retransmission) goes back in the ring.
#[inline(always)]
fn reclaim<F: Family>() {
    let now = now();
    for _ in 0..RECLAIM_BATCH {
        let Some(closed) = closed::take_due::<F>(now) else {
            break;
        };
        let Some(entry) = closed_entry::<F>(closed) else {
            continue;
        };
        if !quiet::<F>(closed, &entry, now) {
            closed::push::<F>(closed, now);
            continue;
        }
        forget::<F>(closed, &entry);
        maps::count(Counter::CtReclaimed);
    }
}

/// The entry of a flow from the closed ring, if its client closed it: its
/// client port's `CT_SOCKET` entry (whichever closed flow it is, it may
/// go) or its forward entry.
#[inline(always)]
fn closed_entry<F: Family>(closed: &ClosedFlow<F::Addr>) -> Option<Entry<F::Addr>> {
    let is_closing = |e: &Entry<F::Addr>| closing(e.state);
    let key = socket_key::<F>(closed.saddr(), closed.sport(), closed.proto());
    if let Some(entry) = F::ct_get_where(key, Seen::Nothing, is_closing) {
        return Some(entry);
    }
    if !ctmap::paired() {
        return None;
    }
    F::ct_get_where(of::<F>(closed, CT_FORWARD), Seen::Nothing, is_closing)
}

/// True if neither direction of a closed flow has seen a packet for
/// `CT_REAP_WAIT`, and the backend's side has closed too (or either side
/// reset the connection).
#[inline(always)]
fn quiet<F: Family>(closed: &ClosedFlow<F::Addr>, forward: &Entry<F::Addr>, now: u32) -> bool {
    let idle = |e: &Entry<F::Addr>| now.wrapping_sub(e.last_seen) >= CT_REAP_WAIT;
    if !idle(forward) {
        return false;
    }
    if forward.is_socket() {
        return closing(forward.reply_state) || forward.state == CT_STATE_RST;
    }
    let reset = forward.state == CT_STATE_RST;
    let open = |reply: &Entry<F::Addr>| !idle(reply) || !(closing(reply.state) || reset);
    F::ct_get_where(
        back::<F>(closed, (forward.addr, forward.port)),
        Seen::Nothing,
        open,
    )
    .is_none()
}

/// The key of the flow's entry for packets coming back from its backend.
#[inline(always)]
fn back<F: Family>(flow: &impl Tuple<F::Addr>, (addr, port): (F::Addr, u16)) -> F::CtKey {
    F::Ct::key(
        addr,
        port,
        flow.saddr(),
        flow.sport(),
        flow.proto(),
        CT_REPLY,
    )
}

/// Removes a flow: its `CT_SOCKET` entry, or its forward and reply
/// entries, and its source NAT entries.
#[inline(always)]
pub fn forget<F: Family>(flow: &impl Tuple<F::Addr>, entry: &Entry<F::Addr>) {
    if entry.is_socket() {
        // Source NAT first: the backend's address is not kept (stack)
        // across the release.
        if entry.flags & CT_SOURCE_NAT != 0 {
            forget_node_port::<F>(flow.proto(), (entry.addr, entry.port), entry.node_port);
        }
        release::<F>(flow, entry);
        F::ct_remove(socket_key::<F>(flow.saddr(), flow.sport(), flow.proto()));
        return;
    }
    release::<F>(flow, entry);
    F::ct_remove(back::<F>(flow, (entry.addr, entry.port)));
    forget_source_nat::<F>(flow, (entry.addr, entry.port));
    F::ct_remove(of::<F>(flow, CT_FORWARD));
}

/// Removes the entry that takes `backend`'s packets to node port
/// `node_port` back to a source-NATed `CT_SOCKET` flow's client, if the
/// flow has a port (not 0).
#[inline(always)]
fn forget_node_port<F: Family>(proto: u8, (addr, port): (F::Addr, u16), node_port: u16) {
    if node_port == 0 {
        return;
    }
    if let Some(node) = CONFIG.get(0).and_then(|c| F::snat_addr(c)) {
        F::ct_remove(F::Ct::key(addr, port, node, node_port, proto, CT_REPLY));
    }
}

/// Removes a pair's source NAT entries towards `backend`, if it has
/// them: the outward entry names the node port the other is keyed by.
#[inline(always)]
fn forget_source_nat<F: Family>(flow: &impl Tuple<F::Addr>, (addr, port): (F::Addr, u16)) {
    let (proto, sport) = (flow.proto(), flow.sport());
    let out = F::Ct::key(flow.saddr(), sport, addr, port, proto, CT_REPLY);
    let Some(node) = F::ct_peek(out) else {
        return;
    };
    if node.flags & CT_OUTWARD == 0 {
        return;
    }
    // Port 0: none picked yet (see `snat`).
    if node.port != 0 {
        F::ct_remove(F::Ct::key(
            addr, port, node.addr, node.port, proto, CT_REPLY,
        ));
    }
    F::ct_remove(out);
}

/// A packet coming back in: what changes, if it belongs to a flow.
#[inline(always)]
pub fn reply<F: Family>(flow: &Flow<F::Addr>) -> Option<Rewrite<F::Addr>> {
    let from_backend = |e: &Entry<F::Addr>| {
        e.flags & CT_AT_EGRESS == 0 && e.addr == flow.saddr && e.port == flow.sport
    };
    if let Some(rewrite) = back_to_client::<F>(flow, from_backend) {
        return Some(rewrite);
    }
    if !ctmap::paired() && !to_node::<F>(flow.daddr) {
        return None;
    }
    let at_ingress = |e: &Entry<F::Addr>| e.flags & CT_EGRESS_ONLY == 0;
    let seen = Seen::Reply(flow.tcp_flags);
    let entry = F::ct_get_where(of::<F>(flow, CT_REPLY), seen, at_ingress)?;
    let side = if entry.flags & CT_REWRITE_DST != 0 {
        Side::Destination
    } else {
        Side::Source
    };
    Some(Rewrite {
        side,
        addr: entry.addr,
        port: entry.port,
    })
}

/// True if source NAT entries may exist and `addr` is the node's source NAT
/// address, where source-NATed flows' replies come back to: other packets
/// never look for their `CT_REWRITE_DST` entries.
#[inline(always)]
fn to_node<F: Family>(addr: F::Addr) -> bool {
    ctmap::source_nat() && CONFIG.get(0).and_then(|c| F::snat_addr(c)) == Some(addr)
}

/// A backend's packet to a client whose `CT_SOCKET` entry `ours` accepts:
/// its source becomes the entry's frontend. None if the frontend is
/// unknown (the agent writes it before its service entry; never seen).
///
/// A reply refreshes the entry's second, and the client's next packet
/// checks its backend's membership only if the service lost a member
/// since that second (`family::entry_backend_stays`): so a reply whose
/// backend left leaves the entry's second alone (its state still follows
/// the packet), and the client's next packet finds out.
#[inline(always)]
fn back_to_client<F: Family>(
    flow: &Flow<F::Addr>,
    ours: impl Fn(&Entry<F::Addr>) -> bool,
) -> Option<Rewrite<F::Addr>> {
    let key = socket_key::<F>(flow.daddr, flow.dport, flow.proto);
    let judge =
        |e: &Entry<F::Addr>| ours(e).then(|| family::entry_backend_stays::<F>(&e.service_id, e));
    let entry = F::ct_get_judged(key, Seen::Reply(flow.tcp_flags), judge)?;
    let (addr, port) = F::rev_nat(entry.service_id)?;
    Some(Rewrite {
        side: Side::Source,
        addr,
        port,
    })
}

/// A packet leaving: the source it gets, if it belongs to a flow. The
/// first packet of a source-NATed flow picks its node port; without one it
/// is dropped (counted), never sent with the client's address.
#[inline(always)]
pub fn egress<F: Family>(flow: &Flow<F::Addr>) -> Verdict<F::Addr> {
    let from_backend = |e: &Entry<F::Addr>| {
        e.flags & CT_AT_EGRESS != 0 && e.addr == flow.saddr && e.port == flow.sport
    };
    if let Some(rewrite) = back_to_client::<F>(flow, from_backend) {
        return Verdict::Rewrite(rewrite);
    }
    let Some((entry, to, holder)) = leaving::<F>(flow) else {
        return Verdict::Pass;
    };
    // No node address (counted): never sent with the client's address.
    let Some(to) = to else {
        return Verdict::Drop;
    };
    let port = match holder {
        Holder::Socket => entry.node_port,
        Holder::Outward => entry.port,
    };
    // One call site: the verifier walks the port search once.
    let port = match port {
        0 => snat::claim::<F>(flow, &entry, to, holder),
        port => Some(port),
    };
    leave_as::<F>(to, port)
}

/// The entry that gives a packet leaving the node its new source, with
/// that source's address (None: the node has none) and where its port is
/// kept: for a client's packet, forwarded to its backend, of a
/// source-NATed `CT_SOCKET` flow, that entry (found by the packet's source:
/// the node's address, the entry's node port, 0 until picked); or a pair's
/// egress entry (its outward entry, the port 0 until picked, or a reply
/// entry whose source becomes the frontend).
#[inline(always)]
fn leaving<F: Family>(flow: &Flow<F::Addr>) -> Option<(Entry<F::Addr>, Option<F::Addr>, Holder)> {
    if ctmap::source_nat() {
        let natted = |e: &Entry<F::Addr>| {
            e.flags & CT_SOURCE_NAT != 0 && e.addr == flow.daddr && e.port == flow.dport
        };
        let key = socket_key::<F>(flow.saddr, flow.sport, flow.proto);
        if let Some(entry) = F::ct_get_where(key, Seen::Nothing, natted) {
            return Some((entry, snat_addr::<F>(), Holder::Socket));
        }
    }
    if !ctmap::paired() {
        return None;
    }
    let at_egress = |e: &Entry<F::Addr>| e.flags & CT_EGRESS_ONLY != 0;
    let key = of::<F>(flow, CT_REPLY);
    let entry = F::ct_get_where(key, Seen::Reply(flow.tcp_flags), at_egress)?;
    Some((entry, Some(entry.addr), Holder::Outward))
}

/// A source-NATed packet leaves from `node` and `port`; without a port it
/// is dropped (counted), never sent with the client's address.
#[inline(always)]
fn leave_as<F: Family>(node: F::Addr, port: Option<u16>) -> Verdict<F::Addr> {
    let Some(port) = port else {
        maps::count(Counter::SnatFailed);
        return Verdict::Drop;
    };
    Verdict::Rewrite(Rewrite {
        side: Side::Source,
        addr: node,
        port,
    })
}

#[inline(always)]
fn entry<A>(
    flow: &Flow<A>,
    (addr, port): (A, u16),
    flags: u16,
    (backend_id, service_id): (u32, u32),
    now: u32,
) -> Entry<A> {
    Entry {
        addr,
        port,
        flags,
        backend_id,
        service_id,
        last_seen: now,
        state: first_state(flow),
        reply_state: CT_STATE_OPEN,
        node_port: 0,
        active: 0,
        direction: 0,
    }
}

/// What every entry of a new flow starts with.
#[derive(Clone, Copy)]
struct NewFlow {
    table: Table,
    /// `CT_*` of its reply-direction entry (or its only one).
    flags: u16,
    /// Backend id, service id.
    ids: (u32, u32),
    now: u32,
}

impl NewFlow {
    /// A flow in `Main` counts as an open connection of its backend; one
    /// in `Overflow` may be evicted without notice, so it does not.
    #[inline(always)]
    fn counted(&self) -> bool {
        self.table == Table::Main
    }

    #[inline(always)]
    fn source_nat(&self) -> bool {
        self.flags & CT_SOURCE_NAT != 0
    }
}

/// Writes the entries of a new flow into `table`, all of them or none:
/// its `CT_SOCKET` entry, or where it cannot have one, a pair.
#[inline(always)]
pub fn remember<F: Family>(
    table: Table,
    flow: &Flow<F::Addr>,
    service: &Service,
    backend_id: u32,
    backend: &Target<F::Addr>,
) -> Result<(), Untracked> {
    // A backend reaching itself would see its own address as the source.
    let hairpin = backend.addr == flow.saddr;
    let source_nat = hairpin || service.flags & SVC_SNAT_EXTERNAL != 0;
    if source_nat && snat_addr::<F>().is_none() {
        return Err(Untracked::NoSourceNat);
    }
    // Unconfirmed until the backend answers (see `CT_UNREPLIED`).
    let mut flags = CT_UNREPLIED;
    if source_nat || service.flags & SVC_REPLY_AT_EGRESS != 0 {
        flags |= CT_AT_EGRESS;
    }
    if source_nat {
        flags |= CT_SOURCE_NAT;
    }
    let new = NewFlow {
        table,
        flags,
        ids: (backend_id, service.id),
        // Only the new-flow programs write new flows, tail-called for a
        // packet whose conntrack lookup (`prior`) ticked this CPU's clock:
        // a read, not a call.
        now: ctmap::now_ticked(),
    };
    let written = match one_entry::<F>(&new, flow, backend) {
        Err(e) if e == -EEXIST => pair::<F>(&new, flow, backend),
        other => other,
    };
    if let Err(e) = written {
        return Err(untracked(e));
    }
    if new.source_nat() {
        // Before the flow's first packet reaches egress, which looks for
        // its node port only while this is up.
        ctmap::mark_source_nat();
    }
    if new.counted() {
        // SAFETY: a field of the array value the closure is given.
        connections(backend_id, |c| unsafe { &raw mut (*c).opened });
    }
    Ok(())
}

/// Writes the flow's `CT_SOCKET` entry. One its client port already has
/// gives way if its flow is over: closing, or towards the same backend
/// (which has one connection per client port: the client reused the port
/// towards another frontend of it). Otherwise `-EEXIST`: the flow needs a
/// pair.
#[inline(always)]
fn one_entry<F: Family>(
    new: &NewFlow,
    flow: &Flow<F::Addr>,
    backend: &Target<F::Addr>,
) -> Result<(), i64> {
    if ctmap::paired() {
        forget_reply::<F>(flow, backend);
    }
    // Made anew for each use below: kept, it would hold stack.
    let key = || socket_key::<F>(flow.saddr, flow.sport, flow.proto);
    let value = Entry {
        active: new.counted() as u32,
        ..entry(
            flow,
            (backend.addr, backend.port),
            new.flags,
            new.ids,
            new.now,
        )
    };
    match F::ct_insert(new.table, key(), value, BPF_NOEXIST as u64) {
        Err(e) if e == -EEXIST => {
            // Only part of the entry is copied, and what its removal needs
            // is read from the map: this path has little stack left.
            if let Some(held) = F::ct_peek(key()) {
                let same_backend = held.addr == backend.addr && held.port == backend.port;
                if !closing(held.state) && !same_backend {
                    return Err(-EEXIST);
                }
                if held.flags & CT_SOURCE_NAT != 0 {
                    forget_node_port::<F>(flow.proto, (held.addr, held.port), held.node_port);
                }
                release_at::<F>(key());
            }
            // Overwrites the held entry. Still `value`: lookups and
            // removals leave the value alone.
            F::ct_insert_staged(new.table, key(), BPF_ANY as u64)
        }
        other => other,
    }
}

/// Writes a source-NATed pair's outward entry, with the node's address and
/// port 0: the egress hook picks the port (see `snat`). The address is
/// read again (`remember` checked it is there): kept from there, it would
/// hold stack across every insert.
#[inline(always)]
fn outward_entry<F: Family>(
    new: &NewFlow,
    flow: &Flow<F::Addr>,
    backend: &Target<F::Addr>,
) -> Result<(), i64> {
    let node = snat_addr::<F>().ok_or(-1i64)?;
    let pending = entry(flow, (node, 0), CT_OUTWARD, new.ids, new.now);
    F::ct_insert(
        new.table,
        outward::<F>(flow, backend),
        pending,
        BPF_ANY as u64,
    )
}

/// Writes a flow's forward and reply entries, and with source NAT its
/// outward entry, all or none: for a flow whose client port another live
/// flow, to another backend, holds (`one_entry` saw it).
#[inline(always)]
fn pair<F: Family>(
    new: &NewFlow,
    flow: &Flow<F::Addr>,
    backend: &Target<F::Addr>,
) -> Result<(), i64> {
    let table = new.table;
    let reply = back::<F>(flow, (backend.addr, backend.port));
    let to_client = entry(flow, (flow.daddr, flow.dport), new.flags, new.ids, new.now);
    // An earlier pair's reply entry under this key is gone already (see
    // `forget_reply`), but for one a racing CPU wrote: this one wins.
    let mut written = F::ct_insert(table, reply, to_client, BPF_ANY as u64);
    if written.is_ok() && new.source_nat() {
        written = outward_entry::<F>(new, flow, backend);
        if written.is_err() {
            F::ct_remove(reply);
        }
    }
    if written.is_ok() {
        let to_backend = Entry {
            active: new.counted() as u32,
            ..entry(flow, (backend.addr, backend.port), 0, new.ids, new.now)
        };
        written = F::ct_insert(table, of::<F>(flow, CT_FORWARD), to_backend, BPF_ANY as u64);
        if written.is_err() {
            // A flow retried in the overflow table must not leave a half
            // in this one.
            F::ct_remove(reply);
            if new.source_nat() {
                F::ct_remove(outward::<F>(flow, backend));
            }
        }
    }
    ctmap::mark_paired();
    written
}

/// Removes the reply entry (and source NAT entries) an earlier pair of
/// the same client port and backend left: that flow is over (the backend
/// has one connection per client port), and its entries would translate
/// this flow's packets. Its forward entry, keyed by its own frontend, is
/// left to expire.
#[inline(always)]
fn forget_reply<F: Family>(flow: &Flow<F::Addr>, backend: &Target<F::Addr>) {
    let reply = back::<F>(flow, (backend.addr, backend.port));
    let Some(flags) = F::ct_flags(reply) else {
        return;
    };
    if flags & CT_SOURCE_NAT != 0 {
        forget_source_nat::<F>(flow, (backend.addr, backend.port));
    }
    F::ct_remove(reply);
}

/// The key of the flow's outward entry: client -> backend, after forwarding.
#[inline(always)]
fn outward<F: Family>(flow: &Flow<F::Addr>, backend: &Target<F::Addr>) -> F::CtKey {
    F::Ct::key(
        flow.saddr,
        flow.sport,
        backend.addr,
        backend.port,
        flow.proto,
        CT_REPLY,
    )
}

/// The node's source NAT address of the family, counted if there is none.
#[inline(always)]
fn snat_addr<F: Family>() -> Option<F::Addr> {
    let node = CONFIG.get(0).and_then(|c| F::snat_addr(c));
    if node.is_none() {
        maps::count(Counter::SnatFailed);
    }
    node
}

#[inline(always)]
fn untracked(error: i64) -> Untracked {
    if error == -E2BIG {
        Untracked::Full
    } else {
        maps::count(Counter::CtInsertFailed);
        Untracked::Failed
    }
}
