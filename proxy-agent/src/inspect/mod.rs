//! `proxy-agent inspect`: what the datapath pinned on this node holds, for
//! people (tables) and tools (JSON), as `cilium bpf lb list` shows Cilium's.
//!
//! [`read`] opens the pinned maps and decodes them into [`records`] (the
//! only I/O, and read-only); [`report`] turns records into reports (pure,
//! the JSON schema); [`table`] draws reports as text (pure). No agent has
//! to be running: the maps stay pinned after it exits.

pub mod read;
pub mod records;
pub mod report;
pub mod table;

use std::path::Path;

use serde::Serialize;

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Subject {
    /// Every conntrack entry of both families.
    Conntrack,
    /// Every frontend with its algorithm, flags, traffic and backends.
    Services,
    /// Every backend with its flows, open connections and services.
    Backends,
    /// The datapath's global event counters.
    Counters,
}

/// How to show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned text.
    Table,
    /// One pretty-printed JSON object (see [`report`] for its fields).
    Json,
}

/// Reads the maps pinned under `<bpffs>/xdproxy` and renders `subject`.
pub fn inspect(bpffs: &Path, subject: Subject, format: Format) -> anyhow::Result<String> {
    let pins = read::Pinned::open(bpffs)?;
    match subject {
        Subject::Services => render(&report::services(&pins.lb()?), format, table::services),
        Subject::Backends => render(&report::backends(&pins.lb()?), format, table::backends),
        Subject::Conntrack => {
            let records = pins.conntrack()?;
            // After the walk: no entry was seen later than this, so no age
            // comes out negative.
            let now = crate::datapath::conntrack::now()?;
            render(&report::conntrack(&records, now), format, table::conntrack)
        }
        Subject::Counters => render(
            &report::counters(&pins.counters()?),
            format,
            table::counters,
        ),
    }
}

fn render<T: Serialize>(
    report: &T,
    format: Format,
    table: fn(&T) -> String,
) -> anyhow::Result<String> {
    match format {
        Format::Table => Ok(table(report)),
        Format::Json => Ok(serde_json::to_string_pretty(report)? + "\n"),
    }
}

#[cfg(test)]
mod tests;
