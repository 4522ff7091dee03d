//! The API server's watch events applied to the agent's view of the cluster.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;
use proxy_agent::kinds::{EndpointSlice, Service};
use proxy_agent::{model::ObjectKey, source::cluster::ClusterStore};

fn service(name: &str, port: &str) -> Service {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: demo}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}"
    ))
    .expect("service")
}

fn slice(name: &str, annotation: Option<&str>) -> EndpointSlice {
    let annotations = annotation
        .map(|t| {
            format!(", annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{t}'}}")
        })
        .unwrap_or_default();
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: web}}{annotations}}}\naddressType: IPv4\nendpoints: []"
    ))
    .expect("slice")
}

fn synced_store() -> ClusterStore {
    let mut store = ClusterStore::default();
    store.service(Event::Init);
    store.service(Event::InitApply(service("web", "80")));
    store.service(Event::InitDone);
    store.slice(Event::Init);
    store.slice(Event::InitDone);
    store.node(Event::Init);
    store.node(Event::InitDone);
    store
}

fn key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: "demo".into(),
        name: name.into(),
    }
}

fn port(store: &ClusterStore, name: &str) -> Option<i32> {
    let objects = store.objects();
    let svc = objects.services.get(&key(name))?;
    Some(svc.spec.as_ref()?.ports.as_ref()?[0].port)
}

#[test]
fn nothing_is_synced_until_every_kind_was_listed() {
    let mut store = ClusterStore::default();
    store.service(Event::Init);
    store.service(Event::InitDone);
    store.slice(Event::Init);
    store.slice(Event::InitDone);
    assert!(!store.synced(), "the node list is still missing");
    store.node(Event::Init);
    store.node(Event::<Node>::InitDone);
    assert!(store.synced());
}

#[test]
fn a_relist_replaces_objects_only_when_complete() {
    let mut store = synced_store();
    store.service(Event::Apply(service("old", "81")));
    store.take_pending();
    // The watch broke (410 Gone): kube relists.
    store.service(Event::Init);
    store.service(Event::InitApply(service("web", "8080")));
    assert_eq!(
        port(&store, "web"),
        Some(80),
        "mid-relist, the live objects stay"
    );
    assert_eq!(port(&store, "old"), Some(81));
    assert!(!store.has_pending());
    store.service(Event::InitDone);
    assert_eq!(port(&store, "web"), Some(8080));
    assert_eq!(
        port(&store, "old"),
        None,
        "gone from the relist, gone from the store"
    );
    assert!(store.has_pending());
}

#[test]
fn an_invalid_object_keeps_its_last_valid_version_and_is_reported() {
    let mut store = synced_store();
    store.service(Event::Apply(service("web", "70000")));
    assert_eq!(port(&store, "web"), Some(80));
    let errors = store.take_errors();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("Service demo/web") && errors[0].contains("spec.ports[0].port"),
        "{}",
        errors[0]
    );
    // The same during a relist.
    store.service(Event::Init);
    store.service(Event::InitApply(service("web", "0")));
    store.service(Event::InitDone);
    assert_eq!(port(&store, "web"), Some(80));
}

#[test]
fn deletes_remove_and_count_as_changes() {
    let mut store = synced_store();
    store.take_pending();
    store.service(Event::Delete(service("web", "80")));
    assert_eq!(port(&store, "web"), None);
    assert_eq!(store.take_pending().len(), 1);
    store.service(Event::Delete(service("never-there", "80")));
    assert!(!store.has_pending(), "deleting nothing changes nothing");
}

#[test]
fn endpoint_changes_are_timed_from_their_trigger_time() {
    let mut store = synced_store();
    store.take_pending();
    let two_seconds_ago =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(2);
    store.slice(Event::Apply(slice(
        "web-1",
        Some(&two_seconds_ago.to_string()),
    )));
    store.slice(Event::Apply(slice("web-2", None)));
    let pending = store.take_pending();
    assert_eq!(pending.len(), 2);
    let age = |at: &Instant| at.elapsed();
    assert!(
        age(&pending[0]) >= Duration::from_millis(1900),
        "{:?}",
        age(&pending[0])
    );
    assert!(
        age(&pending[1]) < Duration::from_millis(500),
        "receipt time without the annotation"
    );
}

#[test]
fn only_the_services_a_change_touches_are_dirty() {
    use proxy_agent::source::cluster::Dirty;
    let mut store = synced_store();
    assert_eq!(
        store.take_dirty(),
        Dirty::All,
        "the initial lists need a full pass"
    );
    store.slice(Event::Apply(slice("web-1", None)));
    store.service(Event::Apply(service("other", "81")));
    let Dirty::Services(dirty) = store.take_dirty() else {
        panic!("a partial pass is enough");
    };
    assert_eq!(
        dirty.into_iter().collect::<Vec<_>>(),
        vec![key("other"), key("web")]
    );
    // A slice moving to another Service dirties both.
    let mut moved = slice("web-1", None);
    moved.metadata.labels = Some(
        [(
            "kubernetes.io/service-name".to_string(),
            "other".to_string(),
        )]
        .into(),
    );
    store.slice(Event::Apply(moved));
    assert_eq!(
        store.take_dirty(),
        Dirty::Services([key("other"), key("web")].into())
    );
}

#[test]
fn a_changed_slice_is_found_through_the_index() {
    use proxy_agent::{model, source::cluster::Dirty};
    let with = |addrs: &str| -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{addrs}]"
        ))
        .expect("slice")
    };
    let mut store = ClusterStore::default();
    store.service(Event::Init);
    store.service(Event::InitApply(service("web", "80")));
    store.service(Event::InitDone);
    store.slice(Event::Init);
    store.slice(Event::InitApply(with(
        "{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}",
    )));
    store.slice(Event::InitDone);
    store.node(Event::Init);
    store.node(Event::InitDone);
    assert_eq!(store.take_dirty(), Dirty::All);
    store.slice(Event::Apply(with("{addresses: [10.1.1.2]}")));
    let Dirty::Services(dirty) = store.take_dirty() else {
        panic!("partial");
    };
    let changes = model::changes(store.objects(), store.index(), &dirty);
    let wanted = &changes[&key("web")];
    assert_eq!(wanted.len(), 1);
    assert_eq!(wanted[0].1.backends.len(), 1, "{wanted:?}");
}

#[test]
fn the_nodes_zone_label_reaches_the_model_and_a_change_redoes_everything() {
    use proxy_agent::source::cluster::Dirty;
    let mut store = synced_store();
    store.take_dirty();
    let node: Node =
        serde_yaml::from_str("metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}")
            .expect("node");
    store.node(Event::Apply(node));
    assert_eq!(store.objects().node.zone.as_deref(), Some("a"));
    assert_eq!(store.take_dirty(), Dirty::All);
}

#[test]
fn a_zone_flag_beats_the_nodes_label_and_the_node_gives_its_addresses() {
    let mut store = ClusterStore::new(proxy_agent::model::ThisNode {
        name: Some("n1".into()),
        zone: Some("b".into()),
        ..Default::default()
    });
    let node: Node = serde_yaml::from_str(
        "metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.9}]}",
    )
    .expect("node");
    store.node(Event::Apply(node));
    let seen = &store.objects().node;
    assert_eq!(seen.zone.as_deref(), Some("b"));
    assert_eq!(seen.name.as_deref(), Some("n1"));
    assert_eq!(seen.addresses, [std::net::IpAddr::from([10, 0, 0, 9])]);
}
