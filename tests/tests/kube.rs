//! The agent against a test API server that speaks the Kubernetes list and
//! watch protocol, with real traffic in network namespaces.
//!
//! The API server listens on the node namespace's loopback, as an API server
//! reachable from the node would; the agent gets a kubeconfig for it.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use proxy_tests::{
    agent::Agent,
    apiserver::ApiServer,
    clients::HttpConn,
    manifests::{self, HTTP_PORT, VIP},
    netns::{Netns, unique_prefix},
    servers::Servers,
    topology::Topology,
    traffic::Traffic,
};
use serde_json::Value;

const BACKENDS: usize = 3;
const NODE: &str = "node-1";

fn json(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).expect("test object")
}

fn node_object() -> Value {
    json(&manifests::node(NODE, &[]))
}

struct KubeLab {
    topology: Topology,
    _servers: Vec<Servers>,
    api: ApiServer,
    agent: Option<Agent>,
    scratch: PathBuf,
}

impl KubeLab {
    fn start(tag: &str, objects: &[Value]) -> anyhow::Result<KubeLab> {
        let topology = Topology::build(&unique_prefix(tag), BACKENDS)?;
        topology.finish_checksums_on_node_egress()?;
        let servers = topology.start_servers()?;
        let api = ApiServer::start_in(&topology.node)?;
        for object in objects {
            api.apply(object.clone())?;
        }
        let scratch = std::env::temp_dir().join(format!("xdproxy-kube-{}", topology.prefix()));
        std::fs::create_dir_all(&scratch)?;
        let kubeconfig = scratch.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let ifaces = topology.agent_ifaces("");
        let agent = Agent::start_kube(&topology.node, &kubeconfig, NODE, &ifaces)?;
        Ok(KubeLab {
            topology,
            _servers: servers,
            api,
            agent: Some(agent),
            scratch,
        })
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent")
    }

    /// Writes an object and waits until the agent has synced after it.
    fn apply(&mut self, object: Value) -> anyhow::Result<()> {
        let syncs = self.agent().log().matches("synced:").count();
        self.api.apply(object)?;
        self.agent()
            .wait_for_syncs(syncs + 1, Duration::from_secs(10))
    }

    fn connect(&self) -> anyhow::Result<HttpConn> {
        HttpConn::connect(
            &self.topology.client,
            SocketAddrV4::new(VIP, HTTP_PORT),
            Duration::from_secs(2),
        )
    }

    /// New connections until `want` answers (the agent may still be
    /// catching up with the API server).
    fn reach(&self, want: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.connect()?.get()? == want {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(5));
        }
        bail!(
            "{want} never answered in 15 s; agent log:\n{}",
            self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
        )
    }

    /// GET on the agent's own HTTP endpoints, from the node namespace.
    fn agent_http(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.topology.node, port, path)
    }

    /// Polls an agent endpoint until it answers `code`.
    fn wait_for_code(
        &self,
        port: u16,
        path: &str,
        code: u16,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (got, body) = self.agent_http(port, path)?;
            if got == code {
                return Ok(body);
            }
            if Instant::now() > deadline {
                bail!("{path} answered {got} ({body:?}), not {code}, for {timeout:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        self.agent.take();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn http_get(ns: &Netns, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = ns.run(move || TcpStream::connect(("127.0.0.1", port)))??;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status code")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

fn web(backends: &[usize]) -> Vec<Value> {
    vec![
        json(&manifests::service()),
        json(&manifests::slice(backends)),
        node_object(),
    ]
}

#[test]
fn api_changes_reach_the_datapath() -> anyhow::Result<()> {
    if !common::ready("api_changes_reach_the_datapath") {
        return Ok(());
    }
    let mut lab = KubeLab::start("api", &web(&[0, 1]))?;
    lab.reach("backend0")?;
    lab.reach("backend1")?;
    lab.apply(json(&manifests::slice(&[0, 1, 2])))?;
    lab.reach("backend2")?;
    lab.apply(json(&manifests::slice(&[1, 2])))?;
    for _ in 0..200 {
        assert_ne!(
            lab.connect()?.get()?,
            "backend0",
            "a removed endpoint got a new connection"
        );
    }
    let syncs = lab.agent().log().matches("synced:").count();
    lab.api.delete("Service", "demo", "web")?;
    lab.agent()
        .wait_for_syncs(syncs + 1, Duration::from_secs(10))?;
    assert!(lab.connect().is_err(), "the deleted Service still answers");
    let (code, metrics) = lab.agent_http(10249, "/metrics")?;
    assert_eq!(code, 200);
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_network_programming_duration_seconds_count "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .context("programming latency count")?;
    assert!(count >= 3, "every change measured: {count}");
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket"));
    assert_eq!(lab.agent_http(10256, "/healthz")?.0, 200);
    assert!(
        lab.agent().log().contains("changed services"),
        "one change is a partial pass"
    );
    Ok(())
}

#[test]
fn an_agent_started_before_the_objects_exist_programs_them_when_they_come() -> anyhow::Result<()> {
    if !common::ready("an_agent_started_before_the_objects_exist_programs_them_when_they_come") {
        return Ok(());
    }
    let mut lab = KubeLab::start("empty", &[])?;
    assert!(lab.connect().is_err(), "nothing is served yet");
    lab.apply(node_object())?;
    lab.apply(json(&manifests::slice(&[0, 2])))?;
    lab.apply(json(&manifests::service()))?;
    lab.reach("backend0")?;
    lab.reach("backend2")?;
    Ok(())
}

#[test]
fn api_trouble_never_costs_traffic_and_the_agent_catches_up() -> anyhow::Result<()> {
    if !common::ready("api_trouble_never_costs_traffic_and_the_agent_catches_up") {
        return Ok(());
    }
    let mut lab = KubeLab::start("trb", &web(&[0, 1]))?;
    lab.wait_for_code(10256, "/readyz", 200, Duration::from_secs(5))?;
    let traffic = Traffic::start(&lab.topology.client)?;

    // Errors on every request: streams end, relists fail.
    lab.api.set_failing(true);
    let why = lab.wait_for_code(10256, "/readyz", 503, Duration::from_secs(10))?;
    assert!(why.contains("watching"), "{why}");
    thread::sleep(Duration::from_millis(500));
    lab.api.set_failing(false);
    lab.wait_for_code(10256, "/readyz", 200, Duration::from_secs(15))?;

    // Down altogether (connections refused), then back.
    lab.api.set_down(true)?;
    lab.wait_for_code(10256, "/readyz", 503, Duration::from_secs(10))?;
    thread::sleep(Duration::from_millis(500));
    lab.api.set_down(false)?;
    lab.wait_for_code(10256, "/readyz", 200, Duration::from_secs(15))?;

    // Slow.
    lab.api.set_delay(Duration::from_millis(300));
    thread::sleep(Duration::from_millis(600));
    lab.api.set_delay(Duration::ZERO);

    // History expired while the streams drop: a change made meanwhile is
    // only seen through a relist after 410 Gone.
    lab.api.compact();
    lab.api.apply(json(&manifests::slice(&[0, 1, 2])))?;
    lab.api.compact();
    lab.api.close_watches();
    lab.reach("backend2")?;

    let seen = traffic.stop()?;
    seen.assert_clean(100);
    let log = lab.agent().log();
    assert!(
        log.contains("the datapath keeps the last programmed state"),
        "{log}"
    );
    Ok(())
}

#[test]
fn services_of_another_proxy_and_headless_slices_are_never_listed() -> anyhow::Result<()> {
    if !common::ready("services_of_another_proxy_and_headless_slices_are_never_listed") {
        return Ok(());
    }
    let other_vip = "10.96.0.11";
    let other = manifests::service()
        .replace(
            "name: web\n",
            "name: other\n  labels: {service.kubernetes.io/service-proxy-name: someone-else}\n",
        )
        .replace(&VIP.to_string(), other_vip);
    let other_slice = manifests::slice(&[1])
        .replace("name: web-1", "name: other-1")
        .replace(
            "kubernetes.io/service-name: web",
            "kubernetes.io/service-name: other",
        );
    // A slice of `web` the EndpointSlice controller marked headless: not ours.
    let headless_slice = manifests::slice(&[2])
        .replace("name: web-1", "name: web-headless")
        .replace(
            "labels: {kubernetes.io/service-name: web}",
            "labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: \"\"}",
        );
    let mut objects = web(&[0]);
    objects.extend([json(&other), json(&other_slice), json(&headless_slice)]);
    let mut lab = KubeLab::start("own", &objects)?;
    lab.reach("backend0")?;
    for _ in 0..50 {
        assert_eq!(
            lab.connect()?.get()?,
            "backend0",
            "a headless slice's endpoint was used"
        );
    }
    let out = std::process::Command::new(proxy_tests::agent::binary()?)
        .args(["inspect", "services", "-o", "json", "--bpffs"])
        .arg(lab.agent().bpffs())
        .output()
        .context("proxy-agent inspect services")?;
    let report: Value = serde_json::from_slice(&out.stdout).context("inspect json")?;
    let frontends: Vec<&str> = report["services"]
        .as_array()
        .context("services")?
        .iter()
        .filter_map(|s| s["frontend"].as_str())
        .collect();
    assert!(
        frontends.iter().all(|f| !f.starts_with(other_vip)),
        "another proxy's Service was programmed: {frontends:?}"
    );
    assert!(
        frontends.iter().any(|f| f.starts_with(&VIP.to_string())),
        "{frontends:?}"
    );
    Ok(())
}
