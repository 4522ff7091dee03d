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

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use proxy_common::{
    Backend4, CT_EGRESS, CT_FORWARD, CT_REPLY, CT_REWRITE_DST, Counter, Ct4Entry, Ct4Key,
    SVC_REPLY_AT_EGRESS, SVC_SNAT_EXTERNAL, Service,
};

use crate::{
    lb::{Rewrite, Side},
    maps::{self, CONFIG, CONNTRACK4},
    parse::Flow,
};

/// Ports tried for one new source-NATed flow before giving up.
const SNAT_TRIES: u32 = 8;

#[inline(always)]
fn key(src: u32, sport: u16, dst: u32, dport: u16, proto: u8, direction: u8) -> Ct4Key {
    Ct4Key {
        src_addr: src,
        dst_addr: dst,
        src_port: sport,
        dst_port: dport,
        proto,
        direction,
        _pad: 0,
    }
}

#[inline(always)]
fn of(flow: &Flow, direction: u8) -> Ct4Key {
    key(
        flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, direction,
    )
}

/// The flow's forward entry, if it has one.
#[inline(always)]
pub fn forward(flow: &Flow) -> Option<Ct4Entry> {
    // SAFETY: a copy out of a live map value.
    CONNTRACK4
        .get_ptr(of(flow, CT_FORWARD))
        .map(|e| unsafe { *e })
}

/// A packet coming back in: what changes, if it belongs to a flow.
#[inline(always)]
pub fn reply(flow: &Flow) -> Option<Rewrite> {
    let entry = CONNTRACK4.get_ptr(of(flow, CT_REPLY))?;
    // SAFETY: a copy out of a live map value.
    let entry = unsafe { *entry };
    let side = if entry.flags & CT_REWRITE_DST != 0 {
        Side::Destination
    } else {
        Side::Source
    };
    Some(Rewrite {
        side,
        addr: entry.nat_addr,
        port: entry.nat_port,
    })
}

/// A packet leaving: the source it gets, if it belongs to a flow.
#[inline(always)]
pub fn egress(flow: &Flow) -> Option<Rewrite> {
    let entry = CONNTRACK4.get_ptr(of(flow, CT_EGRESS))?;
    // SAFETY: a copy out of a live map value.
    let entry = unsafe { *entry };
    Some(Rewrite {
        side: Side::Source,
        addr: entry.nat_addr,
        port: entry.nat_port,
    })
}

#[inline(always)]
fn entry(addr: u32, port: u16, flags: u16, backend_id: u32, service_id: u32) -> Ct4Entry {
    Ct4Entry {
        nat_addr: addr,
        nat_port: port,
        flags,
        backend_id,
        service_id,
    }
}

/// Writes the entries of a new flow; a failure is counted, and the packet
/// is still forwarded.
#[inline(always)]
pub fn remember(flow: &Flow, service: &Service, backend_id: u32, backend: &Backend4) {
    let id = service.id;
    // A backend reaching itself would see its own address as the source.
    let hairpin = backend.addr == flow.saddr;
    let snat = (hairpin || service.flags & SVC_SNAT_EXTERNAL != 0)
        && source_nat(flow, backend, backend_id, id);
    let reply_at_egress = snat || service.flags & SVC_REPLY_AT_EGRESS != 0;
    let direction = if reply_at_egress { CT_EGRESS } else { CT_REPLY };
    let reply = key(
        backend.addr,
        backend.port,
        flow.saddr,
        flow.sport,
        flow.proto,
        direction,
    );
    let to_client = entry(flow.daddr, flow.dport, 0, backend_id, id);
    let to_backend = entry(backend.addr, backend.port, 0, backend_id, id);
    if CONNTRACK4.insert(reply, to_client, 0).is_err()
        || CONNTRACK4
            .insert(of(flow, CT_FORWARD), to_backend, 0)
            .is_err()
    {
        maps::count(Counter::CtInsertFailed);
    }
}

/// Picks a free node port for the flow towards `backend` and writes both
/// source NAT entries; false (counted) if there is no address or port.
#[inline(always)]
fn source_nat(flow: &Flow, backend: &Backend4, backend_id: u32, service_id: u32) -> bool {
    let Some(config) = CONFIG.get(0) else {
        maps::count(Counter::SnatFailed);
        return false;
    };
    let (node, min, max) = (
        config.snat_addr4,
        config.snat_port_min,
        config.snat_port_max,
    );
    if node == 0 || max < min {
        maps::count(Counter::SnatFailed);
        return false;
    }
    let range = (max - min) as u32 + 1;
    // SAFETY: the helper has no preconditions.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..SNAT_TRIES {
        let port = (min as u32 + start.wrapping_add(i) % range) as u16;
        let back = key(
            backend.addr,
            backend.port,
            node,
            port.to_be(),
            flow.proto,
            CT_REPLY,
        );
        let to_client = entry(
            flow.saddr,
            flow.sport,
            CT_REWRITE_DST,
            backend_id,
            service_id,
        );
        // Taken ports belong to other flows towards this backend.
        if CONNTRACK4
            .insert(back, to_client, BPF_NOEXIST as u64)
            .is_err()
        {
            continue;
        }
        let out = key(
            flow.saddr,
            flow.sport,
            backend.addr,
            backend.port,
            flow.proto,
            CT_EGRESS,
        );
        let as_node = entry(node, port.to_be(), 0, backend_id, service_id);
        if CONNTRACK4.insert(out, as_node, 0).is_err() {
            let _ = CONNTRACK4.remove(back);
            break;
        }
        return true;
    }
    maps::count(Counter::SnatFailed);
    false
}
