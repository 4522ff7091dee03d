//! IP fragments: datagrams larger than the path MTU (DNS over EDNS0, for
//! one) arrive in pieces, and only the first carries the ports. Every
//! fragment of a translated flow must be translated, both ways.
//!
//! Crafted fragments through BPF_PROG_TEST_RUN (order, checksums,
//! counters), then real 4 kB UDP exchanges through a 1500-byte path.

mod common;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use common::{
    HOOKS, Hook, Loaded,
    packets::{ETH, Family, MAC_A, MAC_B, V4, V6, ones, verifies},
};
use proxy_common::{Counter, csum};
use proxy_tests::{
    agent::Agent,
    manifests::{
        self, ManifestFile, NODE_ADDR, UDP_NODE_PORT, UDP_PORT, VIP, VIP6, dns_dual as services,
    },
    netns::{Netns, unique_prefix},
    servers::Servers,
    topology::{CLIENT_GATEWAY6, Topology, backend_iface, client_iface},
};

const CLIENT4: [u8; 4] = [10, 0, 1, 2];
const VIP4: [u8; 4] = [10, 96, 0, 10];
const BACKEND4: [u8; 4] = [10, 1, 1, 2];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const VIP6_BYTES: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const BACKEND6: [u8; 16] = [0xfd, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const IPPROTO_UDP: u8 = 17;
// ---------------------------------------------------------------------------
// Crafted fragments through BPF_PROG_TEST_RUN.

struct Lab {
    dp: Loaded,
    hook: Hook,
}

impl Lab {
    fn new(hook: Hook) -> Lab {
        let mut dp = Loaded::new().expect("load the datapath");
        dp.program_yaml(&services()).expect("program the services");
        Lab { dp, hook }
    }

    /// The packet after the hook's program, which must pass it on.
    fn run(&self, packet: &[u8]) -> Vec<u8> {
        self.dp.pass(self.hook, packet)
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.dp.counter(counter)
    }
}

/// A UDP datagram (header and payload) with its checksum over `pseudo`.
fn udp_datagram(pseudo: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::with_capacity(len as usize);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let check = csum::finish(ones(pseudo) + ones(&udp));
    let check = if check == 0 { 0xffff } else { check };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    udp
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&MAC_B);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// What crafting fragments takes per family.
trait Fragments: Family {
    /// Bytes of IP headers (the Fragment header included) before the data.
    const L3: usize;
    /// Bytes of the datagram each fragment carries for a 1500-byte MTU.
    const CHUNK: usize;

    /// The UDP pseudo header for `len` bytes of UDP.
    fn pseudo(src: Self::Addr, dst: Self::Addr, len: usize) -> Vec<u8>;

    /// The frame of one fragment: `chunk`, at `offset` in the datagram,
    /// `more` when others follow it.
    fn fragment(
        addrs: (Self::Addr, Self::Addr),
        id: u32,
        at: (usize, bool),
        chunk: &[u8],
    ) -> Vec<u8>;

    /// A UDP datagram of `len` payload bytes cut into fragments for a
    /// 1500-byte MTU, as a sender's kernel cuts it.
    fn fragments(
        src: (Self::Addr, u16),
        dst: (Self::Addr, u16),
        id: u32,
        len: usize,
    ) -> Vec<Vec<u8>> {
        let pseudo = Self::pseudo(src.0, dst.0, 8 + len);
        let datagram = udp_datagram(&pseudo, src.1, dst.1, &payload(len));
        let chunks: Vec<&[u8]> = datagram.chunks(Self::CHUNK).collect();
        let last = chunks.len() - 1;
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                Self::fragment((src.0, dst.0), id, (i * Self::CHUNK, i < last), chunk)
            })
            .collect()
    }
}

impl Fragments for V4 {
    const L3: usize = 20;
    const CHUNK: usize = 1480;

    fn pseudo(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0, IPPROTO_UDP]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p
    }

    fn fragment(
        (src, dst): ([u8; 4], [u8; 4]),
        id: u32,
        (offset, more): (usize, bool),
        chunk: &[u8],
    ) -> Vec<u8> {
        let more = if more { 0x2000u16 } else { 0 };
        let frag_off = more | (offset / 8) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&(id as u16).to_be_bytes());
        ip.extend_from_slice(&frag_off.to_be_bytes());
        ip.extend_from_slice(&[64, IPPROTO_UDP, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let check = csum::finish(ones(&ip));
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        let mut frame = ethernet(0x0800);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(chunk);
        frame
    }
}

/// Over IPv6 with its Fragment header (and a 32-bit identification).
impl Fragments for V6 {
    const L3: usize = 48;
    const CHUNK: usize = 1448;

    fn pseudo(src: [u8; 16], dst: [u8; 16], len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
        p
    }

    fn fragment(
        (src, dst): ([u8; 16], [u8; 16]),
        id: u32,
        (offset, more): (usize, bool),
        chunk: &[u8],
    ) -> Vec<u8> {
        let frag_off = ((offset / 8) as u16) << 3 | u16::from(more);
        let mut frame = ethernet(0x86dd);
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&[44, 64]);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&[IPPROTO_UDP, 0]);
        frame.extend_from_slice(&frag_off.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(chunk);
        frame
    }
}

/// The datagram's ports (from its first fragment) and whether its UDP
/// checksum is right for `pseudo`: the fragments' payloads put together.
fn reassembled(fragments: &[Vec<u8>], l3: usize, pseudo: &[u8]) -> ((u16, u16), bool) {
    let datagram: Vec<u8> = fragments
        .iter()
        .flat_map(|f| f[ETH + l3..].iter().copied())
        .collect();
    let ports = (
        u16::from_be_bytes([datagram[0], datagram[1]]),
        u16::from_be_bytes([datagram[2], datagram[3]]),
    );
    (ports, verifies(ones(pseudo) + ones(&datagram)))
}

/// Every fragment of `datagram` through the lab's hook: each leaves
/// addressed `addrs`, and together they carry a datagram with `ports` and
/// a valid UDP checksum.
fn translated<F: Fragments>(
    lab: &Lab,
    datagram: &[Vec<u8>],
    addrs: (F::Addr, F::Addr),
    ports: (u16, u16),
    what: &str,
) {
    let hook = lab.hook;
    let out: Vec<Vec<u8>> = datagram.iter().map(|f| lab.run(f)).collect();
    for (i, fragment) in out.iter().enumerate() {
        assert_eq!(F::addrs(fragment), addrs, "{hook:?}: {what} fragment {i}");
    }
    let pseudo = F::pseudo(addrs.0, addrs.1, 8 + 4000);
    let (seen, valid) = reassembled(&out, F::L3, &pseudo);
    assert_eq!(seen, ports, "{hook:?}: {what}");
    assert!(valid, "{hook:?}: UDP checksum of the reassembled {what}");
}

/// Through one hook: a later fragment (`early`) before its first is
/// untouched and counted untracked; then the whole request and the whole
/// reply (`ids`) are translated, every fragment, with valid checksums.
fn fragments_through<F: Fragments>(
    hook: Hook,
    (client, vip, backend): (F::Addr, F::Addr, F::Addr),
    early: usize,
    ids: (u32, u32),
) {
    let lab = Lab::new(hook);
    let request = F::fragments((client, 40000), (vip, 53), ids.0, 4000);
    assert_eq!(request.len(), 3, "4 kB in 1500-byte packets");

    assert_eq!(
        lab.run(&request[early]),
        request[early],
        "{hook:?}: a later fragment before its first"
    );
    assert_eq!(lab.counter(Counter::FragmentUntracked), 1, "{hook:?}");
    assert_eq!(lab.counter(Counter::FragmentTracked), 0, "{hook:?}");

    translated::<F>(&lab, &request, (client, backend), (40000, 5353), "request");
    assert_eq!(lab.counter(Counter::FragmentTracked), 2, "{hook:?}");
    assert_eq!(lab.counter(Counter::FragmentUntracked), 1, "{hook:?}");

    let reply = F::fragments((backend, 5353), (client, 40000), ids.1, 4000);
    translated::<F>(&lab, &reply, (vip, client), (53, 40000), "reply");
    assert_eq!(lab.counter(Counter::FragmentTracked), 4, "{hook:?}");
    assert_eq!(lab.counter(Counter::FragmentUntracked), 1, "{hook:?}");
    assert!(lab.counter(Counter::Fragment) >= 7, "{hook:?}");
}

#[test]
fn ipv4_fragments_are_translated_once_their_first_is_seen() {
    if !common::ready("ipv4_fragments_are_translated_once_their_first_is_seen") {
        return;
    }
    for hook in HOOKS {
        fragments_through::<V4>(hook, (CLIENT4, VIP4, BACKEND4), 1, (0x1234, 0x4321));
    }
}

#[test]
fn ipv6_fragments_are_translated_once_their_first_is_seen() {
    if !common::ready("ipv6_fragments_are_translated_once_their_first_is_seen") {
        return;
    }
    // IPv6: no header checksum; the Fragment header's 32-bit identification.
    for hook in HOOKS {
        fragments_through::<V6>(
            hook,
            (CLIENT6, VIP6_BYTES, BACKEND6),
            2,
            (0x0102_0304, 0x0506_0708),
        );
    }
}

/// Fragments of a datagram that is not a service's stay untouched: no
/// entry is made for them, and their later fragments are untracked.
#[test]
fn fragments_of_other_traffic_pass_untouched() {
    if !common::ready("fragments_of_other_traffic_pass_untouched") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new(hook);
        let other = V4::fragments((CLIENT4, 40000), ([10, 96, 0, 99], 53), 7, 4000);
        for fragment in &other {
            assert_eq!(&lab.run(fragment), fragment, "{hook:?}");
        }
        assert_eq!(lab.counter(Counter::FragmentTracked), 0, "{hook:?}");
        assert_eq!(lab.counter(Counter::FragmentUntracked), 2, "{hook:?}");
    }
}

// ---------------------------------------------------------------------------
// Real traffic: client -> node (agent) -> backend, every link 1500 bytes.

/// Bytes each request carries; the backend echoes them after its name.
const REQUEST: usize = 4000;
const BACKEND: &str = "backend0";
const ATTEMPTS: usize = 3;
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

struct Path {
    topology: Topology,
    _servers: Vec<Servers>,
    _manifest: ManifestFile,
    agent: Option<Agent>,
}

impl Path {
    fn start(tag: &str, client_hook: &str) -> anyhow::Result<Path> {
        let topology = Topology::build(&unique_prefix(tag), 1)?;
        topology.finish_checksums_on_node_egress()?;
        if client_hook == ":xdp" {
            // A wire delivers full checksums; a veth from a local socket does not.
            topology.disable_client_tx_checksum()?;
            topology.enable_client_gro()?;
        }
        let servers = topology.start_servers()?; // BACKEND
        let manifest = ManifestFile::new(
            &format!("manifests-{}", topology.prefix()),
            &manifests::web_dual_stack(&[0]),
        )?;
        let ifaces = topology.agent_ifaces(client_hook);
        let agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
        Ok(Path {
            topology,
            _servers: servers,
            _manifest: manifest,
            agent: Some(agent),
        })
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    fn counter(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.agent().counters()?.get(name).copied().unwrap_or(0))
    }

    /// Checks that every link the datagrams cross is 1500 bytes.
    fn check_mtu(&self) -> anyhow::Result<()> {
        let links = [
            (&self.topology.node, client_iface().to_string()),
            (&self.topology.node, backend_iface(0)),
            (&self.topology.client, "eth0".to_string()),
            (&self.topology.backends[0], "eth0".to_string()),
        ];
        for (ns, iface) in links {
            let line = ns.ip(&["-o", "link", "show", "dev", &iface])?;
            ensure!(line.contains(" mtu 1500 "), "{iface}: {line}");
        }
        Ok(())
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        // Agent first (it cleans its pins), then the namespaces and the
        // manifest's directory.
        self.agent.take();
    }
}

/// Sends a `REQUEST`-byte datagram from a connected UDP socket in `client`
/// to `frontend` and checks the whole echo came back from `frontend`
/// (which shows the backend got the whole request, too).
fn big_exchange(client: &Netns, frontend: SocketAddr) -> anyhow::Result<()> {
    let any: IpAddr = match frontend {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = client
        .run(move || UdpSocket::bind((any, 0)))?
        .context("binding the client socket")?;
    socket.connect(frontend).context("connect")?;
    socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let request: Vec<u8> = (0..REQUEST).map(|i| b'a' + (i % 26) as u8).collect();
    let mut want = format!("{BACKEND}:").into_bytes();
    want.extend_from_slice(&request);
    let mut buf = vec![0u8; 65536];
    for _ in 0..ATTEMPTS {
        socket.send(&request).context("send")?;
        // A connected socket receives only from its peer: a reply that
        // left with the backend's address would never arrive here.
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("recv"),
        };
        ensure!(from == frontend, "reply from {from}, not {frontend}");
        ensure!(
            buf[..len] == want[..],
            "{len}-byte reply, not the {}-byte echo",
            want.len()
        );
        return Ok(());
    }
    bail!(
        "no whole {}-byte reply from {frontend} in {ATTEMPTS} tries",
        want.len()
    )
}

/// The cluster IPs of both families and the NodePorts (source NATed:
/// externalTrafficPolicy Cluster), with 4 kB requests and replies.
fn serves_big_datagrams(client_hook: &str, tag: &str) -> anyhow::Result<()> {
    let path = Path::start(tag, client_hook)?;
    path.check_mtu()?;
    let frontends = [
        SocketAddr::from((VIP, UDP_PORT)),
        SocketAddr::from((VIP6, UDP_PORT)),
        SocketAddr::from((NODE_ADDR, UDP_NODE_PORT)),
        SocketAddr::from((CLIENT_GATEWAY6, UDP_NODE_PORT)),
    ];
    for frontend in frontends {
        let before = path.counter("fragment_tracked")?;
        big_exchange(&path.topology.client, frontend).with_context(|| {
            format!(
                "{client_hook:?} {frontend}: counters {:?}",
                path.agent().counters().ok()
            )
        })?;
        let tracked = path.counter("fragment_tracked")? - before;
        // Two later fragments each way at least, at each hook they cross.
        ensure!(
            tracked >= 4,
            "{frontend}: fragment_tracked rose by {tracked}"
        );
    }
    Ok(())
}

#[test]
fn tc_translates_every_fragment_of_big_udp_datagrams() -> anyhow::Result<()> {
    if !common::ready("tc_translates_every_fragment_of_big_udp_datagrams") {
        return Ok(());
    }
    serves_big_datagrams("", "fragtc")
}

#[test]
fn xdp_translates_every_fragment_of_big_udp_datagrams() -> anyhow::Result<()> {
    if !common::ready("xdp_translates_every_fragment_of_big_udp_datagrams") {
        return Ok(());
    }
    serves_big_datagrams(":xdp", "fragxdp")
}
