//! Reports and tables from hand-built records: no kernel needed.

use std::net::SocketAddr;

use proxy_common::{
    ALG_MAGLEV, ALG_ROUND_ROBIN, BACKEND_TERMINATING, CT_AT_EGRESS, CT_FORWARD, CT_REPLY,
    CT_REWRITE_DST, CT_SOCKET, CT_STATE_ESTABLISHED, CT_STATE_FIN, CT_STATE_SYN, Connections,
    Counter, IPPROTO_TCP, IPPROTO_UDP, SCOPE_ALL, SCOPE_LOCAL, SVC_AFFINITY, SVC_LOCAL_TWIN,
    SVC_REPLY_AT_EGRESS, Service, ServiceStats, SlotKey,
};
use serde_json::json;

use super::{
    records::{BackendActivity, CtRecord, Endpoint, LbRecords, MemberRecord, ServiceRecord},
    report::{self, MemberState},
    table,
};
use crate::datapath::conntrack::{Record, Table};

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a socket address")
}

fn tcp(text: &str) -> Endpoint {
    Endpoint {
        addr: addr(text),
        proto: IPPROTO_TCP,
    }
}

fn service(frontend: &str, entry: Service) -> ServiceRecord {
    ServiceRecord {
        frontend: tcp(frontend),
        scope: SCOPE_ALL,
        entry,
    }
}

fn member(service_id: u32, backend_id: u32, backend: &str, flags: u8) -> MemberRecord {
    MemberRecord {
        service_id,
        backend_id,
        backend: tcp(backend),
        flags,
    }
}

fn slot(service_id: u32, slot: u32) -> SlotKey {
    SlotKey { service_id, slot }
}

/// Service 1: round robin over backends 1 and 2 (slots 1, 0), backend 3
/// terminating, backend 4 a member in no slot, backend 9 in a slot beyond
/// the count (left over: not shown).
fn listed() -> LbRecords {
    let entry = Service {
        id: 1,
        backend_count: 2,
        flags: SVC_AFFINITY | SVC_REPLY_AT_EGRESS,
        affinity_timeout: 10_800,
        algorithm: ALG_ROUND_ROBIN,
        table_size: 0,
        slots_id: 1,
    };
    LbRecords {
        services: vec![service("10.96.0.10:80", entry)],
        slots: [(slot(1, 0), 2), (slot(1, 1), 1), (slot(1, 2), 9)].into(),
        backends: [
            (1, tcp("10.1.1.2:8080")),
            (2, tcp("10.1.2.2:8080")),
            (3, tcp("10.1.3.2:8080")),
            (4, tcp("10.1.4.2:8080")),
        ]
        .into(),
        members: vec![
            member(1, 1, "10.1.1.2:8080", 0),
            member(1, 2, "10.1.2.2:8080", 0),
            member(1, 3, "10.1.3.2:8080", BACKEND_TERMINATING),
            member(1, 4, "10.1.4.2:8080", 0),
        ],
        service_stats: [(
            1,
            ServiceStats {
                packets: 12,
                bytes: 1_736,
            },
        )]
        .into(),
        activity: Default::default(),
    }
}

#[test]
fn a_listed_service_shows_slots_then_members_without_one() {
    let report = report::services(&listed());
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(
        json,
        json!({"services": [{
            "frontend": "10.96.0.10:80",
            "protocol": "TCP",
            "family": "ipv4",
            "clients": "all",
            "service_id": 1,
            "slot_table": 1,
            "algorithm": "round-robin",
            "flags": ["reply-at-egress", "affinity"],
            "affinity_timeout_seconds": 10800,
            "backend_count": 2,
            "table_size": null,
            "missing_slots": 0,
            "packets": 12,
            "bytes": 1736,
            "backends": [
                {"backend_id": 2, "address": "10.1.2.2:8080", "slots": [0],
                 "table_entries": null, "share": null, "state": "active"},
                {"backend_id": 1, "address": "10.1.1.2:8080", "slots": [1],
                 "table_entries": null, "share": null, "state": "active"},
                {"backend_id": 3, "address": "10.1.3.2:8080", "slots": [],
                 "table_entries": null, "share": null, "state": "terminating"},
                {"backend_id": 4, "address": "10.1.4.2:8080", "slots": [],
                 "table_entries": null, "share": null, "state": "no-slot"},
            ],
        }]})
    );
    let text = table::services(&report);
    assert_eq!(
        text,
        "10.96.0.10:80/TCP\n\
         \x20 service 1  slot table 1  algorithm round-robin  backends 2  flags reply-at-egress,affinity(10800s)  packets 12  bytes 1736\n\
         \x20 BACKEND  ADDRESS        SLOTS  STATE\n\
         \x20 2        10.1.2.2:8080  0      active\n\
         \x20 1        10.1.1.2:8080  1      active\n\
         \x20 3        10.1.3.2:8080  -      terminating\n\
         \x20 4        10.1.4.2:8080  -      no-slot\n"
    );
}

#[test]
fn a_maglev_service_shows_each_backends_share_of_its_table() {
    let entry = Service {
        id: 7,
        backend_count: 2,
        algorithm: ALG_MAGLEV,
        table_size: 7,
        slots_id: 7,
        ..Service::default()
    };
    // Slot 6 is missing; backend 5 has 4 entries, backend 6 two.
    let slots = [5, 6, 5, 5, 6, 5].iter().enumerate();
    let lb = LbRecords {
        services: vec![service("[fd00:96::10]:443", entry)],
        slots: slots.map(|(i, b)| (slot(7, i as u32), *b)).collect(),
        backends: [(5, tcp("[fd00:1::2]:8443")), (6, tcp("[fd00:2::2]:8443"))].into(),
        members: vec![
            member(7, 5, "[fd00:1::2]:8443", 0),
            member(7, 6, "[fd00:2::2]:8443", 0),
        ],
        ..LbRecords::default()
    };
    let report = report::services(&lb);
    let s = &report.services[0];
    assert_eq!((s.table_size, s.missing_slots), (Some(7), 1));
    let shares: Vec<(u32, Option<u32>, MemberState)> = (s.backends.iter())
        .map(|b| (b.backend_id, b.table_entries, b.state))
        .collect();
    assert_eq!(
        shares,
        [
            (5, Some(4), MemberState::Active),
            (6, Some(2), MemberState::Active)
        ]
    );
    let text = table::services(&report);
    assert!(text.starts_with("[fd00:96::10]:443/TCP\n"), "{text}");
    assert!(
        text.contains("algorithm maglev  backends 2  table 7"),
        "{text}"
    );
    assert!(text.contains("warning: 1 slots not written"), "{text}");
    assert!(
        text.contains("5        [fd00:1::2]:8443  4        57.1%  active"),
        "{text}"
    );
}

#[test]
fn a_slot_without_member_or_backend_is_flagged() {
    let entry = Service {
        id: 2,
        backend_count: 1,
        slots_id: 2,
        ..Service::default()
    };
    let lb = LbRecords {
        services: vec![service("10.96.0.11:80", entry)],
        slots: [(slot(2, 0), 42)].into(),
        ..LbRecords::default()
    };
    let report = report::services(&lb);
    let b = &report.services[0].backends[0];
    assert_eq!(
        (b.backend_id, b.address, b.state),
        (42, None, MemberState::NotMember)
    );
    assert!(table::services(&report).contains("42       (unknown)  0      not-member"));
}

#[test]
fn no_services_says_so() {
    assert_eq!(
        table::services(&report::services(&LbRecords::default())),
        "no services\n"
    );
}

#[test]
fn backends_show_flows_open_connections_and_memberships() {
    let mut lb = listed();
    lb.members
        .push(member(5, 1, "10.1.1.2:8080", BACKEND_TERMINATING));
    lb.activity.insert(
        1,
        BackendActivity {
            flows: Some(30),
            connections: Some(Connections {
                opened: 30,
                closed: 20,
            }),
            reaped: Some(4),
        },
    );
    // The kernel's counter wrapped past the agent's.
    lb.activity.insert(
        2,
        BackendActivity {
            flows: Some(1),
            connections: Some(Connections {
                opened: 3,
                closed: u32::MAX,
            }),
            reaped: Some(0),
        },
    );
    let report = report::backends(&lb);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(
        json["backends"][0],
        json!({
            "backend_id": 1,
            "address": "10.1.1.2:8080",
            "protocol": "TCP",
            "family": "ipv4",
            "new_flows": 30,
            "opened": 30,
            "closed": 20,
            "reaped": 4,
            "open_connections": 6,
            "services": [
                {"service_id": 1, "state": "active", "frontends": ["10.96.0.10:80/TCP"]},
                {"service_id": 5, "state": "terminating", "frontends": []},
            ],
        })
    );
    assert_eq!(json["backends"][1]["open_connections"], 4);
    // Backend 3 has no counters (a datapath without lb_be_flows): null.
    assert_eq!(json["backends"][2]["new_flows"], serde_json::Value::Null);
    let text = table::backends(&report);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..2],
        [
            "ID  ADDRESS            FAMILY  NEW FLOWS  OPEN  SERVICES",
            "1   10.1.1.2:8080/TCP  ipv4    30         6     1 active, 5 terminating",
        ]
    );
    assert_eq!(
        lines[3],
        "3   10.1.3.2:8080/TCP  ipv4    -          -     1 terminating"
    );
}

fn in_main(entry: Record<SocketAddr>) -> CtRecord {
    CtRecord {
        table: Table::Main,
        entry,
        frontend: None,
    }
}

fn in_overflow(entry: Record<SocketAddr>) -> CtRecord {
    CtRecord {
        table: Table::Overflow,
        entry,
        frontend: None,
    }
}

fn ct(src: &str, dst: &str, direction: u8, nat: &str) -> Record<SocketAddr> {
    Record {
        src: addr(src),
        dst: addr(dst),
        proto: IPPROTO_TCP,
        direction,
        nat: addr(nat),
        flags: 0,
        backend_id: 1,
        service_id: 1,
        last_seen: 100,
        state: CT_STATE_ESTABLISHED,
        reply_state: 0,
        node_port: 0,
        active: false,
    }
}

#[test]
fn conntrack_names_directions_and_states_and_counts_families() {
    let forward = Record {
        active: true,
        last_seen: 95,
        ..ct(
            "10.0.1.2:40000",
            "10.96.0.10:80",
            CT_FORWARD,
            "10.1.1.2:8080",
        )
    };
    let reply = ct("10.1.1.2:8080", "10.0.1.2:40000", CT_REPLY, "10.96.0.10:80");
    let dnat_back = Record {
        flags: CT_REWRITE_DST,
        proto: IPPROTO_UDP,
        state: 0,
        ..ct(
            "10.1.1.2:5353",
            "10.0.1.1:61000",
            CT_REPLY,
            "10.0.1.2:40001",
        )
    };
    // Refreshed after the clock was read: age 0, not 4 billion seconds.
    let egress6 = Record {
        state: CT_STATE_SYN,
        last_seen: 101,
        flags: CT_AT_EGRESS,
        ..ct(
            "[fd00:1::2]:8080",
            "[fd00:1::99]:40000",
            CT_REPLY,
            "[fd00:1::1]:30080",
        )
    };
    let records = [egress6, dnat_back, reply, forward].map(in_main);
    let report = report::conntrack(&records, 100);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(
        json["totals"],
        json!({"ipv4": 3, "ipv6": 1, "ipv4_overflow": 0, "ipv6_overflow": 0})
    );
    assert_eq!(
        json["entries"][0],
        json!({
            "family": "ipv4",
            "table": "main",
            "direction": "forward",
            "protocol": "TCP",
            "src": "10.0.1.2:40000",
            "dst": "10.96.0.10:80",
            "nat": "10.1.1.2:8080",
            "state": "established",
            "age_seconds": 5,
            "last_seen": 95,
            "backend_id": 1,
            "service_id": 1,
            "active": true,
        })
    );
    let directions: Vec<&str> = (report.entries.iter())
        .map(|e| e.direction.as_str())
        .collect();
    assert_eq!(directions, ["forward", "dnat-back", "reply", "egress"]);
    assert_eq!(report.entries[1].state, "open");
    assert_eq!(
        (
            report.entries[3].state.as_str(),
            report.entries[3].age_seconds
        ),
        ("syn", 0)
    );
    let text = table::conntrack(&report);
    assert!(
        text.contains("forward    10.0.1.2:40000 -> 10.96.0.10:80 TCP"),
        "{text}"
    );
    assert!(
        text.contains("egress     [fd00:1::2]:8080 -> [fd00:1::99]:40000 TCP"),
        "{text}"
    );
    assert!(
        text.ends_with("ipv4: 3 entries, ipv6: 1 entries\n"),
        "{text}"
    );
}

/// A flow that found conntrack full: its entries come after the main
/// table's, marked in JSON, in the table and in the totals.
#[test]
fn overflow_entries_are_marked_as_such() {
    let main = in_main(Record {
        active: true,
        ..ct(
            "10.0.1.2:40000",
            "10.96.0.10:80",
            CT_FORWARD,
            "10.1.1.2:8080",
        )
    });
    let overflow = in_overflow(ct(
        "10.0.1.3:40000",
        "10.96.0.10:80",
        CT_FORWARD,
        "10.1.1.2:8080",
    ));
    let overflow_reply = in_overflow(ct(
        "10.1.1.2:8080",
        "10.0.1.3:40000",
        CT_REPLY,
        "10.96.0.10:80",
    ));
    let report = report::conntrack(&[overflow_reply, overflow, main], 100);
    let json = serde_json::to_value(&report).expect("json");
    let tables: Vec<&str> = (report.entries.iter()).map(|e| e.table.name()).collect();
    assert_eq!(tables, ["main", "overflow", "overflow"]);
    assert_eq!(json["entries"][1]["table"], "overflow");
    assert_eq!(json["entries"][1]["active"], false);
    assert_eq!(
        json["totals"],
        json!({"ipv4": 3, "ipv6": 0, "ipv4_overflow": 2, "ipv6_overflow": 0})
    );
    let text = table::conntrack(&report);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with("ACTIVE  TABLE"), "{text}");
    assert!(lines[1].ends_with("yes     main"), "{text}");
    assert!(
        lines[2].starts_with("forward    10.0.1.3:40000 -> 10.96.0.10:80 TCP")
            && lines[2].ends_with("no      overflow"),
        "{text}"
    );
    assert!(
        text.ends_with("ipv4: 3 entries (2 in overflow), ipv6: 0 entries\n"),
        "{text}"
    );
}

/// A flow's only entry: the client, the frontend its service id names,
/// the backend, and both sides' states; forward entries keep their fields.
#[test]
fn a_socket_entry_shows_client_frontend_backend_and_both_states() {
    let socket = |client: &str, service_id| Record {
        active: true,
        service_id,
        reply_state: CT_STATE_FIN,
        ..ct(client, "0.0.0.0:0", CT_SOCKET, "10.1.1.2:8080")
    };
    let known = CtRecord {
        frontend: Some(addr("10.96.0.10:80")),
        ..in_main(socket("10.0.1.2:40000", 1))
    };
    // Service 5's frontend is not in lb4_rev_nat; its flow is source-NATed.
    let mut unknown = in_main(socket("10.0.1.3:40000", 5));
    unknown.entry.node_port = 61_000;
    let forward = in_main(ct(
        "10.0.1.4:40000",
        "10.96.0.10:80",
        CT_FORWARD,
        "10.1.1.2:8080",
    ));
    let report = report::conntrack(&[unknown, forward, known], 100);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(
        json["entries"][1],
        json!({
            "family": "ipv4",
            "table": "main",
            "direction": "socket",
            "protocol": "TCP",
            "src": "10.0.1.2:40000",
            "dst": "10.96.0.10:80",
            "nat": "10.1.1.2:8080",
            "state": "established",
            "age_seconds": 0,
            "last_seen": 100,
            "backend_id": 1,
            "service_id": 1,
            "active": true,
            "frontend": "10.96.0.10:80",
            "reply_state": "fin",
            "node_port": null,
        })
    );
    assert_eq!(json["entries"][2]["dst"], "0.0.0.0:0");
    assert_eq!(json["entries"][2]["frontend"], serde_json::Value::Null);
    assert_eq!(json["entries"][2]["node_port"], 61_000);
    let forward = json["entries"][0].as_object().expect("an object");
    assert_eq!(forward["direction"], "forward");
    assert!(
        !forward.contains_key("frontend") && !forward.contains_key("reply_state"),
        "{forward:?}"
    );
    assert_eq!(json["totals"]["ipv4"], 3);
    let text = table::conntrack(&report);
    assert!(
        text.contains(
            "socket     10.0.1.2:40000 -> 10.96.0.10:80 TCP  10.1.1.2:8080             established/fin"
        ),
        "{text}"
    );
    assert!(
        text.contains("socket     10.0.1.3:40000 -> service 5 TCP      10.1.1.2:8080 via :61000"),
        "{text}"
    );
    assert!(
        text.contains(
            "forward    10.0.1.4:40000 -> 10.96.0.10:80 TCP  10.1.1.2:8080             established "
        ),
        "{text}"
    );
}

#[test]
fn counters_are_named_in_index_order() {
    let mut values: Vec<u64> = (0..u64::from(Counter::COUNT)).collect();
    values.push(7);
    let report = report::counters(&values);
    let json = serde_json::to_string(&report).expect("json");
    assert!(
        json.starts_with(r#"{"counters":{"no_backend":0,"ct_insert_failed":1,"#),
        "{json}"
    );
    assert!(
        json.ends_with(r#""ct_reclaimed":25,"counter_26":7}}"#),
        "{json}"
    );
    let text = table::counters(&report);
    assert!(
        text.starts_with("COUNTER                VALUE\nno_backend             0\n"),
        "{text}"
    );
    for c in Counter::ALL {
        assert!(text.contains(c.name()), "{text}");
    }
}

#[test]
fn numbers_without_a_name_still_show() {
    assert_eq!(
        report::flag_names(SVC_AFFINITY | 0x40),
        ["affinity", "0x40"]
    );
    assert_eq!(report::algorithm_name(9), "unknown(9)");
    assert_eq!(report::state_name(9), "unknown(9)");
    assert_eq!(report::direction_name(7, 0), "unknown(7)");
    assert_eq!(report::direction_name(CT_SOCKET, 0), "socket");
    assert_eq!(report::protocol_name(47), "47");
}

#[test]
fn enum_names_match_their_json() {
    for state in [
        MemberState::Active,
        MemberState::Terminating,
        MemberState::NoSlot,
        MemberState::NotMember,
    ] {
        assert_eq!(
            serde_json::to_value(state).expect("json"),
            json!(state.name())
        );
    }
    for family in [report::IpFamily::Ipv4, report::IpFamily::Ipv6] {
        assert_eq!(
            serde_json::to_value(family).expect("json"),
            json!(family.name())
        );
    }
}

#[test]
fn a_local_twin_is_shown_after_the_entry_for_every_client() {
    let mut lb = listed();
    let mut twin = lb.services[0];
    twin.scope = SCOPE_LOCAL;
    twin.entry.id = 7;
    lb.services[0].entry.flags |= SVC_LOCAL_TWIN;
    lb.services.insert(0, twin);
    let report = report::services(&lb);
    let clients: Vec<&str> = report.services.iter().map(|s| s.clients).collect();
    assert_eq!(clients, ["all", "local"]);
    assert!(report.services[0].flags.contains(&"local-twin".to_string()));
    let text = table::services(&report);
    assert!(
        text.contains("10.96.0.10:80/TCP  (this node's clients)\n  service 7"),
        "{text}"
    );
}
