//! The side-by-side report: one Markdown table (traffic and time to
//! program per scale and mode) and an SVG plot of the traffic figures
//! against the number of Services.

use std::{fmt::Write as _, time::Duration};

use proxy_tests::{
    connrate::quantile,
    plot::{self, Panel, Series},
};

use crate::{
    Samples,
    lanes::{ROUNDS, Traffic, Way},
};

/// One scale's figures.
pub struct Scale {
    pub services: usize,
    /// Time to program, by mode name ("xdproxy", "iptables-legacy", ...).
    pub program: Vec<(&'static str, Samples)>,
    pub traffic: Vec<(Way, Traffic)>,
}

/// A connect this slow waited for a SYN to be sent again.
const RETRIED: Duration = Duration::from_millis(900);

pub fn markdown(scales: &[Scale]) -> String {
    let mut out = format!(
        "Median (range) of {ROUNDS} alternating rounds per mode: new connections per second \
         from one client opening them one at a time (each closed with a RST), connect() \
         latency over all rounds, requests per second with 50 concurrent connections of \
         one request each (failed: requests that got no answer; retried: connects that \
         took a SYN retransmission, the kernel's 1 s initial timeout, which sets a \
         round's conn/s to about 1,000); time to program every Service from nothing.\n\n\
         | Services | mode | conn/s | connect p50 | connect p99 | req/s, 50 concurrent | \
         failed / retried | time to program |\n|---|---|---|---|---|---|---|---|\n"
    );
    for scale in scales {
        for (way, t) in &scale.traffic {
            let program = program_name(*way)
                .and_then(|name| scale.program.iter().find(|(n, _)| *n == name))
                .map_or("-".to_string(), |(_, s)| s.cell());
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1?} | {:.1?} | {} | {} / {} | {program} |",
                scale.services,
                way.name(),
                rate_cell(&t.conn_rates),
                quantile(&t.latencies, 0.5),
                quantile(&t.latencies, 0.99),
                rate_cell(&t.request_rates),
                t.failed,
                t.latencies.iter().filter(|l| **l >= RETRIED).count(),
            );
        }
    }
    let errors: Vec<String> = scales
        .iter()
        .flat_map(|s| s.traffic.iter().map(move |(w, t)| (s.services, w, t)))
        .filter_map(|(n, w, t)| {
            Some(format!(
                "- {n} Services, {}: {}",
                w.name(),
                t.first_error.as_ref()?
            ))
        })
        .collect();
    if !errors.is_empty() {
        out.push_str("\nFirst failure of each mode that had one:\n");
        out.push_str(&errors.join("\n"));
        out.push('\n');
    }
    out
}

/// Whose time to program a way's row shows.
fn program_name(way: Way) -> Option<&'static str> {
    match way {
        Way::Kube(mode) => Some(mode.name()),
        Way::Xdproxy | Way::SocketHooks => Some("xdproxy"),
        Way::NoProxy | Way::NodeNoProxy => None,
    }
}

pub fn svg(scales: &[Scale]) -> String {
    let panel = |title: &str, y_label: &str, value: &dyn Fn(&Traffic) -> f64| Panel {
        title: title.into(),
        y_label: y_label.into(),
        series: Way::ALL
            .iter()
            .map(|way| Series {
                name: way.name().into(),
                points: scales
                    .iter()
                    .filter_map(|s| {
                        let (_, t) = s.traffic.iter().find(|(w, _)| w == way)?;
                        Some((s.services as f64, value(t)))
                    })
                    .collect(),
            })
            .collect(),
    };
    plot::svg(
        &[
            panel(
                "New connections, one client",
                "connections per second",
                &|t| median(&t.conn_rates),
            ),
            panel("Connect latency, median", "microseconds", &|t| {
                quantile(&t.latencies, 0.5).as_secs_f64() * 1e6
            }),
            panel(
                "Short requests, 50 concurrent",
                "requests per second",
                &|t| median(&t.request_rates),
            ),
        ],
        "Services (10 endpoints each)",
    )
}

fn rate_cell(rates: &[f64]) -> String {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.last()) {
        (Some(low), Some(high)) => format!("{:.0} ({low:.0}..{high:.0})", median(&sorted)),
        _ => "-".into(),
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}
