//! `proxy-agent inspect` against a running node: what the test's own
//! connections left in the pinned maps reads back as the frontend, its
//! backends, their flow counts and the flows' conntrack entries.
//!
//! client (10.0.1.2) --cl0--> node --be{i}--> backend i (10.1.{i+1}.2)

use std::{collections::BTreeSet, net::SocketAddrV4, path::Path, process::Command, time::Duration};

use anyhow::{Context, bail, ensure};
use proxy_common::Counter;
use proxy_tests::{
    agent::{self, Agent},
    clients::HttpConn,
    manifests::{self, BACKEND_HTTP_PORT, HTTP_PORT, ManifestFile, UDP_PORT, VIP},
    netns::unique_prefix,
    privilege,
    topology::{Topology, backend_addr},
};
use serde_json::Value;

/// Connections opened (and kept open while the maps are read).
const CONNECTIONS: usize = 6;
const BACKENDS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(5);

/// `proxy-agent inspect ARGS --bpffs BPFFS`: stdout, or an error with stderr.
fn inspect(bpffs: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(agent::binary()?)
        .arg("inspect")
        .args(args)
        .arg("--bpffs")
        .arg(bpffs)
        .output()
        .context("running proxy-agent inspect")?;
    if !out.status.success() {
        bail!(
            "inspect {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("inspect output is not UTF-8")
}

fn inspect_json(bpffs: &Path, subject: &str) -> anyhow::Result<Value> {
    let text = inspect(bpffs, &[subject, "-o", "json"])?;
    serde_json::from_str(&text).with_context(|| format!("inspect {subject} -o json: {text}"))
}

fn array<'a>(value: &'a Value, field: &str) -> anyhow::Result<&'a Vec<Value>> {
    value[field]
        .as_array()
        .with_context(|| format!("no array {field:?} in {value}"))
}

fn http_vip() -> String {
    SocketAddrV4::new(VIP, HTTP_PORT).to_string()
}

fn http_backends() -> BTreeSet<String> {
    (0..BACKENDS)
        .map(|i| SocketAddrV4::new(backend_addr(i), BACKEND_HTTP_PORT).to_string())
        .collect()
}

#[test]
fn inspect_reads_back_what_connections_left_in_the_maps() -> anyhow::Result<()> {
    if !privilege::require_root("inspect_reads_back_what_connections_left_in_the_maps") {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("insp"), BACKENDS)?;
    let _servers = topology.start_servers()?;
    let manifest = ManifestFile::new(
        &format!("inspect-{}", topology.prefix()),
        &manifests::web(&[0, 1]),
    )?;
    let ifaces = topology.agent_ifaces("");
    let agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;

    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut conn =
            HttpConn::connect(&topology.client, SocketAddrV4::new(VIP, HTTP_PORT), TIMEOUT)?;
        conn.get()?;
        conns.push(conn);
    }
    let bpffs = agent.bpffs();
    check_services(bpffs)?;
    check_backends(bpffs)?;
    check_conntrack(bpffs, &conns)?;
    check_counters(bpffs)?;
    check_without_pins(manifest.dir())?;
    Ok(())
}

/// The frontend with both backends active and traffic counted; the table
/// names it.
fn check_services(bpffs: &Path) -> anyhow::Result<()> {
    let json = inspect_json(bpffs, "services")?;
    let services = array(&json, "services")?;
    let udp = SocketAddrV4::new(VIP, UDP_PORT).to_string();
    ensure!(
        services
            .iter()
            .any(|s| s["frontend"] == udp.as_str() && s["protocol"] == "UDP"),
        "no UDP frontend {udp} in {json:#}"
    );
    let web = services
        .iter()
        .find(|s| s["frontend"] == http_vip().as_str() && s["protocol"] == "TCP")
        .with_context(|| format!("no frontend {} in {json:#}", http_vip()))?;
    ensure!(
        web["family"] == "ipv4" && web["algorithm"].is_string(),
        "{web:#}"
    );
    ensure!(web["backend_count"] == BACKENDS, "{web:#}");
    ensure!(
        web["packets"].as_u64().unwrap_or(0) > 0,
        "no packets counted: {web:#}"
    );
    ensure!(
        web["bytes"].as_u64().unwrap_or(0) > 0,
        "no bytes counted: {web:#}"
    );
    let backends = array(web, "backends")?;
    let addresses: BTreeSet<String> = (backends.iter())
        .filter_map(|b| Some(b["address"].as_str()?.to_string()))
        .collect();
    ensure!(
        addresses == http_backends(),
        "backends {addresses:?}: {web:#}"
    );
    ensure!(backends.iter().all(|b| b["state"] == "active"), "{web:#}");

    let table = inspect(bpffs, &["services"])?;
    let header = format!("{}/TCP", http_vip());
    ensure!(
        table.lines().any(|l| l == header),
        "no {header} block in:\n{table}"
    );
    for backend in http_backends() {
        ensure!(table.contains(&backend), "no {backend} in:\n{table}");
    }
    Ok(())
}

/// Every connection counted once as a new flow and as open.
fn check_backends(bpffs: &Path) -> anyhow::Result<()> {
    let json = inspect_json(bpffs, "backends")?;
    let backends = array(&json, "backends")?;
    let http: Vec<&Value> = (backends.iter())
        .filter(|b| {
            b["address"]
                .as_str()
                .is_some_and(|a| http_backends().contains(a))
        })
        .collect();
    ensure!(http.len() == BACKENDS, "HTTP backends missing: {json:#}");
    let sum = |field: &str| http.iter().filter_map(|b| b[field].as_u64()).sum::<u64>();
    ensure!(
        sum("new_flows") == CONNECTIONS as u64,
        "{CONNECTIONS} connections, new flows {}: {json:#}",
        sum("new_flows")
    );
    ensure!(
        sum("open_connections") == CONNECTIONS as u64,
        "{CONNECTIONS} connections open, counted {}: {json:#}",
        sum("open_connections")
    );
    for b in &http {
        let services = array(b, "services")?;
        ensure!(
            services.len() == 1 && services[0]["state"] == "active",
            "{b:#}"
        );
        ensure!(b["protocol"] == "TCP" && b["family"] == "ipv4", "{b:#}");
    }
    Ok(())
}

/// One entry for every connection, found from both directions: the
/// client, its frontend (the VIP, from the reverse-NAT map) and its
/// backend, both sides established.
fn check_conntrack(bpffs: &Path, conns: &[HttpConn]) -> anyhow::Result<()> {
    let json = inspect_json(bpffs, "conntrack")?;
    let entries = array(&json, "entries")?;
    let vip = http_vip();
    for conn in conns {
        let client = conn.local().to_string();
        let flow = entries
            .iter()
            .find(|e| e["direction"] == "socket" && e["src"] == client.as_str())
            .with_context(|| format!("no entry of client {client}: {json:#}"))?;
        ensure!(
            flow["dst"] == vip.as_str()
                && flow["frontend"] == vip.as_str()
                && flow["protocol"] == "TCP"
                && flow["state"] == "established"
                && flow["reply_state"] == "established"
                && flow["active"] == true,
            "{flow:#}"
        );
        let backend = flow["nat"].as_str().context("socket nat")?;
        ensure!(http_backends().contains(backend), "{flow:#}");
        let paired = entries
            .iter()
            .filter(|e| e["src"] == client.as_str() || e["dst"] == client.as_str())
            .count();
        ensure!(
            paired == 1,
            "client {client} has {paired} entries: {json:#}"
        );
    }
    let ipv4 = json["totals"]["ipv4"].as_u64().unwrap_or(0);
    ensure!(ipv4 >= CONNECTIONS as u64, "totals: {json:#}");
    let table = inspect(bpffs, &["conntrack"])?;
    ensure!(table.contains(&format!("-> {vip} TCP")), "{table}");
    ensure!(table.contains(&format!("ipv4: {ipv4} entries")), "{table}");
    Ok(())
}

/// Every counter by name.
fn check_counters(bpffs: &Path) -> anyhow::Result<()> {
    let table = inspect(bpffs, &["counters"])?;
    for counter in Counter::ALL {
        ensure!(
            table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(counter.name())),
            "no {} in:\n{table}",
            counter.name()
        );
    }
    Ok(())
}

/// A bpffs without pins: a failure that says what is missing.
fn check_without_pins(scratch: &Path) -> anyhow::Result<()> {
    let empty = scratch.join("empty-bpffs");
    std::fs::create_dir_all(&empty).context("empty bpffs dir")?;
    let out = Command::new(agent::binary()?)
        .args(["inspect", "services", "--bpffs"])
        .arg(&empty)
        .output()
        .context("running proxy-agent inspect")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "inspect without pins succeeded");
    ensure!(
        stderr.contains(&format!(
            "no datapath pinned under {}",
            empty.join("xdproxy").display()
        )) && stderr.contains("is the agent running on this node?"),
        "unclear error: {stderr}"
    );
    Ok(())
}
