//! Conntrack garbage collection.
//!
//! `ct4_table`/`ct6_table` (conntrack's own table, `datapath::ctlines`)
//! never evict an entry to make room (an LRU would drop established flows
//! under a flood of new ones), so the agent removes what has gone idle. New
//! flows that find their groups full go to the LRU maps
//! `ct4_overflow`/`ct6_overflow`, collected the same way.
//! `timeouts` says how long an entry may stay idle, `expiry` (pure) which
//! flows have expired, `overflow` (pure) when the datapath may stop looking
//! in the overflow maps, `paired` (pure) when it may stop looking for
//! forward and reply entries, `gc` reads (through `datapath::pinned`) and
//! deletes, and `spawn` runs it periodically.

pub mod expiry;
pub mod gc;
pub mod overflow;
pub mod paired;
pub mod timeouts;
pub mod upgrade;

use std::{path::PathBuf, time::Duration};

use tokio::time::{Instant, MissedTickBehavior};

pub use gc::{Gc, Stats};
pub use timeouts::Timeouts;

use crate::{datapath::loader::ConntrackSizes, metrics::Shared};

/// Conntrack settings of `run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Entries per family (`--conntrack-max`), applied when the maps are
    /// created.
    pub max_entries: u32,
    /// Entries per family of the overflow maps (`--conntrack-overflow-max`),
    /// applied when they are created.
    pub overflow_entries: u32,
    /// Time between garbage collection passes.
    pub gc_interval: Duration,
    pub timeouts: Timeouts,
}

/// The smallest `--conntrack-max` and `--conntrack-overflow-max` taken.
pub const MIN_ENTRIES: u32 = 1024;

impl Config {
    /// The map sizes the loader creates the maps with.
    pub fn sizes(&self) -> ConntrackSizes {
        ConntrackSizes {
            entries: self.max_entries,
            overflow: self.overflow_entries,
        }
    }

    /// How long an entry may outlive the last packet that refreshed it:
    /// its timeout, and the garbage collection pass that finds it over.
    pub fn longest_life(&self) -> Duration {
        Duration::from_secs(self.timeouts.longest().into()) + self.gc_interval
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_entries: proxy_common::MAX_CONNTRACK,
            overflow_entries: proxy_common::MAX_CT_OVERFLOW,
            gc_interval: Duration::from_secs(10),
            timeouts: Timeouts::default(),
        }
    }
}

/// The conntrack flags of `run` (kube-proxy's names where it has them).
/// Durations are seconds, or as Go writes them: `24h`, `1h30m`, `10s`.
#[derive(clap::Args, Clone, Debug)]
pub struct Flags {
    /// Conntrack entries per address family (at least 1024). A datapath
    /// already pinned keeps its size until `proxy-agent cleanup`.
    #[arg(long, default_value_t = proxy_common::MAX_CONNTRACK,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_ENTRIES)..))]
    pub conntrack_max: u32,
    /// Entries per address family of the LRU tables that take new flows
    /// while the conntrack table is full (at least 1024). A datapath
    /// already pinned keeps its size until `proxy-agent cleanup`.
    #[arg(long, default_value_t = proxy_common::MAX_CT_OVERFLOW,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_ENTRIES)..))]
    pub conntrack_overflow_max: u32,
    /// Time between conntrack garbage collection passes.
    #[arg(long, default_value = "10s", value_parser = timeouts::parse_interval)]
    pub conntrack_gc_interval: Duration,
    /// Idle time of a TCP direction that has only sent SYNs (seconds or 1m-style).
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_syn, value_parser = timeouts::parse_timeout)]
    pub conntrack_tcp_timeout_syn: u32,
    /// Idle time of an established TCP connection (seconds or 24h-style).
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_established, value_parser = timeouts::parse_timeout)]
    pub conntrack_tcp_timeout_established: u32,
    /// Idle time of a TCP direction that sent a FIN; the other direction
    /// keeps the connection while it still sends (seconds or 10s-style).
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_fin, value_parser = timeouts::parse_timeout)]
    pub conntrack_tcp_timeout_fin: u32,
    /// Idle time of a TCP connection after a RST in either direction
    /// (seconds or 10s-style).
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_rst, value_parser = timeouts::parse_timeout)]
    pub conntrack_tcp_timeout_rst: u32,
    /// Idle time of a UDP flow (seconds or 1m-style).
    #[arg(long, default_value_t = Timeouts::DEFAULT.udp, value_parser = timeouts::parse_timeout)]
    pub conntrack_udp_timeout: u32,
    /// Idle time of a flow of another protocol, such as SCTP (seconds or 5m-style).
    #[arg(long, default_value_t = Timeouts::DEFAULT.other, value_parser = timeouts::parse_timeout)]
    pub conntrack_timeout_other: u32,
}

impl Flags {
    /// The settings these flags ask for.
    pub fn config(&self) -> Config {
        Config {
            max_entries: self.conntrack_max,
            overflow_entries: self.conntrack_overflow_max,
            gc_interval: self.conntrack_gc_interval,
            timeouts: Timeouts {
                tcp_syn: self.conntrack_tcp_timeout_syn,
                tcp_established: self.conntrack_tcp_timeout_established,
                tcp_fin: self.conntrack_tcp_timeout_fin,
                tcp_rst: self.conntrack_tcp_timeout_rst,
                udp: self.conntrack_udp_timeout,
                other: self.conntrack_timeout_other,
            },
        }
    }
}

/// Runs a garbage collection pass every `gc_interval` on the maps pinned
/// under `bpffs`, for as long as the agent runs, and reports each pass in
/// `status`. A failing pass is logged; the next one tries again.
pub fn spawn(bpffs: PathBuf, config: &Config, status: &Shared) -> tokio::task::JoinHandle<()> {
    let (interval, timeouts, status) = (config.gc_interval, config.timeouts, status.clone());
    tokio::spawn(async move {
        // The first pass waits one interval: start-up has more urgent work.
        let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut gc = None;
        loop {
            ticks.tick().await;
            let bpffs = bpffs.clone();
            // The walk is blocking syscalls, up to a map's worth of them.
            let pass = tokio::task::spawn_blocking(move || pass(gc, &bpffs, timeouts)).await;
            let result;
            (gc, result) = match pass {
                Ok(done) => done,
                Err(e) => (
                    None,
                    Err(anyhow::anyhow!("garbage collection pass died: {e}")),
                ),
            };
            report(result, &status);
        }
    })
}

/// One pass, opening the maps first if they are not open yet. The maps are
/// kept open after an error (the next pass retries with any counts still
/// unwritten).
fn pass(
    gc: Option<Gc>,
    bpffs: &std::path::Path,
    timeouts: Timeouts,
) -> (Option<Gc>, anyhow::Result<Stats>) {
    let mut gc = match gc {
        Some(gc) => gc,
        None => match Gc::open(bpffs, timeouts) {
            Ok(gc) => gc,
            Err(e) => return (None, Err(e)),
        },
    };
    let stats = gc.pass();
    (Some(gc), stats)
}

fn report(result: anyhow::Result<Stats>, status: &Shared) {
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            log::error!("conntrack garbage collection: {e:#}; retrying on the next pass");
            return;
        }
    };
    if let Ok(mut status) = status.lock() {
        let c = &mut status.conntrack;
        c.entries4 = stats.entries4;
        c.entries6 = stats.entries6;
        c.overflow4 = stats.overflow4;
        c.overflow6 = stats.overflow6;
        c.gc_deleted += stats.deleted as u64;
        c.gc_unconfirmed += stats.unconfirmed as u64;
        c.gc_duration = stats.duration.as_secs_f64();
    }
    let summary = format!(
        "conntrack: {} IPv4 and {} IPv6 entries, {} and {} in overflow, deleted {} ({} open \
         connections reaped, {} unconfirmed flows given up under pressure, {} flows revived \
         during the pass) in {:?}",
        stats.entries4,
        stats.entries6,
        stats.overflow4,
        stats.overflow6,
        stats.deleted,
        stats.reaped,
        stats.unconfirmed,
        stats.revived,
        stats.duration
    );
    // Overflow entries mean the table was full: worth an operator's eye.
    if stats.deleted > 0 || stats.overflowing {
        log::info!("{summary}");
    } else {
        log::debug!("{summary}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: Flags,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let args = std::iter::once("test").chain(args.iter().copied());
        Cli::try_parse_from(args).map(|cli| cli.flags.config())
    }

    #[test]
    fn flags_default_to_the_config_defaults() {
        assert_eq!(parse(&[]).ok(), Some(Config::default()));
    }

    #[test]
    fn flags_take_go_durations_and_seconds() {
        let config = parse(&[
            "--conntrack-max=4096",
            "--conntrack-overflow-max=2048",
            "--conntrack-gc-interval=1m",
            "--conntrack-tcp-timeout-syn=30s",
            "--conntrack-tcp-timeout-established=1h30m",
            "--conntrack-tcp-timeout-fin=5",
            "--conntrack-tcp-timeout-rst=2s",
            "--conntrack-udp-timeout=2m",
            "--conntrack-timeout-other=1.5h",
        ]);
        let want = Config {
            max_entries: 4096,
            overflow_entries: 2048,
            gc_interval: Duration::from_secs(60),
            timeouts: Timeouts {
                tcp_syn: 30,
                tcp_established: 5_400,
                tcp_fin: 5,
                tcp_rst: 2,
                udp: 120,
                other: 5_400,
            },
        };
        assert_eq!(config.ok(), Some(want));
    }

    #[test]
    fn flags_refuse_what_cannot_work() {
        for bad in [
            "--conntrack-max=1023",
            "--conntrack-max=-1",
            "--conntrack-overflow-max=1023",
            "--conntrack-overflow-max=0",
            "--conntrack-gc-interval=0s",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-udp-timeout=soon",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad} must be refused");
        }
        assert!(parse(&["--conntrack-max=1024"]).is_ok());
        assert!(parse(&["--conntrack-overflow-max=1024"]).is_ok());
    }

    #[test]
    fn the_overflow_maps_default_to_their_own_size() {
        let config = parse(&["--conntrack-max=4096"]).ok();
        let sizes = config.map(|c| c.sizes());
        assert_eq!(
            sizes,
            Some(ConntrackSizes {
                entries: 4096,
                overflow: proxy_common::MAX_CT_OVERFLOW,
            })
        );
    }
}
