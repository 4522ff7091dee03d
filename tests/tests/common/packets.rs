//! Packets for the BPF_PROG_TEST_RUN tests, built and parsed with etherparse
//! (an independent parser) and checksummed with `proxy_common::csum`: the
//! frame addresses, the Internet checksum, and per family (`V4`, `V6`) the
//! TCP/UDP builders, the parse that checks every checksum, and the check of
//! a port unreachable the datapath sends.

use std::{fmt::Debug, hash::Hash, net::IpAddr};

use etherparse::{
    IpHeaders, Ipv4Header, NetSlice, PacketBuilder, PacketBuilderStep, SlicedPacket, TcpSlice,
    TransportSlice, UdpSlice,
};
use proxy_common::csum;

use super::{Hook, crc32c};

/// The sender's and the receiver's MAC of every crafted frame.
pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const ETH: usize = 14;

/// One's complement sum of big-endian 16-bit words, an odd last byte
/// padded with zero; `csum::finish` folds and complements it.
pub fn ones(bytes: &[u8]) -> u32 {
    let even = bytes.len() & !1;
    csum::sum(&bytes[..even]) + bytes.get(even).map_or(0, |b| u32::from(*b) << 8)
}

/// True when `sum` (of data including its checksum) verifies.
pub fn verifies(sum: u32) -> bool {
    csum::finish(sum) == 0
}

/// What the kernel does to a CHECKSUM_PARTIAL packet on transmit without
/// offload: sum from the original L4 header (at `l4`) to the end, fold,
/// write at the original checksum offset (0 becomes 0xffff).
pub fn finish_partial(packet: &mut [u8], l4: usize, check_at: usize) {
    let sum = csum::finish(ones(&packet[l4..]));
    let sum = if sum == 0 { 0xffff } else { sum };
    packet[check_at..check_at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// An IPv6 address with a 48-bit prefix and a 16-bit host part.
pub const fn addr6(prefix: u64, host: u16) -> [u8; 16] {
    let p = prefix.to_be_bytes();
    let h = host.to_be_bytes();
    [
        p[2], p[3], p[4], p[5], p[6], p[7], 0, 0, 0, 0, 0, 0, 0, 0, h[0], h[1],
    ]
}

/// Addressing of a packet, after checking all its checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen<A> {
    pub src: A,
    pub sport: u16,
    pub dst: A,
    pub dport: u16,
    /// The UDP checksum as found, for UDP.
    pub udp_check: Option<u16>,
}

/// An IP family, for the tests that check the same behaviour on both.
pub trait Family {
    type Addr: Copy + Eq + Ord + Hash + Debug + Into<IpAddr>;
    /// Where the L4 header starts in the frames built here.
    const L4: usize;

    /// Ethernet (MAC_A to MAC_B) and IP from `src` to `dst`, TTL 64.
    fn ip(src: Self::Addr, dst: Self::Addr) -> PacketBuilderStep<IpHeaders>;

    /// Addressing of a TCP or UDP packet, after checking its checksums.
    fn seen(packet: &[u8]) -> Seen<Self::Addr>;

    /// (source, destination) of a frame whatever its IP header carries
    /// (a fragment, an ICMP error), after checking an IPv4 header checksum.
    fn addrs(frame: &[u8]) -> (Self::Addr, Self::Addr);

    /// (source, source port, destination, destination port) of an SCTP
    /// packet, after checking its IPv4 header checksum and its CRC32c.
    fn seen_sctp(packet: &[u8]) -> (Self::Addr, u16, Self::Addr, u16);

    /// Checks a port unreachable for `original` (sent by `client` to
    /// `frontend`): MACs swapped if `to_sender`, addresses, type and code,
    /// checksums, and the quote of the original.
    fn check_refusal(
        reply: &[u8],
        original: &[u8],
        addrs: (Self::Addr, Self::Addr),
        to_sender: bool,
        hook: Hook,
    );

    /// A SYN with a payload.
    fn tcp(src: Self::Addr, sport: u16, dst: Self::Addr, dport: u16) -> Vec<u8> {
        let builder = Self::ip(src, dst).tcp(sport, dport, 1000, 64240).syn();
        let payload = b"hello over tcp";
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut out, payload).expect("build tcp");
        out
    }

    fn udp(src: Self::Addr, sport: u16, dst: Self::Addr, dport: u16) -> Vec<u8> {
        let builder = Self::ip(src, dst).udp(sport, dport);
        let payload = b"hello over udp";
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut out, payload).expect("build udp");
        out
    }

    /// SCTP: the common header (ports, verification `tag`) and `chunks`,
    /// its CRC32c filled in.
    fn sctp(
        (src, sport): (Self::Addr, u16),
        (dst, dport): (Self::Addr, u16),
        tag: u32,
        chunks: &[u8],
    ) -> Vec<u8> {
        let mut l4 = [
            &sport.to_be_bytes()[..],
            &dport.to_be_bytes(),
            &tag.to_be_bytes(),
            &[0; 4],
            chunks,
        ]
        .concat();
        let crc = crc32c(&l4);
        l4[8..12].copy_from_slice(&crc.to_le_bytes());
        let builder = Self::ip(src, dst);
        let mut out = Vec::with_capacity(builder.size(l4.len()));
        builder
            .write(&mut out, etherparse::IpNumber(132), &l4)
            .expect("build sctp");
        out
    }

    /// A port unreachable as the hook sends it: TC back to the sender, XDP
    /// handing it to the node's stack, still addressed to the node.
    fn check_port_unreachable(
        reply: &[u8],
        original: &[u8],
        addrs: (Self::Addr, Self::Addr),
        hook: Hook,
    ) {
        Self::check_refusal(reply, original, addrs, hook == Hook::Tc, hook)
    }
}

/// An SCTP DATA chunk carrying "ping" (TSN 1).
pub fn sctp_data() -> Vec<u8> {
    [
        &[0, 3, 0, 20, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0][..],
        b"ping",
    ]
    .concat()
}

/// An SCTP INIT chunk with Initiate Tag `tag`: a_rwnd 65536, one stream
/// each way, initial TSN 1.
pub fn sctp_init(tag: u32) -> Vec<u8> {
    [
        [1u8, 0, 0, 20],
        tag.to_be_bytes(),
        [0, 1, 0, 0],
        [0, 1, 0, 1],
        [0, 0, 0, 1],
    ]
    .concat()
}

/// The IPv4 header of a parsed packet, its checksum checked.
pub fn ipv4_header(sliced: &SlicedPacket) -> Ipv4Header {
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
        panic!("not IPv4: {:?}", sliced.net);
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    header
}

/// The ports of a TCP or UDP packet from `src` to `dst`, its checksum
/// checked against what `tcp_want` or `udp_want` computes (`None`: the
/// UDP checksum is not checked).
fn transport<A>(
    sliced: &SlicedPacket,
    (src, dst): (A, A),
    tcp_want: impl FnOnce(&TcpSlice) -> u16,
    udp_want: impl FnOnce(&UdpSlice) -> Option<u16>,
) -> Seen<A> {
    match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            assert_eq!(tcp.checksum(), tcp_want(tcp), "TCP checksum");
            Seen {
                src,
                sport: tcp.source_port(),
                dst,
                dport: tcp.destination_port(),
                udp_check: None,
            }
        }
        Some(TransportSlice::Udp(udp)) => {
            let check = udp.checksum();
            if let Some(want) = udp_want(udp) {
                assert_eq!(check, want, "UDP checksum");
            }
            Seen {
                src,
                sport: udp.source_port(),
                dst,
                dport: udp.destination_port(),
                udp_check: Some(check),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// The ports of the SCTP common header that starts `l4`, after checking
/// its CRC32c.
pub fn sctp_ports(l4: &[u8]) -> (u16, u16) {
    let mut body = l4.to_vec();
    let stored = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
    body[8..12].copy_from_slice(&[0; 4]);
    assert_eq!(stored, crc32c(&body), "SCTP CRC32c");
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    (port(0), port(2))
}

fn check_macs(sliced: &SlicedPacket, to_sender: bool, hook: Hook) {
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &sliced.link else {
        panic!("no Ethernet: {:?}", sliced.link);
    };
    let macs = match to_sender {
        true => (MAC_B, MAC_A),
        false => (MAC_A, MAC_B),
    };
    assert_eq!((eth.source(), eth.destination()), macs, "{hook:?}: MACs");
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = [u8; 4];
    const L4: usize = ETH + 20;

    fn ip(src: [u8; 4], dst: [u8; 4]) -> PacketBuilderStep<IpHeaders> {
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64)
    }

    fn seen(packet: &[u8]) -> Seen<[u8; 4]> {
        let sliced = SlicedPacket::from_ethernet(packet).expect("etherparse parses the output");
        let header = ipv4_header(&sliced);
        let (src, dst) = (header.source, header.destination);
        transport(
            &sliced,
            (src, dst),
            |tcp| tcp.calc_checksum_ipv4(src, dst).expect("tcp checksum"),
            // A zero UDP checksum over IPv4 is none, and stays so.
            |udp| {
                (udp.checksum() != 0).then(|| {
                    udp.to_header()
                        .calc_checksum_ipv4_raw(src, dst, udp.payload())
                        .expect("udp checksum")
                })
            },
        )
    }

    fn addrs(frame: &[u8]) -> ([u8; 4], [u8; 4]) {
        let ip = &frame[ETH..ETH + 20];
        assert!(verifies(ones(ip)), "IPv4 header checksum of {frame:02x?}");
        let addr = |at: usize| -> [u8; 4] { ip[at..at + 4].try_into().expect("4 bytes") };
        (addr(12), addr(16))
    }

    fn seen_sctp(packet: &[u8]) -> ([u8; 4], u16, [u8; 4], u16) {
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&packet[ETH..]).expect("ipv4");
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "IPv4 checksum"
        );
        let (sport, dport) = sctp_ports(rest);
        (ip.source, sport, ip.destination, dport)
    }

    fn check_refusal(
        reply: &[u8],
        original: &[u8],
        (frontend, client): ([u8; 4], [u8; 4]),
        to_sender: bool,
        hook: Hook,
    ) {
        let sliced = SlicedPacket::from_ethernet(reply).expect("etherparse parses the reply");
        check_macs(&sliced, to_sender, hook);
        let header = ipv4_header(&sliced);
        assert_eq!((header.source, header.destination), (frontend, client));
        let Some(TransportSlice::Icmpv4(icmp)) = &sliced.transport else {
            panic!("not ICMP: {:?}", sliced.transport);
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 3), "port unreachable");
        assert!(verifies(ones(icmp.slice())), "ICMP checksum");
        // The quote: the original IP header (ID aside) and 8 bytes of L4.
        let quote = icmp.payload();
        assert_eq!(quote.len(), 28);
        assert_eq!(quote[..4], original[14..18]);
        assert_eq!(quote[6..20], original[20..34]);
        assert_eq!(quote[20..28], original[34..42]);
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    const L4: usize = ETH + 40;

    fn ip(src: [u8; 16], dst: [u8; 16]) -> PacketBuilderStep<IpHeaders> {
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src, dst, 64)
    }

    fn seen(packet: &[u8]) -> Seen<[u8; 16]> {
        let sliced = SlicedPacket::from_ethernet(packet).expect("etherparse parses the output");
        let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
            panic!("not IPv6: {:?}", sliced.net);
        };
        let header = ip.header().to_header();
        let (src, dst) = (header.source, header.destination);
        transport(
            &sliced,
            (src, dst),
            |tcp| tcp.calc_checksum_ipv6(src, dst).expect("checksum"),
            // No checksum is no option over IPv6: it must be right.
            |udp| {
                Some(
                    udp.to_header()
                        .calc_checksum_ipv6_raw(src, dst, udp.payload())
                        .expect("checksum"),
                )
            },
        )
    }

    fn addrs(frame: &[u8]) -> ([u8; 16], [u8; 16]) {
        let ip = &frame[ETH..ETH + 40];
        let addr = |at: usize| -> [u8; 16] { ip[at..at + 16].try_into().expect("16 bytes") };
        (addr(8), addr(24))
    }

    fn seen_sctp(packet: &[u8]) -> ([u8; 16], u16, [u8; 16], u16) {
        let (ip, rest) = etherparse::Ipv6Header::from_slice(&packet[ETH..]).expect("ipv6");
        let (sport, dport) = sctp_ports(rest);
        (ip.source, sport, ip.destination, dport)
    }

    fn check_refusal(
        reply: &[u8],
        original: &[u8],
        (frontend, client): ([u8; 16], [u8; 16]),
        to_sender: bool,
        hook: Hook,
    ) {
        let sliced = SlicedPacket::from_ethernet(reply).expect("etherparse parses the reply");
        check_macs(&sliced, to_sender, hook);
        let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
            panic!("not IPv6: {:?}", sliced.net);
        };
        let header = ip.header().to_header();
        assert_eq!((header.source, header.destination), (frontend, client));
        let Some(TransportSlice::Icmpv6(icmp)) = &sliced.transport else {
            panic!("not ICMPv6: {:?}", sliced.transport);
        };
        let message = icmp.slice();
        assert_eq!((message[0], message[1]), (1, 4), "port unreachable");
        let length = message.len() as u32;
        let pseudo = ones(&header.source) + ones(&header.destination) + length + 58;
        assert!(verifies(pseudo + ones(message)), "ICMPv6 checksum");
        assert_eq!(&message[8..56], &original[14..62], "quotes the original");
    }
}

/// The IPv4 builders and parse, by their short names.
pub mod v4 {
    use super::{Family, Seen, V4};

    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        V4::tcp(src, sport, dst, dport)
    }

    pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        V4::udp(src, sport, dst, dport)
    }

    pub fn seen(packet: &[u8]) -> Seen<[u8; 4]> {
        V4::seen(packet)
    }
}

/// The IPv6 builders and parse, by their short names.
pub mod v6 {
    use super::{Family, Seen, V6};

    pub fn tcp(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
        V6::tcp(src, sport, dst, dport)
    }

    pub fn udp(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
        V6::udp(src, sport, dst, dport)
    }

    pub fn seen(packet: &[u8]) -> Seen<[u8; 16]> {
        V6::seen(packet)
    }
}
