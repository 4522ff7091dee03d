//! sessionAffinity: ClientIP: a client keeps its backend across flows until
//! it has sent nothing for the service's timeout.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{Affinity4Key, AffinityEntry, Backend4, Counter, Service};

use crate::{lb, maps, maps::AFFINITY4};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Refreshing the timestamp on every packet would write the entry on every
/// packet; a second of staleness is nothing next to a timeout in seconds.
const TOUCH_EVERY_NS: u64 = NS_PER_SEC;

#[inline(always)]
fn key(service: &Service, client: u32) -> Affinity4Key {
    Affinity4Key {
        service_id: service.id,
        client_addr: client,
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The client's backend, if it used one within the timeout and that backend
/// still serves the service.
#[inline(always)]
pub fn backend(service: &Service, client: u32) -> Option<(u32, Backend4)> {
    let entry = AFFINITY4.get_ptr(key(service, client))?;
    // SAFETY: a copy out of a live map value.
    let entry = unsafe { *entry };
    let timeout = service.affinity_timeout as u64 * NS_PER_SEC;
    if now().saturating_sub(entry.last_used_ns) > timeout {
        return None;
    }
    let Some(backend) = lb::member(service.id, entry.backend_id) else {
        maps::count(Counter::AffinityStale);
        return None;
    };
    Some((entry.backend_id, backend))
}

#[inline(always)]
pub fn remember(service: &Service, client: u32, backend_id: u32) {
    let entry = AffinityEntry {
        last_used_ns: now(),
        backend_id,
        _pad: 0,
    };
    // A failed write only costs the affinity of this one client.
    let _ = AFFINITY4.insert(key(service, client), entry, 0);
}

/// Traffic on an established flow keeps the client's affinity alive.
#[inline(always)]
pub fn touch(service: &Service, client: u32, backend_id: u32) {
    let Some(entry) = AFFINITY4.get_ptr_mut(key(service, client)) else {
        remember(service, client, backend_id);
        return;
    };
    let now = now();
    // SAFETY: a live map value; a racing writer on another CPU can only
    // store another recent timestamp.
    unsafe {
        if (*entry).backend_id == backend_id
            && now.saturating_sub((*entry).last_used_ns) > TOUCH_EVERY_NS
        {
            (*entry).last_used_ns = now;
        }
    }
}
