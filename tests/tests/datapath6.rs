//! The programs on IPv6 through BPF_PROG_TEST_RUN: crafted packets in, bytes
//! out, every checksum recomputed by etherparse.

mod common;

use aya::maps::HashMap as BpfHashMap;
use common::{
    HOOKS, Hook, Loaded, TC_ACT_REDIRECT, XDP_PASS, both,
    packets::{
        Family, MAC_A, MAC_B, V6, addr6 as addr, sctp_init,
        v6::{seen, tcp, udp},
    },
};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_agent::datapath::ctstore::CtTables;
use proxy_common::{Counter, Ct6Entry, Ct6Key, names, programs};
use proxy_tests::manifests::{load_balancer6, web_and_empty6 as services};

const CLIENT: [u8; 16] = addr(0x2001_0db8_0009, 2);
const VIP: [u8; 16] = addr(0xfd00_0096_0000, 0x10);
const EMPTY_VIP: [u8; 16] = addr(0xfd00_0096_0000, 0x20);
const NODE: [u8; 16] = addr(0xfd00_0000_0001, 1);
const BACKENDS: [[u8; 16]; 2] = [addr(0xfd00_0001_0001, 2), addr(0xfd00_0001_0002, 2)];

fn lab() -> Loaded {
    lab_for(&services())
}

fn lab_for(yaml: &str) -> Loaded {
    programmed(Loaded::new().expect("load the datapath"), yaml)
}

/// `yaml` programmed for node `here` at NODE.
fn programmed(mut dp: Loaded, yaml: &str) -> Loaded {
    program(&mut dp, yaml);
    dp
}

fn program(dp: &mut Loaded, yaml: &str) {
    dp.program_node(yaml, "here", &[NODE.into()])
        .expect("program");
}

#[test]
fn ipv6_flows_reach_backends_and_replies_come_back_from_the_vip() {
    if !common::ready("ipv6_flows_reach_backends_and_replies_come_back_from_the_vip") {
        return;
    }
    for hook in HOOKS {
        flows_and_replies(&lab(), hook);
    }
}

/// Flows to the VIP spread over both backends, keep them, and their
/// replies come back from the VIP.
fn flows_and_replies(dp: &Loaded, hook: Hook) {
    {
        let mut chosen = std::collections::BTreeSet::new();
        for port in 40000..40032 {
            for (packet, backend_port) in [
                (tcp(CLIENT, port, VIP, 80), 8080),
                (udp(CLIENT, port, VIP, 53), 5353),
            ] {
                let out = seen(&dp.pass(hook, &packet));
                let dst = out.dst;
                assert_eq!(
                    (out.src, out.sport, out.dport),
                    (CLIENT, port, backend_port),
                    "{hook:?}"
                );
                assert!(BACKENDS.contains(&dst), "{hook:?}");
                chosen.insert(dst);
                // Established: same backend.
                assert_eq!(seen(&dp.pass(hook, &packet)).dst, dst, "{hook:?}");
                let reply = if backend_port == 8080 {
                    tcp(dst, 8080, CLIENT, port)
                } else {
                    udp(dst, 5353, CLIENT, port)
                };
                let back = seen(&dp.pass(hook, &reply));
                let frontend_port = if backend_port == 8080 { 80 } else { 53 };
                assert_eq!((back.src, back.sport), (VIP, frontend_port), "{hook:?}");
            }
        }
        assert_eq!(chosen.len(), 2, "{hook:?}: flows spread");
    }
}

#[test]
fn ipv6_node_port_traffic_is_source_nated_and_translated_back_at_egress() {
    if !common::ready("ipv6_node_port_traffic_is_source_nated_and_translated_back_at_egress") {
        return;
    }
    for hook in HOOKS {
        node_port_source_nat(&lab(), hook);
    }
}

/// A node port flow: source-NATed to the node towards the backend, and
/// back to the client from the node port.
fn node_port_source_nat(dp: &Loaded, hook: Hook) {
    {
        let backend = seen(&dp.pass(hook, &tcp(CLIENT, 41000, NODE, 30080))).dst;
        assert!(BACKENDS.contains(&backend));
        let snat = seen(&dp.egress(&tcp(CLIENT, 41000, backend, 8080)));
        let sport = snat.sport;
        assert_eq!(
            (snat.src, snat.dst),
            (NODE, backend),
            "{hook:?}: the backend sees the node"
        );
        assert!(sport >= proxy_common::SNAT_PORT_MIN);
        let back = seen(&dp.pass(hook, &tcp(backend, 8080, NODE, sport)));
        assert_eq!(
            (back.src, back.dst, back.dport),
            (backend, CLIENT, 41000),
            "{hook:?}"
        );
        let out = seen(&dp.egress(&tcp(backend, 8080, CLIENT, 41000)));
        assert_eq!(
            (out.src, out.sport),
            (NODE, 30080),
            "{hook:?}: from the node port"
        );
    }
}

#[test]
fn ipv6_flows_that_found_conntrack_full_work_both_ways() {
    if !common::ready("ipv6_flows_that_found_conntrack_full_work_both_ways") {
        return;
    }
    const MAX: u32 = 4;
    for hook in HOOKS {
        let programs = [programs::XDP, programs::TC_INGRESS, programs::TC_EGRESS];
        let loaded = Loaded::with_conntrack(MAX, 1024, &programs).expect("load the datapath");
        let mut dp = programmed(loaded, &services());
        fill_ct6(&mut dp);
        flows_and_replies(&dp, hook);
        node_port_source_nat(&dp, hook);
        // 32 TCP and 32 UDP flows, and the node port flow.
        assert_eq!(dp.counter(Counter::CtFull), 65, "{hook:?}");
        assert_eq!(dp.counter(Counter::CtInsertFailed), 0);
        let overflow = dp.ebpf.map(names::OVERFLOW6).expect("ct6_overflow");
        let overflow: BpfHashMap<_, Ct6Key, Ct6Entry> =
            BpfHashMap::try_from(overflow).expect("a hash");
        // One entry for each of 64 flows; the source-NATed node port
        // flow's two (its socket entry and its node port's).
        assert_eq!(overflow.keys().count(), 64 + 2, "{hook:?}");
    }
}

/// Fills `ct6_table` with entries of flows that never come.
fn fill_ct6(dp: &mut Loaded) {
    let tables = CtTables::<Ct6Key>::of(&dp.ebpf).expect("ct6's tables");
    let key = |i: u32| Ct6Key {
        src_port: u16::to_be(1 + i as u16),
        proto: 6,
        ..Ct6Key::default()
    };
    common::fill_lines(&tables, key, Ct6Entry::default());
}

#[test]
fn ipv6_service_without_backends_refuses_with_icmpv6() {
    if !common::ready("ipv6_service_without_backends_refuses_with_icmpv6") {
        return;
    }
    both::refuses_without_backends::<V6>(&lab(), (CLIENT, EMPTY_VIP), (42000, 42001));
}

#[test]
fn neighbour_discovery_and_other_ipv6_traffic_pass_untouched() {
    if !common::ready("neighbour_discovery_and_other_ipv6_traffic_pass_untouched") {
        return;
    }
    let dp = lab();
    let solicit = {
        let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(CLIENT, addr(0xff02_0000_0000, 1), 255)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            });
        let payload = VIP;
        let mut out = Vec::new();
        builder.write(&mut out, &payload).expect("build ns");
        out
    };
    for hook in HOOKS {
        for packet in [
            solicit.clone(),
            tcp(CLIENT, 43000, BACKENDS[0], 8080),
            udp(CLIENT, 43001, VIP, 9999),
        ] {
            assert_eq!(dp.pass(hook, &packet), packet, "{hook:?}");
        }
    }
}

#[test]
fn ipv6_source_ranges_and_affinity() {
    if !common::ready("ipv6_source_ranges_and_affinity") {
        return;
    }
    let lb = addr(0x2001_0db8_0100, 1);
    let outsider = addr(0x2001_0db8_0777, 5);
    for hook in HOOKS {
        let dp = lab_for(&load_balancer6());
        let first = seen(&dp.pass(hook, &tcp(CLIENT, 44000, lb, 80))).dst;
        for port in 44001..44030 {
            let out = seen(&dp.pass(hook, &tcp(CLIENT, port, lb, 80)));
            assert_eq!(out.dst, first, "{hook:?}: the client keeps its backend");
        }
        both::outside_the_source_ranges_is_dropped::<V6>(&dp, hook, (outsider, 44000), lb);
    }
}

#[test]
fn ipv6_external_traffic_policy_local_drops_without_local_endpoints() {
    if !common::ready("ipv6_external_traffic_policy_local_drops_without_local_endpoints") {
        return;
    }
    let yaml = load_balancer6()
        .replace(
            "  sessionAffinity: ClientIP\n",
            "  externalTrafficPolicy: Local\n",
        )
        .replace("nodeName: here", "nodeName: elsewhere");
    let dp = lab_for(&yaml);
    let lb = addr(0x2001_0db8_0100, 1);
    both::local_policy_drops_without_local_endpoints::<V6>(&dp, Hook::Tc, (CLIENT, 45000), lb);
    // The client address reaches the backend unchanged under Local.
    let yaml = load_balancer6().replace(
        "  sessionAffinity: ClientIP\n",
        "  externalTrafficPolicy: Local\n",
    );
    let dp = lab_for(&yaml);
    both::local_policy_keeps_the_client_address::<V6>(&dp, (CLIENT, 45001), lb);
}

/// An SCTP INIT over IPv6 with a correct CRC32c.
fn sctp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    V6::sctp((src, sport), (dst, dport), 0, &sctp_init(0xcafe_f00d))
}

#[test]
fn ipv6_sctp_is_translated_and_refused_with_an_abort() {
    if !common::ready("ipv6_sctp_is_translated_and_refused_with_an_abort") {
        return;
    }
    let yaml = services()
        .replace(
            "    - {name: dns, protocol: UDP, port: 53, nodePort: 30053}\n",
            "    - {name: dns, protocol: UDP, port: 53, nodePort: 30053}\n    - {name: sig, protocol: SCTP, port: 3868}\n",
        )
        .replace(
            "  - {name: dns, protocol: UDP, port: 5353}\n",
            "  - {name: dns, protocol: UDP, port: 5353}\n  - {name: sig, protocol: SCTP, port: 13868}\n",
        )
        .replace(
            "ports: [{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]",
            "ports: [{name: sig, protocol: SCTP, port: 3868}]",
        );
    for hook in HOOKS {
        let dp = lab_for(&yaml);
        let (src, sport, dst, dport) =
            V6::seen_sctp(&dp.pass(hook, &sctp6(CLIENT, 46000, VIP, 3868)));
        assert_eq!((src, sport, dport), (CLIENT, 46000, 13868), "{hook:?}");
        assert!(BACKENDS.contains(&dst), "{hook:?}");
        let back = V6::seen_sctp(&dp.pass(hook, &sctp6(dst, 13868, CLIENT, 46000)));
        assert_eq!((back.0, back.1), (VIP, 3868), "{hook:?}");
        let (verdict, reply) = dp.run(hook, &sctp6(CLIENT, 46001, EMPTY_VIP, 3868));
        let sent = match hook {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_REDIRECT,
        };
        assert_eq!(verdict, sent, "{hook:?}");
        let (src, sport, dst, dport) = V6::seen_sctp(&reply);
        assert_eq!(
            (src, sport, dst, dport),
            (EMPTY_VIP, 3868, CLIENT, 46001),
            "{hook:?}"
        );
        assert_eq!(
            &reply[54 + 4..54 + 8],
            &[0xca, 0xfe, 0xf0, 0x0d],
            "the Initiate Tag"
        );
        assert_eq!(reply[54 + 12], 6, "an ABORT");
    }
}

/// An ACK with data from the client, acknowledging up to `ack`.
fn tcp_ack(sport: u16, ack: u32) -> Vec<u8> {
    let builder = V6::ip(CLIENT, VIP).tcp(sport, 80, 2000, 64240).ack(ack);
    let payload = b"more";
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).expect("build tcp");
    out
}

#[test]
fn ipv6_connection_to_a_removed_backend_is_reset() {
    if !common::ready("ipv6_connection_to_a_removed_backend_is_reset") {
        return;
    }
    for (i, hook) in HOOKS.into_iter().enumerate() {
        let mut dp = lab();
        let sport = 42000 + i as u16;
        let out = dp.pass(hook, &tcp(CLIENT, sport, VIP, 80));
        let backend = seen(&out).dst;
        let staying = BACKENDS.into_iter().find(|b| *b != backend).expect("other");
        let without = services().replace(
            &format!(
                "  - addresses: [\"{}\"]\n",
                std::net::Ipv6Addr::from(backend)
            ),
            "",
        );
        assert_ne!(without, services(), "{hook:?}: the backend is in the slice");
        program(&mut dp, &without);
        let before = dp.counter(Counter::Reset);
        let (verdict, rst) = dp.run(hook, &tcp_ack(sport, 5555));
        // XDP hands IPv6 replies to the node's stack; TC redirects them.
        let want = match hook {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_REDIRECT,
        };
        assert_eq!(verdict, want, "{hook:?}");
        let sliced = SlicedPacket::from_ethernet(&rst).expect("parses");
        let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
            panic!("{hook:?}: not IPv6");
        };
        let header = ip.header().to_header();
        assert_eq!(
            (header.source, header.destination),
            (VIP, CLIENT),
            "{hook:?}"
        );
        let Some(TransportSlice::Tcp(t)) = &sliced.transport else {
            panic!("{hook:?}: not TCP");
        };
        assert!(t.rst() && !t.syn() && !t.fin(), "{hook:?}: a RST");
        assert_eq!((t.source_port(), t.destination_port()), (80, sport));
        assert_eq!(t.sequence_number(), 5555, "{hook:?}: from the ACK");
        let want = t.calc_checksum_ipv6(VIP, CLIENT).expect("checksum");
        assert_eq!(t.checksum(), want, "{hook:?}: TCP checksum");
        assert!(t.payload().is_empty());
        assert_eq!(dp.counter(Counter::Reset), before + 1, "{hook:?}");
        // The flow is forgotten: a new SYN from that port goes to the
        // backend that stayed.
        let out = dp.pass(hook, &tcp(CLIENT, sport, VIP, 80));
        assert_eq!(seen(&out).dst, staying, "{hook:?}");
    }
}
