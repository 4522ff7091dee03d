//! Conntrack: the entries that keep a flow's translation in both
//! directions, including source NAT.
//!
//! A flow to a frontend F from client C, sent to backend B, has:
//! - FORWARD (C -> F) at ingress: destination becomes B;
//! - the reply (B -> C): source becomes F, at ingress (REPLY) for cluster
//!   IPs, at egress (EGRESS) for frontends that may be the node's own
//!   addresses and for source-NATed flows.
//! With source NAT to node address N and port p, also:
//! - EGRESS (C -> B): source becomes N:p, after the node forwarded it;
//! - REPLY (B -> N:p) with CT_REWRITE_DST: destination becomes C again.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use proxy_common::{
    CT_EGRESS, CT_FORWARD, CT_REPLY, CT_REWRITE_DST, CT_STATE_ESTABLISHED, CT_STATE_FIN,
    CT_STATE_OPEN, CT_STATE_RST, CT_STATE_SYN, CT_UNREPLIED, Counter, IPPROTO_TCP, IPPROTO_UDP,
    SNAT_IDLE_DATAGRAM, SNAT_IDLE_STREAM, SVC_REPLY_AT_EGRESS, SVC_SNAT_EXTERNAL, Service,
};

use crate::{
    atomic,
    family::{Entry, Family, Table, Target},
    lb::{Rewrite, Side},
    maps::{self, CONFIG, CONNECTIONS},
    parse::{Flow, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The kernel's answer to an insert into a full hash map.
const E2BIG: i64 = 7;

/// Why a new flow has no conntrack entries.
pub enum Untracked {
    /// The table is full: the flow must be steered without state.
    Full,
    /// Another error (counted).
    Failed,
}

/// Ports tried for one new source-NATed flow before giving up.
const SNAT_TRIES: u32 = 8;

/// Coarse monotonic seconds: what conntrack entries remember of time.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: the helper has no preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// A direction's TCP state after a packet with `tcp_flags`. FIN and RST
/// stay: a new SYN on such an entry is a new connection, which the caller
/// sees and handles.
#[inline(always)]
pub fn next_state(state: u8, proto: u8, tcp_flags: u8) -> u8 {
    if proto != IPPROTO_TCP {
        CT_STATE_OPEN
    } else if tcp_flags & TCP_RST != 0 {
        CT_STATE_RST
    } else if tcp_flags & TCP_FIN != 0 || state == CT_STATE_FIN || state == CT_STATE_RST {
        state.max(CT_STATE_FIN)
    } else if tcp_flags & TCP_SYN != 0 {
        state
    } else {
        CT_STATE_ESTABLISHED
    }
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
/// connections), once, whichever CPU gets here first.
#[inline(always)]
pub fn release<F: Family>(flow: &Flow<F::Addr>, entry: &Entry<F::Addr>) {
    if entry.active == 0 {
        return;
    }
    let Some(active) = F::ct_active(of::<F>(flow, CT_FORWARD)) else {
        return;
    };
    // SAFETY: a field of a live map value, 32-bit aligned.
    if unsafe { atomic::swap(active, 0) } != 0 {
        // SAFETY: a field of the array value the closure is given.
        connections(entry.backend_id, |c| unsafe { &raw mut (*c).closed });
    }
}

/// Adds one to a backend's `lb_conns` field, atomically (all CPUs share it).
#[inline(always)]
fn connections(backend_id: u32, field: impl Fn(*mut proxy_common::Connections) -> *mut u32) {
    if let Some(c) = CONNECTIONS.get_ptr_mut(backend_id) {
        // SAFETY: a field of a live array value, 32-bit aligned.
        unsafe { atomic::fetch_add(field(c), 1) };
    }
}

#[inline(always)]
fn of<F: Family>(flow: &Flow<F::Addr>, direction: u8) -> F::CtKey {
    F::ct_key(
        flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, direction,
    )
}

/// The flow's forward entry, if it has one, with this packet taken in. A
/// connection the client began closing stops counting as open.
#[inline(always)]
pub fn forward<F: Family>(flow: &Flow<F::Addr>) -> Option<Entry<F::Addr>> {
    let entry = F::ct_get(of::<F>(flow, CT_FORWARD), Some(flow.tcp_flags))?;
    if closing(entry.state) {
        release::<F>(flow, &entry);
    }
    Some(entry)
}

/// Removes a flow whose backend is gone: its forward entry and the reply
/// entry of whichever stage it has.
#[inline(always)]
pub fn forget<F: Family>(flow: &Flow<F::Addr>, entry: &Entry<F::Addr>) {
    release::<F>(flow, entry);
    for direction in [CT_REPLY, CT_EGRESS] {
        F::ct_remove(F::ct_key(
            entry.addr, entry.port, flow.saddr, flow.sport, flow.proto, direction,
        ));
    }
    forget_source_nat::<F>(flow, (entry.addr, entry.port));
    F::ct_remove(of::<F>(flow, CT_FORWARD));
}

/// Removes the flow's source NAT entries towards `backend`, if it has
/// them: the egress entry names the node port the reply entry is keyed by.
#[inline(always)]
fn forget_source_nat<F: Family>(flow: &Flow<F::Addr>, (addr, port): (F::Addr, u16)) {
    let out = F::ct_key(flow.saddr, flow.sport, addr, port, flow.proto, CT_EGRESS);
    if let Some(node) = F::ct_get(out, None) {
        F::ct_remove(F::ct_key(
            addr, port, node.addr, node.port, flow.proto, CT_REPLY,
        ));
        F::ct_remove(out);
    }
}

/// A packet coming back in: what changes, if it belongs to a flow.
#[inline(always)]
pub fn reply<F: Family>(flow: &Flow<F::Addr>) -> Option<Rewrite<F::Addr>> {
    let entry = F::ct_get(of::<F>(flow, CT_REPLY), Some(flow.tcp_flags))?;
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

/// A packet leaving: the source it gets, if it belongs to a flow.
#[inline(always)]
pub fn egress<F: Family>(flow: &Flow<F::Addr>) -> Option<Rewrite<F::Addr>> {
    let entry = F::ct_get(of::<F>(flow, CT_EGRESS), Some(flow.tcp_flags))?;
    Some(Rewrite {
        side: Side::Source,
        addr: entry.addr,
        port: entry.port,
    })
}

#[inline(always)]
fn entry<A>(
    flow: &Flow<A>,
    (addr, port): (A, u16),
    flags: u16,
    backend_id: u32,
    service_id: u32,
) -> Entry<A> {
    Entry {
        addr,
        port,
        flags,
        backend_id,
        service_id,
        last_seen: now(),
        state: first_state(flow),
        active: 0,
    }
}

/// Writes the entries of a new flow into `table`. A flow in `Main` counts
/// as an open connection of its backend; one in `Overflow` may be evicted
/// without notice, so it does not.
#[inline(always)]
pub fn remember<F: Family>(
    table: Table,
    flow: &Flow<F::Addr>,
    service: &Service,
    backend_id: u32,
    backend: &Target<F::Addr>,
) -> Result<(), Untracked> {
    let id = service.id;
    // A backend reaching itself would see its own address as the source.
    let hairpin = backend.addr == flow.saddr;
    let snat = (hairpin || service.flags & SVC_SNAT_EXTERNAL != 0)
        && source_nat::<F>(table, flow, backend, backend_id, id)?;
    let reply_at_egress = snat || service.flags & SVC_REPLY_AT_EGRESS != 0;
    let direction = if reply_at_egress { CT_EGRESS } else { CT_REPLY };
    let reply = F::ct_key(
        backend.addr,
        backend.port,
        flow.saddr,
        flow.sport,
        flow.proto,
        direction,
    );
    // Unconfirmed until the backend answers (see `CT_UNREPLIED`).
    let to_client = entry(flow, (flow.daddr, flow.dport), CT_UNREPLIED, backend_id, id);
    let counted = table == Table::Main;
    let to_backend = Entry {
        active: counted as u32,
        ..entry(flow, (backend.addr, backend.port), 0, backend_id, id)
    };
    forget_stale::<F>(flow, backend, reply_at_egress, snat);
    let mut written = F::ct_insert(table, reply, to_client, 0);
    if written.is_ok() {
        written = F::ct_insert(table, of::<F>(flow, CT_FORWARD), to_backend, 0);
        if written.is_err() {
            F::ct_remove(reply);
        }
    }
    if let Err(e) = written {
        // All of the flow's entries or none: a flow retried in the overflow
        // table must not leave a half in this one.
        if snat {
            forget_source_nat::<F>(flow, (backend.addr, backend.port));
        }
        return Err(untracked(e));
    }
    if counted {
        // SAFETY: a field of the array value the closure is given.
        connections(backend_id, |c| unsafe { &raw mut (*c).opened });
    }
    Ok(())
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

/// Removes what an earlier flow between the same client port and backend
/// left under the keys this flow does not write (the client may reuse its
/// port towards another frontend of the same backend): its reply entry of
/// the other stage would rewrite this flow's replies, its source NAT entry
/// this flow's packets.
#[inline(always)]
fn forget_stale<F: Family>(
    flow: &Flow<F::Addr>,
    backend: &Target<F::Addr>,
    reply_at_egress: bool,
    snat: bool,
) {
    let other = if reply_at_egress { CT_REPLY } else { CT_EGRESS };
    remove_if_there::<F>(F::ct_key(
        backend.addr,
        backend.port,
        flow.saddr,
        flow.sport,
        flow.proto,
        other,
    ));
    if !snat {
        remove_if_there::<F>(F::ct_key(
            flow.saddr,
            flow.sport,
            backend.addr,
            backend.port,
            flow.proto,
            CT_EGRESS,
        ));
    }
}

/// A lookup is lock-free and cheap; a delete of an absent key is not.
#[inline(always)]
fn remove_if_there<F: Family>(key: F::CtKey) {
    if F::ct_get(key, None).is_some() {
        F::ct_remove(key);
    }
}

/// Picks a free node port for the flow towards `backend` and writes both
/// source NAT entries into `table`; false (counted) if there is no address
/// or port, `Full` if the table is.
#[inline(always)]
fn source_nat<F: Family>(
    table: Table,
    flow: &Flow<F::Addr>,
    backend: &Target<F::Addr>,
    backend_id: u32,
    service_id: u32,
) -> Result<bool, Untracked> {
    let config = CONFIG.get(0);
    let node = config.and_then(|c| F::snat_addr(c));
    let (Some(config), Some(node)) = (config, node) else {
        maps::count(Counter::SnatFailed);
        return Ok(false);
    };
    let (min, max) = (config.snat_port_min, config.snat_port_max);
    if max < min {
        maps::count(Counter::SnatFailed);
        return Ok(false);
    }
    let range = (max - min) as u32 + 1;
    // SAFETY: the helper has no preconditions.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..SNAT_TRIES {
        let port = ((min as u32 + start.wrapping_add(i) % range) as u16).to_be();
        let back = F::ct_key(backend.addr, backend.port, node, port, flow.proto, CT_REPLY);
        let to_client = entry(
            flow,
            (flow.saddr, flow.sport),
            CT_REWRITE_DST | CT_UNREPLIED,
            backend_id,
            service_id,
        );
        // Taken ports belong to other flows towards this backend, unless
        // that flow has been idle long enough to be given up.
        match F::ct_insert(table, back, to_client, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == -E2BIG => return Err(Untracked::Full),
            Err(_) if idle::<F>(back, flow.proto) => {
                if F::ct_insert(table, back, to_client, BPF_ANY as u64).is_err() {
                    continue;
                }
            }
            Err(_) => continue,
        }
        let out = F::ct_key(
            flow.saddr,
            flow.sport,
            backend.addr,
            backend.port,
            flow.proto,
            CT_EGRESS,
        );
        let to_node = entry(flow, (node, port), 0, backend_id, service_id);
        if let Err(e) = F::ct_insert(table, out, to_node, 0) {
            F::ct_remove(back);
            if e == -E2BIG {
                return Err(Untracked::Full);
            }
            break;
        }
        return Ok(true);
    }
    maps::count(Counter::SnatFailed);
    Ok(false)
}

/// True if the entry at `key` has seen no packet for the protocol's source
/// NAT idle time.
#[inline(always)]
fn idle<F: Family>(key: F::CtKey, proto: u8) -> bool {
    let limit = if proto == IPPROTO_UDP {
        SNAT_IDLE_DATAGRAM
    } else {
        SNAT_IDLE_STREAM
    };
    F::ct_get(key, None).is_some_and(|e| now().wrapping_sub(e.last_seen) > limit)
}
