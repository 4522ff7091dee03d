//! Service lookup, conntrack and backend selection: what to do with a packet.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    Backend4, CT_AT_EGRESS, CT_FORWARD, CT_REPLY, Counter, Ct4Entry, Ct4Key, Frontend4, MemberKey,
    SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_REPLY_AT_EGRESS, SVC_SOURCE_RANGES, Service, SlotKey,
};

use crate::{
    affinity,
    maps::{self, BACKENDS4, CONNTRACK4, MEMBERS, SERVICES4, SLOTS},
    parse::Flow,
};

/// Which end of the packet changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client to service: the destination becomes the backend.
    Destination,
    /// Backend to client: the source becomes the service again.
    Source,
}

/// Where a program runs: ingress hooks translate towards backends and most
/// replies; the egress hook only the replies left for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingress,
    Egress,
}

pub struct Rewrite {
    pub side: Side,
    pub addr: u32,
    pub port: u16,
}

pub enum Verdict {
    /// Not ours, or nothing to change: untouched.
    Pass,
    Rewrite(Rewrite),
    /// A service's packet it must not serve (source outside its ranges, no
    /// local endpoint under externalTrafficPolicy: Local).
    Drop,
    /// A service without endpoints: refuse, as kube-proxy's REJECT does.
    Reject,
}

/// What to do with a parsed packet.
#[inline(always)]
pub fn decide(flow: &Flow, len: u64, stage: Stage) -> Verdict {
    if stage == Stage::Ingress {
        let frontend = Frontend4 {
            addr: flow.daddr,
            port: flow.dport,
            proto: flow.proto,
            _pad: 0,
        };
        if let Some(service) = SERVICES4.get_ptr(frontend) {
            // SAFETY: a copy out of a live map value.
            let service = unsafe { *service };
            maps::count_service(service.id, len);
            return to_service(flow, &service);
        }
    }
    match reply(flow, stage) {
        Some(rewrite) => Verdict::Rewrite(rewrite),
        None => Verdict::Pass,
    }
}

/// A backend's reply, translated back to the frontend at the stage its
/// conntrack entry asks for.
#[inline(always)]
fn reply(flow: &Flow, stage: Stage) -> Option<Rewrite> {
    let reply = key(
        flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, CT_REPLY,
    );
    let entry = CONNTRACK4.get_ptr(reply)?;
    // SAFETY: a copy out of a live map value.
    let entry = unsafe { *entry };
    let at_egress = entry.flags & CT_AT_EGRESS != 0;
    if at_egress != (stage == Stage::Egress) {
        return None;
    }
    Some(Rewrite {
        side: Side::Source,
        addr: entry.nat_addr,
        port: entry.nat_port,
    })
}

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

/// A client's packet to a service: to the backend conntrack remembers while
/// it is still a member of the service, otherwise to a newly chosen one.
#[inline(always)]
fn to_service(flow: &Flow, service: &Service) -> Verdict {
    let forward = key(
        flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, CT_FORWARD,
    );
    if let Some(entry) = CONNTRACK4.get_ptr(forward) {
        // SAFETY: a copy out of a live map value.
        let entry = unsafe { *entry };
        if let Some(backend) = member(service.id, entry.backend_id)
            && backend.addr == entry.nat_addr
            && backend.port == entry.nat_port
        {
            if service.flags & SVC_AFFINITY != 0 {
                affinity::touch(service, flow.saddr, entry.backend_id);
            }
            return to(&backend);
        }
        maps::count(Counter::Reselected);
    }
    if service.flags & SVC_SOURCE_RANGES != 0 && !crate::ranges::admits(service.id, flow.saddr) {
        maps::count(Counter::SourceRangeDenied);
        return Verdict::Drop;
    }
    if service.backend_count == 0 {
        return empty(service);
    }
    let chosen = if service.flags & SVC_AFFINITY != 0 {
        affinity::backend(service, flow.saddr).or_else(|| select(service))
    } else {
        select(service)
    };
    let Some((id, backend)) = chosen else {
        return Verdict::Pass;
    };
    if service.flags & SVC_AFFINITY != 0 {
        affinity::remember(service, flow.saddr, id);
    }
    remember(flow, forward, service, id, &backend);
    to(&backend)
}

#[inline(always)]
fn to(backend: &Backend4) -> Verdict {
    Verdict::Rewrite(Rewrite {
        side: Side::Destination,
        addr: backend.addr,
        port: backend.port,
    })
}

/// No backend: refused, unless the service asks for a silent drop.
#[inline(always)]
fn empty(service: &Service) -> Verdict {
    if service.flags & SVC_DROP_WHEN_EMPTY != 0 {
        maps::count(Counter::NoLocalBackend);
        return Verdict::Drop;
    }
    maps::count(Counter::NoBackend);
    Verdict::Reject
}

/// The backend `backend_id` as a member of service `service_id`.
#[inline(always)]
pub fn member(service_id: u32, backend_id: u32) -> Option<Backend4> {
    let key = MemberKey {
        service_id,
        backend_id,
    };
    // SAFETY: a copy out of a live map value.
    MEMBERS.get_ptr(key).map(|b| unsafe { *b })
}

#[inline(always)]
fn select(service: &Service) -> Option<(u32, Backend4)> {
    // SAFETY: the helper has no preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let slot_key = SlotKey {
        service_id: service.id,
        slot,
    };
    let Some(id) = SLOTS.get_ptr(slot_key) else {
        maps::count(Counter::BackendMissing);
        return None;
    };
    // SAFETY: copies out of live map values.
    let id = unsafe { *id };
    let Some(backend) = BACKENDS4.get_ptr(id) else {
        maps::count(Counter::BackendMissing);
        return None;
    };
    Some((id, unsafe { *backend }))
}

/// Writes both directions of a new flow; a failure is counted, and the packet
/// is still forwarded.
#[inline(always)]
fn remember(flow: &Flow, forward: Ct4Key, service: &Service, backend_id: u32, backend: &Backend4) {
    let service_id = service.id;
    let to_backend = Ct4Entry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        backend_id,
        service_id,
    };
    let reply = key(
        backend.addr,
        backend.port,
        flow.saddr,
        flow.sport,
        flow.proto,
        CT_REPLY,
    );
    let to_client = Ct4Entry {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        flags: if service.flags & SVC_REPLY_AT_EGRESS != 0 {
            CT_AT_EGRESS
        } else {
            0
        },
        backend_id,
        service_id,
    };
    if CONNTRACK4.insert(reply, to_client, 0).is_err()
        || CONNTRACK4.insert(forward, to_backend, 0).is_err()
    {
        maps::count(Counter::CtInsertFailed);
    }
}
