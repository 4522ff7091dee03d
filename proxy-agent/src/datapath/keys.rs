//! The model's frontends, backends, service entries and node settings in
//! the maps' byte layout, and back: addresses and ports in network byte
//! order, as in the packet; service flags as the datapath reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_common::{
    Addr6, Backend4, Backend6, Frontend4, Frontend6, NodeConfig, SCOPE_ALL, SCOPE_LOCAL,
    SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_LOCAL_TWIN, SVC_REPLY_AT_EGRESS, SVC_SNAT_EXTERNAL,
    SVC_SOURCE_RANGES, Service,
};

use crate::{
    model::{Clients, Desired, Frontend, FrontendState, Protocol, Scope},
    nodeconfig::Settings,
    reconcile::BackendKey,
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
    let (addr, port, proto) = match value {
        BackendValue::V4(b) => (IpAddr::V4(from_v4(b.addr)), b.port, b.proto),
        BackendValue::V6(b) => (IpAddr::V6(from_v6(&b.addr)), b.port, b.proto),
    };
    Some(BackendKey {
        addr: SocketAddr::new(addr, u16::from_be(port)),
        protocol: protocol(proto)?,
    })
}

/// The service entry: its backends (in slot table `slots_id`) and how the
/// datapath treats its traffic beyond picking one.
pub fn service(id: u32, slots_id: u32, count: u32, state: &FrontendState) -> Service {
    let mut flags = 0;
    // Frontends outside the cluster range may be the node's own addresses.
    if state.scope != Scope::ClusterIp {
        flags |= SVC_REPLY_AT_EGRESS;
    }
    if state.affinity_timeout.is_some() {
        flags |= SVC_AFFINITY;
    }
    if !state.source_ranges.is_empty() {
        flags |= SVC_SOURCE_RANGES;
    }
    if state.drop_when_empty {
        flags |= SVC_DROP_WHEN_EMPTY;
    }
    if state.snat {
        flags |= SVC_SNAT_EXTERNAL;
    }
    if state.local_twin {
        flags |= SVC_LOCAL_TWIN;
    }
    Service {
        id,
        backend_count: count,
        flags,
        affinity_timeout: state.affinity_timeout.unwrap_or(0),
        algorithm: state.algorithm.number(),
        // A table only exists with backends to fill it.
        table_size: if count == 0 { 0 } else { state.table_size },
        slots_id,
    }
}

/// The node configuration: the desired state's source NAT addresses, and
/// the node's ports and hash keys.
pub fn node_config(desired: &Desired, node: &Settings) -> NodeConfig {
    NodeConfig {
        snat_addr4: desired.snat_addr4.as_ref().map_or(0, v4),
        snat_port_min: node.snat_ports.min,
        snat_port_max: node.snat_ports.max,
        snat_addr6: desired.snat_addr6.as_ref().map_or([0; 4], v6),
        node_key: node.node_key,
        cluster_key: node.cluster_key,
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
}
