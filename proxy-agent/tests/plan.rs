//! `proxy-agent plan`: the binary, as a user runs it, without privileges.

use std::process::Command;

fn run_plan(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run proxy-agent plan");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn examples() -> String {
    format!("{}/../examples", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn plan_prints_the_examples_frontends_as_json_and_table() {
    let (code, json, _) = run_plan(&["--manifests", &examples(), "-o", "json"]);
    assert_eq!(code, 0);
    let plan: serde_json::Value = serde_json::from_str(&json).expect("json");
    let frontends = plan["frontends"].as_array().expect("frontends");
    assert_eq!(frontends.len(), 2);
    let http = frontends.iter().find(|f| f["port"] == 80).expect("port 80");
    assert_eq!(http["address"], "10.96.0.10");
    assert_eq!(http["protocol"], "TCP");
    assert_eq!(http["scope"], "ClusterIP");
    assert_eq!(http["service"], "demo/web");
    assert_eq!(
        http["backends"],
        serde_json::json!(["10.1.1.2:8080", "10.1.2.2:8080"])
    );
    let (code, table, _) = run_plan(&["--manifests", &examples()]);
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("10.96.0.10") && l.contains("10.1.2.2:5353")),
        "{table}"
    );
}

#[test]
fn plan_reports_bad_objects_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("xdproxy-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 0}]}\n";
    std::fs::write(dir.join("bad.yaml"), bad).expect("write");
    let (code, out, err) = run_plan(&["--manifests", dir.to_str().expect("path"), "-o", "json"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 2);
    assert!(
        err.contains("Service default/bad") && err.contains("spec.ports[0].port"),
        "{err}"
    );
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(plan["frontends"].as_array().map(Vec::len), Some(0));
}

#[test]
fn plan_for_a_node_applies_node_local_policies() {
    let dir = std::env::temp_dir().join(format!("xdproxy-plan-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let manifests = "apiVersion: v1\nkind: Service\nmetadata: {name: loc}\nspec: {clusterIP: 10.96.0.40, internalTrafficPolicy: Local, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: loc-1, labels: {kubernetes.io/service-name: loc}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.1.1.2], nodeName: n1}, {addresses: [10.1.2.2], nodeName: n2}]\n";
    std::fs::write(dir.join("loc.yaml"), manifests).expect("write");
    let path = dir.to_str().expect("path").to_string();
    let backends = |args: &[&str]| -> serde_json::Value {
        let (code, out, err) = run_plan(args);
        assert_eq!(code, 0, "{err}");
        let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
        plan["frontends"][0]["backends"].clone()
    };
    assert_eq!(
        backends(&["--manifests", &path, "--node-name", "n2", "-o", "json"]),
        serde_json::json!(["10.1.2.2:8080"])
    );
    assert_eq!(
        backends(&["--manifests", &path, "-o", "json"]),
        serde_json::json!([])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plan_for_a_zone_applies_topology_hints() {
    let dir = std::env::temp_dir().join(format!("xdproxy-plan-zone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let manifests = "apiVersion: v1\nkind: Service\nmetadata: {name: z}\nspec: {clusterIP: 10.96.0.50, trafficDistribution: PreferClose, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: z-1, labels: {kubernetes.io/service-name: z}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.1.1.2], hints: {forZones: [{name: a}]}}, {addresses: [10.1.2.2], hints: {forZones: [{name: b}]}}]\n";
    std::fs::write(dir.join("z.yaml"), manifests).expect("write");
    let path = dir.to_str().expect("path").to_string();
    let (code, out, err) = run_plan(&["--manifests", &path, "--zone", "b", "-o", "json"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        plan["frontends"][0]["backends"],
        serde_json::json!(["10.1.2.2:8080"])
    );
}

#[test]
fn plan_shows_node_ports_policies_affinity_ranges_and_health_checks() {
    let dir = std::env::temp_dir().join(format!("xdproxy-plan-lb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses: [{type: InternalIP, address: 10.0.0.1}, {type: ExternalIP, address: 203.0.113.7}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [10.1.1.2], nodeName: n1}
  - {addresses: [10.1.2.2], nodeName: n2}
"#;
    std::fs::write(dir.join("lb.yaml"), yaml).expect("write");
    let path = dir.to_str().expect("path").to_string();
    let plan_for = |args: &[&str]| {
        let mut all = vec!["--manifests", path.as_str(), "-o", "json"];
        all.extend_from_slice(args);
        let (code, json, err) = run_plan(&all);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&json).expect("json")
    };
    let plan = plan_for(&["--node-name", "n1"]);
    let frontends = plan["frontends"].as_array().expect("frontends");
    let find = |address: &str, port: u16| {
        frontends
            .iter()
            .find(|f| f["address"] == address && f["port"] == port)
            .unwrap_or_else(|| panic!("{address}:{port} in {frontends:?}"))
    };
    let cluster = find("10.96.0.30", 80);
    assert_eq!(cluster["backends"].as_array().map(Vec::len), Some(2));
    assert_eq!(cluster["affinityTimeoutSeconds"], 10800);
    let lb = find("198.51.100.1", 80);
    assert_eq!(lb["scope"], "LoadBalancer");
    assert_eq!(lb["backends"], serde_json::json!(["10.1.1.2:8080"]));
    assert_eq!(lb["sourceRanges"], serde_json::json!(["192.0.2.0/24"]));
    for node_ip in ["10.0.0.1", "203.0.113.7"] {
        let np = find(node_ip, 30080);
        assert_eq!(np["scope"], "NodePort");
        assert_eq!(np["backends"], serde_json::json!(["10.1.1.2:8080"]));
        assert!(np.get("sourceRanges").is_none(), "ranges are for LB IPs");
    }
    assert_eq!(
        plan["healthCheckNodePorts"],
        serde_json::json!([{"port": 32000, "service": "demo/lb", "localEndpoints": 1}])
    );
    // Another node, without local endpoints: external traffic is dropped.
    let plan = plan_for(&["--node-name", "n3", "--nodeport-addresses", "10.0.0.0/8"]);
    let frontends = plan["frontends"].as_array().expect("frontends");
    assert!(
        frontends.iter().all(|f| f["address"] != "10.0.0.1"),
        "n3 has no Node object, so no node ports: {frontends:?}"
    );
    let lb = frontends
        .iter()
        .find(|f| f["address"] == "198.51.100.1")
        .expect("lb");
    assert_eq!(lb["withoutBackends"], "drop");
    assert_eq!(plan["healthCheckNodePorts"][0]["localEndpoints"], 0);
    let (_, table, _) = run_plan(&["--manifests", &path, "--node-name", "n1"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        table.contains("affinity=10800s,ranges=192.0.2.0/24"),
        "{table}"
    );
    assert!(
        table.contains("health check node port 32000 for demo/lb: 1 local endpoints"),
        "{table}"
    );
}

const ANNOTATED: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  annotations: {xdproxy.io/lb-algorithm: maglev, xdproxy.io/maglev-table-size: "251"}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec: {clusterIP: 10.96.0.21, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.1.1.2]
  conditions: {ready: true}
- addresses: [10.1.2.2]
  conditions: {ready: false, serving: true, terminating: true}
"#;

#[test]
fn plan_shows_algorithms_from_annotations_and_flags_and_terminating_endpoints() {
    let dir = std::env::temp_dir().join(format!("xdproxy-plan-alg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("svc.yaml"), ANNOTATED).expect("write");
    let path = dir.to_str().expect("path").to_string();
    let (code, json, err) = run_plan(&[
        "--manifests",
        &path,
        "--lb-algorithm",
        "least-connections",
        "-o",
        "json",
    ]);
    let bad = ANNOTATED.replace("\"251\"", "\"250\"");
    std::fs::write(dir.join("svc.yaml"), bad).expect("write");
    let (bad_code, _, bad_err) = run_plan(&["--manifests", &path]);
    let (flag_code, _, flag_err) = run_plan(&["--manifests", &path, "--lb-algorithm", "fastest"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&json).expect("json");
    let find = |addr: &str| {
        plan["frontends"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["address"] == addr).cloned())
            .expect(addr)
    };
    let web = find("10.96.0.20");
    assert_eq!(web["algorithm"], "maglev");
    assert_eq!(web["tableSize"], 251);
    assert_eq!(web["backends"], serde_json::json!(["10.1.1.2:8080"]));
    assert_eq!(web["terminating"], serde_json::json!(["10.1.2.2:8080"]));
    assert_eq!(find("10.96.0.21")["algorithm"], "least-connections");
    // A size that is not a prime rejects the Service, naming the annotation.
    assert_eq!(bad_code, 2);
    assert!(
        bad_err.contains("xdproxy.io/maglev-table-size"),
        "{bad_err}"
    );
    assert_ne!(flag_code, 0);
    assert!(flag_err.contains("round-robin"), "{flag_err}");
}

#[test]
fn plan_reports_a_service_over_the_slot_budget_and_leaves_it_out() {
    let dir = std::env::temp_dir().join(format!("xdproxy-plan-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // Three ports with their own target ports: three 131071-entry tables
    // (393213 slots), over the default budget of 262144. Its 40 external
    // IPs share them and cost nothing more.
    let ips: Vec<String> = (1..=40).map(|i| format!("203.0.113.{i}")).collect();
    let big = format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: big
  namespace: demo
  annotations: {{"xdproxy.io/lb-algorithm": "maglev", "xdproxy.io/maglev-table-size": "131071"}}
spec:
  clusterIP: 10.96.0.20
  externalIPs: [{}]
  ports: [{{name: a, port: 80}}, {{name: b, port: 81}}, {{name: c, port: 82}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: big-1, namespace: demo, labels: {{kubernetes.io/service-name: big}}}}
addressType: IPv4
ports: [{{name: a, port: 8080}}, {{name: b, port: 8081}}, {{name: c, port: 8082}}]
endpoints: [{{addresses: [10.1.1.2]}}]
"#,
        ips.join(", ")
    );
    std::fs::write(dir.join("big.yaml"), big).expect("write");
    let path = dir.to_str().expect("path").to_string();
    let (code, out, err) = run_plan(&["--manifests", &path, "-o", "json"]);
    // With a budget of three tables it fits.
    let (roomy, roomy_out, _) = run_plan(&["--manifests", &path, "--slot-budget", "393213"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("Service demo/big") && err.contains("393213") && err.contains("262144"),
        "{err}"
    );
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(plan["frontends"], serde_json::json!([]), "not programmed");
    assert_eq!(roomy, 0);
    assert_eq!(
        roomy_out.lines().filter(|l| l.contains("demo/big")).count(),
        123
    );
}
