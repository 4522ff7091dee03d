//! The Kubernetes objects the model reads: which ones are ours, how they
//! are named, what is valid, and which slices belong to which Service.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use crate::kinds::{EndpointSlice, Service};
use serde::Serialize;

use super::{
    Objects,
    frontends::{DEFAULT_AFFINITY_TIMEOUT, Protocol},
};
use crate::{
    balancing::{self, Balancing},
    cidr::Cidr,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Services (and their slices) another proxy serves.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label selector that leaves both out, as kube-proxy's informers do:
/// the API server never even lists them to the agent.
pub const OURS_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// False for objects kube-proxy leaves alone: those of another service
/// proxy, and headless ones.
pub fn ours(meta: &crate::kinds::Meta) -> bool {
    let labels = meta.labels.as_ref();
    ![SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]
        .iter()
        .any(|l| labels.is_some_and(|m| m.contains_key(*l)))
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A field of an object that is not acceptable, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: {}", self.field, self.message)
    }
}

fn field_error(field: String, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

pub(super) fn protocol(
    value: Option<&str>,
    field: impl Fn() -> String,
) -> Result<Option<Protocol>, FieldError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(Some(Protocol::Sctp)),
        other => Err(field_error(field(), format!("unknown protocol {other:?}"))),
    }
}

pub(super) fn port_number(value: i32, field: impl Fn() -> String) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field_error(field(), format!("port {value} is not in 1..65535")))
}

/// Rejects what the API server would have rejected and what the model would
/// otherwise have to guess about.
pub fn validate_service(service: &Service) -> Result<(), FieldError> {
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        check_cluster_ip(ip, || format!("spec.clusterIPs[{i}]"))?;
    }
    if let Some(ip) = &spec.cluster_ip {
        check_cluster_ip(ip, || "spec.clusterIP".to_string())?;
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            return Err(field_error(
                format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            ));
        }
    }
    for (i, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        range
            .parse::<Cidr>()
            .map_err(|e| field_error(format!("spec.loadBalancerSourceRanges[{i}]"), e))?;
    }
    affinity_timeout(service)?;
    balancing::of_service(service, Balancing::default())
        .map_err(|(field, message)| field_error(field, message))?;
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        port_number(port.port, || format!("spec.ports[{i}].port"))?;
        protocol(port.protocol.as_deref(), || {
            format!("spec.ports[{i}].protocol")
        })?;
    }
    Ok(())
}

/// sessionAffinity: ClientIP's timeout; None without affinity.
pub(super) fn affinity_timeout(service: &Service) -> Result<Option<u32>, FieldError> {
    let Some(spec) = &service.spec else {
        return Ok(None);
    };
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match seconds {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
        Some(s @ 1..=86_400) => Ok(Some(s as u32)),
        Some(s) => Err(field_error(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
            format!("{s} is not in 1..86400"),
        )),
    }
}

fn check_cluster_ip(ip: &str, field: impl Fn() -> String) -> Result<(), FieldError> {
    if ip.is_empty() || ip == "None" || ip.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    Err(field_error(field(), format!("{ip:?} is not an IP address")))
}

pub fn validate_slice(slice: &EndpointSlice) -> Result<(), FieldError> {
    let family = slice.address_type.as_str();
    if !matches!(family, "IPv4" | "IPv6" | "FQDN") {
        return Err(field_error(
            "addressType".into(),
            format!("{family:?} is not IPv4, IPv6 or FQDN"),
        ));
    }
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        for (j, addr) in endpoint.addresses.iter().enumerate() {
            let ok = match family {
                "IPv4" => addr.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => addr.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => true,
            };
            if !ok {
                return Err(field_error(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{addr:?} is not an {family} address"),
                ));
            }
        }
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            port_number(number, || format!("ports[{i}].port"))?;
        }
        protocol(port.protocol.as_deref(), || format!("ports[{i}].protocol"))?;
    }
    Ok(())
}

/// The Service an EndpointSlice belongs to, by its label.
pub fn owning_service(namespace: &str, slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey {
        namespace: namespace.to_string(),
        name: name.clone(),
    })
}

/// Slices by owning Service: built once for a full pass, or kept up to date
/// by a source as slices come and go.
#[derive(Debug, Default)]
pub struct SliceIndex {
    /// Sorted lists: a Service has one slice or a few, and a one-entry
    /// BTreeSet costs a whole tree node.
    by_service: BTreeMap<ObjectKey, Vec<ObjectKey>>,
}

impl SliceIndex {
    pub fn new(objects: &Objects) -> Self {
        let mut index = SliceIndex::default();
        for (key, slice) in &objects.slices {
            index.insert(key, slice);
        }
        index
    }

    /// Notes a slice (IP ones only: FQDN slices serve no frontend).
    pub fn insert(&mut self, key: &ObjectKey, slice: &EndpointSlice) {
        let ip = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        if let Some(owner) = owning_service(&key.namespace, slice).filter(|_| ip) {
            let slices = (self.by_service.entry(owner)).or_insert_with(|| Vec::with_capacity(1));
            if let Err(at) = slices.binary_search(key) {
                slices.insert(at, key.clone());
            }
        }
    }

    /// Forgets a slice that belonged to `owner`.
    pub fn remove(&mut self, key: &ObjectKey, owner: &ObjectKey) {
        if let Some(slices) = self.by_service.get_mut(owner) {
            slices.retain(|k| k != key);
            if slices.is_empty() {
                self.by_service.remove(owner);
            }
        }
    }

    pub(super) fn slices_of<'a>(
        &self,
        objects: &'a Objects,
        service: &ObjectKey,
    ) -> Vec<&'a EndpointSlice> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| objects.slices.get(key))
            .collect()
    }
}
