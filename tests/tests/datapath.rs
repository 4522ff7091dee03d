//! The programs through BPF_PROG_TEST_RUN: crafted packets in, bytes out.
//! Packets are built and checked with etherparse, an independent parser,
//! including every IPv4, TCP and UDP checksum.

mod common;

use std::collections::HashSet;

use aya::maps::HashMap as BpfHashMap;
use common::{
    HOOKS, Hook, Loaded, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_REDIRECT, XDP_TX, both,
    crc32c,
    packets::{
        Family, MAC_A, MAC_B, V4, sctp_data, sctp_init,
        v4::{seen, tcp, udp},
    },
};
use etherparse::PacketBuilder;
use proxy_agent::datapath::{conntrack::now, ctstore::CtTables};
use proxy_common::{
    CT_AT_EGRESS, CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_REPLY, CT_REWRITE_DST, CT_SOCKET,
    CT_SOURCE_NAT, CT_UNREPLIED, Counter, Ct4Entry, Ct4Key, names,
};
use proxy_tests::manifests::{load_balancer, web_and_empty as services};

const CLIENT: [u8; 4] = [10, 0, 1, 2];
const VIP: [u8; 4] = [10, 96, 0, 10];
const OTHER: [u8; 4] = [10, 96, 0, 99];
const BACKENDS: [[u8; 4]; 2] = [[10, 1, 1, 2], [10, 1, 2, 2]];

struct Lab {
    dp: Loaded,
}

impl Lab {
    fn new() -> Lab {
        let mut dp = Loaded::new().expect("load the datapath");
        dp.program_yaml(&services()).expect("program the services");
        Lab { dp }
    }

    /// Runs the hook's program; checks it let the packet through.
    fn run(&self, hook: Hook, packet: &[u8]) -> Vec<u8> {
        self.dp.pass(hook, packet)
    }

    /// The hook's program's verdict and output, whatever they are.
    fn run_raw(&self, hook: Hook, packet: &[u8]) -> (u32, Vec<u8>) {
        self.dp.run(hook, packet)
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.dp.counter(counter)
    }
}

#[test]
fn a_new_flow_goes_to_a_backend_with_correct_checksums() {
    if !common::ready("a_new_flow_goes_to_a_backend_with_correct_checksums") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new();
        let out = seen(&lab.run(hook, &tcp(CLIENT, 40000, VIP, 80)));
        assert!(BACKENDS.contains(&out.dst), "{hook:?}: {out:?}");
        assert_eq!(
            (out.src, out.sport, out.dport),
            (CLIENT, 40000, 8080),
            "{hook:?}"
        );
        let out = seen(&lab.run(hook, &udp(CLIENT, 40001, VIP, 53)));
        assert!(BACKENDS.contains(&out.dst), "{hook:?}: {out:?}");
        assert_eq!(
            (out.src, out.sport, out.dport),
            (CLIENT, 40001, 5353),
            "{hook:?}"
        );
        assert_ne!(out.udp_check, Some(0));
    }
}

#[test]
fn an_established_flow_keeps_its_backend_and_flows_spread() {
    if !common::ready("an_established_flow_keeps_its_backend_and_flows_spread") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new();
        let mut used = std::collections::BTreeSet::new();
        for sport in 30000..30200 {
            let first = seen(&lab.run(hook, &tcp(CLIENT, sport, VIP, 80))).dst;
            for _ in 0..3 {
                assert_eq!(
                    seen(&lab.run(hook, &tcp(CLIENT, sport, VIP, 80))).dst,
                    first,
                    "{hook:?}"
                );
            }
            used.insert(first);
        }
        assert_eq!(used.len(), 2, "{hook:?}: 200 flows reach both backends");
        let tcp_frontend = proxy_agent::model::Frontend {
            addr: VIP.into(),
            port: 80,
            protocol: proxy_agent::model::Protocol::Tcp,
            clients: Default::default(),
        };
        let id = lab
            .dp
            .reconciler
            .service_id(&tcp_frontend)
            .expect("web's TCP frontend");
        let stats = lab.dp.maps.service_stats(id).expect("stats");
        let web = stats.packets;
        assert_eq!(
            web, 800,
            "{hook:?}: every VIP packet counted once ({stats:?})"
        );
    }
}

#[test]
fn a_service_id_given_anew_counts_from_zero() {
    if !common::ready("a_service_id_given_anew_counts_from_zero") {
        return;
    }
    let mut lab = Lab::new();
    let web_tcp = |lab: &Lab| {
        let frontend = proxy_agent::model::Frontend {
            addr: VIP.into(),
            port: 80,
            protocol: proxy_agent::model::Protocol::Tcp,
            clients: Default::default(),
        };
        lab.dp
            .reconciler
            .service_id(&frontend)
            .expect("web's TCP frontend")
    };
    let packets = |lab: &Lab, id| lab.dp.maps.service_stats(id).expect("stats").packets;
    let id = web_tcp(&lab);
    for sport in 42000..42003 {
        seen(&lab.run(Hook::Xdp, &tcp(CLIENT, sport, VIP, 80)));
    }
    assert_eq!(packets(&lab, id), 3);
    // Every service goes, then comes back: ids are given out lowest first.
    lab.dp
        .program(&Default::default())
        .expect("remove every service");
    lab.dp
        .program_yaml(&services())
        .expect("program the services again");
    assert_eq!(web_tcp(&lab), id, "the same id, given out anew");
    assert_eq!(packets(&lab, id), 0, "the counts of before are not its");
    seen(&lab.run(Hook::Xdp, &tcp(CLIENT, 42003, VIP, 80)));
    assert_eq!(packets(&lab, id), 1);
}

#[test]
fn replies_come_back_from_the_vip() {
    if !common::ready("replies_come_back_from_the_vip") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new();
        let fwd = seen(&lab.run(hook, &tcp(CLIENT, 41000, VIP, 80)));
        let reply = seen(&lab.run(hook, &tcp(fwd.dst, 8080, CLIENT, 41000)));
        assert_eq!(
            (reply.src, reply.sport, reply.dst, reply.dport),
            (VIP, 80, CLIENT, 41000),
            "{hook:?}"
        );
        let fwd = seen(&lab.run(hook, &udp(CLIENT, 41001, VIP, 53)));
        let reply = seen(&lab.run(hook, &udp(fwd.dst, 5353, CLIENT, 41001)));
        assert_eq!(
            (reply.src, reply.sport, reply.dst, reply.dport),
            (VIP, 53, CLIENT, 41001),
            "{hook:?}"
        );
        // A backend talking to the client on another port is not a reply.
        let other = udp(fwd.dst, 9999, CLIENT, 41001);
        assert_eq!(lab.run(hook, &other), other, "{hook:?}");
    }
}

#[test]
fn a_zero_udp_checksum_stays_zero() {
    if !common::ready("a_zero_udp_checksum_stays_zero") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new();
        let mut packet = udp(CLIENT, 42000, VIP, 53);
        let check_at = 14 + 20 + 6;
        packet[check_at..check_at + 2].copy_from_slice(&[0, 0]);
        let out = seen(&lab.run(hook, &packet));
        assert!(BACKENDS.contains(&out.dst));
        assert_eq!(out.udp_check, Some(0), "{hook:?}");
    }
}

#[test]
fn traffic_that_is_not_for_a_service_passes_untouched() {
    if !common::ready("traffic_that_is_not_for_a_service_passes_untouched") {
        return;
    }
    let arp: Vec<u8> = [&[0xff; 6][..], &MAC_A, &[0x08, 0x06], &[0u8; 28]].concat();
    let ipv6 = {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1, 53);
        let mut v = Vec::new();
        b.write(&mut v, b"x").expect("ipv6");
        v
    };
    let icmp = {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_request(1, 1);
        let mut v = Vec::new();
        b.write(&mut v, b"ping").expect("icmp");
        v
    };
    let cases = [
        ("other address", tcp(CLIENT, 43000, OTHER, 80)),
        ("VIP, other port", tcp(CLIENT, 43001, VIP, 81)),
        ("VIP, UDP on a TCP-only port", udp(CLIENT, 43002, VIP, 80)),
        ("ICMP to the VIP", icmp),
        ("ARP", arp),
        ("IPv6", ipv6),
    ];
    for hook in HOOKS {
        let lab = Lab::new();
        for (what, packet) in &cases {
            assert_eq!(&lab.run(hook, packet), packet, "{hook:?}: {what}");
        }
    }
}

#[test]
fn truncated_fragmented_and_garbage_packets_pass_untouched_and_are_counted() {
    if !common::ready("truncated_fragmented_and_garbage_packets_pass_untouched_and_are_counted") {
        return;
    }
    let full = tcp(CLIENT, 44000, VIP, 80);
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43;
    let mut long_total = full.clone();
    long_total[16..18].copy_from_slice(&[0x00, 0x20]);
    // A service's first fragment is translated (see tests/fragments.rs).
    let mut fragment = tcp(CLIENT, 44000, OTHER, 80);
    fragment[20] = 0x20; // more fragments
    let mut later_fragment = full.clone();
    later_fragment[20..22].copy_from_slice(&[0x00, 0x10]);
    let cases: [(&str, Vec<u8>, Option<Counter>); 8] = [
        (
            "ethernet and one byte",
            full[..15].to_vec(),
            Some(Counter::Truncated),
        ),
        (
            "IPv4 header cut",
            full[..24].to_vec(),
            Some(Counter::Truncated),
        ),
        (
            "TCP header cut",
            full[..14 + 20 + 10].to_vec(),
            Some(Counter::Truncated),
        ),
        ("IHL below 5", bad_ihl, None),
        (
            "total length shorter than headers",
            long_total,
            Some(Counter::Truncated),
        ),
        ("other first fragment", fragment, Some(Counter::Fragment)),
        ("later fragment", later_fragment, Some(Counter::Fragment)),
        (
            "garbage",
            (0..60u8).map(|i| i.wrapping_mul(37)).collect(),
            None,
        ),
    ];
    for hook in HOOKS {
        let lab = Lab::new();
        for (what, packet, counter) in &cases {
            if matches!(hook, Hook::Tc) && packet.len() < 14 + 20 {
                // The kernel's skb test run refuses IPv4 frames shorter than
                // an IPv4 header (EINVAL); XDP covers those.
                continue;
            }
            let before = counter.map(|c| lab.counter(c));
            assert_eq!(&lab.run(hook, packet), packet, "{hook:?}: {what}");
            if let (Some(c), Some(before)) = (counter, before) {
                assert_eq!(
                    lab.counter(*c),
                    before + 1,
                    "{hook:?}: {what} counted as {c:?}"
                );
            }
        }
    }
}

#[test]
fn ip_options_are_skipped_correctly() {
    if !common::ready("ip_options_are_skipped_correctly") {
        return;
    }
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(etherparse::IpHeaders::Ipv4(
            etherparse::Ipv4Header {
                source: CLIENT,
                destination: VIP,
                time_to_live: 64,
                options: [1, 1, 1, 1][..].try_into().expect("options"),
                ..Default::default()
            },
            Default::default(),
        ))
        .tcp(45000, 80, 1, 1000);
    let mut packet = Vec::new();
    builder.write(&mut packet, b"options").expect("build");
    assert_eq!(packet[14] & 0x0f, 6, "IHL 6");
    for hook in HOOKS {
        let lab = Lab::new();
        let out = seen(&lab.run(hook, &packet));
        assert!(BACKENDS.contains(&out.dst), "{hook:?}: {out:?}");
        assert_eq!(out.dport, 8080, "{hook:?}");
    }
}

#[test]
fn a_flow_whose_backend_is_removed_moves_to_a_live_one() {
    if !common::ready("a_flow_whose_backend_is_removed_moves_to_a_live_one") {
        return;
    }
    for hook in HOOKS {
        let mut lab = Lab::new();
        let packet = udp(CLIENT, 47000, VIP, 53);
        let first = seen(&lab.run(hook, &packet)).dst;
        let keep = if first == BACKENDS[0] {
            "10.1.2.2"
        } else {
            "10.1.1.2"
        };
        let yaml = services().replace(
            "  - addresses: [10.1.1.2]\n  - addresses: [10.1.2.2]\n",
            &format!("  - addresses: [{keep}]\n"),
        );
        assert_ne!(yaml, services());
        lab.dp.program_yaml(&yaml).expect("reprogram");
        let now = seen(&lab.run(hook, &packet)).dst;
        assert_ne!(now, first, "{hook:?}");
        assert_eq!(lab.counter(Counter::Reselected), 1, "{hook:?}");
    }
}

#[test]
fn a_service_without_backends_refuses_with_port_unreachable() {
    if !common::ready("a_service_without_backends_refuses_with_port_unreachable") {
        return;
    }
    let empty = [10, 96, 0, 20];
    let yaml = services().replace(
        "ports: [{name: http, protocol: TCP, port: 80}]",
        "ports: [{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]",
    );
    let lab = {
        let mut dp = Loaded::new().expect("load");
        dp.program_yaml(&yaml).expect("program");
        Lab { dp }
    };
    both::refuses_without_backends::<V4>(&lab.dp, (CLIENT, empty), (46000, 46001));
}

#[test]
fn a_frontend_on_a_node_address_refuses_straight_back_over_xdp() {
    if !common::ready("a_frontend_on_a_node_address_refuses_straight_back_over_xdp") {
        return;
    }
    // An external IP may be one of the node's own addresses: handed up the
    // stack, a packet from it would be dropped as a martian.
    let external = [192, 0, 2, 77];
    let yaml = services().replace(
        "  clusterIP: 10.96.0.20\n",
        "  clusterIP: 10.96.0.20\n  externalIPs: [192.0.2.77]\n",
    );
    let mut lab = Lab::new();
    lab.dp.program_yaml(&yaml).expect("program");
    for hook in HOOKS {
        let packet = tcp(CLIENT, 46000, external, 80);
        let (verdict, reply) = lab.run_raw(hook, &packet);
        let sent = match hook {
            Hook::Xdp => XDP_REDIRECT,
            Hook::Tc => TC_ACT_REDIRECT,
        };
        assert_eq!(verdict, sent, "{hook:?}");
        V4::check_refusal(&reply, &packet, (external, CLIENT), true, hook);
    }
    assert_eq!(lab.counter(Counter::Rejected), 2);
}

#[test]
fn a_reset_from_a_node_address_frontend_goes_straight_back_over_xdp() {
    if !common::ready("a_reset_from_a_node_address_frontend_goes_straight_back_over_xdp") {
        return;
    }
    let external = [192, 0, 2, 77];
    let yaml = services().replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  externalIPs: [192.0.2.77]\n",
    );
    let mut lab = lab_with_node_address(&yaml);
    let backend = seen(&lab.run(Hook::Xdp, &tcp(CLIENT, 47000, external, 80))).dst;
    let gone = format!("  - addresses: [{}]\n", std::net::Ipv4Addr::from(backend));
    program_with_node_address(&mut lab.dp, &yaml.replace(&gone, ""));
    let ack = {
        let builder = V4::ip(CLIENT, external)
            .tcp(47000, 80, 1001, 64240)
            .ack(5000);
        let mut out = Vec::new();
        builder.write(&mut out, b"data").expect("build tcp");
        out
    };
    let (verdict, rst) = lab.run_raw(Hook::Xdp, &ack);
    assert_eq!(verdict, XDP_REDIRECT, "straight back, not up the stack");
    assert_eq!(lab.counter(Counter::Reset), 1);
    assert_eq!(
        (&rst[..6], &rst[6..12]),
        (&MAC_A[..], &MAC_B[..]),
        "MACs swapped"
    );
    let rst = seen(&rst);
    assert_eq!(
        (rst.src, rst.sport, rst.dst, rst.dport),
        (external, 80, CLIENT, 47000)
    );
}

/// `yaml` programmed for node `node` with these node addresses.
fn lab_for(yaml: &str, node: &str) -> Lab {
    let mut dp = Loaded::new().expect("load the datapath");
    dp.program_node(yaml, node, &[]).expect("program");
    Lab { dp }
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    if !common::ready("load_balancer_source_ranges_admit_only_their_clients") {
        return;
    }
    let lb = [198, 51, 100, 1];
    for hook in HOOKS {
        let lab = lab_for(&load_balancer(), "here");
        let inside = seen(&lab.run(hook, &tcp(CLIENT, 40000, lb, 80)));
        assert_eq!(
            (inside.dst, inside.dport),
            ([10, 1, 1, 2], 8080),
            "{hook:?}"
        );
        both::outside_the_source_ranges_is_dropped::<V4>(
            &lab.dp,
            hook,
            ([192, 0, 2, 9], 40000),
            lb,
        );
        // The cluster IP is not behind the ranges.
        let cluster = seen(&lab.run(hook, &tcp([192, 0, 2, 9], 40001, [10, 96, 0, 30], 80)));
        assert!(BACKENDS.contains(&cluster.dst), "{hook:?}");
    }
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops() {
    if !common::ready("external_traffic_policy_local_without_local_endpoints_drops") {
        return;
    }
    for hook in HOOKS {
        let lab = lab_for(&load_balancer(), "elsewhere");
        both::local_policy_drops_without_local_endpoints::<V4>(
            &lab.dp,
            hook,
            (CLIENT, 40000),
            [198, 51, 100, 1],
        );
    }
}

#[test]
fn replies_of_external_frontends_are_translated_at_egress_only() {
    if !common::ready("replies_of_external_frontends_are_translated_at_egress_only") {
        return;
    }
    let lb = [198, 51, 100, 1];
    for hook in HOOKS {
        let lab = lab_for(&load_balancer(), "here");
        seen(&lab.run(hook, &tcp(CLIENT, 40000, lb, 80)));
        let reply = tcp([10, 1, 1, 2], 8080, CLIENT, 40000);
        assert_eq!(
            lab.run(hook, &reply),
            reply,
            "{hook:?}: untouched at ingress"
        );
        let (verdict, out) = lab.dp.tc_egress(&reply).expect("egress run");
        assert_eq!(verdict, TC_ACT_OK);
        let out = seen(&out);
        assert_eq!(
            (out.src, out.sport),
            (lb, 80),
            "{hook:?}: translated at egress"
        );
        // A cluster-IP reply is translated at ingress and left alone at egress.
        let lab = Lab::new();
        seen(&lab.run(hook, &tcp(CLIENT, 40001, VIP, 80)));
        for backend in BACKENDS {
            let reply = tcp(backend, 8080, CLIENT, 40001);
            let (_, out) = lab.dp.tc_egress(&reply).expect("egress run");
            assert_eq!(out, reply, "{hook:?}: egress leaves cluster-IP replies");
        }
    }
}

#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend() {
    if !common::ready("client_ip_affinity_keeps_a_client_on_its_backend") {
        return;
    }
    let yaml = services().replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n",
    );
    assert_ne!(yaml, services());
    for hook in HOOKS {
        let mut lab = Lab::new();
        lab.dp.program_yaml(&yaml).expect("program");
        let first = seen(&lab.run(hook, &tcp(CLIENT, 41000, VIP, 80))).dst;
        for port in 41001..41050 {
            let out = seen(&lab.run(hook, &tcp(CLIENT, port, VIP, 80)));
            assert_eq!(
                out.dst, first,
                "{hook:?}: new flows follow the client's affinity"
            );
        }
        let others: std::collections::BTreeSet<[u8; 4]> = (0..50)
            .map(|i| seen(&lab.run(hook, &tcp([10, 0, 2, i], 41000, VIP, 80))).dst)
            .collect();
        assert_eq!(others.len(), 2, "{hook:?}: clients still spread");
        // The backend leaves the Service: the client moves.
        let keep = if first == BACKENDS[0] {
            "10.1.2.2"
        } else {
            "10.1.1.2"
        };
        let shrunk = yaml.replace(
            "  - addresses: [10.1.1.2]\n  - addresses: [10.1.2.2]\n",
            &format!("  - addresses: [{keep}]\n"),
        );
        assert_ne!(shrunk, yaml);
        lab.dp.program_yaml(&shrunk).expect("reprogram");
        let moved = seen(&lab.run(hook, &tcp(CLIENT, 42000, VIP, 80))).dst;
        assert_ne!(moved, first, "{hook:?}");
        assert_eq!(lab.counter(Counter::AffinityStale), 1, "{hook:?}");
    }
}

/// `yaml` programmed for node `here` at 10.0.0.1 (its source NAT address).
fn lab_with_node_address(yaml: &str) -> Lab {
    programmed_with_node_address(Loaded::new().expect("load the datapath"), yaml)
}

fn programmed_with_node_address(mut dp: Loaded, yaml: &str) -> Lab {
    program_with_node_address(&mut dp, yaml);
    Lab { dp }
}

fn program_with_node_address(dp: &mut Loaded, yaml: &str) {
    dp.program_node(yaml, "here", &[[10, 0, 0, 1].into()])
        .expect("program");
}

/// The LoadBalancer Service with externalTrafficPolicy Cluster: external
/// clients are source-NATed.
fn load_balancer_cluster() -> String {
    load_balancer()
        .replace("  externalTrafficPolicy: Local\n", "")
        .replace("  loadBalancerSourceRanges: [10.0.1.0/24]\n", "")
}

#[test]
fn external_traffic_is_source_nated_to_the_node_and_back() {
    if !common::ready("external_traffic_is_source_nated_to_the_node_and_back") {
        return;
    }
    for hook in HOOKS {
        source_nat_and_back(&lab_with_node_address(&load_balancer_cluster()), hook);
    }
}

/// A source-NATed flow keeps one `CT_SOCKET` entry, which names its node
/// port, and the entry that takes the backend's answers to that port back
/// to the client: no forward, reply or outward entry, and only the source
/// NAT mark of `ct_paired` goes up, so that other flows' packets still cost
/// one lookup.
#[test]
fn a_source_nated_flow_has_one_socket_entry_and_raises_only_its_mark() {
    if !common::ready("a_source_nated_flow_has_one_socket_entry_and_raises_only_its_mark") {
        return;
    }
    for hook in HOOKS {
        let lab = lab_with_node_address(&load_balancer_cluster());
        assert_eq!(marks(&lab), [0, 0], "{hook:?}: a fresh datapath");
        source_nat_and_back(&lab, hook);
        let mut kinds: Vec<(u8, u16)> = ct4_entries(&lab)
            .into_iter()
            .map(|(k, v)| (k.direction, v.flags & !CT_UNREPLIED))
            .collect();
        kinds.sort();
        let socket = (CT_SOCKET, CT_AT_EGRESS | CT_SOURCE_NAT);
        let per_flow = [(CT_REPLY, CT_REWRITE_DST), socket];
        let mut want: Vec<(u8, u16)> = per_flow.iter().chain(&per_flow).copied().collect();
        want.sort();
        assert_eq!(kinds, want, "{hook:?}: two flows' entries");
        let node_ports: Vec<u16> = ct4_entries(&lab)
            .iter()
            .filter(|(k, _)| k.direction == CT_SOCKET)
            .map(|(_, v)| v.node_port)
            .collect();
        assert!(
            node_ports.len() == 2 && node_ports.iter().all(|p| *p != 0),
            "{hook:?}: each socket entry names its node port: {node_ports:?}"
        );
        assert_eq!(marks(&lab), [0, 1], "{hook:?}: only the source NAT mark");
    }
}

/// The two marks of `ct_paired`: pairs, source NAT entries.
fn marks(lab: &Lab) -> [u32; 2] {
    let map = lab.dp.ebpf.map(names::PAIRED).expect("ct_paired");
    let flag: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).expect("an array");
    [CT_MARK_PAIRS, CT_MARK_SOURCE_NAT].map(|m| flag.get(&m, 0).expect("a mark"))
}

/// Where a flow from outside goes: to a backend, source-NATed to the node
/// after forwarding, and back to the client from the load balancer's IP;
/// a second flow gets another node port.
fn source_nat_and_back(lab: &Lab, hook: Hook) {
    let (lb, node, outsider) = ([198, 51, 100, 1], [10, 0, 0, 1], [203, 0, 113, 50]);
    {
        // In: the destination becomes a backend, the source stays.
        let request = tcp(outsider, 50000, lb, 80);
        let dnat = seen(&lab.run(hook, &request));
        assert_eq!((dnat.src, dnat.sport), (outsider, 50000), "{hook:?}");
        let backend = dnat.dst;
        // Out, after forwarding: the source becomes the node.
        let forwarded = tcp(outsider, 50000, backend, 8080);
        let snat = seen(&lab.dp.egress(&forwarded));
        assert_eq!(
            (snat.src, snat.dst, snat.dport),
            (node, backend, 8080),
            "{hook:?}"
        );
        assert!(
            snat.sport >= proxy_common::SNAT_PORT_MIN,
            "{hook:?}: {}",
            snat.sport
        );
        // The reply to the node: its destination becomes the client again.
        let reply = tcp(backend, 8080, node, snat.sport);
        let back = seen(&lab.run(hook, &reply));
        assert_eq!(
            (back.src, back.dst, back.dport),
            (backend, outsider, 50000),
            "{hook:?}"
        );
        // Out to the client: the source becomes the frontend.
        let out = seen(&lab.dp.egress(&tcp(backend, 8080, outsider, 50000)));
        assert_eq!(
            (out.src, out.sport, out.dst),
            (lb, 80, outsider),
            "{hook:?}"
        );
        // A second flow from another port gets another node port.
        seen(&lab.run(hook, &tcp(outsider, 50001, lb, 80)));
        let dnat2 = seen(&lab.run(hook, &tcp(outsider, 50001, lb, 80)));
        let second = seen(&lab.dp.egress(&tcp(outsider, 50001, dnat2.dst, 8080)));
        if dnat2.dst == backend {
            assert_ne!(second.sport, snat.sport, "{hook:?}: one node port per flow");
        }
    }
}

#[test]
fn a_packet_from_outside_with_the_nodes_address_cannot_touch_its_flows() {
    if !common::ready("a_packet_from_outside_with_the_nodes_address_cannot_touch_its_flows") {
        return;
    }
    let (lb, node, outsider) = ([198, 51, 100, 1], [10, 0, 0, 1], [203, 0, 113, 50]);
    for hook in HOOKS {
        let lab = lab_with_node_address(&load_balancer_cluster());
        let backend = seen(&lab.run(hook, &tcp(outsider, 50000, lb, 80))).dst;
        let snat = seen(&lab.dp.egress(&tcp(outsider, 50000, backend, 8080)));
        // A spoofed new flow from the node's address and source NAT port.
        let (verdict, _) = lab.run_raw(hook, &tcp(node, snat.sport, lb, 80));
        assert_eq!(verdict, hook.dropped(), "{hook:?}");
        assert_eq!(lab.counter(Counter::SpoofedNodeSource), 1, "{hook:?}");
        // The real flow's replies still find their client.
        let back = seen(&lab.run(hook, &tcp(backend, 8080, node, snat.sport)));
        assert_eq!((back.dst, back.dport), (outsider, 50000), "{hook:?}");
        let again = seen(&lab.dp.egress(&tcp(outsider, 50000, backend, 8080)));
        assert_eq!((again.src, again.sport), (node, snat.sport), "{hook:?}");
    }
}

#[test]
fn source_nat_works_for_flows_that_found_conntrack_full() {
    if !common::ready("source_nat_works_for_flows_that_found_conntrack_full") {
        return;
    }
    // One group of eight lines.
    const MAX: u32 = 4;
    for hook in HOOKS {
        let programs = [
            proxy_common::programs::XDP,
            proxy_common::programs::TC_INGRESS,
            proxy_common::programs::TC_EGRESS,
        ];
        let dp = Loaded::with_conntrack(MAX, 1024, &programs).expect("load the datapath");
        let mut lab = programmed_with_node_address(dp, &load_balancer_cluster());
        let filler = fill_ct4(&mut lab, 0);
        source_nat_and_back(&lab, hook);
        assert_eq!(ct4_keys(&lab), filler, "{hook:?}: ct4 as filled");
        assert_eq!(lab.counter(Counter::CtFull), 2, "{hook:?}: two new flows");
        assert_eq!(lab.counter(Counter::SnatFailed), 0, "{hook:?}");
        assert_eq!(lab.counter(Counter::CtInsertFailed), 0, "{hook:?}");
        let overflow = lab.dp.ebpf.map(names::OVERFLOW4).expect("ct4_overflow");
        let overflow: BpfHashMap<_, Ct4Key, Ct4Entry> =
            BpfHashMap::try_from(overflow).expect("a hash");
        assert_eq!(
            overflow.keys().count(),
            4,
            "{hook:?}: the socket entry and the node-port entry of each flow"
        );
    }
}

/// Fills `ct4_table` with entries of flows that never come, but for `room`
/// lines; returns the keys written.
fn fill_ct4(lab: &mut Lab, room: usize) -> HashSet<Ct4Key> {
    let tables = CtTables::<Ct4Key>::of(&lab.dp.ebpf).expect("ct4's tables");
    let key = |i: u32| Ct4Key {
        src_addr: u32::from_ne_bytes([192, 0, 2, 1]),
        src_port: u16::to_be(1 + i as u16),
        proto: 6,
        ..Ct4Key::default()
    };
    let mut keys = common::fill_lines(&tables, key, Ct4Entry::default());
    for key in keys.drain(keys.len() - room..) {
        assert!(tables.main.remove(&key).expect("ct4 mapped"), "make room");
    }
    assert!(!keys.is_empty(), "ct4 filled");
    keys.into_iter().collect()
}

fn ct4_keys(lab: &Lab) -> HashSet<Ct4Key> {
    let tables = CtTables::<Ct4Key>::of(&lab.dp.ebpf).expect("ct4's tables");
    tables
        .main
        .entries()
        .expect("ct4 mapped")
        .into_keys()
        .collect()
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    if !common::ready("external_traffic_policy_local_keeps_the_client_address") {
        return;
    }
    let local = load_balancer().replace("  loadBalancerSourceRanges: [10.0.1.0/24]\n", "");
    let lab = lab_with_node_address(&local);
    both::local_policy_keeps_the_client_address::<V4>(
        &lab.dp,
        ([203, 0, 113, 50], 50000),
        [198, 51, 100, 1],
    );
}

#[test]
fn a_backend_reaching_itself_through_its_service_is_source_nated() {
    if !common::ready("a_backend_reaching_itself_through_its_service_is_source_nated") {
        return;
    }
    let lab = lab_with_node_address(&services());
    let me = BACKENDS[0];
    // Connect until the service picks this backend itself.
    let mut hairpin = None;
    for port in 51000..51100 {
        let out = seen(&lab.run(Hook::Tc, &tcp(me, port, VIP, 80)));
        if out.dst == me {
            hairpin = Some(port);
            break;
        }
    }
    let port = hairpin.expect("the service picked the client itself within 100 flows");
    let snat = seen(&lab.dp.egress(&tcp(me, port, me, 8080)));
    assert_eq!(
        snat.src,
        [10, 0, 0, 1],
        "the backend sees the node, not itself"
    );
    let back = seen(&lab.run(Hook::Tc, &tcp(me, 8080, [10, 0, 0, 1], snat.sport)));
    assert_eq!((back.src, back.dst, back.dport), (me, me, port));
    let out = seen(&lab.dp.egress(&tcp(me, 8080, me, port)));
    assert_eq!(
        (out.src, out.sport),
        (VIP, 80),
        "and the reply comes from the VIP"
    );
    // Other clients of the same service keep their address.
    let other = seen(&lab.run(Hook::Tc, &tcp(CLIENT, 52000, VIP, 80)));
    let forwarded = tcp(CLIENT, 52000, other.dst, 8080);
    assert_eq!(lab.dp.egress(&forwarded), forwarded);
}

/// An SCTP packet (common header and one DATA chunk) with a correct CRC32c.
fn sctp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    V4::sctp((src, sport), (dst, dport), 0x1234_5678, &sctp_data())
}

#[test]
fn sctp_is_served_with_its_crc_updated_for_the_ports() {
    if !common::ready("sctp_is_served_with_its_crc_updated_for_the_ports") {
        return;
    }
    let yaml = services()
        .replace(
            "    - {name: dns, protocol: UDP, port: 53}\n",
            "    - {name: dns, protocol: UDP, port: 53}\n    - {name: sig, protocol: SCTP, port: 3868}\n",
        )
        .replace(
            "  - {name: dns, protocol: UDP, port: 5353}\n",
            "  - {name: dns, protocol: UDP, port: 5353}\n  - {name: sig, protocol: SCTP, port: 13868}\n",
        );
    for hook in HOOKS {
        let mut lab = Lab::new();
        lab.dp.program_yaml(&yaml).expect("program");
        let (src, sport, dst, dport) =
            V4::seen_sctp(&lab.run(hook, &sctp(CLIENT, 40000, VIP, 3868)));
        assert_eq!((src, sport, dport), (CLIENT, 40000, 13868), "{hook:?}");
        assert!(BACKENDS.contains(&dst), "{hook:?}");
        let reply = V4::seen_sctp(&lab.run(hook, &sctp(dst, 13868, CLIENT, 40000)));
        assert_eq!((reply.0, reply.1), (VIP, 3868), "{hook:?}: from the VIP");
    }
    // Without endpoints: refused with an ABORT, on both hooks, valid also
    // after the kernel finishes an offloaded CRC at the original offset.
    let yaml = services().replace(
        "ports: [{name: http, protocol: TCP, port: 80}]",
        "ports: [{name: http, protocol: SCTP, port: 80}]",
    );
    let empty = [10, 96, 0, 20];
    for hook in HOOKS {
        let mut lab = Lab::new();
        lab.dp.program_yaml(&yaml).expect("program");
        let init = V4::sctp((CLIENT, 40001), (empty, 80), 0, &sctp_init(0xcafe_f00d));
        let (verdict, reply) = lab.run_raw(hook, &init);
        let sent = match hook {
            Hook::Xdp => XDP_TX,
            Hook::Tc => TC_ACT_REDIRECT,
        };
        assert_eq!(verdict, sent, "{hook:?}");
        assert_eq!(lab.counter(Counter::Rejected), 1, "{hook:?}");
        assert_eq!(
            (&reply[..6], &reply[6..12]),
            (&MAC_A[..], &MAC_B[..]),
            "{hook:?}"
        );
        let (src, sport, dst, dport) = V4::seen_sctp(&reply);
        assert_eq!(
            (src, sport, dst, dport),
            (empty, 80, CLIENT, 40001),
            "{hook:?}"
        );
        let l4 = &reply[34..];
        assert_eq!(
            &l4[4..8],
            &0xcafe_f00du32.to_be_bytes(),
            "the INIT's Initiate Tag"
        );
        assert_eq!(&l4[12..16], &[6, 0, 0, 4], "ABORT, T clear");
        // What a CRC completion at the original offset (34 + 8) writes.
        let mut finished = reply.clone();
        let mut body = finished[34..].to_vec();
        body[8..12].copy_from_slice(&[0; 4]);
        finished[42..46].copy_from_slice(&crc32c(&body).to_le_bytes());
        assert_eq!(
            finished, reply,
            "{hook:?}: a late completion changes nothing"
        );
    }
}

/// A lab serving `load_balancer()` from one backend (10.1.1.2:8080) with
/// source NAT to 10.0.0.1, node ports `min..=max`, conntrack `ct_max`
/// entries, on every hook.
fn one_backend_lab(ct_max: u32, (min, max): (u16, u16)) -> Lab {
    let one = load_balancer_cluster().replace("  - {addresses: [10.1.2.2], nodeName: there}\n", "");
    let programs = [
        proxy_common::programs::XDP,
        proxy_common::programs::TC_INGRESS,
        proxy_common::programs::TC_EGRESS,
    ];
    let dp = Loaded::with_conntrack(ct_max, 1024, &programs).expect("load the datapath");
    let mut lab = programmed_with_node_address(dp, &one);
    let config = proxy_common::NodeConfig {
        snat_addr4: u32::from_ne_bytes([10, 0, 0, 1]),
        snat_port_min: min,
        snat_port_max: max,
        ..proxy_common::NodeConfig::default()
    };
    lab.dp.maps.config.set(0, config, 0).expect("config");
    lab
}

const LB: [u8; 4] = [198, 51, 100, 1];
const OUTSIDER: [u8; 4] = [203, 0, 113, 50];
const ONE_BACKEND: [u8; 4] = [10, 1, 1, 2];

/// A new flow from OUTSIDER's `port` to the load balancer, in over TC and
/// out after forwarding: the egress verdict and packet.
fn snat_flow(lab: &Lab, port: u16) -> (u32, Vec<u8>) {
    let dnat = seen(&lab.run(Hook::Tc, &tcp(OUTSIDER, port, LB, 80)));
    assert_eq!(dnat.dst, ONE_BACKEND);
    lab.dp
        .tc_egress(&tcp(OUTSIDER, port, ONE_BACKEND, 8080))
        .expect("egress run")
}

/// The reply entry that holds node port `port` towards the one backend.
fn node_port_key(port: u16) -> Ct4Key {
    Ct4Key {
        src_addr: u32::from_ne_bytes(ONE_BACKEND),
        dst_addr: u32::from_ne_bytes([10, 0, 0, 1]),
        src_port: 8080u16.to_be(),
        dst_port: port.to_be(),
        proto: 6,
        direction: proxy_common::CT_REPLY,
        _pad: 0,
    }
}

#[test]
fn an_idle_flows_source_nat_port_goes_to_a_new_flow() {
    if !common::ready("an_idle_flows_source_nat_port_goes_to_a_new_flow") {
        return;
    }
    // A single source NAT port, so the second flow competes.
    let lab = one_backend_lab(proxy_common::MAX_CONNTRACK, (61000, 61000));
    let node = [10, 0, 0, 1];
    let first = seen(&snat_flow(&lab, 50000).1);
    assert_eq!((first.src, first.sport), (node, 61000));
    let again = seen(&lab.dp.egress(&tcp(OUTSIDER, 50000, ONE_BACKEND, 8080)));
    assert_eq!((again.src, again.sport), (node, 61000), "the flow keeps it");
    let (verdict, _) = snat_flow(&lab, 50001);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "the only port is taken: dropped, not sent with the client's address"
    );
    assert_eq!(lab.counter(Counter::SnatFailed), 1);
    // The first flow goes quiet for longer than TCP's idle time.
    let ct = CtTables::<Ct4Key>::of(&lab.dp.ebpf).expect("ct4's tables");
    let mut entry = (ct.main.get(&node_port_key(61000)))
        .expect("ct4 mapped")
        .expect("the first flow's reply entry");
    entry.last_seen = now()
        .expect("the conntrack clock")
        .wrapping_sub(proxy_common::SNAT_IDLE_STREAM + 10);
    (ct.main.insert(node_port_key(61000), entry))
        .expect("ct4 mapped")
        .expect("age it");
    let third = seen(&snat_flow(&lab, 50002).1);
    assert_eq!(
        (third.src, third.sport),
        (node, 61000),
        "the idle port is taken over"
    );
    assert_eq!(lab.counter(Counter::SnatFailed), 1);
    // The old flow gave the port up: back from the backend it now reaches
    // the new client, and its own next packet does not leave with it.
    let back = seen(&lab.run(Hook::Tc, &tcp(ONE_BACKEND, 8080, node, 61000)));
    assert_eq!((back.dst, back.dport), (OUTSIDER, 50002));
    let (verdict, _) = lab
        .dp
        .tc_egress(&tcp(OUTSIDER, 50000, ONE_BACKEND, 8080))
        .expect("egress run");
    assert_eq!(verdict, TC_ACT_SHOT, "the old flow must not share the port");
    assert_eq!(lab.counter(Counter::SnatFailed), 2);
}

#[test]
fn a_small_source_nat_range_is_used_whole_and_then_flows_are_dropped() {
    if !common::ready("a_small_source_nat_range_is_used_whole_and_then_flows_are_dropped") {
        return;
    }
    let lab = one_backend_lab(proxy_common::MAX_CONNTRACK, (61000, 61015));
    let mut ports = HashSet::new();
    for port in 50000..50016 {
        let (verdict, out) = snat_flow(&lab, port);
        assert_eq!(verdict, TC_ACT_OK, "flow {port}");
        let out = seen(&out);
        assert_eq!(out.src, [10, 0, 0, 1], "flow {port}");
        assert!(
            (61000..=61015).contains(&out.sport),
            "flow {port}: {}",
            out.sport
        );
        assert!(
            ports.insert(out.sport),
            "flow {port}: {} given twice",
            out.sport
        );
    }
    let (verdict, _) = snat_flow(&lab, 50016);
    assert_eq!(verdict, TC_ACT_SHOT, "no port left: dropped");
    assert_eq!(lab.counter(Counter::SnatFailed), 1);
}

#[test]
fn a_source_nat_port_is_unique_across_both_conntrack_tables() {
    if !common::ready("a_source_nat_port_is_unique_across_both_conntrack_tables") {
        return;
    }
    // Room for exactly one flow's two entries in ct4 (its socket entry and
    // its node-port entry): the second flow overflows, and must not be
    // given the port the first holds in ct4.
    // One group of eight lines.
    let mut lab = one_backend_lab(4, (61000, 61000));
    fill_ct4(&mut lab, 2);
    let first = seen(&snat_flow(&lab, 50000).1);
    assert_eq!(first.sport, 61000);
    assert!(ct4_keys(&lab).contains(&node_port_key(61000)), "in ct4");
    let (verdict, _) = snat_flow(&lab, 50001);
    assert_eq!(
        lab.counter(Counter::CtFull),
        1,
        "the second flow overflowed"
    );
    assert_eq!(verdict, TC_ACT_SHOT, "the port is held in ct4");
    assert_eq!(lab.counter(Counter::SnatFailed), 1);
    let back = seen(&lab.run(Hook::Tc, &tcp(ONE_BACKEND, 8080, [10, 0, 0, 1], 61000)));
    assert_eq!(
        (back.dst, back.dport),
        (OUTSIDER, 50000),
        "replies reach the first"
    );
}

#[test]
fn a_flow_needing_source_nat_without_a_node_address_is_dropped() {
    if !common::ready("a_flow_needing_source_nat_without_a_node_address_is_dropped") {
        return;
    }
    for hook in HOOKS {
        let mut lab = Lab::new();
        lab.dp
            .program_yaml(&load_balancer_cluster())
            .expect("program");
        let (verdict, _) = lab.run_raw(hook, &tcp(OUTSIDER, 50000, LB, 80));
        assert_eq!(verdict, hook.dropped(), "{hook:?}");
        assert_eq!(lab.counter(Counter::SnatFailed), 1, "{hook:?}");
    }
}

/// The flow hash is keyed: the cluster's key decides Maglev's choices
/// (alike on every node with the same key), the node's key the choices
/// made by hash for flows without state under the other algorithms.
#[test]
fn the_flow_hash_is_keyed() {
    if !common::ready("the_flow_hash_is_keyed") {
        return;
    }
    let maglev = services().replace(
        "metadata: {name: web, namespace: demo}\n",
        "metadata: {name: web, namespace: demo, annotations: {xdproxy.io/lb-algorithm: maglev}}\n",
    );
    let backends = |yaml: &str, keys: ([u32; 2], [u32; 2]), flags: fn(_) -> _| {
        let mut dp = Loaded::new().expect("load the datapath");
        dp.program_yaml(yaml).expect("program");
        let config = proxy_common::NodeConfig {
            node_key: keys.0,
            cluster_key: keys.1,
            ..proxy_common::NodeConfig::default()
        };
        dp.maps.config.set(0, config, 0).expect("config");
        let lab = Lab { dp };
        (40000..40048)
            .map(|p| seen(&lab.run(Hook::Xdp, &tcp_flagged((CLIENT, p), (VIP, 80), flags))).dst)
            .collect::<Vec<_>>()
    };
    let (a, b) = ([1, 2], [3, 4]);
    let syn: fn(_) -> _ = |b: etherparse::PacketBuilderStep<etherparse::TcpHeader>| b.syn();
    let rst: fn(_) -> _ = |b: etherparse::PacketBuilderStep<etherparse::TcpHeader>| b.rst();
    assert_eq!(
        backends(&maglev, (a, b), syn),
        backends(&maglev, (b, b), syn),
        "Maglev: the cluster key only"
    );
    assert_ne!(
        backends(&maglev, (a, a), syn),
        backends(&maglev, (a, b), syn),
        "Maglev: another cluster key"
    );
    assert_eq!(
        backends(&services(), (a, a), rst),
        backends(&services(), (a, b), rst),
        "by hash: the node key only"
    );
    assert_ne!(
        backends(&services(), (a, a), rst),
        backends(&services(), (b, a), rst),
        "by hash: another node key"
    );
}

#[test]
fn a_client_port_reused_towards_another_frontend_of_the_same_backend_is_not_mistranslated() {
    if !common::ready(
        "a_client_port_reused_towards_another_frontend_of_the_same_backend_is_not_mistranslated",
    ) {
        return;
    }
    // One backend behind a cluster IP and a source-NATed LoadBalancer IP.
    let one = load_balancer()
        .replace("  externalTrafficPolicy: Local\n", "")
        .replace("  loadBalancerSourceRanges: [10.0.1.0/24]\n", "")
        .replace("  - {addresses: [10.1.2.2], nodeName: there}\n", "");
    let (lb, vip, backend) = ([198, 51, 100, 1], [10, 96, 0, 30], [10, 1, 1, 2]);
    for first_lb in [true, false] {
        let lab = lab_with_node_address(&one);
        let order = if first_lb { [lb, vip] } else { [vip, lb] };
        for frontend in order {
            // The same client port each time, as a client may reuse it
            // towards a different destination.
            seen(&lab.run(Hook::Tc, &tcp(CLIENT, 47000, frontend, 80)));
            let forwarded = tcp(CLIENT, 47000, backend, 8080);
            let out = seen(&lab.dp.egress(&forwarded));
            let reply = seen(&lab.run(
                Hook::Tc,
                &tcp(
                    backend,
                    8080,
                    if frontend == lb { out.src } else { CLIENT },
                    out.sport,
                ),
            ));
            let to_client =
                seen(
                    &lab.dp
                        .egress(&tcp(reply.src, reply.sport, reply.dst, reply.dport)),
                );
            assert_eq!(
                (
                    to_client.src,
                    to_client.sport,
                    to_client.dst,
                    to_client.dport
                ),
                (frontend, 80, CLIENT, 47000),
                "first {}, now {frontend:?}",
                if first_lb { "LB" } else { "VIP" }
            );
            if frontend == vip {
                assert_eq!(out.src, CLIENT, "a cluster-IP flow is not source-NATed");
            }
        }
    }
}

/// A TCP packet with the given flags (etherparse's builder steps) instead
/// of a SYN.
fn tcp_flagged(
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    flags: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
) -> Vec<u8> {
    let builder = flags(V4::ip(src, dst).tcp(sport, dport, 1000, 64240));
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).expect("build tcp");
    out
}

fn ct4_entries(lab: &Lab) -> Vec<(Ct4Key, Ct4Entry)> {
    let tables = CtTables::<Ct4Key>::of(&lab.dp.ebpf).expect("ct4's tables");
    tables
        .main
        .entries()
        .expect("ct4 mapped")
        .into_iter()
        .collect()
}

/// The reply entries of the flows in ct4, with whether each is unreplied.
fn unreplied(lab: &Lab) -> Vec<bool> {
    ct4_entries(lab)
        .iter()
        .filter(|(k, _)| k.direction != proxy_common::CT_FORWARD)
        .map(|(_, v)| v.flags & proxy_common::CT_UNREPLIED != 0)
        .collect()
}

#[test]
fn a_flow_stays_unconfirmed_until_its_backend_answers() {
    if !common::ready("a_flow_stays_unconfirmed_until_its_backend_answers") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new();
        // A bare ACK, as from a client whose connection conntrack lost,
        // or a forged one: tracked, but unconfirmed.
        let ack = tcp_flagged((CLIENT, 40000), (VIP, 80), |b| b.ack(1));
        let backend = seen(&lab.run(hook, &ack)).dst;
        assert_eq!(unreplied(&lab), [true], "{hook:?}");
        // Another bare ACK from the client confirms nothing.
        seen(&lab.run(hook, &ack));
        assert_eq!(unreplied(&lab), [true], "{hook:?}");
        // The backend's answer does.
        let answer = tcp_flagged((backend, 8080), (CLIENT, 40000), |b| b.ack(1));
        seen(&lab.run(hook, &answer));
        assert_eq!(unreplied(&lab), [false], "{hook:?}");
    }
}

#[test]
fn a_rst_of_no_known_flow_creates_no_state() {
    if !common::ready("a_rst_of_no_known_flow_creates_no_state") {
        return;
    }
    for hook in HOOKS {
        let lab = Lab::new();
        let mut backends = HashSet::new();
        for port in 40000..40064 {
            let rst = tcp_flagged((CLIENT, port), (VIP, 80), |b| b.rst());
            let out = seen(&lab.run(hook, &rst));
            assert!(BACKENDS.contains(&out.dst), "{hook:?}: {out:?}");
            // The same RST again goes to the same backend: the flow's hash.
            assert_eq!(seen(&lab.run(hook, &rst)).dst, out.dst, "{hook:?}");
            backends.insert(out.dst);
        }
        assert_eq!(backends.len(), BACKENDS.len(), "{hook:?}: spread by hash");
        assert!(ct4_entries(&lab).is_empty(), "{hook:?}: no entries");
        assert_eq!(lab.counter(Counter::UntrackedRst), 128, "{hook:?}");
        // A RST of a tracked flow still closes it as before.
        let backend = seen(&lab.run(hook, &tcp(CLIENT, 41000, VIP, 80))).dst;
        let rst = tcp_flagged((CLIENT, 41000), (VIP, 80), |b| b.rst());
        assert_eq!(seen(&lab.run(hook, &rst)).dst, backend, "{hook:?}");
        assert_eq!(lab.counter(Counter::UntrackedRst), 128, "{hook:?}");
    }
}
