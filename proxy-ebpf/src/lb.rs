//! Service lookup, conntrack and backend selection: what to do with a packet.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    Backend4, Counter, Frontend4, MemberKey, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_SOURCE_RANGES,
    Service, SlotKey,
};

use crate::{
    affinity, ct,
    maps::{self, BACKENDS4, MEMBERS, SERVICES4, SLOTS},
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
    let rewrite = match stage {
        Stage::Egress => ct::egress(flow),
        Stage::Ingress => {
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
            ct::reply(flow)
        }
    };
    match rewrite {
        Some(rewrite) => Verdict::Rewrite(rewrite),
        None => Verdict::Pass,
    }
}

/// A client's packet to a service: to the backend conntrack remembers while
/// it is still a member of the service, otherwise to a newly chosen one.
#[inline(always)]
fn to_service(flow: &Flow, service: &Service) -> Verdict {
    if let Some(entry) = ct::forward(flow) {
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
    ct::remember(flow, service, id, &backend);
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
