//! Services and EndpointSlices as the agent holds them: only the fields the
//! model reads, under k8s-openapi's names and types, so the model reads them
//! the same way. Decoding skips every other field without allocating it (a
//! real API server sends managed fields, `kubectl apply`'s copy of the whole
//! object, owner references and each endpoint's Pod), and the store holds
//! every one of these objects for as long as the agent runs: k8s-openapi's
//! full types cost about five times the memory at 10,000 Services.
//!
//! Their metadata is `Meta`: name, namespace, labels and the annotations
//! read; `Watched` gives kube the `ObjectMeta` it needs.
//!
//! Like k8s-openapi's, the decoders take a missing or null required field as
//! its empty value (Go writes an empty list as `null`) and ignore unknown
//! fields.

mod meta;
mod service;
mod slice;

pub use meta::{KEPT_ANNOTATIONS, Meta};
pub use service::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
pub use slice::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A required field: absent or null is its default, as k8s-openapi reads it.
fn or_default<'de, D, T>(decoder: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(decoder)?.unwrap_or_default())
}

/// A required list (absent or null: empty) without spare capacity: serde
/// grows a list of unknown length to the next power of two, and these are
/// held for the agent's life (a slice's 10 endpoints took room for 16).
fn list<'de, D, T>(decoder: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(some_list(decoder)?.unwrap_or_default())
}

/// An optional list, as `list` keeps it.
fn some_list<'de, D, T>(decoder: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut list = Option::<Vec<T>>::deserialize(decoder)?;
    if let Some(list) = list.as_mut() {
        list.shrink_to_fit();
    }
    Ok(list)
}

/// One of these kinds: which k8s-openapi type it stands for, and its
/// metadata.
pub trait Kind {
    type Of: k8s_openapi::Resource;
    fn meta(&self) -> &Meta;
    fn meta_mut(&mut self) -> &mut Meta;
}

/// An object as kube's `Api` and watcher take it: they need k8s-openapi's
/// `ObjectMeta` (the watcher resumes from the resource version), which is
/// made from the object's own name, namespace and resource version while
/// decoding and dropped once the watcher has read it (see `object`).
#[derive(Clone, Debug)]
pub struct Watched<T> {
    metadata: ObjectMeta,
    object: T,
}

impl<T> Watched<T> {
    pub fn object(self) -> T {
        self.object
    }
}

impl<'de, T: Kind + Deserialize<'de>> Deserialize<'de> for Watched<T> {
    fn deserialize<D: Deserializer<'de>>(decoder: D) -> Result<Self, D::Error> {
        let mut object = T::deserialize(decoder)?;
        let meta = object.meta_mut();
        let metadata = ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            resource_version: meta.resource_version.take(),
            ..ObjectMeta::default()
        };
        Ok(Watched { metadata, object })
    }
}

impl<T: Kind> k8s_openapi::Resource for Watched<T> {
    const API_VERSION: &'static str = T::Of::API_VERSION;
    const GROUP: &'static str = T::Of::GROUP;
    const KIND: &'static str = T::Of::KIND;
    const VERSION: &'static str = T::Of::VERSION;
    const URL_PATH_SEGMENT: &'static str = T::Of::URL_PATH_SEGMENT;
    type Scope = <T::Of as k8s_openapi::Resource>::Scope;
}

impl<T: Kind> k8s_openapi::Metadata for Watched<T> {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{balancing::ALGORITHM_ANNOTATION, source::cluster::TRIGGER_TIME};
    use std::collections::BTreeMap;

    #[test]
    fn a_served_slice_keeps_what_the_model_reads_and_nothing_else() {
        let served = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc", "namespace": "default", "resourceVersion": "42",
                "uid": "9a0b6c1d", "generateName": "web-",
                "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
                },
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a\": 1}",
                    (ALGORITHM_ANNOTATION): "maglev",
                    (TRIGGER_TIME): "2026-12-06T00:00:00Z"
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "1"}],
                "managedFields": [{"manager": "kube-controller-manager", "fieldsV1": {"f:endpoints": {}}}]
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["10.0.0.1"], "hostname": "web-0", "nodeName": "node-a", "zone": "z1",
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
                "targetRef": {"kind": "Pod", "name": "web-0"},
                "deprecatedTopology": {"a": "b"}
            }]
        });
        let watched: Watched<EndpointSlice> =
            serde_json::from_value(served).expect("a served slice");
        let seen = k8s_openapi::Metadata::metadata(&watched);
        assert_eq!(
            seen.resource_version.as_deref(),
            Some("42"),
            "the watcher resumes from it"
        );
        assert_eq!(seen.name.as_deref(), Some("web-abc"));
        assert_eq!(seen.namespace.as_deref(), Some("default"));
        let slice = watched.object();
        let meta = &slice.metadata;
        assert_eq!(meta.name.as_deref(), Some("web-abc"));
        assert_eq!(meta.namespace.as_deref(), Some("default"));
        assert_eq!(meta.resource_version, None, "not held");
        let keys = |map: &Option<BTreeMap<String, String>>| -> Vec<String> {
            map.iter().flat_map(|m| m.keys().cloned()).collect()
        };
        assert_eq!(keys(&meta.labels), [crate::model::SERVICE_NAME_LABEL]);
        assert_eq!(
            keys(&meta.annotations),
            [TRIGGER_TIME, ALGORITHM_ANNOTATION]
        );
        let endpoint = &slice.endpoints[0];
        assert_eq!(endpoint.addresses, ["10.0.0.1"]);
        let spare = (slice.endpoints.capacity(), endpoint.addresses.capacity());
        assert_eq!(spare, (1, 1), "held lists have no spare room");
        assert_eq!(endpoint.node_name.as_deref(), Some("node-a"));
        let hints = endpoint.hints.as_ref().expect("hints");
        assert_eq!(
            hints.for_zones.as_ref().map(|z| z[0].name.as_str()),
            Some("z1")
        );
        assert_eq!(
            hints.for_nodes.as_ref().map(|n| n[0].name.as_str()),
            Some("node-a")
        );
        let conditions = endpoint.conditions.as_ref().expect("conditions");
        assert_eq!(conditions.terminating, Some(false));
        assert_eq!(slice.ports.as_ref().and_then(|p| p[0].port), Some(8080));
    }

    #[test]
    fn null_and_missing_required_fields_are_empty_as_go_writes_them() {
        let slice: EndpointSlice = serde_json::from_str(
            r#"{"metadata": {"name": "s", "annotations": null}, "endpoints": null, "addressType": null}"#,
        )
        .expect("a slice without endpoints");
        assert!(slice.endpoints.is_empty());
        assert_eq!(slice.address_type, "");
        assert_eq!(slice.metadata.annotations, None);
        let service: Service =
            serde_json::from_str(r#"{"metadata": null, "spec": {"ports": [{"port": null}]}}"#)
                .expect("a bare service");
        assert_eq!(service.metadata.name, None);
        assert_eq!(
            service.spec.and_then(|s| s.ports).map(|p| p[0].port),
            Some(0)
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error_naming_it() {
        let wrong = r#"{"metadata": {"name": "s"}, "spec": {"ports": [{"port": "eighty"}]}}"#;
        let mut decoder = serde_json::Deserializer::from_str(wrong);
        let error = serde_path_to_error::deserialize::<_, Service>(&mut decoder)
            .expect_err("a string port");
        assert_eq!(error.path().to_string(), "spec.ports[0].port");
    }

    #[test]
    fn the_service_fields_the_model_reads_decode() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                "externalIPs": ["192.0.2.1"], "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Cluster", "healthCheckNodePort": 30001,
                "loadBalancerSourceRanges": ["192.0.2.0/24"], "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP", "targetPort": "http"}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.9", "ipMode": "VIP", "hostname": "lb"}]}}
        }))
        .expect("a LoadBalancer Service");
        let spec = service.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.1"));
        assert_eq!(spec.cluster_ips.map(|i| i.len()), Some(1));
        assert_eq!(spec.external_ips.map(|i| i.len()), Some(1));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.health_check_node_port, Some(30001));
        assert_eq!(spec.load_balancer_source_ranges.map(|r| r.len()), Some(1));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let timeout = spec
            .session_affinity_config
            .and_then(|c| c.client_ip?.timeout_seconds);
        assert_eq!(timeout, Some(60));
        let port = &spec.ports.expect("ports")[0];
        assert_eq!((port.port, port.node_port), (80, Some(30080)));
        assert_eq!(port.name.as_deref(), Some("http"));
        let ingress = service
            .status
            .and_then(|s| s.load_balancer?.ingress)
            .expect("ingress");
        assert_eq!(ingress[0].ip.as_deref(), Some("192.0.2.9"));
        assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
    }
}
