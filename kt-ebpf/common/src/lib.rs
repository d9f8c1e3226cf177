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

/// Program names (function names in the object).
pub const PROG_CONNECT4: &str = "kt_connect4";
pub const PROG_CONNECT6: &str = "kt_connect6";
pub const PROG_GETPEERNAME4: &str = "kt_getpeername4";
pub const PROG_GETPEERNAME6: &str = "kt_getpeername6";
/// Every program of the object, in attach order.
pub const PROGRAMS: [&str; 4] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
];
/// Every map of the object that userspace touches.
pub const MAPS: [&str; 6] = [
    SVC4_MAP,
    SVC6_MAP,
    SKIP_CGROUP_MAP,
    ORIG_DST_MAP,
    COUNTERS_MAP,
    SVC_STATS_MAP,
];

/// Capacities.
pub const SVC4_MAX_ENTRIES: u32 = 65_536;
pub const SVC6_MAX_ENTRIES: u32 = 16_384;
pub const SKIP_CGROUP_MAX_ENTRIES: u32 = 64;
pub const SVC_STATS_MAX_ENTRIES: u32 = 65_536;

/// Key of [`SVC4_MAP`]: the destination a client dials.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SvcKey4 {
    /// IPv4 address, network order (`bpf_sock_addr.user_ip4`).
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    /// [`PROTO_TCP`].
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
}

/// Indices of [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Counter {
    /// Every connect the programs saw.
    ConnectSeen = 0,
    /// Not TCP: passed through.
    ConnectNotTcp = 1,
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
}

/// Number of slots of [`COUNTERS_MAP`].
pub const COUNTER_SLOTS: u32 = 8;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::ConnectSeen,
        Counter::ConnectNotTcp,
        Counter::ConnectNoMatch,
        Counter::ConnectRedirected,
        Counter::V4MappedRedirected,
        Counter::ConnectSkipped,
        Counter::PeernameRestored,
        Counter::OrigStoreFailed,
    ];

    /// A stable snake_case name, used for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectSeen => "connect_seen",
            Counter::ConnectNotTcp => "connect_not_tcp",
            Counter::ConnectNoMatch => "connect_no_match",
            Counter::ConnectRedirected => "connect_redirected",
            Counter::V4MappedRedirected => "v4_mapped_redirected",
            Counter::ConnectSkipped => "connect_skipped",
            Counter::PeernameRestored => "peername_restored",
            Counter::OrigStoreFailed => "orig_store_failed",
        }
    }
}

// The ABI: a change here must be a deliberate change on both sides.
const _: () = assert!(size_of::<SvcKey4>() == 8);
const _: () = assert!(size_of::<SvcKey6>() == 20);
const _: () = assert!(size_of::<Redirect>() == 32);
const _: () = assert!(size_of::<OrigDst>() == 28);
const _: () = assert!(size_of::<SvcStats>() == 32);

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::*;
