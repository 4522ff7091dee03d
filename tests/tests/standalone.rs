//! The pinned datapath on its own: the agent is killed, and short
//! connections churn through the cluster IP. With no garbage collection
//! running, every connection must still succeed and the table must stay
//! bounded:
//! - a client whose ports come round again within a second (a narrow port
//!   range, TIME_WAIT reuse) at full speed: a reused port takes over its
//!   old flow's entries, so no reply entry is left behind without the
//!   forward entry that names it;
//! - a client whose flows never repeat, into a table with room for a few
//!   seconds of them: closed flows give their entries up to new ones rather
//!   than crowd them out into the overflow table.
//!
//! client (10.0.1.2) --cl0 (TC)--> node --be{i}--> backend i (10.1.{i+1}.2)

mod common;

use std::{
    collections::HashMap as StdHashMap,
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::ensure;
use proxy_agent::datapath::{
    conntrack::{CtKey, Record},
    ctstore::CtTables,
    pinned::Pins,
};
use proxy_common::{CT_FORWARD, CT_REPLY, Counter, Ct4Key};
use proxy_tests::{
    churn::{Churned, Load, churn},
    lab::WebLab,
    manifests::{HTTP_PORT, VIP},
};

const BACKENDS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(5);

/// The web Service behind an agent that was killed.
struct Lab(WebLab);

impl Lab {
    /// The agent started with `--conntrack-max max`, one flow through it,
    /// then killed; the client's ports are `ports`.
    fn alone(tag: &str, max: u32, ports: (u16, u16)) -> anyhow::Result<Lab> {
        let max = max.to_string();
        let mut lab = Lab(WebLab::start(
            tag,
            BACKENDS,
            "",
            &["--conntrack-max", &max],
        )?);
        let range = format!("{}\t{}", ports.0, ports.1);
        lab.0
            .topology
            .client
            .sysctl("net.ipv4.ip_local_port_range", &range)?;
        let warm = lab.churn(Load {
            threads: 1,
            run: Duration::from_millis(200),
            timeout: TIMEOUT,
            rate: None,
        })?;
        ensure!(
            warm.connections > 0 && warm.failures == 0,
            "before the agent stopped: {warm:?}"
        );
        lab.0.agent.kill()?;
        Ok(lab)
    }

    fn churn(&self, load: Load) -> anyhow::Result<Churned> {
        let vip = SocketAddrV4::new(VIP, HTTP_PORT).into();
        let run = churn(&self.0.topology.client, vip, load)?;
        eprintln!(
            "churn without the agent: {} connections in {:.1?} ({:.0}/s)",
            run.connections,
            run.elapsed,
            run.per_second()
        );
        ensure!(
            run.failures == 0,
            "{} of {} connections failed; first: {:?}",
            run.failures,
            run.connections + run.failures,
            run.errors
        );
        Ok(run)
    }

    fn ct4_records(&self) -> anyhow::Result<Vec<Record<SocketAddr>>> {
        let tables = CtTables::<Ct4Key>::open(&Pins::at(self.0.bpffs()))?;
        let entries = tables.main.entries()?;
        Ok(entries.iter().map(|(k, v)| k.decode(v)).collect())
    }
}

#[test]
fn without_its_agent_a_reused_port_takes_over_its_old_flow() -> anyhow::Result<()> {
    if !common::ready("without_its_agent_a_reused_port_takes_over_its_old_flow") {
        return Ok(());
    }
    const PORTS: (u16, u16) = (30_000, 39_999);
    let ports = usize::from(PORTS.1 - PORTS.0) + 1;
    let lab = Lab::alone("alone", 65_536, PORTS)?;
    // The client closes first: its ports in TIME_WAIT come round again
    // after a second.
    lab.0.topology.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let run = lab.churn(Load {
        threads: 8,
        run: Duration::from_secs(20),
        timeout: TIMEOUT,
        rate: None,
    })?;
    ensure!(
        run.connections > 2 * ports,
        "only {} connections: the client's {ports} ports were not reused",
        run.connections
    );
    let full = lab.0.counter(Counter::CtFull.name())?;
    ensure!(full == 0, "{full} new flows found conntrack full");
    let entries = lab.ct4_records()?;
    // A flow here has a forward and a reply entry; a port, one flow.
    ensure!(
        entries.len() <= 2 * ports,
        "{} entries for {ports} client ports",
        entries.len()
    );
    let orphans = orphaned_replies(&entries);
    ensure!(
        orphans.is_empty(),
        "{} reply entries without their flow's forward entry, e.g. {:?}",
        orphans.len(),
        orphans.first()
    );
    Ok(())
}

#[test]
fn without_its_agent_closed_flows_make_room_for_new_ones() -> anyhow::Result<()> {
    if !common::ready("without_its_agent_closed_flows_make_room_for_new_ones") {
        return Ok(());
    }
    // 1,000 connections a second, each on a port of its own for the whole
    // run (30,000 flows, 60,000 entries), into a table of 8,192 entries:
    // room for the 2-3 s a closed flow keeps its entries, not for them all.
    const MAX: u32 = 8_192;
    let lab = Lab::alone("room", MAX, (20_000, 59_999))?;
    let run = lab.churn(Load {
        threads: 4,
        run: Duration::from_secs(30),
        timeout: TIMEOUT,
        rate: Some(1_000),
    })?;
    ensure!(
        run.connections as u64 > 2 * u64::from(MAX),
        "only {} connections: too few to fill the table",
        run.connections
    );
    let (full, reclaimed) = (
        lab.0.counter(Counter::CtFull.name())?,
        lab.0.counter(Counter::CtReclaimed.name())?,
    );
    eprintln!("ct_full {full}, ct_reclaimed {reclaimed}");
    ensure!(reclaimed > 0, "no closed flow was reclaimed");
    // Only flows that met the table full before the first reclaim.
    ensure!(
        full <= (run.connections / 100) as u64,
        "{full} of {} new flows found conntrack full: closed flows crowded them out",
        run.connections
    );
    let orphans = orphaned_replies(&lab.ct4_records()?).len();
    ensure!(orphans == 0, "{orphans} reply entries without their flow");
    Ok(())
}

/// Reply entries (backend -> client) whose client has no forward entry
/// naming that backend: what a reused port left behind.
fn orphaned_replies(entries: &[Record<SocketAddr>]) -> Vec<&Record<SocketAddr>> {
    let backend_of: StdHashMap<SocketAddr, SocketAddr> = entries
        .iter()
        .filter(|r| r.direction == CT_FORWARD)
        .map(|r| (r.src, r.nat))
        .collect();
    entries
        .iter()
        .filter(|r| r.direction == CT_REPLY)
        .filter(|r| backend_of.get(&r.dst) != Some(&r.src))
        .collect()
}
