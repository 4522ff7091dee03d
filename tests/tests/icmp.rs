//! ICMP errors about translated flows, translated back.
//!
//! Through BPF_PROG_TEST_RUN: errors built by hand around the bytes the
//! programs themselves produced for a flow; after translation the quote must
//! be exactly what the client sent (or, half way, what the node forwarded)
//! and every checksum must hold, recomputed here from scratch.
//!
//! With real sockets: client -- node (agent) -- router -- server, where the
//! Service's backend is the server. A route with a smaller MTU (1300) on the
//! node or on the router makes one of them answer the client's large
//! segments with "fragmentation needed" / "packet too big" quoting the
//! translated packet; a large upload through the ClusterIP completes only if
//! the client gets that error about its own connection. A UDP datagram to a
//! port the server does not listen on fails the client's connected socket
//! with ECONNREFUSED only if the server's port unreachable comes back from
//! the ClusterIP.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use common::{
    HOOKS, Hook, Loaded,
    packets::{ETH, Family, MAC_A, MAC_B, V4, V6, addr6, ones, verifies},
};
use proxy_common::{Counter, csum};
use proxy_tests::{
    agent::Agent,
    manifests::{self, ManifestFile, VIP, VIP6, web_dual_and_lb as services},
    netns::{Netns, unique_prefix},
    topology::Topology,
};

const CLIENT: [u8; 4] = [10, 0, 1, 2];
const NODE: [u8; 4] = [10, 0, 0, 1];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const LB: [u8; 4] = [198, 51, 100, 1];
const BACKEND: [u8; 4] = [10, 1, 1, 2];
const OUTSIDER: [u8; 4] = [203, 0, 113, 50];
const ROUTER: [u8; 4] = [192, 0, 2, 1];

const CLIENT6: [u8; 16] = addr6(0x2001_0db8_0009, 2);
const NODE6: [u8; 16] = addr6(0xfd00_0000_0001, 1);
const CLUSTER_IP6: [u8; 16] = addr6(0xfd00_0096_0000, 0x10);
const BACKEND6: [u8; 16] = addr6(0xfd00_0001_0001, 2);

/// The datapath programmed with `services()` for node `here`, whose address
/// (10.0.0.1, fd00:0:1::1) source NAT uses.
fn lab() -> Loaded {
    let mut dp = Loaded::new().expect("load the datapath");
    dp.program_node(&services(), "here", &[NODE.into(), NODE6.into()])
        .expect("program");
    dp
}

/// What ICMP errors take per family.
trait Errors: Family {
    /// The IP header's length.
    const IP: usize;
    const ETHER_TYPE: [u8; 2];
    /// "Fragmentation needed" / "packet too big".
    const TOO_BIG: (u8, u8);
    const PORT_UNREACH: (u8, u8);

    /// The IP header of an ICMP message of `len` bytes from `src` to `dst`.
    fn header(src: Self::Addr, dst: Self::Addr, len: usize) -> Vec<u8>;

    /// The pseudo-header sum an ICMP message of `len` bytes under `ip`
    /// adds to its checksum.
    fn pseudo(ip: &[u8], len: usize) -> u32;

    /// An ICMP error from `src` to `dst` quoting `quote` (an IP packet's
    /// start).
    fn icmp(
        src: Self::Addr,
        dst: Self::Addr,
        (kind, code): (u8, u8),
        rest: u32,
        quote: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![kind, code, 0, 0];
        icmp.extend_from_slice(&rest.to_be_bytes());
        icmp.extend_from_slice(quote);
        let ip = Self::header(src, dst, icmp.len());
        let check = csum::finish(Self::pseudo(&ip, icmp.len()) + ones(&icmp));
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        [&MAC_A[..], &MAC_B, &Self::ETHER_TYPE, &ip, &icmp].concat()
    }

    /// How much of the failed packet's IP datagram an error quotes here:
    /// IP, and TCP up to and past its checksum.
    fn quote_len() -> usize {
        Self::IP + 28
    }

    /// An ICMP error quoting the first `quote_len()` bytes of `packet`.
    fn about(
        src: Self::Addr,
        dst: Self::Addr,
        kind: (u8, u8),
        rest: u32,
        packet: &[u8],
    ) -> Vec<u8> {
        Self::icmp(src, dst, kind, rest, &quote(packet, Self::quote_len()))
    }

    /// An error's addresses and quote, after checking its checksums.
    fn error(packet: &[u8]) -> (Self::Addr, Self::Addr, Vec<u8>) {
        let (src, dst) = Self::addrs(packet);
        let ip = &packet[ETH..ETH + Self::IP];
        let icmp = &packet[ETH + Self::IP..];
        assert!(
            verifies(Self::pseudo(ip, icmp.len()) + ones(icmp)),
            "ICMP checksum of {packet:02x?}"
        );
        (src, dst, icmp[8..].to_vec())
    }

    /// A client's packet; its payload makes a quote of the first 48 bytes
    /// of IP hold the TCP checksum. An ACK with data.
    fn segment(src: Self::Addr, sport: u16, dst: Self::Addr, dport: u16) -> Vec<u8> {
        let builder = Self::ip(src, dst).tcp(sport, dport, 1000, 64240).ack(1);
        let mut out = Vec::new();
        builder
            .write(&mut out, b"a segment that will not fit")
            .expect("build tcp");
        out
    }

    fn datagram(src: Self::Addr, sport: u16, dst: Self::Addr, dport: u16) -> Vec<u8> {
        let builder = Self::ip(src, dst).udp(sport, dport);
        let mut out = Vec::new();
        builder
            .write(&mut out, b"a datagram nobody takes")
            .expect("build udp");
        out
    }
}

impl Errors for V4 {
    const IP: usize = 20;
    const ETHER_TYPE: [u8; 2] = [0x08, 0x00];
    const TOO_BIG: (u8, u8) = (3, 4);
    const PORT_UNREACH: (u8, u8) = (3, 3);

    fn header(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
        let mut ip = vec![0u8; Self::IP];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((Self::IP + len) as u16).to_be_bytes());
        ip[6] = 0x40; // DF, as the kernel sends its errors
        ip[8] = 64;
        ip[9] = 1;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let check = csum::finish(ones(&ip));
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        ip
    }

    /// None: ICMP's checksum covers the message alone.
    fn pseudo(_: &[u8], _: usize) -> u32 {
        0
    }
}

impl Errors for V6 {
    const IP: usize = 40;
    const ETHER_TYPE: [u8; 2] = [0x86, 0xdd];
    const TOO_BIG: (u8, u8) = (2, 0);
    const PORT_UNREACH: (u8, u8) = (1, 4);

    fn header(src: [u8; 16], dst: [u8; 16], len: usize) -> Vec<u8> {
        let mut ip = vec![0u8; Self::IP];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        ip[6] = 58;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
        ip
    }

    fn pseudo(ip: &[u8], len: usize) -> u32 {
        ones(&ip[8..40]) + len as u32 + 58
    }
}

/// The first `len` bytes of a packet's IP datagram: what an error quotes.
fn quote(packet: &[u8], len: usize) -> Vec<u8> {
    packet[ETH..ETH + len].to_vec()
}

const MTU: u32 = 1300;

#[test]
fn a_source_nated_flows_errors_go_back_to_the_client_about_its_packet() {
    if !common::ready("a_source_nated_flows_errors_go_back_to_the_client_about_its_packet") {
        return;
    }
    for hook in HOOKS {
        let dp = lab();
        // The client's packet in, to the backend, out from the node.
        let sent = V4::segment(OUTSIDER, 50000, LB, 80);
        let forwarded = dp.pass(hook, &sent);
        let snat = dp.egress(&forwarded);
        assert_eq!(&snat[ETH + 12..ETH + 16], &NODE, "{hook:?}: source NAT");
        // A router on the way to the backend cannot forward it whole.
        let error = V4::about(ROUTER, NODE, V4::TOO_BIG, MTU, &snat);
        let back = dp.pass(hook, &error);
        let (src, dst, quoted) = V4::error(&back);
        assert_eq!((src, dst), (ROUTER, OUTSIDER), "{hook:?}: to the client");
        assert_eq!(
            quoted,
            quote(&forwarded, V4::quote_len()),
            "{hook:?}: as forwarded"
        );
        let out = dp.egress(&back);
        let (src, dst, quoted) = V4::error(&out);
        assert_eq!((src, dst), (ROUTER, OUTSIDER), "{hook:?}: from the router");
        assert_eq!(
            quoted,
            quote(&sent, V4::quote_len()),
            "{hook:?}: as the client sent it"
        );
        assert_eq!(&out[ETH + V4::IP + 4..ETH + V4::IP + 8], &MTU.to_be_bytes());
        // The backend's own error comes from the frontend.
        let error = V4::about(BACKEND, NODE, V4::PORT_UNREACH, 0, &snat);
        let out = dp.egress(&dp.pass(hook, &error));
        let (src, dst, quoted) = V4::error(&out);
        assert_eq!((src, dst), (LB, OUTSIDER), "{hook:?}: from the frontend");
        assert_eq!(quoted, quote(&sent, V4::quote_len()), "{hook:?}");
        assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 4, "{hook:?}");
        assert_eq!(dp.counter(Counter::IcmpErrorFailed), 0, "{hook:?}");
    }
}

/// A backend's port unreachable about a client's datagram to the cluster
/// IP goes back from the cluster IP, quoting what the client sent.
fn port_unreachable_from_the_cluster_ip<F: Errors>(
    hook: Hook,
    (client, cluster_ip, backend): (F::Addr, F::Addr, F::Addr),
) {
    let dp = lab();
    let sent = F::datagram(client, 40000, cluster_ip, 53);
    let forwarded = dp.pass(hook, &sent);
    assert_eq!(F::addrs(&forwarded).1, backend, "{hook:?}");
    let whole = forwarded.len() - ETH;
    let error = F::icmp(
        backend,
        client,
        F::PORT_UNREACH,
        0,
        &quote(&forwarded, whole),
    );
    let (src, dst, quoted) = F::error(&dp.pass(hook, &error));
    assert_eq!((src, dst), (cluster_ip, client), "{hook:?}");
    assert_eq!(quoted, quote(&sent, whole), "{hook:?}");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1, "{hook:?}");
}

#[test]
fn a_backends_port_unreachable_comes_from_the_cluster_ip() {
    if !common::ready("a_backends_port_unreachable_comes_from_the_cluster_ip") {
        return;
    }
    for hook in HOOKS {
        port_unreachable_from_the_cluster_ip::<V4>(hook, (CLIENT, CLUSTER_IP, BACKEND));
        port_unreachable_from_the_cluster_ip::<V6>(hook, (CLIENT6, CLUSTER_IP6, BACKEND6));
    }
}

/// The node's own "too big" (from `gateway`, its address towards the
/// client) about a packet it forwarded for the client's flow to the
/// cluster IP is translated at egress: the client sees its own packet.
fn too_big_from_the_node<F: Errors>(
    dp: &Loaded,
    hook: Hook,
    (client, cluster_ip, gateway): (F::Addr, F::Addr, F::Addr),
) {
    let sent = F::segment(client, 40001, cluster_ip, 80);
    let forwarded = dp.pass(hook, &sent);
    let error = F::about(gateway, client, F::TOO_BIG, MTU, &forwarded);
    let (src, dst, quoted) = F::error(&dp.egress(&error));
    assert_eq!((src, dst), (gateway, client), "{hook:?}");
    assert_eq!(quoted, quote(&sent, F::quote_len()), "{hook:?}");
}

#[test]
fn the_nodes_own_fragmentation_needed_is_translated_at_egress() {
    if !common::ready("the_nodes_own_fragmentation_needed_is_translated_at_egress") {
        return;
    }
    let gateway = [10, 0, 1, 1];
    let gateway6 = addr6(0x2001_0db8_0009, 1);
    for hook in HOOKS {
        let dp = lab();
        too_big_from_the_node::<V4>(&dp, hook, (CLIENT, CLUSTER_IP, gateway));
        too_big_from_the_node::<V6>(&dp, hook, (CLIENT6, CLUSTER_IP6, gateway6));
        assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 2, "{hook:?}");
    }
}

#[test]
fn errors_about_other_flows_pass_untouched() {
    if !common::ready("errors_about_other_flows_pass_untouched") {
        return;
    }
    for hook in HOOKS {
        let dp = lab();
        let forwarded = dp.pass(hook, &V4::segment(CLIENT, 40002, CLUSTER_IP, 80));
        // Another client port: no flow of ours.
        let other = V4::segment(CLIENT, 40003, BACKEND, 8080);
        let errors = [
            V4::about(ROUTER, CLIENT, V4::TOO_BIG, MTU, &other),
            // Ours, but not addressed to the quoted packet's source.
            V4::about(ROUTER, ROUTER, V4::TOO_BIG, MTU, &forwarded),
            // Ours, but an echo request is not an error.
            V4::about(ROUTER, CLIENT, (8, 0), 0, &forwarded),
            V6::about(
                BACKEND6,
                CLIENT6,
                V6::PORT_UNREACH,
                0,
                &V6::segment(CLIENT6, 1, BACKEND6, 2),
            ),
        ];
        for error in &errors {
            assert_eq!(&dp.pass(hook, error), error, "{hook:?}");
            assert_eq!(&dp.egress(error), error, "{hook:?}");
        }
        assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0, "{hook:?}");
        assert_eq!(dp.counter(Counter::IcmpErrorFailed), 0, "{hook:?}");
    }
}

#[test]
fn an_error_about_a_flow_of_ours_too_short_to_translate_is_dropped() {
    if !common::ready("an_error_about_a_flow_of_ours_too_short_to_translate_is_dropped") {
        return;
    }
    for hook in HOOKS {
        let dp = lab();
        let forwarded = dp.pass(hook, &V4::segment(CLIENT, 40004, CLUSTER_IP, 80));
        // The ports, but not the 8 bytes every error must quote.
        let error = V4::icmp(
            BACKEND,
            CLIENT,
            V4::PORT_UNREACH,
            0,
            &quote(&forwarded, V4::IP + 4),
        );
        let (verdict, _) = dp.run(hook, &error);
        assert_eq!(verdict, hook.dropped(), "{hook:?}");
        assert_eq!(dp.counter(Counter::IcmpErrorFailed), 1, "{hook:?}");
        assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0, "{hook:?}");
    }
}

/// The server behind the router, the Service's backend.
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 1, 0, 0, 0, 0, 2);
const SERVER_PORT: u16 = 8080;
/// The smaller MTU on the way to the server; the client's path has 1500.
const SMALL_MTU: &str = "1300";
/// What the client uploads: thousands of full-sized segments.
const UPLOAD: usize = 4 << 20;
/// Generous for a few megabytes between namespaces, and far less than a
/// stalled connection's retransmissions take to give up.
const UPLOAD_TIME: Duration = Duration::from_secs(8);

/// Where the route with the smaller MTU is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bottleneck {
    /// The node's own route to the server: the node answers the client's
    /// forwarded segments itself (and its error leaves through TC egress).
    Node,
    /// The router's route to the server: its errors come in through the
    /// node's ingress hook.
    Router,
}

/// client -- node (agent) -- router -- server, the server the Service's
/// only backend. Fields drop in order: the agent before the namespaces.
struct Path {
    agent: Agent,
    sink: Sink,
    /// Held: dropping it deletes the server namespace.
    _server: Netns,
    topology: Topology,
    _manifest: ManifestFile,
}

impl Path {
    fn start(tag: &str, bottleneck: Bottleneck) -> anyhow::Result<Path> {
        let topology = Topology::build(&unique_prefix(tag), 1)?;
        let server = Netns::create(&format!("{}s", topology.prefix()))?;
        wire_server(&topology, &server)?;
        let (ns, via) = match bottleneck {
            Bottleneck::Node => (&topology.node, ["via", "10.1.1.2", "via", "fd00:1:1::2"]),
            Bottleneck::Router => (&topology.backends[0], ["dev", "srv0", "dev", "srv0"]),
        };
        let host4 = format!("{SERVER}/32");
        let host6 = format!("{SERVER6}/128");
        ns.ip(&[
            "route", "add", &host4, via[0], via[1], "mtu", "lock", SMALL_MTU,
        ])?;
        ns.ip(&[
            "-6", "route", "add", &host6, via[2], via[3], "mtu", "lock", SMALL_MTU,
        ])?;
        let sink = Sink::start(&server)?;
        let web = manifests::web_dual_stack(&[0])
            .replace("\"10.1.1.2\"", &format!("\"{SERVER}\""))
            .replace("\"fd00:1:1::2\"", &format!("\"{SERVER6}\""));
        ensure!(web.contains(&SERVER.to_string()) && web.contains(&SERVER6.to_string()));
        let manifest = ManifestFile::new(&format!("icmp-{}", topology.prefix()), &web)?;
        let ifaces = topology.agent_ifaces("");
        let agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
        Ok(Path {
            agent,
            sink,
            _server: server,
            topology,
            _manifest: manifest,
        })
    }

    fn translated(&self) -> anyhow::Result<u64> {
        let counters = self.agent.counters()?;
        counters
            .get("icmp_error_translated")
            .copied()
            .with_context(|| format!("no icmp_error_translated in {counters:?}"))
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        self.sink.stop();
    }
}

/// The router (the topology's backend namespace) forwards to the server on
/// a link of its own: 10.2.1.0/24 and fd00:2:1::/64, the server at ::2.
fn wire_server(topology: &Topology, server: &Netns) -> anyhow::Result<()> {
    let router = &topology.backends[0];
    router.sysctl("net.ipv4.ip_forward", "1")?;
    router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    router.ip(&[
        "link",
        "add",
        "srv0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        server.name(),
    ])?;
    router.ip(&["addr", "add", "10.2.1.1/24", "dev", "srv0"])?;
    router.ip(&["addr", "add", "fd00:2:1::1/64", "dev", "srv0", "nodad"])?;
    router.ip(&["link", "set", "srv0", "up"])?;
    server.ip(&["addr", "add", "10.2.1.2/24", "dev", "eth0"])?;
    server.ip(&["addr", "add", "fd00:2:1::2/64", "dev", "eth0", "nodad"])?;
    server.ip(&["link", "set", "eth0", "up"])?;
    server.ip(&["route", "add", "default", "via", "10.2.1.1"])?;
    server.ip(&["-6", "route", "add", "default", "via", "fd00:2:1::1"])?;
    let node = &topology.node;
    node.ip(&["route", "add", "10.2.1.0/24", "via", "10.1.1.2"])?;
    node.ip(&["-6", "route", "add", "fd00:2:1::/64", "via", "fd00:1:1::2"])?;
    Ok(())
}

/// A TCP server in the server namespace (both families) that reads each
/// connection to its end and answers with the byte count. Nothing listens
/// on UDP.
struct Sink {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(server: &Netns) -> anyhow::Result<Sink> {
        let listener = server
            .run(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, SERVER_PORT)))?
            .context("listening in the server namespace")?;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || count_and_answer(conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Sink {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn count_and_answer(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(UPLOAD_TIME * 2));
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = conn.write_all(&total.to_be_bytes());
}

/// Uploads `UPLOAD` bytes through the Service from the client namespace;
/// the time it took, or why it failed.
fn upload(client: &Netns, to: SocketAddr) -> anyhow::Result<Duration> {
    client.run(move || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .with_context(|| format!("connecting to {to}"))?;
        conn.set_write_timeout(Some(UPLOAD_TIME))?;
        conn.set_read_timeout(Some(UPLOAD_TIME))?;
        let chunk = vec![0x5au8; 64 << 10];
        for _ in 0..UPLOAD / chunk.len() {
            conn.write_all(&chunk).with_context(|| {
                format!(
                    "uploading to {to} stalled after {:?}: no path MTU learned",
                    started.elapsed()
                )
            })?;
        }
        conn.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        conn.read_exact(&mut count)
            .with_context(|| format!("waiting for {to}'s byte count"))?;
        let count = u64::from_be_bytes(count);
        ensure!(
            count == UPLOAD as u64,
            "{to} received {count} of {UPLOAD} bytes"
        );
        Ok(started.elapsed())
    })?
}

/// The smaller MTU is learnt through the Service in both families: the
/// upload completes in time and translated errors were counted.
fn path_mtu_discovery_works(tag: &str, bottleneck: Bottleneck) {
    let path = Path::start(tag, bottleneck).expect("topology and agent");
    for to in [
        SocketAddr::from((VIP, manifests::HTTP_PORT)),
        SocketAddr::from((VIP6, manifests::HTTP_PORT)),
    ] {
        let before = path.translated().expect("counters");
        let took = upload(&path.topology.client, to)
            .unwrap_or_else(|e| panic!("{bottleneck:?}: {e:#}\nagent log:\n{}", path.agent.log()));
        assert!(took < UPLOAD_TIME, "{bottleneck:?} {to}: took {took:?}");
        let after = path.translated().expect("counters");
        assert!(
            after > before,
            "{bottleneck:?} {to}: no error translated ({before} -> {after})"
        );
    }
}

#[test]
fn path_mtu_discovery_through_a_cluster_ip_when_the_node_has_the_smaller_mtu() {
    if !common::ready("path_mtu_discovery_through_a_cluster_ip_when_the_node_has_the_smaller_mtu") {
        return;
    }
    path_mtu_discovery_works("pmtun", Bottleneck::Node);
}

#[test]
fn path_mtu_discovery_through_a_cluster_ip_when_a_router_has_the_smaller_mtu() {
    if !common::ready("path_mtu_discovery_through_a_cluster_ip_when_a_router_has_the_smaller_mtu") {
        return;
    }
    path_mtu_discovery_works("pmtur", Bottleneck::Router);
}

/// A connected UDP socket's datagram to the Service, whose backend does not
/// listen on the port: the next receive fails with ECONNREFUSED. Sent up to
/// three times, a second apart (the server rate-limits its errors).
fn refused(client: &Netns, to: SocketAddr) -> anyhow::Result<()> {
    client.run(move || -> anyhow::Result<()> {
        let local: SocketAddr = match to {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            // A send may already report the error of the one before.
            if let Err(e) = socket.send(b"anyone?") {
                ensure!(
                    e.kind() == ErrorKind::ConnectionRefused,
                    "send to {to}: {e}"
                );
                return Ok(());
            }
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => bail!("receiving from {to}: {e}"),
                Ok(n) => bail!("{to} answered {n} bytes"),
            }
        }
        bail!("no ECONNREFUSED from {to}: the port unreachable did not come back translated")
    })?
}

#[test]
fn a_udp_datagram_to_a_port_the_backend_does_not_serve_is_refused() {
    if !common::ready("a_udp_datagram_to_a_port_the_backend_does_not_serve_is_refused") {
        return;
    }
    let path = Path::start("udpref", Bottleneck::Router).expect("topology and agent");
    for to in [
        SocketAddr::from((VIP, manifests::UDP_PORT)),
        SocketAddr::from((VIP6, manifests::UDP_PORT)),
    ] {
        let before = path.translated().expect("counters");
        refused(&path.topology.client, to)
            .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", path.agent.log()));
        let after = path.translated().expect("counters");
        assert!(
            after > before,
            "{to}: no error translated ({before} -> {after})"
        );
    }
}
