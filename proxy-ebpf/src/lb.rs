//! Service lookup, conntrack and backend selection: what to do with a packet.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    Counter, MemberKey, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_SOURCE_RANGES, Service, SlotKey,
};

use crate::{
    affinity, ct,
    family::{Family, Target},
    maps::{self, SLOTS},
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
/// replies; the egress hook only the source rewrites left for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingress,
    Egress,
}

pub struct Rewrite<A> {
    pub side: Side,
    pub addr: A,
    pub port: u16,
}

pub enum Verdict<A> {
    /// Not ours, or nothing to change: untouched.
    Pass,
    Rewrite(Rewrite<A>),
    /// A service's packet it must not serve (source outside its ranges, no
    /// local endpoint under externalTrafficPolicy: Local).
    Drop,
    /// A service without endpoints: refuse, as kube-proxy's REJECT does.
    Reject,
}

/// What to do with a parsed packet.
#[inline(always)]
pub fn decide<F: Family>(flow: &Flow<F::Addr>, len: u64, stage: Stage) -> Verdict<F::Addr> {
    let rewrite = match stage {
        Stage::Egress => ct::egress::<F>(flow),
        Stage::Ingress => {
            if let Some(service) = F::service(flow.daddr, flow.dport, flow.proto) {
                maps::count_service(service.id, len);
                return to_service::<F>(flow, &service);
            }
            ct::reply::<F>(flow)
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
fn to_service<F: Family>(flow: &Flow<F::Addr>, service: &Service) -> Verdict<F::Addr> {
    if let Some(entry) = ct::forward::<F>(flow) {
        if let Some(backend) = member::<F>(service.id, entry.backend_id)
            && backend.addr == entry.addr
            && backend.port == entry.port
        {
            if service.flags & SVC_AFFINITY != 0 {
                affinity::touch::<F>(service, flow.saddr, entry.backend_id);
            }
            return to(&backend);
        }
        maps::count(Counter::Reselected);
    }
    if service.flags & SVC_SOURCE_RANGES != 0 && !F::admits(service.id, flow.saddr) {
        maps::count(Counter::SourceRangeDenied);
        return Verdict::Drop;
    }
    if service.backend_count == 0 {
        return empty(service);
    }
    let chosen = if service.flags & SVC_AFFINITY != 0 {
        affinity::backend::<F>(service, flow.saddr).or_else(|| select::<F>(service))
    } else {
        select::<F>(service)
    };
    let Some((id, backend)) = chosen else {
        return Verdict::Pass;
    };
    if service.flags & SVC_AFFINITY != 0 {
        affinity::remember::<F>(service, flow.saddr, id);
    }
    ct::remember::<F>(flow, service, id, &backend);
    to(&backend)
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
    Verdict::Reject
}

/// The backend `backend_id` as a member of service `service_id`.
#[inline(always)]
pub fn member<F: Family>(service_id: u32, backend_id: u32) -> Option<Target<F::Addr>> {
    F::member(MemberKey {
        service_id,
        backend_id,
    })
}

#[inline(always)]
fn select<F: Family>(service: &Service) -> Option<(u32, Target<F::Addr>)> {
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
    // SAFETY: a copy out of a live map value.
    let id = unsafe { *id };
    let Some(backend) = F::backend(id) else {
        maps::count(Counter::BackendMissing);
        return None;
    };
    Some((id, backend))
}
