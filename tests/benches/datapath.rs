//! `cargo xtask bench`: datapath ns per packet through BPF_PROG_TEST_RUN,
//! next to an empty XDP program measured the same way in the same run.
//!
//! With repeat > 1 the kernel does not restore the packet, so after the
//! first pass a rewritten packet would time another path. Two methods avoid
//! that, and both are reported:
//! - steady state: the object's bench wrapper restores the packet head (and
//!   for new flows gives it an unseen source) before tail-calling the program
//!   under test, `REPEAT` times per syscall; the baseline is the wrapper
//!   tail-calling the empty program;
//! - single pass: one run per syscall, the empty program interleaved, which
//!   includes the cost of a cold cache on every run.
//!
//! Each case proves the path it timed: return value, output bytes and the
//! per-service and conntrack counters are checked.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, bail, ensure};
use aya::maps::{Array, MapData, ProgramArray};
use common::{Loaded, XDP_PASS};
use etherparse::PacketBuilder;
use proxy_agent::model::{Desired, Frontend, FrontendState, ObjectKey, Protocol};
use proxy_common::{BENCH_HEAD, BenchPacket, Counter, names, programs};

const SAMPLES: usize = 20_000;
const REPEAT: u32 = 1_000_000;
/// New-flow runs per syscall: ROUNDS x this many flows (two conntrack entries
/// each) fit in the conntrack map, so no run pays for LRU eviction.
const NEW_FLOW_REPEAT: u32 = 20_000;
const ROUNDS: usize = 5;
const SCALES: [usize; 3] = [1, 10_000, 100_000];
const CLIENT: [u8; 4] = [172, 16, 0, 2];

fn main() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("cargo xtask bench") {
        bail!("the benchmark needs root");
    }
    let mut steady = Vec::new();
    let mut single = Vec::new();
    for services in SCALES {
        let (s, p) = measure(services).with_context(|| format!("{services} services"))?;
        steady.push(s);
        single.push(p);
    }
    print_table(
        &format!("steady state: wrapper + program, {REPEAT} runs per syscall, median of {ROUNDS}"),
        &steady,
    );
    print_table(
        &format!("single pass: one run per syscall, median of {SAMPLES}"),
        &single,
    );
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

fn measure(services: usize) -> anyhow::Result<(Row, Row)> {
    let mut dp = Loaded::new()?;
    let started = std::time::Instant::now();
    dp.program(&desired(services))?;
    eprintln!("{services} services programmed in {:?}", started.elapsed());
    // The service under test is the last one written: the lookup is no
    // luckier than any other.
    let target = vip(services - 1);
    let steady = Steady::new(&mut dp)?.measure(&dp, services, target)?;
    let mut empty = Vec::with_capacity(SAMPLES * 3);
    let established = established(&dp, target, &mut empty)?;
    let new_flow = new_flows(&dp, target, &mut empty)?;
    let non_service = non_service(&dp, &mut empty)?;
    let single = Row {
        services,
        empty: median(empty),
        established,
        new_flow,
        non_service,
    };
    Ok((steady, single))
}

/// The bench wrapper's two maps.
struct Steady {
    packet: Array<MapData, BenchPacket>,
    target: ProgramArray<MapData>,
}

impl Steady {
    fn new(dp: &mut Loaded) -> anyhow::Result<Steady> {
        let packet = dp
            .ebpf
            .take_map(names::BENCH_PACKET)
            .context("bench_packet")?;
        let target = dp
            .ebpf
            .take_map(names::BENCH_TARGET)
            .context("bench_target")?;
        Ok(Steady {
            packet: packet.try_into()?,
            target: target.try_into()?,
        })
    }

    /// Per-run ns of the wrapper calling `program` on `packet`, median of rounds.
    fn time(
        &mut self,
        dp: &Loaded,
        program: &str,
        packet: &[u8],
        vary: bool,
        repeat: u32,
    ) -> anyhow::Result<(f64, Vec<u8>)> {
        let prog: &aya::programs::Xdp = dp.ebpf.program(program).context("program")?.try_into()?;
        self.target.set(0, prog.fd()?, 0)?;
        let mut head = [0u8; BENCH_HEAD];
        head.copy_from_slice(&packet[..BENCH_HEAD]);
        self.packet.set(
            0,
            BenchPacket {
                head,
                vary_source: vary as u32,
                seq: 0,
            },
            0,
        )?;
        let mut times = Vec::with_capacity(ROUNDS);
        let mut last = Vec::new();
        for _ in 0..ROUNDS {
            let (ret, out, ns) = dp.xdp_repeat(programs::XDP_BENCH, packet, repeat)?;
            ensure!(
                ret == XDP_PASS,
                "{program} via the wrapper returned {ret} (tail call failed?)"
            );
            times.push(ns);
            last = out;
        }
        Ok((median(times), last))
    }

    fn measure(mut self, dp: &Loaded, services: usize, target: Ipv4Addr) -> anyhow::Result<Row> {
        let flow = tcp(CLIENT, 51_000, target, 80);
        let (empty, _) = self.time(dp, programs::XDP_EMPTY, &flow, false, REPEAT)?;
        // New flows first, while conntrack has room for all of them.
        let before = service_packets(dp)?;
        let (new_flow, out) = self.time(dp, programs::XDP, &flow, true, NEW_FLOW_REPEAT)?;
        ensure!(
            destination(&out)[..2] == [10, 200],
            "new flows were not DNATed"
        );
        let runs = NEW_FLOW_REPEAT as u64 * ROUNDS as u64;
        ensure!(
            service_packets(dp)? - before == runs,
            "service counter mismatch (new flows)"
        );
        ensure!(
            dp.maps.counter(Counter::CtInsertFailed)? == 0,
            "conntrack inserts failed"
        );
        // Established: the first run creates the flow, every later one finds it.
        let runs = REPEAT as u64 * ROUNDS as u64;
        let before = service_packets(dp)?;
        let (established, out) = self.time(dp, programs::XDP, &flow, false, REPEAT)?;
        ensure!(
            destination(&out)[..2] == [10, 200],
            "established packets were not DNATed"
        );
        ensure!(
            service_packets(dp)? - before == runs,
            "service counter mismatch (established)"
        );
        ensure!(
            dp.maps.counter(Counter::Reselected)? == 0,
            "conntrack re-selected: not the established path"
        );
        // New flows again, now that every insert evicts the oldest flow.
        let (full, _) = self.time(dp, programs::XDP, &flow, true, REPEAT)?;
        eprintln!("{services} services: new flow with conntrack full (LRU eviction) {full:.0} ns");
        let other = tcp(CLIENT, 51_001, Ipv4Addr::new(192, 168, 77, 7), 80);
        let before = service_packets(dp)?;
        let (non_service, out) = self.time(dp, programs::XDP, &other, false, REPEAT)?;
        ensure!(out == other, "a non-service packet was changed");
        ensure!(
            service_packets(dp)? == before,
            "a non-service packet was counted"
        );
        Ok(Row {
            services,
            empty,
            established,
            new_flow,
            non_service,
        })
    }
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

fn print_table(title: &str, rows: &[Row]) {
    println!();
    println!("XDP datapath, ns per packet, {title} (+delta over the empty program)");
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
