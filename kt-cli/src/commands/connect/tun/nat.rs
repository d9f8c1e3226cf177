//! The address translation behind `kt0` (pure: bytes in, bytes out).
//!
//! A TCP segment or UDP datagram a workstation program sends to a cluster address arrives on
//! `kt0` as an IPv4 packet. [`Nat::translate`] rewrites it to come from [`PEER`]`:n` (a port
//! `n` the table allocates for that flow) and go to ktctl's own listener on
//! [`LOCAL`]`:listener`; written back into `kt0`, the workstation's kernel delivers it to that
//! listener, which asks the table for the flow behind `n` and carries the connection over
//! SSH. Answers from the listener go to [`PEER`]`:n`, so they come out of `kt0` too and are
//! rewritten back to come from the cluster address to the program. Both ends of every
//! connection are the kernel's own TCP: windows, retransmission and congestion control are
//! the kernel's, not a userspace stack's. (sing-tun's "system" stack works this way.)
//!
//! Checksums are adjusted incrementally (RFC 1624). Fragments, options-free oddities and
//! other protocols are dropped, as a firewall would; IPv6 is not translated yet.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

/// `kt0`'s own address, where ktctl's listeners are; the source of rewritten answers is
/// the cluster's. From 198.18.0.0/15 (RFC 2544's benchmarking range), which no cluster or
/// LAN uses; `kt0` holds 198.18.0.0/30.
pub(crate) const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The made-up other end of `kt0`: translated flows come from `PEER:n`.
pub(crate) const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The ports flows are given: above the ephemeral ports a kernel picks for its own.
const FLOW_PORTS: std::ops::RangeInclusive<u16> = 10_000..=65_000;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// TCP or UDP: each has its own listener and its own flow ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
}

/// One program's conversation with one cluster address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Flow {
    pub protocol: Protocol,
    /// The program's address and port (the packet's source).
    pub client: SocketAddrV4,
    /// The cluster address and port it asked for.
    pub destination: SocketAddrV4,
}

struct Entry {
    flow: Flow,
    last_seen: Instant,
}

/// The translation table: flows ↔ ports on [`PEER`], per protocol.
pub(crate) struct Nat {
    tcp_listener: u16,
    udp_listener: u16,
    /// How long an unused flow keeps its port before another may take it.
    tcp_idle: Duration,
    udp_idle: Duration,
    ports: HashMap<Flow, u16>,
    flows: HashMap<(Protocol, u16), Entry>,
    cursor: u16,
}

impl Nat {
    /// A table for listeners on `LOCAL:tcp_listener` and `LOCAL:udp_listener`; a flow's port
    /// is reused only after the flow was idle for `tcp_idle` / `udp_idle`.
    pub(crate) fn new(
        tcp_listener: u16,
        udp_listener: u16,
        tcp_idle: Duration,
        udp_idle: Duration,
    ) -> Self {
        Self {
            tcp_listener,
            udp_listener,
            tcp_idle,
            udp_idle,
            ports: HashMap::new(),
            flows: HashMap::new(),
            cursor: *FLOW_PORTS.start(),
        }
    }

    /// The flow a listener's peer `PEER:port` stands for, if the table knows it.
    pub(crate) fn flow(&self, protocol: Protocol, peer: SocketAddr) -> Option<Flow> {
        match peer {
            SocketAddr::V4(peer) if *peer.ip() == PEER => {
                self.flows.get(&(protocol, peer.port())).map(|e| e.flow)
            }
            _ => None,
        }
    }

    /// Rewrites `packet` (one IPv4 packet read from `kt0`) in place; `true` when it is to be
    /// written back into `kt0`, `false` when it is to be dropped.
    pub(crate) fn translate(&mut self, packet: &mut [u8], now: Instant) -> bool {
        let Some(header) = Ipv4Packet::parse(packet) else {
            return false;
        };
        let protocol = match header.protocol {
            TCP => Protocol::Tcp,
            UDP => Protocol::Udp,
            _ => return false,
        };
        let listener = match protocol {
            Protocol::Tcp => self.tcp_listener,
            Protocol::Udp => self.udp_listener,
        };
        let (source, destination) = (header.source(packet), header.destination(packet));
        if *source.ip() == LOCAL && *destination.ip() == PEER && source.port() == listener {
            // An answer from ktctl's listener: back to the program, from the cluster address.
            let Some(entry) = self.flows.get_mut(&(protocol, destination.port())) else {
                return false;
            };
            entry.last_seen = now;
            let flow = entry.flow;
            header.rewrite(packet, flow.destination, flow.client);
            return true;
        }
        if *destination.ip() == LOCAL || *destination.ip() == PEER {
            return false;
        }
        let flow = Flow {
            protocol,
            client: source,
            destination,
        };
        let Some(port) = self.port_for(flow, now) else {
            return false;
        };
        header.rewrite(
            packet,
            SocketAddrV4::new(PEER, port),
            SocketAddrV4::new(LOCAL, listener),
        );
        true
    }

    /// The port `flow` has, or a free one for it (the least recently used when every port
    /// is taken).
    fn port_for(&mut self, flow: Flow, now: Instant) -> Option<u16> {
        if let Some(&port) = self.ports.get(&flow) {
            if let Some(entry) = self.flows.get_mut(&(flow.protocol, port)) {
                entry.last_seen = now;
            }
            return Some(port);
        }
        let idle = match flow.protocol {
            Protocol::Tcp => self.tcp_idle,
            Protocol::Udp => self.udp_idle,
        };
        let span = usize::from(FLOW_PORTS.end() - FLOW_PORTS.start()) + 1;
        let mut chosen = None;
        for _ in 0..span {
            let port = self.cursor;
            self.cursor = if port == *FLOW_PORTS.end() {
                *FLOW_PORTS.start()
            } else {
                port + 1
            };
            match self.flows.get(&(flow.protocol, port)) {
                Some(entry) if now.saturating_duration_since(entry.last_seen) < idle => {}
                _ => {
                    chosen = Some(port);
                    break;
                }
            }
        }
        let port = match chosen {
            Some(port) => port,
            None => self
                .flows
                .iter()
                .filter(|((protocol, _), _)| *protocol == flow.protocol)
                .min_by_key(|(_, entry)| entry.last_seen)
                .map(|((_, port), _)| *port)?,
        };
        if let Some(old) = self.flows.remove(&(flow.protocol, port)) {
            self.ports.remove(&old.flow);
        }
        self.flows.insert(
            (flow.protocol, port),
            Entry {
                flow,
                last_seen: now,
            },
        );
        self.ports.insert(flow, port);
        Some(port)
    }
}

/// Where an IPv4 packet's fields are.
struct Ipv4Packet {
    header_len: usize,
    protocol: u8,
}

impl Ipv4Packet {
    /// An unfragmented IPv4 TCP or UDP packet whose transport header is whole.
    fn parse(packet: &[u8]) -> Option<Self> {
        let first = *packet.first()?;
        if first >> 4 != 4 {
            return None;
        }
        let header_len = usize::from(first & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
        if header_len < 20 || total_len > packet.len() || total_len < header_len {
            return None;
        }
        let flags_fragment = u16::from_be_bytes([packet[6], packet[7]]);
        // More fragments, or a fragment offset: not the whole datagram.
        if flags_fragment & 0x3fff != 0 {
            return None;
        }
        let protocol = packet[9];
        let transport_len = match protocol {
            TCP => 20,
            UDP => 8,
            _ => 0,
        };
        if total_len < header_len + transport_len {
            return None;
        }
        Some(Self {
            header_len,
            protocol,
        })
    }

    fn source(&self, packet: &[u8]) -> SocketAddrV4 {
        let l4 = &packet[self.header_len..];
        SocketAddrV4::new(
            Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            u16::from_be_bytes([l4[0], l4[1]]),
        )
    }

    fn destination(&self, packet: &[u8]) -> SocketAddrV4 {
        let l4 = &packet[self.header_len..];
        SocketAddrV4::new(
            Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    }

    /// Sets the source and destination address and port, adjusting the IPv4 header's and
    /// the transport's checksums (whose pseudo-header holds the addresses).
    fn rewrite(&self, packet: &mut [u8], source: SocketAddrV4, destination: SocketAddrV4) {
        let mut old = [0u8; 12];
        old[..8].copy_from_slice(&packet[12..20]);
        old[8..].copy_from_slice(&packet[self.header_len..self.header_len + 4]);
        let mut new = [0u8; 12];
        new[..4].copy_from_slice(&source.ip().octets());
        new[4..8].copy_from_slice(&destination.ip().octets());
        new[8..10].copy_from_slice(&source.port().to_be_bytes());
        new[10..12].copy_from_slice(&destination.port().to_be_bytes());

        let ip_checksum = u16::from_be_bytes([packet[10], packet[11]]);
        packet[10..12]
            .copy_from_slice(&adjust_checksum(ip_checksum, &old[..8], &new[..8]).to_be_bytes());
        packet[12..20].copy_from_slice(&new[..8]);

        let l4 = self.header_len;
        let at = l4 + if self.protocol == TCP { 16 } else { 6 };
        let checksum = u16::from_be_bytes([packet[at], packet[at + 1]]);
        // A UDP checksum of zero means "none" (RFC 768) and stays so; a computed zero is
        // sent as all ones.
        if !(self.protocol == UDP && checksum == 0) {
            let mut adjusted = adjust_checksum(checksum, &old, &new);
            if self.protocol == UDP && adjusted == 0 {
                adjusted = 0xffff;
            }
            packet[at..at + 2].copy_from_slice(&adjusted.to_be_bytes());
        }
        packet[l4..l4 + 4].copy_from_slice(&new[8..12]);
    }
}

/// RFC 1624 eqn. 3: the Internet checksum `checksum` after the 16-bit words `old` (an even
/// number of bytes) of the summed data became `new`.
fn adjust_checksum(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!checksum);
    for (old, new) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u32::from(!u16::from_be_bytes([old[0], old[1]]));
        sum += u32::from(u16::from_be_bytes([new[0], new[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;

    const PROGRAM: SocketAddrV4 = SocketAddrV4::new(LOCAL, 40_000);
    const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

    fn tcp_packet(source: SocketAddrV4, destination: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(source.ip().octets(), destination.ip().octets(), 64)
            .tcp(source.port(), destination.port(), 7, 64_240)
            .syn();
        let mut packet = Vec::new();
        builder.write(&mut packet, payload).unwrap();
        packet
    }

    fn udp_packet(source: SocketAddrV4, destination: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(source.ip().octets(), destination.ip().octets(), 64)
            .udp(source.port(), destination.port());
        let mut packet = Vec::new();
        builder.write(&mut packet, payload).unwrap();
        packet
    }

    /// The packet's addresses, checked against checksums etherparse computes from scratch.
    fn addresses(packet: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("IPv4")
        };
        let header = ip.header().to_header();
        assert_eq!(
            header.header_checksum,
            header.calc_header_checksum(),
            "IPv4 header checksum"
        );
        let payload = ip.payload().payload;
        let (source, destination) = (header.source, header.destination);
        match sliced.transport.unwrap() {
            TransportSlice::Tcp(tcp) => {
                let computed = tcp
                    .to_header()
                    .calc_checksum_ipv4(&header, tcp.payload())
                    .unwrap();
                assert_eq!(tcp.checksum(), computed, "TCP checksum");
                (
                    SocketAddrV4::new(source.into(), tcp.source_port()),
                    SocketAddrV4::new(destination.into(), tcp.destination_port()),
                )
            }
            TransportSlice::Udp(udp) => {
                let computed = udp
                    .to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .unwrap();
                assert_eq!(udp.checksum(), computed, "UDP checksum");
                assert_eq!(udp.payload().len() + 8, payload.len());
                (
                    SocketAddrV4::new(source.into(), udp.source_port()),
                    SocketAddrV4::new(destination.into(), udp.destination_port()),
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn nat() -> Nat {
        Nat::new(
            9_000,
            9_001,
            Duration::from_secs(7200),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_connection_goes_to_the_listener_and_its_answers_come_from_the_cluster_address() {
        let mut nat = nat();
        let now = Instant::now();
        let mut syn = tcp_packet(PROGRAM, SERVICE, b"");
        assert!(nat.translate(&mut syn, now));
        let (source, destination) = addresses(&syn);
        assert_eq!(*source.ip(), PEER);
        assert_eq!(destination, SocketAddrV4::new(LOCAL, 9_000));
        let flow = nat.flow(Protocol::Tcp, source.into()).unwrap();
        assert_eq!((flow.client, flow.destination), (PROGRAM, SERVICE));

        let mut answer = tcp_packet(destination, source, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(nat.translate(&mut answer, now));
        assert_eq!(addresses(&answer), (SERVICE, PROGRAM));

        let mut again = tcp_packet(PROGRAM, SERVICE, b"GET / HTTP/1.1\r\n\r\n");
        assert!(nat.translate(&mut again, now));
        assert_eq!(addresses(&again).0, source, "one flow, one port");
    }

    #[test]
    fn udp_flows_are_apart_from_tcp_and_keep_a_zero_checksum_zero() {
        let mut nat = nat();
        let now = Instant::now();
        let dns = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
        let mut query = udp_packet(PROGRAM, dns, b"query");
        assert!(nat.translate(&mut query, now));
        let (source, destination) = addresses(&query);
        assert_eq!(destination, SocketAddrV4::new(LOCAL, 9_001));
        assert!(nat.flow(Protocol::Tcp, source.into()).is_none());
        assert_eq!(
            nat.flow(Protocol::Udp, source.into()).unwrap().destination,
            dns
        );
        let mut answer = udp_packet(destination, source, b"answer");
        assert!(nat.translate(&mut answer, now));
        assert_eq!(addresses(&answer), (dns, PROGRAM));

        let mut unchecked = udp_packet(PROGRAM, dns, b"query");
        let at = 20 + 6;
        unchecked[at..at + 2].copy_from_slice(&[0, 0]);
        assert!(nat.translate(&mut unchecked, now));
        assert_eq!(&unchecked[at..at + 2], &[0, 0]);
    }

    #[test]
    fn what_is_not_a_whole_tcp_or_udp_packet_to_the_cluster_is_dropped() {
        let mut nat = nat();
        let now = Instant::now();
        let mut to_listener = tcp_packet(
            SocketAddrV4::new(PEER, 10_000),
            SocketAddrV4::new(LOCAL, 9_000),
            b"",
        );
        assert!(
            !nat.translate(&mut to_listener, now),
            "nothing to ktctl's own addresses"
        );
        let mut unknown_answer = tcp_packet(
            SocketAddrV4::new(LOCAL, 9_000),
            SocketAddrV4::new(PEER, 12_345),
            b"",
        );
        assert!(!nat.translate(&mut unknown_answer, now), "no such flow");
        let mut fragment = tcp_packet(PROGRAM, SERVICE, b"data");
        fragment[6] |= 0x20;
        assert!(!nat.translate(&mut fragment, now));
        let mut truncated = tcp_packet(PROGRAM, SERVICE, b"");
        truncated.truncate(30);
        assert!(!nat.translate(&mut truncated, now));
        let mut icmp = tcp_packet(PROGRAM, SERVICE, b"");
        icmp[9] = 1;
        assert!(!nat.translate(&mut icmp, now));
        assert!(!nat.translate(&mut [0x60, 0, 0, 0], now), "IPv6");
    }

    #[test]
    fn an_idle_flow_gives_its_port_up_and_a_full_table_reuses_the_oldest() {
        let mut nat = Nat::new(
            9_000,
            9_001,
            Duration::from_secs(10),
            Duration::from_secs(10),
        );
        let start = Instant::now();
        let span = u32::from(FLOW_PORTS.end() - FLOW_PORTS.start()) + 1;
        for i in 0..span {
            let client = SocketAddrV4::new(LOCAL, 1 + (i % 60_000) as u16);
            let destination = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 80);
            let flow = Flow {
                protocol: Protocol::Tcp,
                client,
                destination,
            };
            assert!(
                nat.port_for(flow, start + Duration::from_millis(u64::from(i)))
                    .is_some()
            );
        }
        let newcomer = Flow {
            protocol: Protocol::Tcp,
            client: PROGRAM,
            destination: SERVICE,
        };
        let now = start + Duration::from_secs(1);
        let port = nat.port_for(newcomer, now).unwrap();
        assert_eq!(port, *FLOW_PORTS.start(), "the least recently used port");
        assert_eq!(nat.ports.len(), span as usize, "the old flow is gone");
        let later = start + Duration::from_secs(3600);
        let other = Flow {
            protocol: Protocol::Tcp,
            client: PROGRAM,
            destination: SocketAddrV4::new(LOCAL, 1),
        };
        assert_eq!(
            nat.port_for(other, later),
            Some(*FLOW_PORTS.start()),
            "idle ports are free again"
        );
        assert!(!nat.ports.contains_key(&newcomer));
        assert_eq!(nat.ports.len(), span as usize);
    }

    #[test]
    fn checksum_adjustment_matches_rfc_1624() {
        // RFC 1624 section 4: 0xDD2F becomes ... when 0x5555 becomes 0x3285.
        assert_eq!(
            adjust_checksum(0xdd2f, &[0x55, 0x55], &[0x32, 0x85]),
            0x0000
        );
    }
}
