//! Reports as aligned text for people (`-o table`, the default).

use std::fmt::Write as _;

use super::report::{
    BackendsReport, ConntrackReport, CountersReport, CtView, ServiceBackend, ServiceView,
    ServicesReport, SocketView,
};

/// One block per frontend: its entry, then its backends.
pub fn services(report: &ServicesReport) -> String {
    if report.services.is_empty() {
        return "no services\n".into();
    }
    let blocks: Vec<String> = report.services.iter().map(service).collect();
    blocks.join("\n")
}

fn service(s: &ServiceView) -> String {
    let clients = match s.clients {
        "local" => "  (this node's clients)",
        _ => "",
    };
    let mut out = format!("{}/{}{clients}\n", s.frontend, s.protocol);
    let mut facts = vec![
        format!("service {}", s.service_id),
        format!("slot table {}", s.slot_table),
        format!("algorithm {}", s.algorithm),
        format!("backends {}", s.backend_count),
    ];
    if let Some(size) = s.table_size {
        facts.push(format!("table {size}"));
    }
    facts.push(format!("flags {}", flags(s)));
    facts.push(format!("packets {}", s.packets));
    facts.push(format!("bytes {}", s.bytes));
    let _ = writeln!(out, "  {}", facts.join("  "));
    if s.missing_slots > 0 {
        let _ = writeln!(out, "  warning: {} slots not written", s.missing_slots);
    }
    if s.backends.is_empty() {
        out.push_str("  (no backends)\n");
        return out;
    }
    let table = s.table_size.is_some();
    let rows: Vec<Vec<String>> = s.backends.iter().map(|b| backend_row(b, table)).collect();
    let header: &[&str] = if table {
        &["BACKEND", "ADDRESS", "ENTRIES", "SHARE", "STATE"]
    } else {
        &["BACKEND", "ADDRESS", "SLOTS", "STATE"]
    };
    out + &grid("  ", header, &rows)
}

/// The flags, `affinity` with its timeout; `-` for none.
fn flags(s: &ServiceView) -> String {
    if s.flags.is_empty() {
        return "-".into();
    }
    let named = s
        .flags
        .iter()
        .map(|f| match (f.as_str(), s.affinity_timeout_seconds) {
            ("affinity", Some(seconds)) => format!("affinity({seconds}s)"),
            _ => f.clone(),
        });
    named.collect::<Vec<_>>().join(",")
}

fn backend_row(b: &ServiceBackend, table: bool) -> Vec<String> {
    let address = b
        .address
        .map_or_else(|| "(unknown)".into(), |a| a.to_string());
    let mut row = vec![b.backend_id.to_string(), address];
    if table {
        row.push(b.table_entries.unwrap_or(0).to_string());
        row.push(format!("{:.1}%", b.share.unwrap_or(0.0) * 100.0));
    } else if b.slots.is_empty() {
        row.push("-".into());
    } else {
        let slots: Vec<String> = b.slots.iter().map(u32::to_string).collect();
        row.push(slots.join(","));
    }
    row.push(b.state.name().into());
    row
}

/// One line per backend.
pub fn backends(report: &BackendsReport) -> String {
    let rows: Vec<Vec<String>> = (report.backends.iter())
        .map(|b| {
            let services: Vec<String> = (b.services.iter())
                .map(|m| format!("{} {}", m.service_id, m.state.name()))
                .collect();
            vec![
                b.backend_id.to_string(),
                format!("{}/{}", b.address, b.protocol),
                b.family.name().into(),
                optional(b.new_flows),
                optional(b.open_connections),
                if services.is_empty() {
                    "-".into()
                } else {
                    services.join(", ")
                },
            ]
        })
        .collect();
    let header = ["ID", "ADDRESS", "FAMILY", "NEW FLOWS", "OPEN", "SERVICES"];
    grid("", &header, &rows)
}

/// One line per entry, then the totals per family.
pub fn conntrack(report: &ConntrackReport) -> String {
    let rows: Vec<Vec<String>> = report.entries.iter().map(ct_row).collect();
    let header = [
        "DIRECTION",
        "FLOW",
        "NAT",
        "STATE",
        "AGE",
        "BACKEND",
        "SERVICE",
        "ACTIVE",
        "TABLE",
    ];
    let mut out = grid("", &header, &rows);
    let t = &report.totals;
    let _ = writeln!(
        out,
        "ipv4: {} entries{}, ipv6: {} entries{}",
        t.ipv4,
        in_overflow(t.ipv4_overflow),
        t.ipv6,
        in_overflow(t.ipv6_overflow)
    );
    out
}

/// ` (N in overflow)`, or nothing for none: most nodes never overflow.
fn in_overflow(entries: usize) -> String {
    match entries {
        0 => String::new(),
        n => format!(" ({n} in overflow)"),
    }
}

fn ct_row(e: &CtView) -> Vec<String> {
    vec![
        e.direction.clone(),
        flow(e),
        nat(e),
        ct_state(e),
        format!("{}s", e.age_seconds),
        e.backend_id.to_string(),
        e.service_id.to_string(),
        if e.active { "yes" } else { "no" }.into(),
        e.table.name().into(),
    ]
}

/// `src -> dst PROTO`; a socket entry whose frontend is not known names
/// its service id instead of an address it does not have.
fn flow(e: &CtView) -> String {
    match &e.socket {
        Some(s) if s.frontend.is_none() => {
            format!("{} -> service {} {}", e.src, e.service_id, e.protocol)
        }
        _ => format!("{} -> {} {}", e.src, e.dst, e.protocol),
    }
}

/// What the entry rewrites to; a source-NATed socket entry's backend with
/// the node port its client's packets leave from.
fn nat(e: &CtView) -> String {
    match &e.socket {
        Some(SocketView {
            node_port: Some(port),
            ..
        }) => format!("{} via :{port}", e.nat),
        _ => e.nat.to_string(),
    }
}

/// The entry's state; a socket entry's as `client/backend`.
fn ct_state(e: &CtView) -> String {
    match &e.socket {
        Some(s) => format!("{}/{}", e.state, s.reply_state),
        None => e.state.clone(),
    }
}

/// One line per counter.
pub fn counters(report: &CountersReport) -> String {
    let rows: Vec<Vec<String>> = (report.counters.0.iter())
        .map(|(name, value)| vec![name.clone(), value.to_string()])
        .collect();
    grid("", &["COUNTER", "VALUE"], &rows)
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Columns padded to their widest cell (the last one is not padded), every
/// line prefixed with `indent`.
fn grid(indent: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        out.push_str(indent);
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
        out.push('\n');
    }
    out
}
