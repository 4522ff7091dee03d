//! `proxy-agent plan`: the binary, as a user runs it, without privileges.
//! Its manifests are proxy-tests' fixtures.

use std::{path::PathBuf, process::Command};

use proxy_tests::manifests;

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

/// A directory holding one manifest file, removed on drop.
struct Manifests(PathBuf);

impl Manifests {
    fn new(tag: &str, text: &str) -> Manifests {
        let dir = std::env::temp_dir().join(format!("xdproxy-plan-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let manifests = Manifests(dir);
        manifests.write(text);
        manifests
    }

    fn write(&self, text: &str) {
        std::fs::write(self.0.join("objects.yaml"), text).expect("write");
    }

    /// The directory, as `--manifests` takes it.
    fn path(&self) -> String {
        self.0.to_str().expect("path").to_string()
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
    let dir = Manifests::new("bad", &manifests::plan_bad_port());
    let (code, out, err) = run_plan(&["--manifests", &dir.path(), "-o", "json"]);
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
    let dir = Manifests::new("local", &manifests::plan_node_local());
    let path = dir.path();
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
}

#[test]
fn plan_for_a_zone_applies_topology_hints() {
    let dir = Manifests::new("zone", &manifests::plan_zones());
    let (code, out, err) = run_plan(&["--manifests", &dir.path(), "--zone", "b", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        plan["frontends"][0]["backends"],
        serde_json::json!(["10.1.2.2:8080"])
    );
}

#[test]
fn plan_shows_node_ports_policies_affinity_ranges_and_health_checks() {
    let dir = Manifests::new("lb", &manifests::plan_load_balancer());
    let path = dir.path();
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
    assert!(
        table.contains("affinity=10800s,ranges=192.0.2.0/24"),
        "{table}"
    );
    assert!(
        table.contains("health check node port 32000 for demo/lb: 1 local endpoints"),
        "{table}"
    );
}

#[test]
fn plan_shows_algorithms_from_annotations_and_flags_and_terminating_endpoints() {
    let annotated = manifests::plan_annotated();
    let dir = Manifests::new("alg", &annotated);
    let path = dir.path();
    let (code, json, err) = run_plan(&[
        "--manifests",
        &path,
        "--lb-algorithm",
        "least-connections",
        "-o",
        "json",
    ]);
    let bad = annotated.replace("\"251\"", "\"250\"");
    assert_ne!(bad, annotated);
    dir.write(&bad);
    let (bad_code, _, bad_err) = run_plan(&["--manifests", &path]);
    let (flag_code, _, flag_err) = run_plan(&["--manifests", &path, "--lb-algorithm", "fastest"]);
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
    // Three ports with their own target ports: three 131071-entry tables
    // (393213 slots), over the default budget of 262144. Its 40 external
    // IPs share them and cost nothing more.
    let dir = Manifests::new("budget", &manifests::plan_over_budget());
    let path = dir.path();
    let (code, out, err) = run_plan(&["--manifests", &path, "-o", "json"]);
    // With a budget of three tables it fits.
    let (roomy, roomy_out, _) = run_plan(&["--manifests", &path, "--slot-budget", "393213"]);
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
