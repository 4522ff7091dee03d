//! `cargo bench -p proxy-agent --bench maglev`: time to build one Maglev
//! lookup table, as the agent does for a service whenever its backends
//! change. Prints timings only; the machine is too noisy to assert on them.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use proxy_agent::{
    maglev::{DEFAULT_TABLE_SIZE, backend_names, table},
    model::Protocol,
};

const WARM_UP: usize = 20;
const RUNS: usize = 200;
const TARGET: &str = "target: < 4 ms, half of a peer's published ~8 ms";

fn main() {
    println!("Maglev table build, {RUNS} runs after {WARM_UP} warm-up; {TARGET}");
    for (size, backends) in [
        (DEFAULT_TABLE_SIZE, 1000),
        (DEFAULT_TABLE_SIZE, 100),
        (65537, 1000),
    ] {
        let mut times = measure(&names(backends), size);
        times.sort_unstable();
        println!(
            "size {size}, {backends} backends: median {}, p90 {}, min {}",
            ms(times[RUNS / 2]),
            ms(times[RUNS * 9 / 10]),
            ms(times[0]),
        );
    }
}

/// Names of `n` TCP backends as the agent gives them.
fn names(n: usize) -> Vec<String> {
    let addrs = (0..n as u32).map(|i| (Ipv4Addr::from(0x0a00_0000 + i), 8080).into());
    backend_names(&addrs.collect::<Vec<_>>(), Protocol::Tcp)
}

fn measure(backends: &[String], size: u32) -> Vec<Duration> {
    for _ in 0..WARM_UP {
        black_box(table(black_box(backends), size));
    }
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            black_box(table(black_box(backends), size));
            start.elapsed()
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}
