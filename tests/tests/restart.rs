//! The agent killed, restarted and replaced under continuous traffic: no
//! request fails and every open connection and UDP flow keeps its backend.

mod common;

use std::{path::PathBuf, thread, time::Duration};

use anyhow::Context;
use proxy_tests::{
    agent::Agent,
    manifests::{self, ManifestFile},
    netns::unique_prefix,
    topology::Topology,
    traffic::Traffic,
};

const BACKENDS: usize = 3;
/// How long traffic runs between steps (the agent is down for one of them).
const STEP: Duration = Duration::from_millis(400);

/// A copy of the agent binary under another name: what an upgrade puts in place.
fn rebuilt_binary(scratch: &std::path::Path) -> anyhow::Result<PathBuf> {
    let copy = scratch.join("proxy-agent-upgrade");
    std::fs::copy(proxy_tests::agent::binary()?, &copy).context("copying the agent binary")?;
    Ok(copy)
}

#[test]
fn killing_restarting_and_replacing_the_agent_drops_nothing() -> anyhow::Result<()> {
    if !common::ready("killing_restarting_and_replacing_the_agent_drops_nothing") {
        return Ok(());
    }
    restarts_under_traffic("rst", "tc")
}

/// The same with XDP on the client-facing interface (the client's checksums
/// finished, as from a wire): XDP links are taken over too.
#[test]
fn restarting_with_xdp_links_drops_nothing() -> anyhow::Result<()> {
    if !common::ready("restarting_with_xdp_links_drops_nothing") {
        return Ok(());
    }
    restarts_under_traffic("rsx", "xdp")
}

fn restarts_under_traffic(tag: &str, client_hook: &str) -> anyhow::Result<()> {
    let topology = Topology::build(&unique_prefix(tag), BACKENDS)?;
    topology.finish_checksums_on_node_egress()?;
    if client_hook == "xdp" {
        topology.disable_client_tx_checksum()?;
    }
    let _servers = topology.start_servers()?;
    let manifest = ManifestFile::new(
        &format!("restart-{}", topology.prefix()),
        &manifests::web(&[0, 1, 2]),
    )?;
    let ifaces = topology.agent_ifaces(&format!(":{client_hook}"));
    let mut agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;

    let traffic = Traffic::start(&topology.client)?;
    thread::sleep(STEP);
    agent.kill()?;
    thread::sleep(STEP);
    agent.restart(None)?;
    thread::sleep(STEP);
    let upgrade = rebuilt_binary(manifest.dir())?;
    let status = agent.stop()?;
    assert!(status.success(), "SIGTERM exit: {status}");
    agent.restart(Some(upgrade))?;
    thread::sleep(STEP);
    let seen = traffic.stop()?;

    let log = agent.log();
    // The agent's own clean-up runs its binary, which lives in the
    // manifest's directory.
    drop(agent);
    drop(manifest);
    seen.assert_clean(100);
    assert!(seen.new_connections > 10, "{seen:?}");
    assert_eq!(
        log.matches(&format!(
            "replaced the {client_hook} program on cl0 atomically"
        ))
        .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("adopting").count(),
        4,
        "maps and entries adopted twice: {log}"
    );
    let syncs: Vec<&str> = log.lines().filter(|l| l.contains("synced:")).collect();
    assert_eq!(syncs.len(), 3, "{log}");
    for line in &syncs[1..] {
        assert!(
            line.contains("(0 map writes)"),
            "a restart with nothing changed writes nothing: {line}"
        );
    }
    println!("restart: {seen:?}");
    Ok(())
}
