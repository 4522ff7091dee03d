//! `cargo bench -p proxy-agent --bench maglev`: time to build one Maglev
//! lookup table, as the agent does for a service whenever its backends
//! change. Prints timings only; the machine is too noisy to assert on them.

use std::hint::black_box;
use std::time::{Duration, Instant};

use proxy_agent::maglev::{DEFAULT_TABLE_SIZE, table};

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

/// Backend names as the agent gives them: address, port, protocol.
fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let [_, a, b, c] = (i as u32).to_be_bytes();
            format!("10.{a}.{b}.{c}:8080/TCP")
        })
        .collect()
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
