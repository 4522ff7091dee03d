//! What the agent reports: kube-proxy's programming metrics (same names, so
//! existing dashboards keep working), health, and readiness.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

/// A Prometheus histogram with fixed upper bounds (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// Exponential buckets: `start`, `start * factor`, ... (`n` of them).
    pub fn exponential(start: f64, factor: f64, n: usize) -> Self {
        let bounds: Vec<f64> = (0..n).map(|i| start * factor.powi(i as i32)).collect();
        Histogram {
            counts: vec![0; bounds.len()],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, seconds: f64) {
        for (bound, count) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Shared between the sync loop (writer) and the HTTP server (reader).
#[derive(Debug)]
pub struct Status {
    pub network_programming: Histogram,
    pub sync_duration: Histogram,
    pub sync_errors: u64,
    pub last_sync: Option<SystemTime>,
    /// The oldest change received and not yet programmed.
    pub oldest_pending: Option<Instant>,
    /// Why the agent is not ready (API unreachable, initial list missing), if it is not.
    pub not_ready: Option<String>,
    /// False while this node is going away (`model::node_leaving`):
    /// `/healthz` fails so load balancers stop sending to it.
    pub node_eligible: bool,
    pub frontends: usize,
    pub backends: usize,
    /// Slot tables in `lb_slots` (frontends with the same slots share one)
    /// and the entries they take.
    pub slot_tables: usize,
    pub slots: u64,
    /// Services kept at their last valid version because their tables
    /// would need more than `--slot-budget` entries.
    pub services_over_slot_budget: usize,
    /// Frontends another Service also claimed, at the last full pass: the
    /// losers, not programmed.
    pub frontend_conflicts: usize,
    /// Interfaces with the datapath attached (`--iface`).
    pub interfaces: usize,
    /// `lb_filter` bits raised: the share of the array a packet that is
    /// neither a service's nor a reply finds raised is the share that
    /// still pays a hash lookup.
    pub filter_bits: u32,
    pub conntrack: Conntrack,
}

/// What the last conntrack garbage collection pass saw, and all passes did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Conntrack {
    pub entries4: usize,
    pub entries6: usize,
    /// Entries of the overflow maps (new flows that found the table full).
    pub overflow4: usize,
    pub overflow6: usize,
    /// Entries deleted since the agent started.
    pub gc_deleted: u64,
    /// Unconfirmed flows given up early because a table ran full.
    pub gc_unconfirmed: u64,
    /// The last pass's duration, seconds.
    pub gc_duration: f64,
}

pub type Shared = Arc<Mutex<Status>>;

impl Default for Status {
    fn default() -> Self {
        Status {
            // As kube-proxy's, from 1 ms; ours go lower because we are faster.
            network_programming: Histogram::exponential(0.0001, 2.0, 22),
            sync_duration: Histogram::exponential(0.0001, 2.0, 18),
            sync_errors: 0,
            last_sync: None,
            oldest_pending: Some(Instant::now()),
            not_ready: Some("initial sync not done".into()),
            node_eligible: true,
            frontends: 0,
            frontend_conflicts: 0,
            backends: 0,
            slot_tables: 0,
            slots: 0,
            services_over_slot_budget: 0,
            interfaces: 0,
            filter_bits: 0,
            conntrack: Conntrack::default(),
        }
    }
}

impl Status {
    /// kube-proxy's rule: healthy unless a change has waited longer than
    /// `timeout` to be programmed.
    pub fn healthy(&self, timeout: Duration) -> bool {
        self.oldest_pending.is_none_or(|t| t.elapsed() < timeout)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.network_programming.render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        );
        self.sync_duration.render(
            &mut out,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
        );
        let last = self
            .last_sync
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let gauges = [
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                last,
            ),
            (
                "xdproxy_sync_errors_total",
                "Map writes that failed (the state before them stays)",
                self.sync_errors as f64,
            ),
            (
                "xdproxy_frontends",
                "Frontends programmed",
                self.frontends as f64,
            ),
            (
                "xdproxy_backends",
                "Backends programmed",
                self.backends as f64,
            ),
            (
                "xdproxy_slot_tables",
                "Slot tables in lb_slots (frontends with the same backends and table size share one)",
                self.slot_tables as f64,
            ),
            (
                "xdproxy_slots",
                "lb_slots entries in use",
                self.slots as f64,
            ),
            (
                "xdproxy_services_over_slot_budget",
                "Services kept at their last valid version: their slot tables would need more \
                 than --slot-budget lb_slots entries",
                self.services_over_slot_budget as f64,
            ),
            (
                "xdproxy_frontend_conflicts",
                "Frontends two Services claim, left to the better claim (allocated addresses win)",
                self.frontend_conflicts as f64,
            ),
            (
                "xdproxy_filter_bits_raised",
                "lb_filter bits raised, of 1048576 (one per frontend and per backend, and backends \
                 that left while their flows may live): a packet to neither that meets a raised \
                 bit pays the hash lookup the filter spares the others",
                self.filter_bits as f64,
            ),
            (
                "xdproxy_interfaces_attached",
                "Interfaces the datapath is attached to",
                self.interfaces as f64,
            ),
            (
                "xdproxy_conntrack_gc_deleted_total",
                "Conntrack entries deleted by garbage collection",
                self.conntrack.gc_deleted as f64,
            ),
            (
                "xdproxy_conntrack_unconfirmed_evicted_total",
                "Unconfirmed flows (nothing answered yet) removed early because conntrack ran full",
                self.conntrack.gc_unconfirmed as f64,
            ),
            (
                "xdproxy_conntrack_gc_duration_seconds",
                "Duration of the last conntrack garbage collection pass",
                self.conntrack.gc_duration,
            ),
        ];
        for (name, help, value) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let c = &self.conntrack;
        per_family(
            &mut out,
            "xdproxy_conntrack_entries",
            "Conntrack entries at the last garbage collection pass",
            (c.entries4, c.entries6),
        );
        per_family(
            &mut out,
            "xdproxy_conntrack_overflow_entries",
            "Entries of the LRU overflow conntrack (flows that found the table full) at the \
             last garbage collection pass",
            (c.overflow4, c.overflow6),
        );
        out
    }
}

/// A gauge with an IPv4 and an IPv6 series.
fn per_family(out: &mut String, name: &str, help: &str, (v4, v6): (usize, usize)) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n\
         {name}{{family=\"ipv4\"}} {v4}\n{name}{{family=\"ipv6\"}} {v6}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::exponential(0.001, 2.0, 3);
        h.observe(0.0005);
        h.observe(0.003);
        h.observe(10.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.004\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn conntrack_metrics_are_rendered() {
        let s = Status {
            conntrack: Conntrack {
                entries4: 12,
                entries6: 3,
                overflow4: 5,
                overflow6: 0,
                gc_deleted: 40,
                gc_unconfirmed: 9,
                gc_duration: 0.25,
            },
            ..Status::default()
        };
        let out = s.render();
        for line in [
            "xdproxy_conntrack_entries{family=\"ipv4\"} 12\n",
            "xdproxy_conntrack_entries{family=\"ipv6\"} 3\n",
            "# TYPE xdproxy_conntrack_entries gauge\n",
            "xdproxy_conntrack_overflow_entries{family=\"ipv4\"} 5\n",
            "xdproxy_conntrack_overflow_entries{family=\"ipv6\"} 0\n",
            "# TYPE xdproxy_conntrack_overflow_entries gauge\n",
            "# TYPE xdproxy_conntrack_gc_deleted_total counter\n",
            "xdproxy_conntrack_gc_deleted_total 40\n",
            "xdproxy_conntrack_unconfirmed_evicted_total 9\n",
            "# TYPE xdproxy_conntrack_gc_duration_seconds gauge\n",
            "xdproxy_conntrack_gc_duration_seconds 0.25\n",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn slot_table_metrics_are_rendered() {
        let s = Status {
            slot_tables: 2,
            slots: 131_073,
            services_over_slot_budget: 1,
            filter_bits: 7,
            ..Status::default()
        };
        let out = s.render();
        for line in [
            "# TYPE xdproxy_filter_bits_raised gauge\nxdproxy_filter_bits_raised 7\n",
            "# TYPE xdproxy_slot_tables gauge\nxdproxy_slot_tables 2\n",
            "# TYPE xdproxy_slots gauge\nxdproxy_slots 131073\n",
            "xdproxy_services_over_slot_budget 1\n",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn health_follows_kube_proxy() {
        let mut s = Status::default();
        assert!(
            s.healthy(Duration::from_secs(60)),
            "a fresh start is within the timeout"
        );
        s.oldest_pending = Instant::now().checked_sub(Duration::from_secs(61));
        assert!(
            !s.healthy(Duration::from_secs(60)),
            "a change waiting too long is unhealthy"
        );
        s.oldest_pending = None;
        assert!(s.healthy(Duration::from_secs(60)));
    }
}
