//! The agent killed, restarted and replaced under continuous traffic: no
//! request fails and every open connection and UDP flow keeps its backend.

mod common;

use std::{net::Ipv4Addr, path::PathBuf, process::Command, thread, time::Duration};

use anyhow::Context;
use aya::maps::{Array, MapData};
use proxy_agent::{
    conntrack::upgrade::LEGACY_EGRESS,
    datapath::{
        conntrack::{self, Table},
        ctstore::CtTables,
        pinned::{self, Pins},
    },
};
use proxy_common::{
    Backend4, CT_AT_EGRESS, CT_FORWARD, CT_GROUP, CT_REPLY, CT_STATE_ESTABLISHED, CT_TAG_LIVE,
    Ct4Entry, Ct4Group, Ct4Key, CtWords, IPPROTO_TCP, MAX_BACKENDS, ct_lines, mix::fmix32, names,
};
use proxy_tests::{
    agent::Agent,
    clients::HttpConn,
    manifests::{self, ManifestFile},
    netns::{run_checked, unique_prefix},
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

/// An agent of this version taking over the datapath of an earlier one
/// rewrites the egress entries (direction 2) that version wrote, which its
/// programs no longer read: connections open across the upgrade keep their
/// translation at egress. An entry no flow accounts for goes.
#[test]
fn an_upgrade_rewrites_the_earlier_versions_egress_entries() -> anyhow::Result<()> {
    if !common::ready("an_upgrade_rewrites_the_earlier_versions_egress_entries") {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("rup"), 1)?;
    let manifest = ManifestFile::new(
        &format!("upgrade-{}", topology.prefix()),
        &manifests::web(&[0]),
    )?;
    let ifaces = topology.agent_ifaces(":tc");
    let mut agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
    let mut ct4 = CtTables::<Ct4Key>::open(&Pins::at(agent.bpffs()))?;
    let endpoint = |last: u8, port: u16| {
        (
            u32::from(Ipv4Addr::new(10, 9, 0, last)).to_be(),
            port.to_be(),
        )
    };
    let (client, frontend, backend) = (endpoint(1, 40_000), endpoint(2, 80), endpoint(3, 8080));
    let key = |src: (u32, u16), dst: (u32, u16), direction| Ct4Key {
        src_addr: src.0,
        dst_addr: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        proto: IPPROTO_TCP,
        direction,
        _pad: 0,
    };
    let now = conntrack::now()?;
    let value = |nat: (u32, u16)| Ct4Entry {
        nat_addr: nat.0,
        nat_port: nat.1,
        last_seen: now,
        state: CT_STATE_ESTABLISHED,
        ..Ct4Entry::default()
    };
    let legacy = key(backend, client, LEGACY_EGRESS);
    let orphan = key(backend, endpoint(9, 1234), LEGACY_EGRESS);
    ct4.insert(
        Table::Main,
        key(client, frontend, CT_FORWARD),
        value(backend),
    )?;
    ct4.insert(Table::Main, legacy, value(frontend))?;
    ct4.insert(Table::Main, orphan, value(frontend))?;

    agent.kill()?;
    agent.restart(None)?;
    let rewritten = key(backend, client, CT_REPLY);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entry = loop {
        if let Some(entry) = ct4.main.get(&rewritten)? {
            break entry;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the legacy egress entry was not rewritten; agent log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    };
    anyhow::ensure!(
        entry.flags & CT_AT_EGRESS != 0 && (entry.nat_addr, entry.nat_port) == frontend,
        "rewritten as {entry:?}"
    );
    anyhow::ensure!(ct4.main.get(&legacy)?.is_none(), "the legacy entry stayed");
    anyhow::ensure!(
        ct4.main.get(&orphan)?.is_none(),
        "the orphan legacy entry stayed"
    );
    Ok(())
}

/// An agent of this version taking over the datapath of a version that kept
/// backends in hash maps (`lb4_backends`) copies them into its arrays before
/// its programs run: its first pass finds every backend in place (nothing
/// to write), traffic does not notice, and the hash map is unpinned.
#[test]
fn an_upgrade_copies_the_earlier_versions_backends() -> anyhow::Result<()> {
    if !common::ready("an_upgrade_copies_the_earlier_versions_backends") {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("rbe"), BACKENDS)?;
    let _servers = topology.start_servers()?;
    let manifest = ManifestFile::new(
        &format!("backends-{}", topology.prefix()),
        &manifests::web(&[0, 1, 2]),
    )?;
    let ifaces = topology.agent_ifaces(":tc");
    let mut agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
    let pins = Pins::at(agent.bpffs());
    let array: Array<MapData, Backend4> = pins.map(names::BACKENDS4)?;
    let held = pinned::backends(&array, names::BACKENDS4)?;
    drop(array);
    // Each endpoint once for TCP, once for UDP.
    anyhow::ensure!(held.len() == 2 * BACKENDS, "backends programmed: {held:?}");

    let traffic = Traffic::start(&topology.client)?;
    thread::sleep(STEP);
    agent.kill()?;
    // What the earlier version left pinned: the backends in a hash map,
    // and no array (its programs, still attached, hold theirs).
    pin_legacy_backends(&pins.path(names::LEGACY_BACKENDS4), &held)?;
    std::fs::remove_file(pins.path(names::BACKENDS4))?;
    // `inspect` reads a datapath of that version as well.
    let listed = inspected_backends(agent.bpffs())?;
    anyhow::ensure!(listed == held.len(), "inspect listed {listed} backends");
    agent.restart(None)?;
    thread::sleep(STEP);
    let seen = traffic.stop()?;

    let log = agent.log();
    seen.assert_clean(50);
    let copied = format!(
        "copied {} backends from {} into {}",
        held.len(),
        names::LEGACY_BACKENDS4,
        names::BACKENDS4
    );
    assert!(log.contains(&copied), "{log}");
    let syncs: Vec<&str> = log.lines().filter(|l| l.contains("synced:")).collect();
    assert_eq!(syncs.len(), 2, "{log}");
    assert!(
        syncs[1].contains("(0 map writes)"),
        "the backends were in place before the first pass: {}",
        syncs[1]
    );
    assert!(!pins.path(names::LEGACY_BACKENDS4).exists(), "{log}");
    let array: Array<MapData, Backend4> = pins.map(names::BACKENDS4)?;
    assert_eq!(pinned::backends(&array, names::BACKENDS4)?, held);
    Ok(())
}

/// Pins a hash map of backends as versions before the arrays did, with
/// `bpftool` (as an operator would inspect it).
fn pin_legacy_backends(path: &std::path::Path, backends: &[(u32, Backend4)]) -> anyhow::Result<()> {
    let entries = backends.iter().map(|(id, b)| {
        let mut value = b.addr.to_ne_bytes().to_vec();
        value.extend(b.port.to_ne_bytes());
        value.extend([b.proto, b.flags]);
        (id.to_ne_bytes().to_vec(), value)
    });
    pin_map(
        path,
        ("hash", 0),
        names::LEGACY_BACKENDS4,
        (4, 8),
        MAX_BACKENDS,
        entries,
    )
}

/// Pins a map `name` of `(type, flags)`, `(key, value)` sizes and `max`
/// entries at `path` with `bpftool`, holding `entries`.
fn pin_map(
    path: &std::path::Path,
    (kind, flags): (&str, u32),
    name: &str,
    (key, value): (usize, usize),
    max: u32,
    entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<()> {
    run_checked(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(path)
            .args(["type", kind, "key", &key.to_string(), "value"])
            .args([value.to_string().as_str(), "entries", &max.to_string()])
            .args(["name", name, "flags", &flags.to_string()]),
    )
    .context("creating the map (bpftool comes with apt-get install bpftool)")?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
    for (k, v) in entries {
        run_checked(
            Command::new("bpftool")
                .args(["map", "update", "pinned"])
                .arg(path)
                .args(["key", "hex"])
                .args(hex(&k))
                .args(["value", "hex"])
                .args(hex(&v)),
        )?;
    }
    Ok(())
}

/// How many backends `proxy-agent inspect backends` lists.
fn inspected_backends(bpffs: &std::path::Path) -> anyhow::Result<usize> {
    let out = run_checked(
        Command::new(proxy_tests::agent::binary()?)
            .args(["inspect", "backends", "-o", "json", "--bpffs"])
            .arg(bpffs),
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("inspect's JSON")?;
    let backends = json["backends"].as_array().context("no backends array")?;
    Ok(backends.len())
}

/// An agent of this version taking over the datapath of a version that kept
/// conntrack in the kernel's hash maps (`ct4`) copies their entries into
/// its own table before its programs run: open connections keep their
/// backends (balancing is random: a connection whose entry were lost
/// would be sent to another backend, which resets it), and the hash map
/// is unpinned.
#[test]
fn an_upgrade_copies_the_earlier_versions_conntrack() -> anyhow::Result<()> {
    upgrade_keeps_conntrack(
        "an_upgrade_copies_the_earlier_versions_conntrack",
        names::LEGACY_CONNTRACK4,
        pin_legacy_conntrack,
    )
}

/// The same from the version whose table hashed without a seed
/// (`ct4_groups`): its entries are read from every line, wherever its hash
/// put them, and written where the seeded hash puts them.
#[test]
fn an_upgrade_rehashes_the_unseeded_table() -> anyhow::Result<()> {
    upgrade_keeps_conntrack(
        "an_upgrade_rehashes_the_unseeded_table",
        names::LEGACY_GROUPS4,
        pin_unseeded_table,
    )
}

/// Pins a family's conntrack entries as an earlier version kept them.
type PinOld =
    fn(&std::path::Path, &std::collections::HashMap<Ct4Key, Ct4Entry>) -> anyhow::Result<()>;

/// Open connections through an agent, then its conntrack entries pinned
/// by `pin_old` at `legacy` as an earlier version left them, and an agent
/// of this version started over that: the connections keep their
/// backends, and the legacy map is copied and unpinned.
fn upgrade_keeps_conntrack(name: &str, legacy: &str, pin_old: PinOld) -> anyhow::Result<()> {
    if !common::ready(name) {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("rct"), BACKENDS)?;
    let _servers = topology.start_servers()?;
    let manifest = ManifestFile::new(
        &format!("conntrack-{}", topology.prefix()),
        &manifests::web(&[0, 1, 2]),
    )?;
    let ifaces = topology.agent_ifaces(":tc");
    let mut agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
    let vip = std::net::SocketAddrV4::new(manifests::VIP, manifests::HTTP_PORT);
    let mut conns = (0..8)
        .map(|_| HttpConn::connect(&topology.client, vip, Duration::from_secs(5)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first: Vec<String> = conns
        .iter_mut()
        .map(HttpConn::get)
        .collect::<Result<_, _>>()?;
    let distinct: std::collections::BTreeSet<&String> = first.iter().collect();
    anyhow::ensure!(distinct.len() > 1, "connections spread: {first:?}");

    agent.kill()?;
    // What the earlier version left pinned: the entries in its map, and
    // no table of this version (its programs, still attached, hold theirs).
    let pins = Pins::at(agent.bpffs());
    let held = CtTables::<Ct4Key>::open(&pins)?.main.entries()?;
    anyhow::ensure!(held.len() >= conns.len(), "entries: {held:?}");
    pin_old(&pins.path(legacy), &held)?;
    std::fs::remove_file(pins.path(names::CT4_GROUPS))?;
    // `inspect` reads a datapath of that version as well.
    let listed = inspected_conntrack(agent.bpffs())?;
    anyhow::ensure!(listed == held.len(), "inspect listed {listed} entries");
    agent.restart(None)?;

    let log = agent.log();
    for (conn, backend) in conns.iter_mut().zip(&first) {
        let now = (conn.get())
            .with_context(|| format!("a connection opened before the upgrade\n{log}"))?;
        assert_eq!(&now, backend, "a connection moved across the upgrade");
    }
    let copied = format!(
        "copied {} conntrack entries from {legacy} into {}",
        held.len(),
        names::CT4_GROUPS
    );
    assert!(log.contains(&copied), "{log}");
    assert!(!pins.path(legacy).exists(), "{log}");
    let table = CtTables::<Ct4Key>::open(&pins)?.main.entries()?;
    for key in held.keys() {
        assert!(table.contains_key(key), "{key:?} was not copied");
    }
    Ok(())
}

/// Pins conntrack entries in a hash map as versions before conntrack's own
/// table did, with `bpftool`.
fn pin_legacy_conntrack(
    path: &std::path::Path,
    entries: &std::collections::HashMap<Ct4Key, Ct4Entry>,
) -> anyhow::Result<()> {
    let sizes = (size_of::<Ct4Key>(), size_of::<Ct4Entry>());
    let entries = entries.iter().map(|(k, v)| (bytes(k), bytes(v)));
    let max = proxy_common::MAX_CONNTRACK;
    pin_map(
        path,
        ("hash", 0),
        names::LEGACY_CONNTRACK4,
        sizes,
        max,
        entries,
    )
}

/// Pins conntrack entries in a table as the version before the seed did,
/// with `bpftool`: groups of eight lines, all of the map a power of two of
/// them, each key at the group and tag that version's hash gave it.
fn pin_unseeded_table(
    path: &std::path::Path,
    entries: &std::collections::HashMap<Ct4Key, Ct4Entry>,
) -> anyhow::Result<()> {
    let groups = ct_lines(proxy_common::MAX_CONNTRACK) / CT_GROUP;
    let mut table: std::collections::BTreeMap<u32, Ct4Group> = Default::default();
    for (key, value) in entries {
        let (home, tag) = unseeded_home(key, groups - 1);
        let group = table.entry(home).or_default();
        let line = (group.tags.iter().position(|t| *t == 0)).context("a full group")?;
        group.tags[line] = tag;
        group.keys[line] = *key;
        group.values[line] = *value;
    }
    let sizes = (4, size_of::<Ct4Group>());
    let written = (table.iter()).map(|(index, group)| (index.to_ne_bytes().to_vec(), bytes(group)));
    let mmapable = 1 << 10;
    let name = names::LEGACY_GROUPS4;
    pin_map(path, ("array", mmapable), name, sizes, groups, written)
}

/// The group and tag of a key in the table before the seed: a chain of
/// MurmurHash3 finalizers, one a word of the key.
fn unseeded_home(key: &Ct4Key, mask: u32) -> (u32, u32) {
    let mut h = 0x9e37_79b9u32;
    for w in key.words() {
        h = fmix32(h ^ *w);
    }
    (h & mask, fmix32(h ^ 0x5bd1_e995) | CT_TAG_LIVE)
}

/// A plain-data value's bytes.
fn bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
    // SAFETY: a Pod value's bytes, all initialized (explicit padding).
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

/// How many entries `proxy-agent inspect conntrack` lists.
fn inspected_conntrack(bpffs: &std::path::Path) -> anyhow::Result<usize> {
    let out = run_checked(
        Command::new(proxy_tests::agent::binary()?)
            .args(["inspect", "conntrack", "-o", "json", "--bpffs"])
            .arg(bpffs),
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("inspect's JSON")?;
    let entries = json["entries"].as_array().context("no entries array")?;
    Ok(entries.len())
}
