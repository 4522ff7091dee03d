//! The model's frontends, backends, service entries and node settings in
//! the maps' byte layout, and back: addresses and ports in network byte
//! order, as in the packet; service flags as the datapath reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_common::{
    Addr6, Backend4, Backend6, Frontend4, Frontend6, MemberKey, NodeConfig, SCOPE_ALL, SCOPE_LOCAL,
    SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_LOCAL_TWIN, SVC_REPLY_AT_EGRESS, SVC_SNAT_EXTERNAL,
    SVC_SOURCE_RANGES, Service, SlotKey,
};

use crate::{
    balancing::Algorithm,
    model::{Clients, Frontend, Protocol},
    nodeconfig::{PortRange, Settings},
    reconcile::{BackendKey, Member, NodeEntry, ServiceEntry, Slot},
};

/// A frontend in the map of its family.
pub enum FrontendKey {
    V4(Frontend4),
    V6(Frontend6),
}

/// A backend in the map of its family.
pub enum BackendValue {
    V4(Backend4),
    V6(Backend6),
}

pub fn frontend(f: &Frontend) -> FrontendKey {
    let (port, proto) = (f.port.to_be(), f.protocol.number());
    let scope = match f.clients {
        Clients::All => SCOPE_ALL,
        Clients::Local => SCOPE_LOCAL,
    };
    match f.addr {
        IpAddr::V4(a) => FrontendKey::V4(Frontend4 {
            addr: v4(&a),
            port,
            proto,
            scope,
        }),
        IpAddr::V6(a) => FrontendKey::V6(Frontend6 {
            addr: v6(&a),
            port,
            proto,
            scope,
        }),
    }
}

pub fn backend(b: &BackendKey) -> BackendValue {
    let (port, proto) = (b.addr.port().to_be(), b.protocol.number());
    match b.addr.ip() {
        IpAddr::V4(a) => BackendValue::V4(Backend4 {
            addr: v4(&a),
            port,
            proto,
            flags: 0,
        }),
        IpAddr::V6(a) => BackendValue::V6(Backend6 {
            addr: v6(&a),
            port,
            proto,
            flags: 0,
        }),
    }
}

pub fn v4(a: &Ipv4Addr) -> u32 {
    u32::from(*a).to_be()
}

pub fn v6(a: &Ipv6Addr) -> Addr6 {
    let o = a.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

pub fn from_v4(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(a))
}

pub fn from_v6(a: &Addr6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

fn protocol(number: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.number() == number)
}

/// The model's frontend an adopted map key stands for (None: a protocol or
/// scope the model does not know).
pub fn frontend_of(key: &FrontendKey) -> Option<Frontend> {
    let (addr, port, proto, scope) = match key {
        FrontendKey::V4(f) => (IpAddr::V4(from_v4(f.addr)), f.port, f.proto, f.scope),
        FrontendKey::V6(f) => (IpAddr::V6(from_v6(&f.addr)), f.port, f.proto, f.scope),
    };
    let clients = match scope {
        SCOPE_ALL => Clients::All,
        SCOPE_LOCAL => Clients::Local,
        _ => return None,
    };
    Some(Frontend {
        addr,
        port: u16::from_be(port),
        protocol: protocol(proto)?,
        clients,
    })
}

pub fn backend_of(value: &BackendValue) -> Option<BackendKey> {
    let (addr, proto) = match value {
        BackendValue::V4(b) => (socket4(b.addr, b.port), b.proto),
        BackendValue::V6(b) => (socket6(&b.addr, b.port), b.proto),
    };
    Some(BackendKey {
        addr,
        protocol: protocol(proto)?,
    })
}

/// An IPv4 address and port in network byte order, as in the packet.
pub fn socket4(addr: u32, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(from_v4(addr)), u16::from_be(port))
}

/// An IPv6 address and port in network byte order, as in the packet.
pub fn socket6(addr: &Addr6, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(from_v6(addr)), u16::from_be(port))
}

/// A service entry as the datapath reads it.
pub fn service(entry: &ServiceEntry) -> Service {
    let bits = [
        (entry.reply_at_egress, SVC_REPLY_AT_EGRESS),
        (entry.affinity_timeout.is_some(), SVC_AFFINITY),
        (entry.source_ranges, SVC_SOURCE_RANGES),
        (entry.drop_when_empty, SVC_DROP_WHEN_EMPTY),
        (entry.snat, SVC_SNAT_EXTERNAL),
        (entry.local_twin, SVC_LOCAL_TWIN),
    ];
    Service {
        id: entry.id,
        backend_count: entry.backend_count,
        flags: bits
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |f, (_, bit)| f | bit),
        affinity_timeout: entry.affinity_timeout.unwrap_or(0),
        algorithm: entry.algorithm.number(),
        table_size: entry.table_size,
        slots_id: entry.slots_id,
    }
}

/// The entry a service value in the map stands for (an unknown algorithm
/// reads as the default one, so the entry is rewritten).
pub fn service_entry(service: &Service) -> ServiceEntry {
    let on = |bit: u32| service.flags & bit != 0;
    ServiceEntry {
        id: service.id,
        slots_id: service.slots_id,
        backend_count: service.backend_count,
        algorithm: Algorithm::from_number(service.algorithm).unwrap_or_default(),
        table_size: service.table_size,
        affinity_timeout: on(SVC_AFFINITY).then_some(service.affinity_timeout),
        reply_at_egress: on(SVC_REPLY_AT_EGRESS),
        source_ranges: on(SVC_SOURCE_RANGES),
        drop_when_empty: on(SVC_DROP_WHEN_EMPTY),
        snat: on(SVC_SNAT_EXTERNAL),
        local_twin: on(SVC_LOCAL_TWIN),
    }
}

pub fn slot(slot: Slot) -> SlotKey {
    SlotKey {
        service_id: slot.table,
        slot: slot.index,
    }
}

pub fn slot_of(key: &SlotKey) -> Slot {
    Slot {
        table: key.service_id,
        index: key.slot,
    }
}

pub fn member(member: Member) -> MemberKey {
    MemberKey {
        service_id: member.service_id,
        backend_id: member.backend_id,
    }
}

pub fn member_of(key: &MemberKey) -> Member {
    Member {
        service_id: key.service_id,
        backend_id: key.backend_id,
    }
}

/// The node configuration as the datapath reads it.
pub fn node_config(node: &NodeEntry) -> NodeConfig {
    NodeConfig {
        snat_addr4: node.snat_addr4.as_ref().map_or(0, v4),
        snat_port_min: node.settings.snat_ports.min,
        snat_port_max: node.settings.snat_ports.max,
        snat_addr6: node.snat_addr6.as_ref().map_or([0; 4], v6),
        node_key: node.settings.node_key,
        cluster_key: node.settings.cluster_key,
    }
}

/// The node entry a configuration in the map stands for.
pub fn node_entry(config: &NodeConfig) -> NodeEntry {
    NodeEntry {
        snat_addr4: (config.snat_addr4 != 0).then(|| from_v4(config.snat_addr4)),
        snat_addr6: (config.snat_addr6 != [0; 4]).then(|| from_v6(&config.snat_addr6)),
        settings: Settings {
            snat_ports: PortRange {
                min: config.snat_port_min,
                max: config.snat_port_max,
            },
            node_key: config.node_key,
            cluster_key: config.cluster_key,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_packet_order() {
        let a6: Ipv6Addr = "fd00:96::10".parse().expect("v6");
        assert_eq!(from_v6(&v6(&a6)), a6);
        // The first word holds the address's first bytes as they sit in memory.
        assert_eq!(v6(&a6)[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x96]);
        let a4 = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(v4(&a4).to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(from_v4(v4(&a4)), a4);
    }

    #[test]
    fn a_frontends_clients_are_its_keys_scope_and_come_back_on_adoption() {
        for clients in [Clients::All, Clients::Local] {
            let f = Frontend {
                addr: "10.0.0.1".parse().expect("v4"),
                port: 30080,
                protocol: Protocol::Tcp,
                clients,
            };
            let key = frontend(&f);
            let FrontendKey::V4(k) = &key else {
                panic!("an IPv4 key");
            };
            let scope = if clients == Clients::Local {
                SCOPE_LOCAL
            } else {
                SCOPE_ALL
            };
            assert_eq!(k.scope, scope);
            assert_eq!(frontend_of(&key), Some(f));
        }
    }

    #[test]
    fn service_entries_and_node_entries_come_back_as_written() {
        let entry = ServiceEntry {
            id: 7,
            slots_id: 3,
            backend_count: 2,
            algorithm: Algorithm::Maglev,
            table_size: 251,
            affinity_timeout: Some(30),
            reply_at_egress: true,
            source_ranges: true,
            drop_when_empty: false,
            snat: true,
            local_twin: false,
        };
        let written = service(&entry);
        assert_eq!(
            written.flags,
            SVC_REPLY_AT_EGRESS | SVC_AFFINITY | SVC_SOURCE_RANGES | SVC_SNAT_EXTERNAL
        );
        assert_eq!(service_entry(&written), entry);
        let plain = ServiceEntry {
            affinity_timeout: None,
            reply_at_egress: false,
            source_ranges: false,
            snat: false,
            ..entry
        };
        assert_eq!(service(&plain).flags, 0);
        assert_eq!(service_entry(&service(&plain)), plain);
        let node = NodeEntry {
            snat_addr4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            snat_addr6: None,
            settings: Settings {
                snat_ports: PortRange {
                    min: 61000,
                    max: 65535,
                },
                node_key: [1, 2],
                cluster_key: [3, 4],
            },
        };
        assert_eq!(node_entry(&node_config(&node)), node);
    }
}
