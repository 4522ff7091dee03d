//! The few rtnetlink messages the link watcher needs, written and read by
//! hand: two dump requests, and links and routes out of the replies and
//! notifications. Reading is pure (bytes in, messages out) so it is tested
//! without a kernel; the socket is a thin layer over libc.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::Context;

/// `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// `struct ifinfomsg`.
const IFINFOMSG_LEN: usize = 16;
/// `struct rtmsg`.
const RTMSG_LEN: usize = 12;
/// `struct rtnexthop`.
const RTNH_LEN: usize = 8;
/// Set on the messages of a dump the kernel saw change while dumping.
const NLM_F_DUMP_INTR: u16 = 0x10;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// What the kernel said about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkMsg {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND (`veth`, `bridge`, ...); None for physical NICs.
    pub kind: Option<String>,
    pub up: bool,
    pub loopback: bool,
}

/// A route, as much as the watcher needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMsg {
    /// A unicast default route (IPv4 or IPv6) of the main table.
    pub default_main: bool,
    /// Its output interfaces: RTA_OIF or every nexthop of RTA_MULTIPATH.
    pub oifs: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Link(LinkMsg),
    LinkGone(u32),
    Route(RouteMsg),
    Done,
    /// NLMSG_ERROR with a non-zero errno (positive here).
    Error(i32),
    /// Anything else: ignored.
    Other,
}

/// One message with the header fields that say whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub seq: u32,
    /// The sender's port: ours for replies to our requests.
    pub port: u32,
    /// Part of a dump that changed while it ran (NLM_F_DUMP_INTR).
    pub interrupted: bool,
    pub body: Body,
}

/// The messages in one datagram; a truncated or malformed tail is dropped.
pub fn parse(mut buf: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let kind = u16_at(buf, 4);
        let flags = u16_at(buf, 6);
        out.push(Message {
            seq: u32_at(buf, 8),
            port: u32_at(buf, 12),
            interrupted: flags & NLM_F_DUMP_INTR != 0,
            body: body(kind, &buf[NLMSG_HDRLEN..len]),
        });
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    out
}

fn body(kind: u16, payload: &[u8]) -> Body {
    let kind = i32::from(kind);
    match kind {
        libc::NLMSG_DONE => Body::Done,
        libc::NLMSG_ERROR => match payload.get(..4) {
            Some(errno) if i32_at(errno, 0) != 0 => Body::Error(-i32_at(errno, 0)),
            _ => Body::Other,
        },
        k if k == i32::from(libc::RTM_NEWLINK) => link(payload).map_or(Body::Other, Body::Link),
        k if k == i32::from(libc::RTM_DELLINK) => {
            link(payload).map_or(Body::Other, |l| Body::LinkGone(l.index))
        }
        k if k == i32::from(libc::RTM_NEWROUTE) || k == i32::from(libc::RTM_DELROUTE) => {
            route(payload).map_or(Body::Other, Body::Route)
        }
        _ => Body::Other,
    }
}

/// An ifinfomsg and its attributes. Bridge port messages (family
/// AF_BRIDGE, also on RTNLGRP_LINK) describe a port, not the link: a port
/// leaving its bridge is an RTM_DELLINK of that kind while the link stays.
fn link(payload: &[u8]) -> Option<LinkMsg> {
    let header = payload.get(..IFINFOMSG_LEN)?;
    if i32::from(header[0]) != libc::AF_UNSPEC {
        return None;
    }
    let index = u32_at(header, 4);
    let flags = u32_at(header, 8);
    let mut msg = LinkMsg {
        index,
        name: String::new(),
        kind: None,
        up: flags & libc::IFF_UP as u32 != 0,
        loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
    };
    for (kind, value) in attributes(&payload[IFINFOMSG_LEN..]) {
        match kind {
            libc::IFLA_IFNAME => msg.name = c_string(value),
            libc::IFLA_LINKINFO => {
                msg.kind = attributes(value)
                    .find(|(k, _)| *k == libc::IFLA_INFO_KIND)
                    .map(|(_, v)| c_string(v));
            }
            _ => {}
        }
    }
    (!msg.name.is_empty()).then_some(msg)
}

/// An rtmsg: whether it is a main-table unicast default route, and where
/// it goes out.
fn route(payload: &[u8]) -> Option<RouteMsg> {
    let header = payload.get(..RTMSG_LEN)?;
    let family = i32::from(header[0]);
    let dst_len = header[1];
    let mut table = u32::from(header[4]);
    let kind = header[7];
    let mut oifs = Vec::new();
    for (attr, value) in attributes(&payload[RTMSG_LEN..]) {
        match attr {
            libc::RTA_TABLE if value.len() >= 4 => table = u32_at(value, 0),
            libc::RTA_OIF if value.len() >= 4 => oifs.push(u32_at(value, 0)),
            libc::RTA_MULTIPATH => oifs.extend(nexthops(value)),
            _ => {}
        }
    }
    let default_main = (family == libc::AF_INET || family == libc::AF_INET6)
        && dst_len == 0
        && table == u32::from(libc::RT_TABLE_MAIN)
        && kind == libc::RTN_UNICAST;
    Some(RouteMsg { default_main, oifs })
}

/// The interfaces of RTA_MULTIPATH's rtnexthops.
fn nexthops(mut buf: &[u8]) -> Vec<u32> {
    let mut oifs = Vec::new();
    while buf.len() >= RTNH_LEN {
        let len = usize::from(u16_at(buf, 0));
        if len < RTNH_LEN || len > buf.len() {
            break;
        }
        oifs.push(u32_at(buf, 4));
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    oifs
}

/// (type, value) of each rtattr in `buf`, nested flag bits cleared.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(buf, 0));
        if len < 4 || len > buf.len() {
            return None;
        }
        // NLA_F_NESTED and NLA_F_NET_BYTEORDER are not part of the type.
        let kind = u16_at(buf, 2) & 0x3fff;
        let value = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn c_string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

// The callers check the lengths; a short buffer reads as zeros, never panics.
fn u16_at(buf: &[u8], at: usize) -> u16 {
    let mut b = [0; 2];
    if let Some(s) = buf.get(at..at + 2) {
        b.copy_from_slice(s);
    }
    u16::from_ne_bytes(b)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_ne_bytes(b)
}

fn i32_at(buf: &[u8], at: usize) -> i32 {
    u32_at(buf, at) as i32
}

/// What to dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dump {
    Links,
    Routes,
}

/// A dump request: a header and a zeroed ifinfomsg or rtmsg (family
/// AF_UNSPEC: all links, the routes of both families).
pub fn dump_request(what: Dump, seq: u32) -> Vec<u8> {
    let (kind, body) = match what {
        Dump::Links => (libc::RTM_GETLINK, IFINFOMSG_LEN),
        Dump::Routes => (libc::RTM_GETROUTE, RTMSG_LEN),
    };
    let len = NLMSG_HDRLEN + body;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    // Port 0: the kernel fills in ours.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.resize(len, 0);
    msg
}

/// A NETLINK_ROUTE socket subscribed to some multicast groups.
pub struct Socket {
    fd: OwnedFd,
    /// The port the kernel gave us: replies to our dumps carry it.
    pub port: u32,
}

/// A receive buffer big enough that a burst of pod churn does not overrun
/// it; root may go past rmem_max. An overrun is survived (by a resync), so
/// failing to get this much is not an error.
const RCVBUF: libc::c_int = 4 << 20;

impl Socket {
    /// Opens a socket subscribed to `groups` (RTMGRP_* bits).
    pub fn open(groups: u32) -> anyhow::Result<Socket> {
        // SAFETY: socket(2) with constant arguments; the fd is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("opening a NETLINK_ROUTE socket");
        }
        // SAFETY: raw is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_rcvbuf(&fd);
        // SAFETY: sockaddr_nl is plain data; zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = groups;
        let size = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_nl of `size` bytes.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), size) };
        if rc < 0 {
            return Err(io::Error::last_os_error())
                .context("subscribing to rtnetlink link and route notifications");
        }
        let mut len = size;
        // SAFETY: getsockname writes at most `len` bytes into addr.
        let rc = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &raw mut len) };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("reading the netlink port");
        }
        Ok(Socket {
            fd,
            port: addr.nl_pid,
        })
    }

    pub fn send(&self, msg: &[u8]) -> anyhow::Result<()> {
        // SAFETY: msg is valid for its length; an unconnected netlink socket
        // sends to the kernel.
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("sending an rtnetlink dump request");
        }
        Ok(())
    }

    /// Blocks for one datagram; its length, or an error (ENOBUFS: the
    /// kernel dropped notifications because we were slow).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // MSG_TRUNC: the datagram's real length, to notice a cut one.
        // SAFETY: buf is valid for writes of its length.
        let rc = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = rc as usize;
        if len > buf.len() {
            // Lost like an overrun: the caller resyncs.
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        Ok(len)
    }
}

fn set_rcvbuf(fd: &OwnedFd) {
    let value: libc::c_int = RCVBUF;
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: the value is a c_int of `size` bytes.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                size,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a netlink message as the kernel would.
    pub(crate) struct Builder(Vec<u8>);

    impl Builder {
        pub(crate) fn new(kind: u16, seq: u32, port: u32, flags: u16) -> Builder {
            let mut b = Vec::new();
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(&flags.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&port.to_ne_bytes());
            Builder(b)
        }

        pub(crate) fn bytes(mut self, bytes: &[u8]) -> Builder {
            self.0.extend_from_slice(bytes);
            self
        }

        pub(crate) fn attr(mut self, kind: u16, value: &[u8]) -> Builder {
            self.0.extend_from_slice(&attr(kind, value));
            self
        }

        pub(crate) fn finish(mut self) -> Vec<u8> {
            let len = self.0.len() as u32;
            self.0[..4].copy_from_slice(&len.to_ne_bytes());
            self.0.resize(align4(self.0.len()), 0);
            self.0
        }
    }

    pub(crate) fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    pub(crate) fn ifinfomsg(family: u8, index: u32, flags: u32) -> Vec<u8> {
        let mut m = vec![family, 0, 1, 0];
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m
    }

    pub(crate) fn link_msg(kind: u16, index: u32, name: &str, link_kind: Option<&str>) -> Vec<u8> {
        let mut b = Builder::new(kind, 0, 0, 0)
            .bytes(&ifinfomsg(0, index, libc::IFF_UP as u32))
            .attr(libc::IFLA_IFNAME, format!("{name}\0").as_bytes());
        if let Some(k) = link_kind {
            let nested = attr(libc::IFLA_INFO_KIND, format!("{k}\0").as_bytes());
            b = b.attr(libc::IFLA_LINKINFO | 0x8000, &nested);
        }
        b.finish()
    }

    pub(crate) fn rtmsg(family: u8, dst_len: u8, table: u8) -> Vec<u8> {
        vec![
            family,
            dst_len,
            0,
            0,
            table,
            3,
            0,
            libc::RTN_UNICAST,
            0,
            0,
            0,
            0,
        ]
    }

    pub(crate) fn route_msg(family: u8, dst_len: u8, oif: u32) -> Vec<u8> {
        Builder::new(libc::RTM_NEWROUTE, 0, 0, 0)
            .bytes(&rtmsg(family, dst_len, libc::RT_TABLE_MAIN))
            .attr(
                libc::RTA_TABLE,
                &u32::from(libc::RT_TABLE_MAIN).to_ne_bytes(),
            )
            .attr(libc::RTA_OIF, &oif.to_ne_bytes())
            .finish()
    }

    #[test]
    fn reads_links_with_name_kind_and_flags() {
        let mut buf = link_msg(libc::RTM_NEWLINK, 7, "veth12", Some("veth"));
        buf.extend(link_msg(libc::RTM_NEWLINK, 2, "eth0", None));
        buf.extend(link_msg(libc::RTM_DELLINK, 7, "veth12", Some("veth")));
        let bodies: Vec<Body> = parse(&buf).into_iter().map(|m| m.body).collect();
        assert_eq!(
            bodies,
            vec![
                Body::Link(LinkMsg {
                    index: 7,
                    name: "veth12".into(),
                    kind: Some("veth".into()),
                    up: true,
                    loopback: false,
                }),
                Body::Link(LinkMsg {
                    index: 2,
                    name: "eth0".into(),
                    kind: None,
                    up: true,
                    loopback: false,
                }),
                Body::LinkGone(7),
            ]
        );
    }

    #[test]
    fn bridge_port_messages_are_not_links() {
        let buf = Builder::new(libc::RTM_DELLINK, 0, 0, 0)
            .bytes(&ifinfomsg(libc::AF_BRIDGE as u8, 7, 0))
            .attr(libc::IFLA_IFNAME, b"veth1\0")
            .finish();
        assert_eq!(parse(&buf)[0].body, Body::Other);
    }

    #[test]
    fn loopback_is_flagged() {
        let buf = Builder::new(libc::RTM_NEWLINK, 0, 0, 0)
            .bytes(&ifinfomsg(0, 1, (libc::IFF_UP | libc::IFF_LOOPBACK) as u32))
            .attr(libc::IFLA_IFNAME, b"lo\0")
            .finish();
        let Body::Link(link) = &parse(&buf)[0].body else {
            panic!("not a link: {:?}", parse(&buf));
        };
        assert!(link.loopback);
    }

    #[test]
    fn reads_default_routes_and_multipath_nexthops() {
        let v4 = route_msg(libc::AF_INET as u8, 0, 3);
        let Body::Route(r) = &parse(&v4)[0].body else {
            panic!("not a route");
        };
        assert_eq!((r.default_main, r.oifs.as_slice()), (true, &[3][..]));

        let other = route_msg(libc::AF_INET6 as u8, 64, 3);
        let Body::Route(r) = &parse(&other)[0].body else {
            panic!("not a route");
        };
        assert!(!r.default_main, "a /64 is not a default route");

        let mut hops = Vec::new();
        for oif in [4u32, 5] {
            let gateway = attr(libc::RTA_GATEWAY, &[10, 0, 0, oif as u8]);
            hops.extend_from_slice(&((RTNH_LEN + gateway.len()) as u16).to_ne_bytes());
            hops.extend_from_slice(&[0, 0]);
            hops.extend_from_slice(&oif.to_ne_bytes());
            hops.extend(gateway);
        }
        let multipath = Builder::new(libc::RTM_NEWROUTE, 0, 0, 0)
            .bytes(&rtmsg(libc::AF_INET6 as u8, 0, libc::RT_TABLE_MAIN))
            .attr(libc::RTA_MULTIPATH, &hops)
            .finish();
        let Body::Route(r) = &parse(&multipath)[0].body else {
            panic!("not a route");
        };
        assert_eq!((r.default_main, r.oifs.as_slice()), (true, &[4, 5][..]));

        let local = Builder::new(libc::RTM_NEWROUTE, 0, 0, 0)
            .bytes(&rtmsg(libc::AF_INET as u8, 0, 200))
            .attr(libc::RTA_TABLE, &200u32.to_ne_bytes())
            .attr(libc::RTA_OIF, &9u32.to_ne_bytes())
            .finish();
        let Body::Route(r) = &parse(&local)[0].body else {
            panic!("not a route");
        };
        assert!(!r.default_main, "table 200 is not main");
    }

    #[test]
    fn done_errors_and_truncation() {
        let mut buf = Builder::new(libc::NLMSG_DONE as u16, 9, 77, NLM_F_DUMP_INTR)
            .bytes(&0i32.to_ne_bytes())
            .finish();
        buf.extend(
            Builder::new(libc::NLMSG_ERROR as u16, 10, 77, 0)
                .bytes(&(-libc::EBUSY).to_ne_bytes())
                .finish(),
        );
        let mut cut = link_msg(libc::RTM_NEWLINK, 7, "veth12", None);
        cut.truncate(20);
        buf.extend(cut);
        let msgs = parse(&buf);
        assert_eq!(msgs.len(), 2, "the cut message is dropped: {msgs:?}");
        assert_eq!((msgs[0].seq, msgs[0].port), (9, 77));
        assert!(msgs[0].interrupted);
        assert_eq!(msgs[0].body, Body::Done);
        assert_eq!(msgs[1].body, Body::Error(libc::EBUSY));
    }

    #[test]
    fn dump_requests_are_well_formed() {
        let req = dump_request(Dump::Routes, 5);
        assert_eq!(req.len(), NLMSG_HDRLEN + RTMSG_LEN);
        assert_eq!(u32_at(&req, 0) as usize, req.len());
        assert_eq!(u16_at(&req, 4), libc::RTM_GETROUTE);
        assert_eq!(u32_at(&req, 8), 5);
    }
}
