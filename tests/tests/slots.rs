//! `lb_slots` under Services with many frontends: frontends with the same
//! slot table (algorithm kind, table size, backends) share one copy, so a
//! Service with a large Maglev table on 40 addresses, or a node-wide
//! `--lb-algorithm maglev` over hundreds of frontends, costs one table, not
//! one per frontend (which filled the map and failed the pass). Programmed
//! through the agent's model and reconciler, run with BPF_PROG_TEST_RUN,
//! `lb_slots` read back.

mod common;

use std::collections::BTreeSet;

use common::{
    Loaded, XDP_PASS,
    packets::{Family, V4},
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use proxy_agent::{
    balancing::{Algorithm, Balancing},
    model,
};
use proxy_common::MAX_SLOTS;
use proxy_tests::manifests::{self, FIVE_BACKENDS as BACKENDS};

const CLIENT: [u8; 4] = [10, 0, 1, 2];

/// The i-th external IP (documentation range 203.0.113.0/24, then 198.51.100.0/24).
fn external_ip(i: usize) -> [u8; 4] {
    match i {
        0..250 => [203, 0, 113, 1 + i as u8],
        _ => [198, 51, 100, 1 + (i - 250) as u8],
    }
}

/// Service `name` on cluster IP `vip` and `externals` external IPs (TCP
/// 80 -> 8080), with `annotations` (YAML flow mapping) and the BACKENDS.
fn service(name: &str, vip: [u8; 4], externals: &[[u8; 4]], annotations: &str) -> String {
    manifests::web_on_externals(name, vip, externals, annotations, &BACKENDS)
}

fn syn(dst: [u8; 4], sport: u16) -> Vec<u8> {
    let builder = V4::ip(CLIENT, dst).tcp(sport, 80, 1, 65535).syn();
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).expect("build a SYN");
    out
}

/// Sends a SYN to `frontend`: it must come out rewritten to a backend's
/// port 8080.
fn reaches_a_backend(dp: &Loaded, frontend: [u8; 4], sport: u16) -> [u8; 4] {
    let (ret, out) = dp.xdp(&syn(frontend, sport)).expect("XDP test run");
    assert_eq!(ret, XDP_PASS, "{frontend:?}: passed on");
    let sliced = SlicedPacket::from_ethernet(&out).expect("parse the output");
    let Some(NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("{frontend:?}: not IPv4 out");
    };
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("{frontend:?}: not TCP out");
    };
    let dst = ip.header().destination();
    assert!(
        BACKENDS.contains(&dst),
        "{frontend:?}: sent to {dst:?}, not a backend"
    );
    assert_eq!(tcp.destination_port(), 8080, "{frontend:?}: target port");
    dst
}

fn slot_entries(dp: &Loaded) -> usize {
    dp.maps.slots.keys().filter(Result::is_ok).count()
}

/// The objects of `yaml` on a node with an address: external clients of
/// the external IPs are source-NATed to it.
fn on_a_node(yaml: &str) -> model::Objects {
    let mut objects = common::objects(yaml).expect("parse");
    objects.node.addresses = vec![std::net::IpAddr::from([10, 0, 0, 1])];
    objects
}

/// A Service with a 131071-entry Maglev table on its cluster IP and 39
/// external IPs: one table (131071 slots), not 40 (5.2M, more than
/// `lb_slots` holds).
#[test]
fn large_maglev_table_on_forty_frontends_is_one_table() {
    if !common::ready("large_maglev_table_on_forty_frontends_is_one_table") {
        return;
    }
    let externals: Vec<[u8; 4]> = (0..39).map(external_ip).collect();
    let annotations =
        r#"{"xdproxy.io/lb-algorithm": "maglev", "xdproxy.io/maglev-table-size": "131071"}"#;
    let yaml = service("big", [10, 96, 0, 10], &externals, annotations);
    let mut dp = Loaded::new().expect("load the datapath");
    dp.program(&model::desired(&on_a_node(&yaml)))
        .expect("program 40 frontends");
    assert_eq!(slot_entries(&dp), 131_071, "one table for all 40 frontends");
    let mut chosen = BTreeSet::new();
    for (i, frontend) in std::iter::once([10, 96, 0, 10])
        .chain(externals.iter().copied())
        .enumerate()
    {
        chosen.insert(reaches_a_backend(&dp, frontend, 20_000 + i as u16));
    }
    assert!(chosen.len() > 1, "the table spreads flows: {chosen:?}");
}

/// `--lb-algorithm maglev` (table 16381) over two Services with the same
/// endpoints and 300 frontends between them: one table, where one per
/// frontend (4.9M slots) overflowed `lb_slots` at 256 frontends.
#[test]
fn node_wide_maglev_over_three_hundred_frontends_does_not_fill_slots() {
    if !common::ready("node_wide_maglev_over_three_hundred_frontends_does_not_fill_slots") {
        return;
    }
    let a: Vec<[u8; 4]> = (0..149).map(external_ip).collect();
    let b: Vec<[u8; 4]> = (149..298).map(external_ip).collect();
    let yaml =
        service("one", [10, 96, 0, 10], &a, "{}") + &service("two", [10, 96, 0, 11], &b, "{}");
    let mut objects = on_a_node(&yaml);
    objects.node.balancing = Balancing {
        algorithm: Algorithm::Maglev,
        table_size: 16_381,
    };
    let desired = model::desired(&objects);
    assert_eq!(desired.frontends.len(), 300);
    let mut dp = Loaded::new().expect("load the datapath");
    dp.program(&desired).expect("program 300 frontends");
    let used = slot_entries(&dp);
    assert_eq!(used, 16_381, "one shared table");
    assert!(used < MAX_SLOTS as usize);
    for (i, frontend) in a.iter().chain(&b).enumerate().step_by(7) {
        reaches_a_backend(&dp, *frontend, 30_000 + i as u16);
    }
    reaches_a_backend(&dp, [10, 96, 0, 11], 31_000);
}
