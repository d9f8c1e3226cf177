//! Types shared by the kt eBPF programs (`kt-ebpf`) and the node agent.
//!
//! The layout of every type here is an ABI between the kernel object and userspace:
//! - every struct is `#[repr(C)]` with fixed-width integers and explicit padding fields
//!   that must be zero (garbage padding in a hash key breaks lookups);
//! - **all addresses and ports are in network byte order**, exactly as they appear in
//!   `bpf_sock_addr`, so the kernel side never converts;
//! - sizes are pinned by compile-time asserts, so a layout change fails the build.
#![no_std]

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;
/// `AF_INET`.
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;

/// Map of IPv4 services: [`SvcKey4`] → [`Redirect`].
pub const SVC4_MAP: &str = "KT_SVC4";
/// Map of IPv6 services: [`SvcKey6`] → [`Redirect`].
pub const SVC6_MAP: &str = "KT_SVC6";
/// Cgroups whose sockets are never redirected (the agent's own): cgroup id → `u8`.
pub const SKIP_CGROUP_MAP: &str = "KT_SKIP_CGROUP";
/// Per-socket storage of the original destination ([`OrigDst`]).
pub const ORIG_DST_MAP: &str = "KT_ORIG_DST";
/// Per-CPU global counters indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "KT_COUNTERS";
/// Per-CPU per-service statistics indexed by `Redirect::svc_id`.
pub const SVC_STATS_MAP: &str = "KT_SVC_STATS";
/// Datagrams sent by an unconnected IPv4 UDP socket to a redirect target: [`RevKey4`] →
/// [`RevVal`], so that `cgroup/recvmsg4` shows the reply as coming from the Service.
pub const UDP_REV4_MAP: &str = "KT_UDP_REV4";
/// The IPv6 twin of [`UDP_REV4_MAP`]: [`RevKey6`] → [`RevVal`].
pub const UDP_REV6_MAP: &str = "KT_UDP_REV6";

/// Program names (function names in the object).
pub const PROG_CONNECT4: &str = "kt_connect4";
pub const PROG_CONNECT6: &str = "kt_connect6";
pub const PROG_GETPEERNAME4: &str = "kt_getpeername4";
pub const PROG_GETPEERNAME6: &str = "kt_getpeername6";
pub const PROG_SENDMSG4: &str = "kt_sendmsg4";
pub const PROG_SENDMSG6: &str = "kt_sendmsg6";
pub const PROG_RECVMSG4: &str = "kt_recvmsg4";
pub const PROG_RECVMSG6: &str = "kt_recvmsg6";
/// Every program of the object, in attach order.
pub const PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
];
/// Every map of the object that userspace touches.
pub const MAPS: [&str; 8] = [
    SVC4_MAP,
    SVC6_MAP,
    SKIP_CGROUP_MAP,
    ORIG_DST_MAP,
    COUNTERS_MAP,
    SVC_STATS_MAP,
    UDP_REV4_MAP,
    UDP_REV6_MAP,
];

/// Capacities.
pub const SVC4_MAX_ENTRIES: u32 = 65_536;
pub const SVC6_MAX_ENTRIES: u32 = 16_384;
pub const SKIP_CGROUP_MAX_ENTRIES: u32 = 64;
pub const SVC_STATS_MAX_ENTRIES: u32 = 65_536;
/// LRU: an entry outlives its socket until evicted (socket cookies are never reused, so a
/// stale one matches nothing).
pub const UDP_REV4_MAX_ENTRIES: u32 = 65_536;
pub const UDP_REV6_MAX_ENTRIES: u32 = 16_384;

/// Key of [`SVC4_MAP`]: the destination a client dials.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SvcKey4 {
    /// IPv4 address, network order (`bpf_sock_addr.user_ip4`).
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`]: an exchange of a TCP port leaves UDP on the same
    /// number alone.
    pub proto: u8,
    pub _pad: u8,
}

/// Key of [`SVC6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SvcKey6 {
    /// IPv6 address as four network-order words (`bpf_sock_addr.user_ip6`).
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Where a matching connect is sent. Value of [`SVC4_MAP`] and [`SVC6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Redirect {
    /// Index into [`SVC_STATS_MAP`], allocated by the agent.
    pub svc_id: u32,
    /// [`AF_INET`] or [`AF_INET6`]: the family of the target.
    pub family: u8,
    /// A [`Mode`] as `u8`.
    pub mode: u8,
    /// [`FLAG_RESTORE_PEER`] and friends.
    pub flags: u8,
    pub _pad0: u8,
    /// Target port, network order.
    pub port: u16,
    pub _pad1: u16,
    /// Target IPv4 address when `family == AF_INET`, network order.
    pub addr4: u32,
    /// Target IPv6 address when `family == AF_INET6`, network-order words.
    pub addr6: [u32; 4],
}

/// Key of [`UDP_REV4_MAP`]: a socket (its cookie) and the redirect target it sent to.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RevKey4 {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// The redirect target's address, network order.
    pub addr: u32,
    /// The redirect target's port, network order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of [`UDP_REV6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RevKey6 {
    pub cookie: u64,
    /// The redirect target's address, network-order words.
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// Value of the reverse maps: the Service address a datagram was sent to before it was
/// redirected, which a reply from the target is shown as coming from.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RevVal {
    /// The original address; IPv4 in `addr[0]`, network order.
    pub addr: [u32; 4],
    /// The original port, network order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the map of the original.
    pub family: u8,
    pub _pad: u8,
    pub svc_id: u32,
}

/// `Redirect::flags`: make `getpeername()` report the original destination.
pub const FLAG_RESTORE_PEER: u8 = 1;

/// What a redirect is for (only reported; the kernel treats both alike).
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Exchange = 1,
    Mesh = 2,
}

/// The destination a socket dialled before it was redirected; per-socket storage.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct OrigDst {
    pub svc_id: u32,
    /// Original address; IPv4 in `addr[0]`, network order.
    pub addr: [u32; 4],
    /// Original port, network order.
    pub port: u16,
    /// Family of the original address as the application saw it.
    pub family: u8,
    pub _pad0: u8,
    /// The port the socket was sent to, network order; getpeername only restores a
    /// peer that still is the redirect target.
    pub redirected_port: u16,
    pub _pad1: u16,
}

/// Per-CPU statistics of one redirect ([`SVC_STATS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SvcStats {
    pub connects_redirected: u64,
    pub peername_restored: u64,
    /// Connects to this service from a cgroup in [`SKIP_CGROUP_MAP`].
    pub skipped_self: u64,
    /// Failures, e.g. the socket storage could not be created.
    pub errors: u64,
    /// UDP datagrams sent to the Service by unconnected sockets and redirected.
    pub datagrams_redirected: u64,
    /// Replies a UDP socket received from the target, shown as from the Service.
    pub replies_restored: u64,
}

/// Indices of [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Counter {
    /// Every connect the programs saw.
    ConnectSeen = 0,
    /// Neither TCP nor UDP (SCTP, say): passed through.
    ConnectOtherProtocol = 1,
    /// No map entry: passed through.
    ConnectNoMatch = 2,
    /// Rewritten.
    ConnectRedirected = 3,
    /// Rewritten from an IPv6 socket dialling a v4-mapped address.
    V4MappedRedirected = 4,
    /// The caller's cgroup is in the skip map.
    ConnectSkipped = 5,
    /// getpeername answered with the original destination.
    PeernameRestored = 6,
    /// The original destination could not be stored.
    OrigStoreFailed = 7,
    /// Every unconnected UDP send the programs saw.
    UdpSendSeen = 8,
    /// An unconnected UDP send rewritten.
    UdpSendRedirected = 9,
    /// A received datagram shown as from the Service it was sent to.
    UdpReplyRestored = 10,
    /// A reverse entry whose redirect is gone or changed: removed, the reply left as is.
    UdpRevStale = 11,
    /// An IPv6 send to a Service held on an IPv4 address: the kernel cannot send an IPv6
    /// socket's datagram to a v4-mapped target, so it goes to the pods.
    UdpV6ToV4Skipped = 12,
    /// The reverse entry could not be written.
    RevStoreFailed = 13,
}

/// Number of slots of [`COUNTERS_MAP`].
pub const COUNTER_SLOTS: u32 = 14;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::ConnectSeen,
        Counter::ConnectOtherProtocol,
        Counter::ConnectNoMatch,
        Counter::ConnectRedirected,
        Counter::V4MappedRedirected,
        Counter::ConnectSkipped,
        Counter::PeernameRestored,
        Counter::OrigStoreFailed,
        Counter::UdpSendSeen,
        Counter::UdpSendRedirected,
        Counter::UdpReplyRestored,
        Counter::UdpRevStale,
        Counter::UdpV6ToV4Skipped,
        Counter::RevStoreFailed,
    ];

    /// A stable snake_case name, used for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectSeen => "connect_seen",
            Counter::ConnectOtherProtocol => "connect_other_protocol",
            Counter::ConnectNoMatch => "connect_no_match",
            Counter::ConnectRedirected => "connect_redirected",
            Counter::V4MappedRedirected => "v4_mapped_redirected",
            Counter::ConnectSkipped => "connect_skipped",
            Counter::PeernameRestored => "peername_restored",
            Counter::OrigStoreFailed => "orig_store_failed",
            Counter::UdpSendSeen => "udp_send_seen",
            Counter::UdpSendRedirected => "udp_send_redirected",
            Counter::UdpReplyRestored => "udp_reply_restored",
            Counter::UdpRevStale => "udp_rev_stale",
            Counter::UdpV6ToV4Skipped => "udp_v6_to_v4_skipped",
            Counter::RevStoreFailed => "rev_store_failed",
        }
    }
}

// The ABI: a change here must be a deliberate change on both sides.
const _: () = assert!(size_of::<SvcKey4>() == 8);
const _: () = assert!(size_of::<SvcKey6>() == 20);
const _: () = assert!(size_of::<Redirect>() == 32);
const _: () = assert!(size_of::<OrigDst>() == 28);
const _: () = assert!(size_of::<SvcStats>() == 48);
const _: () = assert!(size_of::<RevKey4>() == 16);
const _: () = assert!(size_of::<RevKey6>() == 32);
const _: () = assert!(size_of::<RevVal>() == 24);

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::*;
