//! `cargo xtask bench`: datapath ns per packet through BPF_PROG_TEST_RUN,
//! next to an empty XDP program measured the same way in the same run.
//!
//! Every run is a single pass (repeat = 1): with repeat > 1 the kernel does
//! not restore the packet, so after the first pass a rewritten packet would
//! time another path. Each case proves the path it timed: return value,
//! output bytes and counters are checked for every sample.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, bail, ensure};
use common::{Loaded, XDP_PASS};
use etherparse::PacketBuilder;
use proxy_agent::model::{Desired, Frontend, FrontendState, ObjectKey, Protocol};
use proxy_common::{Counter, programs};

const SAMPLES: usize = 20_000;
const SCALES: [usize; 3] = [1, 10_000, 100_000];
const CLIENT: [u8; 4] = [172, 16, 0, 2];

fn main() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("cargo xtask bench") {
        bail!("the benchmark needs root");
    }
    let mut rows = Vec::new();
    for services in SCALES {
        rows.push(measure(services).with_context(|| format!("{services} services"))?);
    }
    print_table(&rows);
    Ok(())
}

/// Service i: VIP 10.(96 + i / 65536).(i / 256 % 256).(i % 256):80, two backends.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        96 + (i / 65_536) as u8,
        (i / 256 % 256) as u8,
        (i % 256) as u8,
    )
}

fn desired(services: usize) -> Desired {
    let mut out = Desired::default();
    for i in 0..services {
        let backends = (0..2)
            .map(|b| SocketAddrV4::new(Ipv4Addr::new(10, 200, ((i * 2 + b) % 250) as u8, 2), 8080))
            .collect();
        out.frontends.insert(
            Frontend {
                addr: vip(i),
                port: 80,
                protocol: Protocol::Tcp,
            },
            FrontendState {
                service: ObjectKey {
                    namespace: "bench".into(),
                    name: format!("svc{i}"),
                },
                port_name: "http".into(),
                backends,
            },
        );
    }
    out
}

fn tcp(src: [u8; 4], sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst.octets(), 64)
        .tcp(sport, dport, 1, 64240);
    let mut out = Vec::new();
    let _ = builder.write(&mut out, &[0u8; 64]);
    out
}

struct Row {
    services: usize,
    empty: f64,
    established: f64,
    new_flow: f64,
    non_service: f64,
}

fn measure(services: usize) -> anyhow::Result<Row> {
    let mut dp = Loaded::new()?;
    let started = std::time::Instant::now();
    dp.program(&desired(services))?;
    eprintln!("{services} services programmed in {:?}", started.elapsed());
    // The service under test is the last one written: the lookup is no
    // luckier than any other.
    let target = vip(services - 1);
    let mut empty = Vec::with_capacity(SAMPLES * 3);
    let established = established(&dp, target, &mut empty)?;
    let new_flow = new_flows(&dp, target, &mut empty)?;
    let non_service = non_service(&dp, &mut empty)?;
    Ok(Row {
        services,
        empty: median(empty),
        established,
        new_flow,
        non_service,
    })
}

fn run(dp: &Loaded, packet: &[u8], empty: &mut Vec<u64>) -> anyhow::Result<(Vec<u8>, u64)> {
    let (ret, _, base) = dp.xdp_named(programs::XDP_EMPTY, packet)?;
    ensure!(ret == XDP_PASS, "empty program returned {ret}");
    empty.push(base);
    let (ret, out, ns) = dp.xdp_named(programs::XDP, packet)?;
    ensure!(ret == XDP_PASS, "datapath returned {ret}");
    Ok((out, ns))
}

fn destination(packet: &[u8]) -> [u8; 4] {
    [packet[30], packet[31], packet[32], packet[33]]
}

fn service_packets(dp: &Loaded) -> anyhow::Result<u64> {
    let mut total = 0;
    for id in 1..=dp.reconciler.frontend_count() as u32 {
        total += dp.maps.service_stats(id)?.packets;
    }
    Ok(total)
}

fn established(dp: &Loaded, target: Ipv4Addr, empty: &mut Vec<u64>) -> anyhow::Result<f64> {
    let packet = tcp(CLIENT, 50_000, target, 80);
    let (first, _) = run(dp, &packet, empty)?;
    let backend = destination(&first);
    ensure!(
        backend[..2] == [10, 200],
        "first packet was not DNATed: {backend:?}"
    );
    let before = service_packets(dp)?;
    let mut times = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (out, ns) = run(dp, &packet, empty)?;
        ensure!(
            destination(&out) == backend,
            "an established packet changed backend"
        );
        times.push(ns);
    }
    ensure!(
        service_packets(dp)? - before == SAMPLES as u64,
        "service counter mismatch"
    );
    ensure!(
        dp.maps.counter(Counter::Reselected)? == 0,
        "conntrack re-selected: not the established path"
    );
    Ok(median(times))
}

fn new_flows(dp: &Loaded, target: Ipv4Addr, empty: &mut Vec<u64>) -> anyhow::Result<f64> {
    let before = service_packets(dp)?;
    let mut times = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        // A fresh source address and port each time: a flow conntrack has never seen.
        let src = [172, 17, (i / 256) as u8, (i % 256) as u8];
        let packet = tcp(src, 20_000 + (i % 40_000) as u16, target, 80);
        let (out, ns) = run(dp, &packet, empty)?;
        ensure!(
            destination(&out)[..2] == [10, 200],
            "a new flow was not DNATed"
        );
        times.push(ns);
    }
    ensure!(
        service_packets(dp)? - before == SAMPLES as u64,
        "service counter mismatch"
    );
    ensure!(
        dp.maps.counter(Counter::CtInsertFailed)? == 0,
        "conntrack inserts failed"
    );
    Ok(median(times))
}

fn non_service(dp: &Loaded, empty: &mut Vec<u64>) -> anyhow::Result<f64> {
    let packet = tcp(CLIENT, 50_001, Ipv4Addr::new(192, 168, 77, 7), 80);
    let before = service_packets(dp)?;
    let mut times = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (out, ns) = run(dp, &packet, empty)?;
        ensure!(out == packet, "a non-service packet was changed");
        times.push(ns);
    }
    ensure!(
        service_packets(dp)? == before,
        "a non-service packet was counted"
    );
    Ok(median(times))
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "XDP datapath, ns per packet (median of {SAMPLES} single runs; +delta over the empty program)"
    );
    println!(
        "{:>9} | {:>7} | {:>17} | {:>17} | {:>17}",
        "services", "empty", "established", "new flow", "non-service"
    );
    for r in rows {
        println!(
            "{:>9} | {:>7.0} | {:>7.0} (+{:>6.0}) | {:>7.0} (+{:>6.0}) | {:>7.0} (+{:>6.0})",
            r.services,
            r.empty,
            r.established,
            r.established - r.empty,
            r.new_flow,
            r.new_flow - r.empty,
            r.non_service,
            r.non_service - r.empty
        );
    }
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return;
    };
    let ratio = |a: f64, b: f64| a / b;
    let mut ratios = BTreeMap::new();
    ratios.insert("established", ratio(last.established, first.established));
    ratios.insert("new flow", ratio(last.new_flow, first.new_flow));
    ratios.insert("non-service", ratio(last.non_service, first.non_service));
    println!();
    println!(
        "cost at {} services / cost at {} (target <= 1.10):",
        last.services, first.services
    );
    for (case, r) in ratios {
        println!("  {case:<12} {r:.2}x");
    }
    println!("targets: established <= empty + 60 ns, new flow <= empty + 150 ns");
}
