//! Userspace conversions between std socket addresses and the map types.
//!
//! "Network order" means the value's bytes in memory are the bytes on the wire, so an
//! address is `u32::from_ne_bytes(octets)` and a port is `port.to_be()`.

extern crate std;

use core::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::{
    AF_INET, AF_INET6, FLAG_RESTORE_PEER, Mode, OrigDst, PROTO_TCP, PROTO_UDP, Redirect, RevKey4,
    RevKey6, RevVal, SvcKey4, SvcKey6, SvcStats,
};

// SAFETY: plain `#[repr(C)]` integers with explicit padding; any bit pattern is valid.
unsafe impl aya::Pod for SvcKey4 {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcKey6 {}
// SAFETY: as above.
unsafe impl aya::Pod for Redirect {}
// SAFETY: as above.
unsafe impl aya::Pod for OrigDst {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcStats {}
// SAFETY: as above.
unsafe impl aya::Pod for RevKey4 {}
// SAFETY: as above.
unsafe impl aya::Pod for RevKey6 {}
// SAFETY: as above.
unsafe impl aya::Pod for RevVal {}

/// The transport a service-map entry redirects: each has its own entries, so exchanging a
/// TCP port leaves UDP on the same number alone.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    /// The IP protocol number of the map keys.
    pub const fn proto(self) -> u8 {
        match self {
            Transport::Tcp => PROTO_TCP,
            Transport::Udp => PROTO_UDP,
        }
    }

    /// The transport of a map key's protocol number; `None` for another.
    pub const fn of(proto: u8) -> Option<Self> {
        match proto {
            PROTO_TCP => Some(Transport::Tcp),
            PROTO_UDP => Some(Transport::Udp),
            _ => None,
        }
    }
}

impl core::fmt::Display for Transport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        })
    }
}

/// An IPv4 address as `bpf_sock_addr.user_ip4` holds it.
pub fn ip4_to_net(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Inverse of [`ip4_to_net`].
pub fn ip4_from_net(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// An IPv6 address as `bpf_sock_addr.user_ip6` holds it.
pub fn ip6_to_net(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Inverse of [`ip6_to_net`].
pub fn ip6_from_net(raw: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in raw.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

impl SvcKey4 {
    /// The key of TCP connects to `dst`.
    pub fn tcp(dst: SocketAddrV4) -> Self {
        Self::new(dst, Transport::Tcp)
    }

    /// The key of `transport` traffic to `dst`.
    pub fn new(dst: SocketAddrV4, transport: Transport) -> Self {
        Self {
            addr: ip4_to_net(*dst.ip()),
            port: dst.port().to_be(),
            proto: transport.proto(),
            _pad: 0,
        }
    }

    pub fn socket_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(ip4_from_net(self.addr), u16::from_be(self.port))
    }
}

impl SvcKey6 {
    /// The key of TCP connects to `dst`.
    pub fn tcp(dst: SocketAddrV6) -> Self {
        Self::new(dst, Transport::Tcp)
    }

    /// The key of `transport` traffic to `dst`.
    pub fn new(dst: SocketAddrV6, transport: Transport) -> Self {
        Self {
            addr: ip6_to_net(*dst.ip()),
            port: dst.port().to_be(),
            proto: transport.proto(),
            _pad: 0,
        }
    }

    pub fn socket_addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(ip6_from_net(self.addr), u16::from_be(self.port), 0, 0)
    }
}

impl Redirect {
    /// Send matching connects to `target`; `getpeername()` keeps reporting the original.
    pub fn to(target: SocketAddr, svc_id: u32, mode: Mode) -> Self {
        let (family, addr4, addr6) = match target {
            SocketAddr::V4(a) => (AF_INET, ip4_to_net(*a.ip()), [0; 4]),
            SocketAddr::V6(a) => (AF_INET6, 0, ip6_to_net(*a.ip())),
        };
        Self {
            svc_id,
            family,
            mode: mode as u8,
            flags: FLAG_RESTORE_PEER,
            _pad0: 0,
            port: target.port().to_be(),
            _pad1: 0,
            addr4,
            addr6,
        }
    }

    /// The target as a socket address.
    pub fn target(&self) -> SocketAddr {
        let port = u16::from_be(self.port);
        if self.family == AF_INET6 {
            SocketAddr::new(ip6_from_net(self.addr6).into(), port)
        } else {
            SocketAddr::new(ip4_from_net(self.addr4).into(), port)
        }
    }
}

impl core::ops::AddAssign for SvcStats {
    fn add_assign(&mut self, other: Self) {
        self.connects_redirected += other.connects_redirected;
        self.peername_restored += other.peername_restored;
        self.skipped_self += other.skipped_self;
        self.errors += other.errors;
        self.datagrams_redirected += other.datagrams_redirected;
        self.replies_restored += other.replies_restored;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_key_is_in_wire_order() {
        let key = SvcKey4::tcp("10.96.0.10:8080".parse().unwrap());
        // The bytes in memory are the bytes on the wire, whatever the host's endianness.
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(key.proto, PROTO_TCP);
        assert_eq!(key.socket_addr(), "10.96.0.10:8080".parse().unwrap());
    }

    #[test]
    fn udp_keys_differ_from_tcp_keys_of_one_address() {
        let dst = "10.96.0.10:53".parse().unwrap();
        let (tcp, udp) = (SvcKey4::tcp(dst), SvcKey4::new(dst, Transport::Udp));
        assert_ne!(tcp, udp);
        assert_eq!((tcp.proto, udp.proto), (6, 17));
        assert_eq!(Transport::of(udp.proto), Some(Transport::Udp));
        assert_eq!(Transport::of(132), None, "SCTP is neither");
    }

    #[test]
    fn ipv6_key_round_trips() {
        let addr: SocketAddrV6 = "[fd00::1:2]:443".parse().unwrap();
        let key = SvcKey6::tcp(addr);
        assert_eq!(key.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(key.addr[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(key.socket_addr(), addr);
    }

    #[test]
    fn redirect_round_trips_both_families() {
        for target in ["172.30.0.1:40001", "[fd00::5]:40002"] {
            let target: SocketAddr = target.parse().unwrap();
            let r = Redirect::to(target, 7, Mode::Exchange);
            assert_eq!(r.target(), target);
            assert_eq!(r.svc_id, 7);
            assert_eq!(r.flags & FLAG_RESTORE_PEER, FLAG_RESTORE_PEER);
            assert_eq!((r._pad0, r._pad1), (0, 0));
        }
    }
}
