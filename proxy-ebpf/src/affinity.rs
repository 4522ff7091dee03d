//! sessionAffinity: ClientIP: a client keeps its backend across flows until
//! it has sent nothing for the service's timeout.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{AffinityEntry, BACKEND_TERMINATING, Counter, Service};

use crate::{
    family::{self, Family, Target},
    maps,
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Refreshing the timestamp on every packet would write the entry on every
/// packet; a second of staleness is nothing next to a timeout in seconds.
const TOUCH_EVERY_NS: u64 = NS_PER_SEC;

#[inline(always)]
fn now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The client's backend, if it used one within the timeout and that backend
/// still serves the service.
#[inline(always)]
pub fn backend<F: Family>(service: &Service, client: F::Addr) -> Option<(u32, Target<F::Addr>)> {
    let entry = F::affinity_get(service.id, client)?;
    // SAFETY: a copy out of a live map value.
    let entry = unsafe { *entry };
    let timeout = service.affinity_timeout as u64 * NS_PER_SEC;
    if now().saturating_sub(entry.last_used_ns) > timeout {
        return None;
    }
    // A terminating backend keeps its flows but takes no new ones.
    let backend = family::member::<F>(service.id, entry.backend_id)
        .filter(|b| b.flags & BACKEND_TERMINATING == 0);
    let Some(backend) = backend else {
        maps::count(Counter::AffinityStale);
        return None;
    };
    Some((entry.backend_id, backend))
}

#[inline(always)]
pub fn remember<F: Family>(service: &Service, client: F::Addr, backend_id: u32) {
    let entry = AffinityEntry {
        last_used_ns: now(),
        backend_id,
        _pad: 0,
    };
    F::affinity_insert(service.id, client, entry);
}

/// Traffic on an established flow keeps the client's affinity alive.
#[inline(always)]
pub fn touch<F: Family>(service: &Service, client: F::Addr, backend_id: u32) {
    let Some(entry) = F::affinity_get(service.id, client) else {
        remember::<F>(service, client, backend_id);
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
