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
    CT_EGRESS, CT_FORWARD, CT_REPLY, CT_REWRITE_DST, Counter, IPPROTO_UDP, SNAT_IDLE_DATAGRAM,
    SNAT_IDLE_STREAM, SVC_REPLY_AT_EGRESS, SVC_SNAT_EXTERNAL, Service,
};

use crate::{
    family::{Entry, Family, Target},
    lb::{Rewrite, Side},
    maps::{self, CONFIG},
    parse::Flow,
};

/// Ports tried for one new source-NATed flow before giving up.
const SNAT_TRIES: u32 = 8;

/// Coarse monotonic seconds: what conntrack entries remember of time.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: the helper has no preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
fn of<F: Family>(flow: &Flow<F::Addr>, direction: u8) -> F::CtKey {
    F::ct_key(
        flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, direction,
    )
}

/// The flow's forward entry, if it has one.
#[inline(always)]
pub fn forward<F: Family>(flow: &Flow<F::Addr>) -> Option<Entry<F::Addr>> {
    F::ct_get(of::<F>(flow, CT_FORWARD), true)
}

/// A packet coming back in: what changes, if it belongs to a flow.
#[inline(always)]
pub fn reply<F: Family>(flow: &Flow<F::Addr>) -> Option<Rewrite<F::Addr>> {
    let entry = F::ct_get(of::<F>(flow, CT_REPLY), true)?;
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
    let entry = F::ct_get(of::<F>(flow, CT_EGRESS), true)?;
    Some(Rewrite {
        side: Side::Source,
        addr: entry.addr,
        port: entry.port,
    })
}

#[inline(always)]
fn entry<A>(addr: A, port: u16, flags: u16, backend_id: u32, service_id: u32) -> Entry<A> {
    Entry {
        addr,
        port,
        flags,
        backend_id,
        service_id,
        last_seen: now(),
    }
}

/// Writes the entries of a new flow; a failure is counted, and the packet
/// is still forwarded.
#[inline(always)]
pub fn remember<F: Family>(
    flow: &Flow<F::Addr>,
    service: &Service,
    backend_id: u32,
    backend: &Target<F::Addr>,
) {
    let id = service.id;
    // A backend reaching itself would see its own address as the source.
    let hairpin = backend.addr == flow.saddr;
    let snat = (hairpin || service.flags & SVC_SNAT_EXTERNAL != 0)
        && source_nat::<F>(flow, backend, backend_id, id);
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
    let to_client = entry(flow.daddr, flow.dport, 0, backend_id, id);
    let to_backend = entry(backend.addr, backend.port, 0, backend_id, id);
    forget_stale::<F>(flow, backend, reply_at_egress, snat);
    if !F::ct_insert(reply, to_client, 0) || !F::ct_insert(of::<F>(flow, CT_FORWARD), to_backend, 0)
    {
        maps::count(Counter::CtInsertFailed);
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
    if F::ct_get(key, false).is_some() {
        F::ct_remove(key);
    }
}

/// Picks a free node port for the flow towards `backend` and writes both
/// source NAT entries; false (counted) if there is no address or port.
#[inline(always)]
fn source_nat<F: Family>(
    flow: &Flow<F::Addr>,
    backend: &Target<F::Addr>,
    backend_id: u32,
    service_id: u32,
) -> bool {
    let config = CONFIG.get(0);
    let node = config.and_then(|c| F::snat_addr(c));
    let (Some(config), Some(node)) = (config, node) else {
        maps::count(Counter::SnatFailed);
        return false;
    };
    let (min, max) = (config.snat_port_min, config.snat_port_max);
    if max < min {
        maps::count(Counter::SnatFailed);
        return false;
    }
    let range = (max - min) as u32 + 1;
    // SAFETY: the helper has no preconditions.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..SNAT_TRIES {
        let port = ((min as u32 + start.wrapping_add(i) % range) as u16).to_be();
        let back = F::ct_key(backend.addr, backend.port, node, port, flow.proto, CT_REPLY);
        let to_client = entry(
            flow.saddr,
            flow.sport,
            CT_REWRITE_DST,
            backend_id,
            service_id,
        );
        // Taken ports belong to other flows towards this backend, unless
        // that flow has been idle long enough to be given up.
        if !F::ct_insert(back, to_client, BPF_NOEXIST as u64)
            && !(idle::<F>(back, flow.proto) && F::ct_insert(back, to_client, BPF_ANY as u64))
        {
            continue;
        }
        let out = F::ct_key(
            flow.saddr,
            flow.sport,
            backend.addr,
            backend.port,
            flow.proto,
            CT_EGRESS,
        );
        if !F::ct_insert(out, entry(node, port, 0, backend_id, service_id), 0) {
            F::ct_remove(back);
            break;
        }
        return true;
    }
    maps::count(Counter::SnatFailed);
    false
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
    F::ct_get(key, false).is_some_and(|e| now().wrapping_sub(e.last_seen) > limit)
}
