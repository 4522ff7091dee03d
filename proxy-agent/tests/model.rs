//! The model as tables: objects in, frontends and backends out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proxy_agent::kinds::{EndpointSlice, Service};
use proxy_agent::model::{self, Clients, Desired, Frontend, ObjectKey, Objects, Protocol};

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn objects(services: &[(&str, &str)], slices: &[(&str, &str)]) -> Objects {
    let mut out = Objects::default();
    for (ns, yaml) in services {
        let s: Service = serde_yaml::from_str(yaml).expect("test service");
        let name = s.metadata.name.clone().expect("name");
        out.services.insert(key(ns, &name), s);
    }
    for (ns, yaml) in slices {
        let s: EndpointSlice = serde_yaml::from_str(yaml).expect("test slice");
        let name = s.metadata.name.clone().expect("name");
        out.slices.insert(key(ns, &name), s);
    }
    out
}

fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: IpAddr::V4(Ipv4Addr::from(addr)),
        port,
        protocol,
        clients: Default::default(),
    }
}

fn be(addr: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(addr)), port)
}

fn backends_of(desired: &Desired, frontend: Frontend) -> Vec<SocketAddr> {
    desired
        .frontends
        .get(&frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend:?} in {:?}", desired.frontends.keys()))
        .backends
        .clone()
}

/// `WEB`'s cluster IP frontend for HTTP.
fn web_cluster_ip() -> Frontend {
    fe([10, 96, 0, 10], 80, Protocol::Tcp)
}

const WEB: &str = r#"
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

fn slice(name: &str, service: &str, endpoints: &str) -> String {
    format!(
        r#"
metadata:
  name: {name}
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
  - {{name: dns, port: 5353, protocol: UDP}}
endpoints: {endpoints}
"#
    )
}

#[test]
fn cluster_ip_ports_map_to_ready_endpoints_by_port_name() {
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], conditions: {ready: true}},
            {addresses: [10.1.2.2]},
            {addresses: [10.1.3.2], conditions: {ready: false}}]"#,
    );
    let desired = model::desired(&objects(&[("default", WEB)], &[("default", &s)]));
    assert_eq!(desired.frontends.len(), 2);
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![be([10, 1, 1, 2], 8080), be([10, 1, 2, 2], 8080)],
        "ready and unknown-readiness endpoints serve, not-ready ones do not"
    );
    assert_eq!(
        backends_of(&desired, fe([10, 96, 0, 10], 53, Protocol::Udp)),
        vec![be([10, 1, 1, 2], 5353), be([10, 1, 2, 2], 5353)]
    );
    assert!(desired.warnings.is_empty());
}

#[test]
fn slices_of_other_services_and_namespaces_are_ignored_and_several_slices_merge() {
    let mine_a = slice("web-a", "web", "[{addresses: [10.1.1.2]}]");
    let mine_b = slice(
        "web-b",
        "web",
        "[{addresses: [10.1.2.2]}, {addresses: [10.1.1.2]}]",
    );
    let other_service = slice("db-a", "db", "[{addresses: [10.9.9.9]}]");
    let other_ns = slice("web-x", "web", "[{addresses: [10.8.8.8]}]");
    let desired = model::desired(&objects(
        &[("default", WEB)],
        &[
            ("default", &mine_a),
            ("default", &mine_b),
            ("default", &other_service),
            ("prod", &other_ns),
        ],
    ));
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![be([10, 1, 1, 2], 8080), be([10, 1, 2, 2], 8080)]
    );
}

#[test]
fn service_port_without_a_matching_slice_port_has_no_backends() {
    let svc = r#"
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{name: metrics, port: 9090}]}
"#;
    let s = slice("web-1", "web", "[{addresses: [10.1.1.2]}]");
    let desired = model::desired(&objects(&[("default", svc)], &[("default", &s)]));
    assert_eq!(
        backends_of(&desired, fe([10, 96, 0, 10], 9090, Protocol::Tcp)),
        vec![]
    );
}

#[test]
fn unnamed_single_port_matches_unnamed_slice_port() {
    let svc = "metadata: {name: one}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80, targetPort: 8080}]}";
    let s = r#"
metadata: {name: one-1, labels: {kubernetes.io/service-name: one}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.1.2]}]
"#;
    let desired = model::desired(&objects(&[("default", svc)], &[("default", s)]));
    assert_eq!(
        backends_of(&desired, fe([10, 96, 0, 11], 80, Protocol::Tcp)),
        vec![be([10, 1, 1, 2], 8080)]
    );
}

#[test]
fn services_without_a_cluster_ip_get_nothing() {
    let cases = [
        (
            "external name",
            "metadata: {name: a}\nspec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}",
        ),
        (
            "headless",
            "metadata: {name: b}\nspec: {clusterIP: None, ports: [{port: 80}]}",
        ),
        ("no spec", "metadata: {name: c}"),
    ];
    for (what, yaml) in cases {
        let desired = model::desired(&objects(&[("default", yaml)], &[]));
        assert!(
            desired.frontends.is_empty(),
            "{what}: {:?}",
            desired.frontends
        );
    }
}

#[test]
fn every_cluster_ip_of_both_families_and_every_protocol() {
    let svc = r#"
metadata: {name: dual}
spec:
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12, 'fd00::12']
  ports: [{name: a, port: 80}, {name: s, port: 99, protocol: SCTP}]
"#;
    let desired = model::desired(&objects(&[("default", svc)], &[]));
    let frontends: Vec<Frontend> = desired.frontends.keys().copied().collect();
    let v6 = Frontend {
        addr: "fd00::12".parse().expect("v6"),
        port: 80,
        protocol: Protocol::Tcp,
        clients: Default::default(),
    };
    let sctp = |mut f: Frontend| {
        f.port = 99;
        f.protocol = Protocol::Sctp;
        f
    };
    let v4 = fe([10, 96, 0, 12], 80, Protocol::Tcp);
    assert_eq!(frontends, vec![v4, sctp(v4), v6, sctp(v6)]);
}

#[test]
fn two_services_claiming_one_frontend_is_a_warning_and_the_first_wins() {
    let a = "metadata: {name: a}\nspec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}";
    let b = "metadata: {name: b}\nspec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}";
    let desired = model::desired(&objects(&[("default", a), ("default", b)], &[]));
    assert_eq!(desired.frontends.len(), 1);
    assert_eq!(desired.warnings.len(), 1, "{:?}", desired.warnings);
    assert_eq!(desired.conflicts, 1);
    let state = &desired.frontends[&fe([10, 96, 0, 13], 80, Protocol::Tcp)];
    assert_eq!(state.service, key("default", "a"));
}

#[test]
fn an_allocated_address_wins_over_an_external_ip_claiming_it_whatever_the_names() {
    // `default/a` sorts first and claims kube-dns's address as its
    // LoadBalancer IP; the cluster IP keeps it (CVE-2020-8554).
    let dns = "metadata: {name: kube-dns}\nspec: {clusterIP: 10.96.0.53, ports: [{port: 53, protocol: UDP}]}";
    let a = r#"
metadata: {name: a}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  ports: [{port: 53, protocol: UDP, nodePort: 30053}]
status: {loadBalancer: {ingress: [{ip: 10.96.0.53}]}}
"#;
    let s = slice("a-1", "a", "[{addresses: [10.1.9.2], nodeName: elsewhere}]");
    let objs = objects(&[("default", a), ("kube-system", dns)], &[("default", &s)]);
    let desired = model::desired(&objs);
    let dns_frontend = fe([10, 96, 0, 53], 53, Protocol::Udp);
    assert_eq!(
        desired.frontends[&dns_frontend].service,
        key("kube-system", "kube-dns")
    );
    assert_eq!(
        desired.frontends[&dns_frontend].scope,
        model::Scope::ClusterIp
    );
    assert_eq!(desired.conflicts, 1, "{:?}", desired.warnings);
    assert!(
        desired
            .warnings
            .iter()
            .all(|w| w.contains("serving kube-system/kube-dns"))
    );
    // And the loser's local-client twin does not linger.
    assert!(
        desired.frontends.iter().all(
            |(f, s)| f.addr != dns_frontend.addr || s.service == key("kube-system", "kube-dns")
        ),
        "{:?}",
        desired.frontends.keys().collect::<Vec<_>>()
    );
}

#[test]
fn validation_names_the_field() {
    let cases = [
        (
            "metadata: {name: a}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}",
            "spec.clusterIP",
        ),
        (
            "metadata: {name: a}\nspec: {clusterIPs: [10.96.0.1, nope]}",
            "spec.clusterIPs[1]",
        ),
        (
            "metadata: {name: a}\nspec: {ports: [{port: 80}, {port: 70000}]}",
            "spec.ports[1].port",
        ),
        (
            "metadata: {name: a}\nspec: {ports: [{port: 80, protocol: ICMP}]}",
            "spec.ports[0].protocol",
        ),
        (
            "metadata: {name: a}\nspec: {externalIPs: [192.0.2.1, nope]}",
            "spec.externalIPs[1]",
        ),
    ];
    for (yaml, field) in cases {
        let s: Service = serde_yaml::from_str(yaml).expect("test service");
        let err = model::validate_service(&s).expect_err(yaml);
        assert_eq!(err.field, field, "{yaml}");
    }
    let bad_slice = "metadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [banana]}]";
    let s: EndpointSlice = serde_yaml::from_str(bad_slice).expect("test slice");
    assert_eq!(
        model::validate_slice(&s).expect_err("bad").field,
        "endpoints[1].addresses[0]"
    );
}

#[test]
fn external_ips_and_load_balancer_ingress_are_frontends_too() {
    use proxy_agent::model::Scope;
    let svc = r#"
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [192.0.2.10]
  ports: [{name: http, port: 80}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.7}, {hostname: lb.example.com}]}
"#;
    let desired = model::desired(&objects(&[("default", svc)], &[]));
    let scopes: Vec<(IpAddr, Scope)> = desired
        .frontends
        .iter()
        .map(|(f, s)| (f.addr, s.scope))
        .collect();
    assert_eq!(
        scopes,
        vec![
            (IpAddr::from([10, 96, 0, 20]), Scope::ClusterIp),
            (IpAddr::from([192, 0, 2, 10]), Scope::ExternalIp),
            (IpAddr::from([198, 51, 100, 7]), Scope::LoadBalancer),
        ]
    );
    // Ingress IPs belong to LoadBalancer Services only.
    let not_lb = svc.replace("type: LoadBalancer", "type: ClusterIP");
    assert_eq!(
        model::desired(&objects(&[("default", &not_lb)], &[]))
            .frontends
            .len(),
        2
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let both = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], conditions: {ready: true}},
            {addresses: [10.1.2.2], conditions: {ready: false, serving: true, terminating: true}}]"#,
    );
    let desired = model::desired(&objects(&[("default", WEB)], &[("default", &both)]));
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![be([10, 1, 1, 2], 8080)]
    );
    let draining = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], conditions: {ready: false, serving: false, terminating: true}},
            {addresses: [10.1.2.2], conditions: {ready: false, serving: true, terminating: true}}]"#,
    );
    let desired = model::desired(&objects(&[("default", WEB)], &[("default", &draining)]));
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![be([10, 1, 2, 2], 8080)],
        "the serving terminating endpoint takes new connections while nothing is ready"
    );
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_this_node() {
    let svc = r#"
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.10]
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}]
"#;
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], nodeName: n1},
            {addresses: [10.1.2.2], nodeName: n2},
            {addresses: [10.1.3.2], nodeName: n1, conditions: {ready: false}}]"#,
    );
    let mut objs = objects(&[("default", svc)], &[("default", &s)]);
    objs.node.name = Some("n1".into());
    let desired = model::desired(&objs);
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![be([10, 1, 1, 2], 8080)]
    );
    assert_eq!(
        backends_of(&desired, fe([192, 0, 2, 10], 80, Protocol::Tcp)).len(),
        2,
        "external traffic is not governed by the internal policy"
    );
    objs.node.name = Some("n3".into());
    let desired = model::desired(&objs);
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![],
        "no local endpoint, no backend"
    );
    // Endpoints elsewhere: kube-proxy drops, it does not refuse.
    assert!(desired.frontends[&web_cluster_ip()].drop_when_empty);
    let nowhere = objects(
        &[("default", svc)],
        &[("default", &slice("web-1", "web", "[]"))],
    );
    let desired = model::desired(&nowhere);
    assert!(
        !desired.frontends[&web_cluster_ip()].drop_when_empty,
        "no endpoint anywhere: refused"
    );
    objs.node.name = None;
    assert_eq!(
        backends_of(&model::desired(&objs), web_cluster_ip()),
        vec![]
    );
}

#[test]
fn topology_hints_keep_traffic_in_the_zone_as_kube_proxy_does() {
    let svc = |extra: &str| {
        format!(
            "metadata: {{name: web{extra}}}\nspec: {{clusterIP: 10.96.0.10, trafficDistribution: PreferClose, ports: [{{name: http, port: 80}}]}}"
        )
    };
    let hinted = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], hints: {forZones: [{name: a}]}},
            {addresses: [10.1.2.2], hints: {forZones: [{name: b}]}}]"#,
    );
    let with = |service: &str, slice: &str, zone: Option<&str>| {
        let mut objs = objects(&[("default", service)], &[("default", slice)]);
        objs.node.zone = zone.map(str::to_string);
        backends_of(&model::desired(&objs), web_cluster_ip())
    };
    let plain = svc("").replace(", trafficDistribution: PreferClose", "");
    assert_eq!(
        with(&svc(""), &hinted, Some("a")),
        vec![be([10, 1, 1, 2], 8080)],
        "zone a keeps zone a"
    );
    assert_eq!(
        with(&svc(""), &hinted, Some("b")),
        vec![be([10, 1, 2, 2], 8080)]
    );
    assert_eq!(
        with(&svc(""), &hinted, Some("c")).len(),
        2,
        "no endpoint for the zone: all serve"
    );
    assert_eq!(
        with(&svc(""), &hinted, None).len(),
        2,
        "unknown zone: all serve"
    );
    // The hints alone decide, as in kube-proxy: the EndpointSlice
    // controller writes them only for Services that asked.
    assert_eq!(
        with(&plain, &hinted, Some("a")),
        vec![be([10, 1, 1, 2], 8080)],
        "hints are followed whatever the Service says"
    );
    let annotated = plain.replace(
        "metadata: {name: web}",
        "metadata: {name: web, annotations: {service.kubernetes.io/topology-mode: Auto}}",
    );
    assert_eq!(
        with(&annotated, &hinted, Some("a")),
        vec![be([10, 1, 1, 2], 8080)],
        "the annotation asks too"
    );
    let partly = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], hints: {forZones: [{name: a}]}}, {addresses: [10.1.2.2]}]"#,
    );
    assert_eq!(
        with(&svc(""), &partly, Some("a")).len(),
        2,
        "an endpoint without hints disables them"
    );
}

#[test]
fn node_hints_come_before_zone_hints() {
    let svc =
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}";
    let hinted = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], hints: {forNodes: [{name: n1}], forZones: [{name: a}]}},
            {addresses: [10.1.2.2], hints: {forNodes: [{name: n2}], forZones: [{name: a}]}},
            {addresses: [10.1.3.2], hints: {forNodes: [{name: n3}], forZones: [{name: b}]}}]"#,
    );
    let with = |node: &str, zone: &str, slice: &str| {
        let mut objs = objects(&[("default", svc)], &[("default", slice)]);
        objs.node.name = Some(node.into());
        objs.node.zone = Some(zone.into());
        backends_of(&model::desired(&objs), web_cluster_ip())
    };
    assert_eq!(
        with("n2", "a", &hinted),
        vec![be([10, 1, 2, 2], 8080)],
        "this node's"
    );
    assert_eq!(
        with("n9", "a", &hinted),
        vec![be([10, 1, 1, 2], 8080), be([10, 1, 2, 2], 8080)],
        "no endpoint for this node: the zone's"
    );
    assert_eq!(with("n9", "z", &hinted).len(), 3, "neither: all");
    let one_without = hinted.replace("forNodes: [{name: n3}], ", "");
    assert_eq!(
        with("n3", "b", &one_without),
        vec![be([10, 1, 3, 2], 8080)],
        "not every endpoint has node hints: zone hints decide"
    );
}

fn node(yaml: &str) -> k8s_openapi::api::core::v1::Node {
    serde_yaml::from_str(yaml).expect("test node")
}

const NODE_PORT_WEB: &str = r#"
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
"#;

#[test]
fn node_ports_are_served_on_the_nodes_addresses_within_the_ranges() {
    let n = node(
        r#"
metadata: {name: n1}
status:
  addresses:
    - {type: InternalIP, address: 10.0.0.1}
    - {type: ExternalIP, address: 203.0.113.7}
    - {type: Hostname, address: n1}
    - {type: InternalIP, address: "fd00::1"}
"#,
    );
    let v6: IpAddr = "fd00::1".parse().expect("v6");
    assert_eq!(
        model::ThisNode::default().seeing(Some(&n)).addresses,
        vec![
            IpAddr::from([10, 0, 0, 1]),
            v6,
            IpAddr::from([203, 0, 113, 7])
        ],
        "InternalIPs first"
    );
    let s = slice("web-1", "web", "[{addresses: [10.1.1.2]}]");
    let mut objs = objects(&[("default", NODE_PORT_WEB)], &[("default", &s)]);
    objs.node.addresses = model::ThisNode::default().seeing(Some(&n)).addresses;
    objs.node.addresses.retain(|a| a.is_ipv4());
    let desired = model::desired(&objs);
    for addr in [[10, 0, 0, 1], [203, 0, 113, 7]] {
        let frontend = fe(addr, 30080, Protocol::Tcp);
        assert_eq!(
            backends_of(&desired, frontend),
            vec![be([10, 1, 1, 2], 8080)]
        );
        assert_eq!(desired.frontends[&frontend].scope, model::Scope::NodePort);
        assert_eq!(
            backends_of(&desired, fe(addr, 30053, Protocol::Udp)),
            vec![be([10, 1, 1, 2], 5353)]
        );
    }
    assert_eq!(desired.frontends.len(), 2 + 4, "cluster IP and node ports");

    objs.node.nodeport_ranges = vec!["10.0.0.0/8".parse().expect("cidr")];
    let desired = model::desired(&objs);
    assert!(
        desired
            .frontends
            .contains_key(&fe([10, 0, 0, 1], 30080, Protocol::Tcp))
    );
    assert!(
        !desired
            .frontends
            .contains_key(&fe([203, 0, 113, 7], 30080, Protocol::Tcp))
    );

    objs.node.addresses.clear();
    assert_eq!(
        model::desired(&objs).frontends.len(),
        2,
        "no known address, no NodePort"
    );
}

#[test]
fn only_node_port_and_load_balancer_services_open_node_ports() {
    let s = slice("web-1", "web", "[{addresses: [10.1.1.2]}]");
    for (kind, opens) in [
        ("ClusterIP", false),
        ("NodePort", true),
        ("LoadBalancer", true),
    ] {
        let svc = NODE_PORT_WEB.replace("type: NodePort", &format!("type: {kind}"));
        let mut objs = objects(&[("default", &svc)], &[("default", &s)]);
        objs.node.addresses = vec![IpAddr::from([10, 0, 0, 1])];
        let desired = model::desired(&objs);
        assert_eq!(
            desired
                .frontends
                .contains_key(&fe([10, 0, 0, 1], 30080, Protocol::Tcp)),
            opens,
            "{kind}"
        );
    }
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and `extra`
/// in its spec, reached from outside at `LOCAL_LB_WEB_EXTERNAL`.
fn local_lb_web(extra: &str) -> String {
    format!(
        r#"
metadata: {{name: web}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.10]
  externalTrafficPolicy: Local
  {extra}
  ports: [{{name: http, port: 80, nodePort: 30080}}]
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.1}}]
"#
    )
}

/// `local_lb_web`'s external IP, load balancer IP and node port (on node
/// address 10.0.0.1).
const LOCAL_LB_WEB_EXTERNAL: [([u8; 4], u16); 3] = [
    ([192, 0, 2, 10], 80),
    ([198, 51, 100, 1], 80),
    ([10, 0, 0, 1], 30080),
];

#[test]
fn external_traffic_policy_local_keeps_external_traffic_on_this_node() {
    let svc = &local_lb_web("");
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], nodeName: n1},
            {addresses: [10.1.2.2], nodeName: n2},
            {addresses: [10.1.4.2], nodeName: n1,
             conditions: {ready: false, serving: true, terminating: true}}]"#,
    );
    let mut objs = objects(&[("default", svc)], &[("default", &s)]);
    objs.node.name = Some("n1".into());
    objs.node.addresses = vec![IpAddr::from([10, 0, 0, 1])];
    let desired = model::desired(&objs);
    for external in LOCAL_LB_WEB_EXTERNAL.map(|(a, port)| fe(a, port, Protocol::Tcp)) {
        assert_eq!(
            backends_of(&desired, external),
            vec![be([10, 1, 1, 2], 8080)],
            "{external:?}"
        );
    }
    assert_eq!(
        backends_of(&desired, web_cluster_ip()).len(),
        2,
        "cluster IP traffic is not governed by the external policy"
    );
    // Seen from n2, only its own endpoint serves.
    objs.node.name = Some("n2".into());
    let desired = model::desired(&objs);
    assert_eq!(
        backends_of(&desired, fe([10, 0, 0, 1], 30080, Protocol::Tcp)),
        vec![be([10, 1, 2, 2], 8080)]
    );
    objs.node.name = Some("n3".into());
    assert_eq!(
        backends_of(
            &model::desired(&objs),
            fe([198, 51, 100, 1], 80, Protocol::Tcp)
        ),
        vec![]
    );
}

#[test]
fn local_clients_of_external_local_frontends_get_every_endpoint() {
    let svc = &local_lb_web("internalTrafficPolicy: Local");
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], nodeName: n1},
            {addresses: [10.1.2.2], nodeName: n2}]"#,
    );
    let mut objs = objects(&[("default", svc)], &[("default", &s)]);
    objs.node.name = Some("n3".into());
    objs.node.addresses = vec![IpAddr::from([10, 0, 0, 1])];
    let desired = model::desired(&objs);
    let both = vec![be([10, 1, 1, 2], 8080), be([10, 1, 2, 2], 8080)];
    for external in LOCAL_LB_WEB_EXTERNAL.map(|(a, port)| fe(a, port, Protocol::Tcp)) {
        // Outside clients: this node has no endpoint, so they are dropped.
        let state = &desired.frontends[&external];
        assert!(
            state.backends.is_empty() && state.drop_when_empty,
            "{external:?}"
        );
        assert!(state.local_twin, "{external:?}");
        // Pods and processes on the node reach every endpoint, unmasqueraded.
        let local = Frontend {
            clients: Clients::Local,
            ..external
        };
        let twin = &desired.frontends[&local];
        assert_eq!(twin.backends, both, "{external:?}");
        assert!(!twin.drop_when_empty && !twin.snat && !twin.local_twin);
    }
    // The cluster IP follows internalTrafficPolicy, for local clients too:
    // no twin, and no endpoint on n3.
    let cluster = web_cluster_ip();
    assert!(desired.frontends[&cluster].backends.is_empty());
    assert!(!desired.frontends[&cluster].local_twin);
    let twins = desired
        .frontends
        .keys()
        .filter(|f| f.clients == Clients::Local)
        .count();
    assert_eq!(twins, 3);
    // Where outside and local clients get the same endpoints, no twin.
    objs.node.name = Some("n1".into());
    let s = slice("web-1", "web", r#"[{addresses: [10.1.1.2], nodeName: n1}]"#);
    objs.slices = objects(&[], &[("default", &s)]).slices;
    let desired = model::desired(&objs);
    assert!(desired.frontends.keys().all(|f| f.clients == Clients::All));
    assert!(desired.frontends.values().all(|s| !s.local_twin));
}

#[test]
fn health_check_counts_distinct_local_ready_addresses_over_all_ports() {
    let svc = r#"
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports:
    - {name: http, port: 80}
    - {name: dns, port: 53, protocol: UDP}
"#;
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], nodeName: n1},
            {addresses: [10.1.3.2], nodeName: n1,
             conditions: {ready: false, serving: true, terminating: true}},
            {addresses: [10.1.2.2], nodeName: n2}]"#,
    );
    let mut objs = objects(&[("default", svc)], &[("default", &s)]);
    objs.node.name = Some("n1".into());
    let index = model::SliceIndex::new(&objs);
    let web = key("default", "web");
    assert_eq!(model::health_check(&objs, &index, &web), Some((32000, 1)));
    objs.node.name = Some("n3".into());
    assert_eq!(model::health_check(&objs, &index, &web), Some((32000, 0)));
    let cluster = svc.replace(
        "externalTrafficPolicy: Local",
        "externalTrafficPolicy: Cluster",
    );
    let objs = objects(&[("default", &cluster)], &[("default", &s)]);
    assert_eq!(model::health_check(&objs, &index, &web), None);
}

#[test]
fn dual_stack_services_serve_each_family_from_its_own_slices() {
    let svc = r#"
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  loadBalancerSourceRanges: [192.0.2.0/24, "2001:db8::/32"]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}, {ip: "2001:db8:1::1"}]
"#;
    let v4 = slice("web-v4", "web", "[{addresses: [10.1.1.2]}]");
    let v6 = slice("web-v6", "web", r#"[{addresses: ["fd00:1:1::2"]}]"#)
        .replace("addressType: IPv4", "addressType: IPv6");
    let mut objs = objects(&[("default", svc)], &[("default", &v4), ("default", &v6)]);
    objs.node.addresses = vec![IpAddr::from([10, 0, 0, 1]), "fd00::1".parse().expect("v6")];
    let desired = model::desired(&objs);
    let at = |addr: &str, port: u16| Frontend {
        addr: addr.parse().expect("address"),
        port,
        protocol: Protocol::Tcp,
        clients: Default::default(),
    };
    let v4_backend: Vec<SocketAddr> = vec!["10.1.1.2:8080".parse().expect("v4")];
    let v6_backend: Vec<SocketAddr> = vec!["[fd00:1:1::2]:8080".parse().expect("v6")];
    for (frontend, backends) in [
        (at("10.96.0.10", 80), &v4_backend),
        (at("198.51.100.1", 80), &v4_backend),
        (at("10.0.0.1", 30080), &v4_backend),
        (at("fd00:96::10", 80), &v6_backend),
        (at("2001:db8:1::1", 80), &v6_backend),
        (at("fd00::1", 30080), &v6_backend),
    ] {
        assert_eq!(&backends_of(&desired, frontend), backends, "{frontend:?}");
    }
    let ranges = |addr: &str| {
        let state = &desired.frontends[&at(addr, 80)];
        state
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ranges("198.51.100.1"),
        ["192.0.2.0/24"],
        "each family its own ranges"
    );
    assert_eq!(ranges("2001:db8:1::1"), ["2001:db8::/32"]);
    assert_eq!(
        desired.snat_addr4,
        Some(std::net::Ipv4Addr::new(10, 0, 0, 1))
    );
    assert_eq!(desired.snat_addr6, Some("fd00::1".parse().expect("v6")));
}

#[test]
fn a_single_stack_service_opens_no_node_port_on_the_other_family() {
    let s = slice("web-1", "web", "[{addresses: [10.1.1.2]}]");
    let mut objs = objects(&[("default", NODE_PORT_WEB)], &[("default", &s)]);
    objs.node.addresses = vec![IpAddr::from([10, 0, 0, 1]), "fd00::1".parse().expect("v6")];
    let desired = model::desired(&objs);
    assert!(
        desired
            .frontends
            .contains_key(&fe([10, 0, 0, 1], 30080, Protocol::Tcp))
    );
    assert!(
        desired.frontends.keys().all(|f| f.addr.is_ipv4()),
        "no IPv6 NodePort for an IPv4-only Service: {:?}",
        desired.frontends.keys()
    );
}

#[test]
fn omitted_conditions_read_as_kube_proxy_reads_them() {
    // ready omitted: ready; serving omitted: serving; terminating omitted:
    // not terminating. A terminating endpoint without `serving` is the
    // fallback when nothing is ready.
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.1.2], conditions: {ready: false, terminating: true}},
            {addresses: [10.1.2.2], conditions: {ready: false, serving: false, terminating: true}}]"#,
    );
    let objs = objects(&[("default", WEB)], &[("default", &s)]);
    let desired = model::desired(&objs);
    assert_eq!(
        backends_of(&desired, web_cluster_ip()),
        vec![be([10, 1, 1, 2], 8080)]
    );
    let s = slice(
        "web-1",
        "web",
        r#"[{addresses: [10.1.3.2], conditions: {}}]"#,
    );
    let objs = objects(&[("default", WEB)], &[("default", &s)]);
    assert_eq!(
        backends_of(&model::desired(&objs), web_cluster_ip()),
        vec![be([10, 1, 3, 2], 8080)]
    );
}

#[test]
fn load_balancer_ingress_in_proxy_mode_is_not_captured() {
    let svc = r#"
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1, ipMode: Proxy}, {ip: 198.51.100.2, ipMode: VIP}, {ip: 198.51.100.3}]
"#;
    let s = slice("web-1", "web", "[{addresses: [10.1.1.2]}]");
    let desired = model::desired(&objects(&[("default", svc)], &[("default", &s)]));
    let ingress: Vec<IpAddr> = desired
        .frontends
        .iter()
        .filter(|(_, state)| state.scope == model::Scope::LoadBalancer)
        .map(|(f, _)| f.addr)
        .collect();
    assert_eq!(
        ingress,
        vec![
            IpAddr::from([198, 51, 100, 2]),
            IpAddr::from([198, 51, 100, 3])
        ]
    );
}

#[test]
fn a_node_being_deleted_or_tainted_by_the_autoscaler_is_leaving() {
    let plain = node("metadata: {name: n1}");
    assert!(!model::ThisNode::default().seeing(Some(&plain)).leaving);
    let tainted = node(
        "metadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]}",
    );
    assert!(model::ThisNode::default().seeing(Some(&tainted)).leaving);
    let other_taint =
        node("metadata: {name: n1}\nspec: {taints: [{key: dedicated, effect: NoSchedule}]}");
    assert!(
        !model::ThisNode::default()
            .seeing(Some(&other_taint))
            .leaving
    );
    let deleted = node("metadata: {name: n1, deletionTimestamp: \"2026-12-04T10:00:00Z\"}");
    assert!(model::ThisNode::default().seeing(Some(&deleted)).leaving);
}

#[test]
fn source_ranges_holding_the_node_admit_the_load_balancer_ips() {
    let svc = r#"
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: [10.0.0.0/24]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2}]
"#;
    let s = slice("web-1", "web", "[{addresses: [10.1.1.2]}]");
    let mut objs = objects(&[("default", svc)], &[("default", &s)]);
    let ranges = |objs: &Objects| -> Vec<String> {
        let desired = model::desired(objs);
        desired.frontends[&fe([198, 51, 100, 1], 80, Protocol::Tcp)]
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    objs.node.addresses = vec![IpAddr::from([10, 0, 0, 7])];
    assert_eq!(
        ranges(&objs),
        ["10.0.0.0/24", "198.51.100.1/32", "198.51.100.2/32"],
        "the node is inside the ranges: its traffic through the load balancer is too"
    );
    objs.node.addresses = vec![IpAddr::from([10, 0, 9, 7])];
    assert_eq!(ranges(&objs), ["10.0.0.0/24"], "outside: only the ranges");
}

#[test]
fn source_nat_uses_the_hosts_address_of_a_family_the_node_lacks() {
    let mut objs = objects(&[], &[]);
    objs.node.addresses = vec![IpAddr::from([10, 0, 0, 1])];
    objs.node.host_addresses = vec![
        IpAddr::from([192, 168, 1, 5]),
        "2001:db8::5".parse().expect("v6"),
    ];
    let desired = model::desired(&objs);
    assert_eq!(
        desired.snat_addr4,
        Some(std::net::Ipv4Addr::new(10, 0, 0, 1)),
        "the Node's address first"
    );
    assert_eq!(desired.snat_addr6, Some("2001:db8::5".parse().expect("v6")));
    assert!(
        desired.frontends.is_empty(),
        "host addresses open no NodePorts"
    );
}
