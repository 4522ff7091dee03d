//! Sockets the socket hooks connected to a backend that has since left its
//! Service. Nothing in the datapath sees their packets (they go to the
//! backend's own address), so nothing would tell the application: a
//! connected UDP socket would send into a pod that is gone for as long as
//! it lives. They are destroyed (sock_diag SOCK_DESTROY): TCP connections
//! are reset, and the application's next call on a UDP socket fails, so it
//! reconnects and the hooks give it a live backend.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    hash::Hash,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context;
use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use proxy_common::{
    Backend4, Backend6, IPPROTO_TCP, IPPROTO_UDP, MAX_SOCK_NAT, MemberKey, SOCK_REVERSE, SockNat4,
    SockNat4Key, SockNat6, SockNat6Key, names,
};

use super::{
    keys::{from_v4, from_v6, v4, v6},
    pinned::{self, Pins},
    sockets::{self, Destroyed, Peer},
};
use crate::reconcile::BackendKey;

/// The pinned maps a sweep reads.
struct Maps {
    nat4: HashMap<MapData, SockNat4Key, SockNat4>,
    nat6: HashMap<MapData, SockNat6Key, SockNat6>,
    members4: HashMap<MapData, MemberKey, Backend4>,
    members6: HashMap<MapData, MemberKey, Backend6>,
}

impl Maps {
    fn open(pins: &Pins) -> anyhow::Result<Maps> {
        Ok(Maps {
            nat4: pins.map(names::SOCK_NAT4)?,
            nat6: pins.map(names::SOCK_NAT6)?,
            members4: pins.map(names::MEMBERS4)?,
            members6: pins.map(names::MEMBERS6)?,
        })
    }

    /// The network namespaces of the sockets the hooks connected to one of
    /// `peers`: only those are searched, so a backend nobody reached
    /// through the hooks costs no walk at all.
    fn namespaces(&self, peers: &[Peer]) -> anyhow::Result<HashSet<u64>> {
        let wanted: HashSet<(SocketAddr, u8)> = peers.iter().map(|p| (p.addr, p.proto)).collect();
        let mut out = HashSet::new();
        for (key, value) in entries(&self.nat4, names::SOCK_NAT4)? {
            let addr = SocketAddr::new(IpAddr::V4(from_v4(key.addr)), u16::from_be(key.port));
            if key.direction == SOCK_REVERSE && wanted.contains(&(addr, key.proto)) {
                out.insert(value.netns_cookie);
            }
        }
        for (key, value) in entries(&self.nat6, names::SOCK_NAT6)? {
            let addr = SocketAddr::new(IpAddr::V6(from_v6(&key.addr)), u16::from_be(key.port));
            if key.direction == SOCK_REVERSE && wanted.contains(&(addr, key.proto)) {
                out.insert(value.netns_cookie);
            }
        }
        Ok(out)
    }

    /// True if the hooks connected this socket to `peer` for a service that
    /// no longer has `peer` as a member.
    fn stale(&self, cookie: u64, peer: Peer) -> bool {
        let port = peer.addr.port().to_be();
        match peer.addr.ip() {
            IpAddr::V4(a) => {
                let key = SockNat4Key {
                    cookie,
                    addr: v4(&a),
                    port,
                    proto: peer.proto,
                    direction: SOCK_REVERSE,
                };
                let Ok(entry) = self.nat4.get(&key, 0) else {
                    return false;
                };
                let member = self
                    .members4
                    .get(&member_key(entry.service_id, entry.backend_id), 0);
                !member.is_ok_and(|b| b.addr == key.addr && b.port == port)
            }
            IpAddr::V6(a) => {
                let key = SockNat6Key {
                    cookie,
                    addr: v6(&a),
                    port,
                    proto: peer.proto,
                    direction: SOCK_REVERSE,
                    _pad: 0,
                };
                let Ok(entry) = self.nat6.get(&key, 0) else {
                    return false;
                };
                let member = self
                    .members6
                    .get(&member_key(entry.service_id, entry.backend_id), 0);
                !member.is_ok_and(|b| b.addr == key.addr && b.port == port)
            }
        }
    }
}

/// Every entry of a socket map.
fn entries<K: Pod + Eq + Hash, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> anyhow::Result<StdHashMap<K, V>> {
    pinned::entries(map, MAX_SOCK_NAT as usize).with_context(|| format!("reading {name}"))
}

fn member_key(service_id: u32, backend_id: u32) -> MemberKey {
    MemberKey {
        service_id,
        backend_id,
    }
}

/// Finds and destroys stale sockets; the maps are under `<bpffs>/xdproxy`.
pub struct Sweeper {
    pins: Pins,
}

impl Sweeper {
    pub fn new(bpffs: &Path) -> Sweeper {
        Sweeper {
            pins: Pins::at(bpffs),
        }
    }

    /// Destroys the sockets the hooks connected to one of `left` for a
    /// service it no longer serves, in the network namespaces the hooks
    /// recorded for them. Blocking.
    pub fn sweep(&self, left: &[BackendKey]) -> anyhow::Result<Destroyed> {
        let peers: Vec<Peer> = left.iter().filter_map(peer).collect();
        if peers.is_empty() {
            return Ok(Destroyed::default());
        }
        let maps = Maps::open(&self.pins)?;
        let netns = maps.namespaces(&peers)?;
        if netns.is_empty() {
            return Ok(Destroyed::default());
        }
        let select = |cookie: u64, _local: SocketAddr, peer: Peer| maps.stale(cookie, peer);
        Ok(sockets::destroy_in(&peers, &netns, &select))
    }
}

/// The sockets of a backend: TCP and UDP only (the hooks serve no other).
fn peer(backend: &BackendKey) -> Option<Peer> {
    let proto = backend.protocol.number();
    (proto == IPPROTO_TCP || proto == IPPROTO_UDP).then_some(Peer {
        addr: backend.addr,
        proto,
    })
}
