//! Health check node ports: what a Service with externalTrafficPolicy:
//! Local asks this node to answer, and how many local endpoints it has.

use std::collections::BTreeSet;

use crate::kinds::EndpointSlice;

use super::{
    Objects,
    endpoints::ready_on_node,
    objects::{ObjectKey, SliceIndex, port_number, protocol},
};

/// The health check node port a Service asks this node to answer, with its
/// local ready endpoints counted as kube-proxy counts them (distinct
/// addresses over all the Service's ports; terminating ones do not count, so
/// a node left with only those fails the check): LoadBalancer Services with
/// externalTrafficPolicy: Local only.
pub fn health_check(
    objects: &Objects,
    index: &SliceIndex,
    key: &ObjectKey,
) -> Option<(u16, usize)> {
    let service = objects.services.get(key)?;
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let port = port_number(spec.health_check_node_port?, String::new).ok()?;
    let slices = index.slices_of(objects, key);
    let node = objects.node.name.as_deref();
    // Dual-stack kube-proxy reports one family's count (its proxiers share
    // one health server): a dual-stack pod counts once.
    let mut most = 0;
    for family in ["IPv4", "IPv6"] {
        let of_family: Vec<&EndpointSlice> = slices
            .iter()
            .copied()
            .filter(|s| s.address_type == family)
            .collect();
        let mut local = BTreeSet::new();
        for service_port in spec.ports.iter().flatten() {
            let Ok(Some(protocol)) = protocol(service_port.protocol.as_deref(), String::new) else {
                continue;
            };
            let name = service_port.name.as_deref().unwrap_or("");
            let ready = ready_on_node(&of_family, name, protocol, node);
            local.extend(ready.iter().map(|e| e.ip()));
        }
        most = most.max(local.len());
    }
    Some((port, most))
}
