//! A full conntrack table under real traffic: new TCP connections and UDP
//! flows through the cluster IP still work both ways (their entries go to
//! the LRU overflow table), connections already tracked keep working, and
//! garbage collection empties the overflow table and turns its lookups off
//! again once those flows are gone.
//!
//! client (10.0.1.2) --cl0 (TC)--> node --be{i}--> backend i (10.1.{i+1}.2)
//!
//! `ct4` is filled with entries of made-up flows written by the test, as a
//! flood of real connections would fill it.

mod common;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_agent::datapath::{conntrack::now, ctstore::CtTables, pinned::Pins};
use proxy_common::{
    CT_FORWARD, CT_STATE_ESTABLISHED, Counter, Ct4Entry, Ct4Key, IPPROTO_TCP, names,
};
use proxy_tests::{
    clients::{HttpConn, new_connections, new_udp_flows},
    lab::WebLab,
    manifests::{HTTP_PORT, UDP_PORT, VIP},
};

const BACKENDS: usize = 3;
const CONNTRACK_MAX: u32 = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Short timeouts, so that one test sees the overflow flows expire.
const FLAGS: &[&str] = &[
    "--conntrack-max",
    "1024",
    "--conntrack-overflow-max",
    "1024",
    "--conntrack-gc-interval",
    "1s",
    "--conntrack-tcp-timeout-syn",
    "2s",
    "--conntrack-tcp-timeout-fin",
    "1s",
    "--conntrack-tcp-timeout-rst",
    "1s",
    "--conntrack-udp-timeout",
    "2s",
];

fn http_vip() -> SocketAddr {
    SocketAddrV4::new(VIP, HTTP_PORT).into()
}

fn udp_vip() -> SocketAddr {
    SocketAddrV4::new(VIP, UDP_PORT).into()
}

/// The web Service behind an agent with `FLAGS` (or others), and what
/// these tests read of its conntrack.
struct Lab(WebLab);

impl std::ops::Deref for Lab {
    type Target = WebLab;
    fn deref(&self) -> &WebLab {
        &self.0
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut WebLab {
        &mut self.0
    }
}

impl Lab {
    fn start() -> anyhow::Result<Lab> {
        Lab::start_with(FLAGS, "")
    }

    /// With these agent flags, and `extra` appended to the manifest.
    fn start_with(flags: &[&str], extra: &str) -> anyhow::Result<Lab> {
        WebLab::start("ovf", BACKENDS, extra, flags).map(Lab)
    }

    fn ct4(&self) -> anyhow::Result<CtTables<Ct4Key>> {
        CtTables::open(&Pins::at(self.agent.bpffs()))
    }

    /// Entries in both of ct4's tables: a flow whose group of lines ran
    /// full is in the overflow table.
    fn ct4_len(&self) -> anyhow::Result<usize> {
        Ok(self.ct4()?.main.len()? + self.overflow_len()?)
    }

    fn overflow_len(&self) -> anyhow::Result<usize> {
        let map: HashMap<MapData, Ct4Key, Ct4Entry> = pinned(self, names::OVERFLOW4)?;
        Ok(map.keys().count())
    }

    fn overflowed(&self) -> anyhow::Result<u32> {
        let flag: Array<MapData, u32> = pinned(self, names::OVERFLOWED)?;
        Ok(flag.get(&0, 0)?)
    }

    fn new_connections(&self, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        new_connections(&self.topology.client, http_vip(), n, CONNECT_TIMEOUT)
    }

    fn new_udp_flows(&self, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        new_udp_flows(&self.topology.client, udp_vip(), n, Duration::from_secs(1))
    }
}

fn pinned<T: TryFrom<Map, Error = MapError>>(lab: &Lab, name: &str) -> anyhow::Result<T> {
    Pins::at(lab.agent.bpffs()).map(name)
}

/// Fills every free line of `ct4_table` with established entries of flows from
/// 192.0.2.0/24 that never send; returns their keys.
fn fill(ct4: &CtTables<Ct4Key>) -> anyhow::Result<Vec<Ct4Key>> {
    let now = now()?;
    let mut keys = Vec::new();
    let lines = ct4.main.lines();
    ensure!(lines == 2 * CONNTRACK_MAX as usize, "{lines} lines");
    // Keys land in groups by hash: many more than the lines fill them all.
    for i in 0..16 * lines as u32 {
        let key = Ct4Key {
            src_addr: u32::from_be_bytes([192, 0, 2, (i % 250) as u8 + 1]).to_be(),
            dst_addr: u32::from_be_bytes([198, 51, 100, 1]).to_be(),
            src_port: (10000 + i as u16).to_be(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            direction: CT_FORWARD,
            _pad: 0,
        };
        let value = Ct4Entry {
            nat_addr: u32::from_be_bytes([198, 51, 100, 2]).to_be(),
            nat_port: 8080u16.to_be(),
            last_seen: now,
            state: CT_STATE_ESTABLISHED,
            ..Ct4Entry::default()
        };
        if ct4.main.insert(key, value)?.is_ok() {
            keys.push(key);
        }
        // With the lines the connections opened before hold.
        if ct4.main.len()? == lines {
            return Ok(keys);
        }
    }
    bail!(
        "ct4_table took only {} of its {lines} lines",
        ct4.main.len()?
    )
}

/// Polls `done` every 100 ms until it holds or `timeout` passes.
fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn a_full_conntrack_table_keeps_new_flows_working_and_collects_them_after() -> anyhow::Result<()> {
    if !common::ready("a_full_conntrack_table_keeps_new_flows_working_and_collects_them_after") {
        return Ok(());
    }
    let lab = Lab::start()?;
    // Connections tracked in ct4 before it fills up.
    let mut tracked = (0..4)
        .map(|_| HttpConn::connect(&lab.topology.client, http_vip(), CONNECT_TIMEOUT))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first: Vec<String> = tracked
        .iter_mut()
        .map(HttpConn::get)
        .collect::<Result<_, _>>()?;

    let ct4 = lab.ct4()?;
    let filler = fill(&ct4)?;
    let full_before = lab.counter(Counter::CtFull.name())?;
    ensure!(lab.overflowed()? == 0, "nothing overflowed before the fill");

    let tcp = lab.new_connections(30)?;
    let udp = lab.new_udp_flows(20)?;
    ensure!(
        tcp.len() == BACKENDS,
        "new connections hashed over all backends: {tcp:?}"
    );
    ensure!(udp.len() > 1, "new UDP flows hashed over backends: {udp:?}");
    let full = lab.counter(Counter::CtFull.name())? - full_before;
    ensure!(
        full >= 50,
        "ct_full counted {full} new flows, not at least 50"
    );
    ensure!(
        lab.counter(Counter::CtInsertFailed.name())? == 0,
        "no insert failed"
    );
    ensure!(lab.overflowed()? == 1, "the overflow table is in use");
    ensure!(
        lab.overflow_len()? > 0,
        "the overflow table holds the new flows"
    );
    for (conn, backend) in tracked.iter_mut().zip(&first) {
        let now = conn.get().context("a connection tracked before the fill")?;
        ensure!(
            &now == backend,
            "a tracked connection moved: {backend} -> {now}"
        );
    }

    // The new flows are closed (TCP) or idle (UDP): garbage collection
    // empties the overflow table and turns its lookups off.
    wait_for("overflow table collected", Duration::from_secs(20), || {
        Ok(lab.overflow_len()? == 0 && lab.overflowed()? == 0)
    })?;
    ensure!(
        lab.ct4()?.main.len()? >= filler.len(),
        "the filler is untouched"
    );

    // Room again: new flows are tracked in ct4, not counted as ct_full.
    for key in &filler {
        ensure!(ct4.main.remove(key)?, "freeing a ct4 entry");
    }
    let full_before = lab.counter(Counter::CtFull.name())?;
    lab.new_connections(10)?;
    ensure!(
        lab.counter(Counter::CtFull.name())? == full_before,
        "flows fit in ct4 again"
    );
    ensure!(lab.overflowed()? == 0 && lab.overflow_len()? == 0);
    for conn in &mut tracked {
        conn.get()
            .context("a connection tracked before the fill, at the end")?;
    }
    Ok(())
}

/// A Service whose only endpoint is an address nobody holds: packets to it
/// are dropped past the node, as a firewall, a NetworkPolicy or a dead
/// backend would drop them. Nothing ever comes back.
fn dead_service() -> String {
    let [a, b, c, _] = proxy_tests::topology::backend_addr(0).octets();
    proxy_tests::manifests::dead_service(DEAD_VIP, std::net::Ipv4Addr::new(a, b, c, 99))
}

const DEAD_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 77);

/// Sends `count` bare TCP ACKs (no SYN: mid-connection packets of
/// connections that never were) from the client to the dead Service, one
/// source port each, through a raw socket.
fn bare_acks(lab: &Lab, count: u16) -> anyhow::Result<()> {
    let src = proxy_tests::topology::CLIENT_ADDR.octets();
    let packets: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let builder = etherparse::PacketBuilder::ipv4(src, DEAD_VIP.octets(), 64)
                .tcp(20_000 + i, 80, 1, 64240)
                .ack(1);
            let mut out = Vec::with_capacity(builder.size(0));
            builder.write(&mut out, &[]).map(|()| out)
        })
        .collect::<Result<_, _>>()?;
    lab.topology.client.run(move || send_raw(&packets))?
}

fn send_raw(packets: &[Vec<u8>]) -> anyhow::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor we just opened and nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(DEAD_VIP).to_be(),
        },
        sin_zero: [0; 8],
    };
    for packet in packets {
        // SAFETY: the buffer and address outlive the call.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        ensure!(sent >= 0, "sendto: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The unconfirmed flows garbage collection reported giving up early.
fn given_up(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            l.split(" unconfirmed flows given up")
                .next()?
                .rsplit(' ')
                .next()
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// Measured before: 200 bare ACKs to a Service whose backend drops them
/// left 400 `established` entries due to stay a day (one entry each now).
#[test]
fn bare_acks_nobody_answers_last_only_the_syn_timeout() -> anyhow::Result<()> {
    if !common::ready("bare_acks_nobody_answers_last_only_the_syn_timeout") {
        return Ok(());
    }
    let lab = Lab::start_with(FLAGS, &dead_service())?;
    bare_acks(&lab, 200)?;
    wait_for("the ACKs' entries", Duration::from_secs(5), || {
        Ok(lab.ct4_len()? >= 200)
    })?;
    let unreplied = lab
        .ct4()?
        .main
        .entries()?
        .into_values()
        .filter(|v| v.flags & proxy_common::CT_UNREPLIED != 0)
        .count();
    assert_eq!(unreplied, 200, "one unconfirmed entry per ACK");
    // --conntrack-tcp-timeout-syn 2s, a pass every second.
    wait_for("the ACKs' entries to go", Duration::from_secs(8), || {
        Ok(lab.ct4_len()? == 0)
    })?;
    Ok(())
}

/// A flood of unanswered ACKs that fills three quarters of the table is
/// given up at the next pass, long before the SYN timeout, while a
/// confirmed connection stays.
#[test]
fn a_full_table_gives_up_unanswered_flows_first() -> anyhow::Result<()> {
    if !common::ready("a_full_table_gives_up_unanswered_flows_first") {
        return Ok(());
    }
    let flags = ["--conntrack-max", "1024", "--conntrack-gc-interval", "1s"];
    let mut lab = Lab::start_with(&flags, &dead_service())?;
    let mut conn = HttpConn::connect(&lab.topology.client, http_vip(), CONNECT_TIMEOUT)?;
    conn.get()?;
    // Three quarters of 1024 entries, one a flow.
    bare_acks(&lab, 800)?;
    wait_for("the flood's entries", Duration::from_secs(5), || {
        Ok(lab.ct4_len()? >= 800)
    })?;
    // The SYN timeout is 60 s: only the pressure rule removes them this soon.
    wait_for("the flood's entries to go", Duration::from_secs(10), || {
        Ok(lab.ct4_len()? <= 1)
    })?;
    // The pass logs what it gave up once its deletions are done: after the
    // table may already look empty.
    let logged = wait_for("the pass's log line", Duration::from_secs(5), || {
        Ok(given_up(&lab.agent.log()) >= 800)
    });
    assert!(logged.is_ok(), "{}", lab.agent.log());
    assert_eq!(given_up(&lab.agent.log()), 800, "{}", lab.agent.log());
    conn.get()
        .context("the confirmed connection after the flood")?;
    assert_eq!(lab.ct4_len()?, 1, "the confirmed connection's entry stays");
    lab.agent.stop()?;
    Ok(())
}

/// The source NAT ports are reserved on the node, so that no local socket
/// is given one of them as its ephemeral port.
#[test]
fn the_source_nat_ports_are_reserved_on_the_node() -> anyhow::Result<()> {
    if !common::ready("the_source_nat_ports_are_reserved_on_the_node") {
        return Ok(());
    }
    let flags = ["--snat-port-range", "40000-45000"];
    let lab = Lab::start_with(&flags, "")?;
    let reserved = lab
        .topology
        .node
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports"))??;
    assert_eq!(reserved.trim(), "40000-45000");
    let config: Array<MapData, proxy_common::NodeConfig> = pinned(&lab, names::CONFIG)?;
    let config = config.get(&0, 0)?;
    assert_eq!((config.snat_port_min, config.snat_port_max), (40000, 45000));
    assert_ne!(config.node_key, [0; 2], "a random node key");
    Ok(())
}
