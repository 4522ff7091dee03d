//! Service lookup, conntrack and backend selection: what to do with a packet.

use aya_ebpf::{cty::c_void, helpers::bpf_loop};
use proxy_common::{
    ALG_LEAST_CONN, ALG_ROUND_ROBIN, ALG_SOURCE_HASH, Chosen, Counter, IPPROTO_TCP,
    LEAST_CONN_SCAN, SCOPE_ALL, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_REPLY_AT_EGRESS,
    SVC_SOURCE_RANGES, Service, SlotKey,
};

use crate::{
    affinity, atomic,
    ct::{self, Untracked},
    ctmap::{Entry, Table},
    family::{self, Family, Target},
    filter,
    hash::{Hashed, Key, OfFlow},
    maps::{self, CONFIG, CONNECTIONS, REAPED, ROUND_ROBIN, SLOTS, lookup},
    parse::{Flow, TCP_RST},
    random::random,
    verdict::{Rewrite, Side, Stage, Verdict},
};

/// What to do with a parsed packet.
#[inline(always)]
pub fn decide<F: Family>(flow: &Flow<F::Addr>, len: u64, stage: Stage) -> Verdict<F::Addr> {
    if stage == Stage::Egress {
        return ct::egress::<F>(flow);
    }
    if filter::may_be_frontend(flow) {
        // An established flow's entry names its service: the frontend's
        // lookup is for the others.
        let prior = ct::prior::<F>(flow);
        // The judge saw it listed: read again, it is so unless the agent
        // unlisted it since, and then the frontend's lookup decides.
        let service = ct::prior_service::<F>(&prior);
        let service = service.or_else(|| F::service(flow.daddr, flow.dport, flow.proto, SCOPE_ALL));
        if let Some(service) = service {
            maps::count_service(service.id, len);
            return to_service::<F>(flow, &service, prior);
        }
    }
    if !filter::may_be_backend(flow) {
        return Verdict::Pass;
    }
    match ct::reply::<F>(flow) {
        Some(rewrite) => Verdict::Rewrite(rewrite),
        None => Verdict::Pass,
    }
}

/// How a backend is picked for a flow without a usable conntrack entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// By the service's algorithm.
    Algorithm,
    /// By the flow's hash: the same backend for every packet of the flow
    /// without any state (a connection met mid-way, a full table).
    Hash,
}

/// A client's packet to a service: to the backend conntrack remembers while
/// it is still a member of the service, otherwise to a newly chosen one.
#[inline(always)]
fn to_service<F: Family>(
    flow: &Flow<F::Addr>,
    service: &Service,
    prior: ct::Prior<ct::CtValue<F>>,
) -> Verdict<F::Addr> {
    let pick = match ct::forward::<F>(flow, service, prior) {
        Some(entry) => match established::<F>(flow, service, &entry) {
            Some(verdict) => return verdict,
            None => Pick::Algorithm,
        },
        // Only a SYN may start a connection anywhere; a packet in the
        // middle of one must go where the hash says, every time.
        None if flow.proto == IPPROTO_TCP && !flow.opens() => Pick::Hash,
        None => Pick::Algorithm,
    };
    // Packets that reach an ingress hook never come from the node itself:
    // one with the node's source NAT address came from outside, and its
    // flow would overwrite the node's own source-NATed flows' entries.
    if from_node::<F>(flow.saddr) {
        maps::count(Counter::SpoofedNodeSource);
        return Verdict::Drop;
    }
    if service.flags & SVC_SOURCE_RANGES != 0 && !F::admits(service.id, flow.saddr) {
        maps::count(Counter::SourceRangeDenied);
        return Verdict::Drop;
    }
    if service.backend_count == 0 {
        return empty(service);
    }
    if pick == Pick::Hash && flow.tcp_flags & TCP_RST != 0 {
        return untracked_rst::<F>(flow, service);
    }
    let affinity = service.flags & SVC_AFFINITY != 0;
    let chosen = match affinity && pick == Pick::Algorithm {
        true => affinity::backend::<F>(service, flow.saddr),
        false => None,
    };
    let hashed = OfFlow::new(flow);
    let Some((id, backend)) = chosen.or_else(|| select::<F, _>(service, &hashed, pick)) else {
        return Verdict::Pass;
    };
    hand_over::<F>(service, id, &backend)
}

/// Leaves the new flow's backend for the new-flow program (`new_flow`),
/// which the caller tail-calls: conntrack's writes are there, so the
/// verifier walks them once, not once for each path through this
/// program (most of its work, and of the agent's start). The verdict
/// says where the packet goes if that program cannot run: to the backend,
/// without state.
#[inline(always)]
fn hand_over<F: Family>(service: &Service, id: u32, backend: &Target<F::Addr>) -> Verdict<F::Addr> {
    let Some(chosen) = F::chosen() else {
        maps::count(Counter::CtInsertFailed);
        return to(backend);
    };
    // SAFETY: this CPU's value, live; written whole.
    unsafe {
        *chosen = Chosen {
            service: *service,
            backend_id: id,
            port: backend.port,
            flags: backend.flags,
            _pad: 0,
            addr: backend.addr,
        }
    };
    Verdict::NewFlow(Rewrite {
        side: Side::Destination,
        addr: backend.addr,
        port: backend.port,
    })
}

/// The new-flow program's half of a new flow (see `hand_over`): writes its
/// conntrack entries, then sends it to its backend.
#[inline(always)]
pub fn start<F: Family>(flow: &Flow<F::Addr>) -> Verdict<F::Addr> {
    let Some(chosen) = F::chosen() else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's value, live, written by the program that called
    // this one for this packet.
    let (service, id) = unsafe { (&(*chosen).service, (*chosen).backend_id) };
    // SAFETY: as above.
    let backend = unsafe {
        Target {
            addr: (*chosen).addr,
            port: (*chosen).port,
            flags: (*chosen).flags,
        }
    };
    match ct::remember::<F>(Table::Main, flow, service, id, &backend) {
        Ok(()) => {
            maps::count_backend_flow(id);
            if service.flags & SVC_AFFINITY != 0 {
                affinity::remember::<F>(service, flow.saddr, id);
            }
            to(&backend)
        }
        Err(Untracked::Full) => {
            maps::count(Counter::CtFull);
            overflow::<F>(flow, service)
        }
        Err(Untracked::Failed) => to(&backend),
        Err(Untracked::NoSourceNat) => Verdict::Drop,
    }
}

/// A RST of no flow conntrack knows: sent where the flow's hash says,
/// without state. A RST creates no flow, and entries for a stream of forged
/// RSTs would only fill the table.
#[inline(always)]
fn untracked_rst<F: Family>(flow: &Flow<F::Addr>, service: &Service) -> Verdict<F::Addr> {
    maps::count(Counter::UntrackedRst);
    match select::<F, _>(service, &OfFlow::new(flow), Pick::Hash) {
        Some((_, backend)) => to(&backend),
        None => Verdict::Pass,
    }
}

/// A new flow that found conntrack full: tracked in the overflow table, and
/// steered by its hash, so that if its entries are evicted its next packets
/// still reach the same backend.
#[inline(always)]
fn overflow<F: Family>(flow: &Flow<F::Addr>, service: &Service) -> Verdict<F::Addr> {
    let Some((id, backend)) = select::<F, _>(service, &OfFlow::new(flow), Pick::Hash) else {
        return Verdict::Pass;
    };
    match ct::remember::<F>(Table::Overflow, flow, service, id, &backend) {
        Ok(()) => maps::count_backend_flow(id),
        Err(Untracked::NoSourceNat) => return Verdict::Drop,
        Err(_) => {}
    }
    to(&backend)
}

/// A packet of a flow conntrack knows: its verdict, or None if the flow
/// must be given a backend anew (its connection closed and a new one
/// reuses the port, or its backend left and it is not TCP); the old flow's
/// entries are gone then.
#[inline(always)]
fn established<F: Family>(
    flow: &Flow<F::Addr>,
    service: &Service,
    entry: &Entry<F::Addr>,
) -> Option<Verdict<F::Addr>> {
    if !family::entry_backend_stays::<F>(&service.id, entry) {
        maps::count(Counter::Reselected);
        if flow.proto == IPPROTO_TCP && !flow.opens() {
            ct::forget::<F>(flow, entry);
            // A RST is never answered with one (RFC 9293): the client is
            // closing the connection anyway.
            return Some(match flow.tcp_flags & TCP_RST {
                0 if service.flags & SVC_REPLY_AT_EGRESS != 0 => Verdict::ResetToSender,
                0 => Verdict::Reset,
                _ => Verdict::Drop,
            });
        }
        ct::forget::<F>(flow, entry);
        return None;
    }
    // A new connection on a closed one's port takes over: the old flow's
    // entries go now, or its reply entry (keyed by its own backend) would
    // stay behind until garbage collection, which needs the agent.
    if flow.opens() && ct::closing(entry.state) {
        ct::forget::<F>(flow, entry);
        return None;
    }
    if service.flags & SVC_AFFINITY != 0 {
        affinity::touch::<F>(service, flow.saddr, entry.backend_id);
    }
    // The member's address and port are the entry's (checked above).
    Some(to(&Target {
        addr: entry.addr,
        port: entry.port,
        flags: 0,
    }))
}

/// True if `addr` is the node's source NAT address of its family.
#[inline(always)]
fn from_node<F: Family>(addr: F::Addr) -> bool {
    CONFIG
        .get(0)
        .and_then(|c| F::snat_addr(c))
        .is_some_and(|node| node == addr)
}

#[inline(always)]
fn to<A: Copy>(backend: &Target<A>) -> Verdict<A> {
    Verdict::Rewrite(Rewrite {
        side: Side::Destination,
        addr: backend.addr,
        port: backend.port,
    })
}

/// No backend: refused, unless the service asks for a silent drop.
#[inline(always)]
fn empty<A>(service: &Service) -> Verdict<A> {
    if service.flags & SVC_DROP_WHEN_EMPTY != 0 {
        maps::count(Counter::NoLocalBackend);
        return Verdict::Drop;
    }
    maps::count(Counter::NoBackend);
    match service.flags & SVC_REPLY_AT_EGRESS {
        0 => Verdict::Reject,
        _ => Verdict::RejectToSender,
    }
}

/// A backend for a new flow, from the service's slots.
#[inline(always)]
pub fn select<F: Family, H: Hashed>(
    service: &Service,
    hashed: &H,
    pick: Pick,
) -> Option<(u32, Target<F::Addr>)> {
    // Callers check it first; the new-flow program's own copy of the
    // service does not show that to the compiler.
    if service.backend_count == 0 {
        return None;
    }
    let slot = if service.table_size != 0 {
        // Maglev and source hash: slots hold the lookup table, and every
        // node must pick alike.
        let key = keys().1;
        let h = match service.algorithm {
            ALG_SOURCE_HASH => hashed.source(key),
            _ => hashed.five_tuple(key),
        };
        h % service.table_size
    } else if pick == Pick::Hash {
        hashed.five_tuple(keys().0) % service.backend_count
    } else {
        match service.algorithm {
            ALG_ROUND_ROBIN => next_turn(service.id) % service.backend_count,
            ALG_LEAST_CONN => return least_connections::<F>(service),
            _ => random() % service.backend_count,
        }
    };
    slot_backend::<F>(service.slots_id, slot)
}

/// The node's hash key and the cluster's (see `NodeConfig`).
#[inline(always)]
fn keys() -> (Key, Key) {
    CONFIG
        .get(0)
        .map_or(([0; 2], [0; 2]), |c| (c.node_key, c.cluster_key))
}

/// The service's round-robin counter, advanced atomically: CPUs share it.
#[inline(always)]
fn next_turn(service_id: u32) -> u32 {
    match ROUND_ROBIN.get_ptr_mut(service_id) {
        // SAFETY: a live array value, 32-bit aligned.
        Some(turn) => unsafe { atomic::fetch_add(turn, 1) },
        None => random(),
    }
}

/// The backend with the fewest open connections among up to
/// `LEAST_CONN_SCAN` slots from a random one (the random start spreads ties).
#[inline(always)]
fn least_connections<F: Family>(service: &Service) -> Option<(u32, Target<F::Addr>)> {
    let count = service.backend_count;
    let mut scan = Scan {
        slot: SlotKey {
            service_id: service.slots_id,
            slot: 0,
        },
        backend_id: 0,
        count,
        start: random() % count,
        best: 0,
        fewest: u32::MAX,
    };
    // bpf_loop: the verifier checks the body once, not once per turn.
    // SAFETY: the callback and its context match what it expects.
    unsafe {
        bpf_loop(
            count.min(LEAST_CONN_SCAN),
            scan_slot as *mut c_void,
            (&raw mut scan).cast(),
            0,
        )
    };
    if scan.fewest == u32::MAX {
        maps::count(Counter::BackendMissing);
        return None;
    }
    F::backend(scan.best).map(|b| (scan.best, b))
}

/// State of a least-connections scan. The keys of the callback's lookups
/// live here, in the caller's frame: the callback then needs no stack of
/// its own, and BPF's 512 bytes are for the whole chain of frames.
#[repr(C)]
struct Scan {
    /// The service's slot table, and the slot looked at.
    slot: SlotKey,
    /// The backend looked at.
    backend_id: u32,
    count: u32,
    start: u32,
    best: u32,
    fewest: u32,
}

/// One turn of the scan: the `i`th slot from the start.
extern "C" fn scan_slot(i: u64, scan: *mut Scan) -> i64 {
    // SAFETY: bpf_loop passes the context it was given.
    let scan = unsafe { &mut *scan };
    let mut slot = scan.start.wrapping_add(i as u32);
    if slot >= scan.count {
        slot -= scan.count;
    }
    scan.slot.slot = slot;
    // SAFETY: the key is the map's key type.
    let Some(id) = (unsafe { lookup::<u32>((&raw const SLOTS).cast(), &raw const scan.slot) })
    else {
        return 0;
    };
    // SAFETY: a copy out of a live map value.
    scan.backend_id = unsafe { *id };
    let open = open_connections(scan);
    if open < scan.fewest {
        scan.fewest = open;
        scan.best = scan.backend_id;
    }
    0
}

/// The scanned backend's open connections: opened - closed - reaped (see
/// `proxy_common::Connections`), in wrapping arithmetic.
#[inline(always)]
fn open_connections(scan: &Scan) -> u32 {
    let id = &raw const scan.backend_id;
    // SAFETY: both arrays are keyed by backend id.
    let Some(c) =
        (unsafe { lookup::<proxy_common::Connections>((&raw const CONNECTIONS).cast(), id) })
    else {
        return u32::MAX;
    };
    // SAFETY: a copy out of a live array value; a torn read only skews one
    // choice.
    let c = unsafe { *c };
    // SAFETY: as above.
    let reaped =
        unsafe { lookup::<u32>((&raw const REAPED).cast(), id) }.map_or(0, |r| unsafe { *r });
    // Read apart from each other, the counts can disagree for a moment; a
    // negative difference means none open, not four billion.
    (c.opened.wrapping_sub(c.closed).wrapping_sub(reaped) as i32).max(0) as u32
}

#[inline(always)]
fn slot_backend<F: Family>(slots_id: u32, slot: u32) -> Option<(u32, Target<F::Addr>)> {
    let slot_key = SlotKey {
        service_id: slots_id,
        slot,
    };
    let Some(id) = SLOTS.get_ptr(slot_key) else {
        maps::count(Counter::BackendMissing);
        return None;
    };
    // SAFETY: a copy out of a live map value.
    let id = unsafe { *id };
    let Some(backend) = F::backend(id) else {
        maps::count(Counter::BackendMissing);
        return None;
    };
    Some((id, backend))
}
