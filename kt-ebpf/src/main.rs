//! kt's eBPF object: socket-level redirect of Service traffic.
//!
//! `cgroup/connect4|6` look the destination (TCP, or a connected UDP socket's) up in the
//! service maps and rewrite it to the redirect target before the kernel builds a single
//! packet (no NAT, no conntrack, kube-proxy never sees the flow); the original destination
//! is kept in socket storage so that `cgroup/getpeername4|6` can report it back.
//! `cgroup/sendmsg4|6` do the same for each datagram of an unconnected UDP socket
//! (`sendto`); those fire only when the call names an address, so a connected socket is
//! the connect hooks' (kernel: `udp_sendmsg`). A redirected UDP socket's Service address is
//! kept per socket cookie and target in an LRU map, from which `cgroup/recvmsg4|6` show a
//! reply as coming from the Service (as Cilium's socket LB does), after checking that the
//! redirect still stands. Sockets of cgroups in the skip map (the agent itself) are never
//! redirected. Every program always returns 1 (allow): a failure here must never break a
//! connect or a send, it only leaves it unredirected (fail-open).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _,
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use aya_log_ebpf::error;
use kt_ebpf_common::{
    AF_INET, AF_INET6, COUNTER_SLOTS, Counter, FLAG_RESTORE_PEER, OrigDst, PROTO_TCP, PROTO_UDP,
    Redirect, RevKey4, RevKey6, RevVal, SKIP_CGROUP_MAX_ENTRIES, SVC_STATS_MAX_ENTRIES,
    SVC4_MAX_ENTRIES, SVC6_MAX_ENTRIES, SvcKey4, SvcKey6, SvcStats, UDP_REV4_MAX_ENTRIES,
    UDP_REV6_MAX_ENTRIES,
};

/// Allow the syscall (for getpeername and recvmsg the verifier accepts nothing else).
const ALLOW: i32 = 1;

#[btf_map]
static KT_SVC4: HashMap<SvcKey4, Redirect, { SVC4_MAX_ENTRIES as usize }> = HashMap::new();
#[btf_map]
static KT_SVC6: HashMap<SvcKey6, Redirect, { SVC6_MAX_ENTRIES as usize }> = HashMap::new();
#[btf_map]
static KT_SKIP_CGROUP: HashMap<u64, u8, { SKIP_CGROUP_MAX_ENTRIES as usize }> = HashMap::new();
#[btf_map]
static KT_ORIG_DST: SkStorage<OrigDst> = SkStorage::new();
#[btf_map]
static KT_COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static KT_SVC_STATS: PerCpuArray<SvcStats, { SVC_STATS_MAX_ENTRIES as usize }> = PerCpuArray::new();
#[btf_map]
static KT_UDP_REV4: LruHashMap<RevKey4, RevVal, { UDP_REV4_MAX_ENTRIES as usize }> =
    LruHashMap::new();
#[btf_map]
static KT_UDP_REV6: LruHashMap<RevKey6, RevVal, { UDP_REV6_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// `::ffff:0:0/96`: the third word of a v4-mapped IPv6 address, network order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
fn kt_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid, writable context.
    let sa = unsafe { &mut *ctx.sock_addr };
    count(Counter::ConnectSeen);
    let Some(proto) = transport(sa) else {
        count(Counter::ConnectOtherProtocol);
        return ALLOW;
    };
    let key = SvcKey4 {
        addr: sa.user_ip4,
        port: user_port(sa),
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; userspace updates replace whole entries.
    let Some(redirect) = (unsafe { KT_SVC4.get(key) }).copied() else {
        count(Counter::ConnectNoMatch);
        return ALLOW;
    };
    if redirect.family != AF_INET || is_skipped(&redirect) {
        return ALLOW;
    }
    remember(&ctx, &redirect, AF_INET, [key.addr, 0, 0, 0], key.port);
    if proto == PROTO_UDP {
        // recvfrom() on the connected socket names the target: shown as the Service.
        reverse(&ctx, &redirect, AF_INET, [key.addr, 0, 0, 0], key.port);
    }
    sa.user_ip4 = redirect.addr4;
    sa.user_port = u32::from(redirect.port);
    redirected(&redirect);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
fn kt_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in kt_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    count(Counter::ConnectSeen);
    let Some(proto) = transport(sa) else {
        count(Counter::ConnectOtherProtocol);
        return ALLOW;
    };
    // Word by word: the verifier refuses a modified pointer into user_ip6.
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = user_port(sa);
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD;

    // A dual-stack socket dialling ::ffff:a.b.c.d goes to the IPv4 service a.b.c.d.
    let redirect = if v4_mapped {
        let key = SvcKey4 {
            addr: ip6[3],
            port,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once, as in kt_connect4.
        unsafe { KT_SVC4.get(key) }.copied()
    } else {
        let key = SvcKey6 {
            addr: ip6,
            port,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once, as in kt_connect4.
        unsafe { KT_SVC6.get(key) }.copied()
    };
    let Some(redirect) = redirect else {
        count(Counter::ConnectNoMatch);
        return ALLOW;
    };
    if is_skipped(&redirect) {
        return ALLOW;
    }
    let target = match redirect.family {
        AF_INET6 => redirect.addr6,
        AF_INET => [0, 0, V4_MAPPED_WORD, redirect.addr4],
        _ => return ALLOW,
    };
    remember(&ctx, &redirect, AF_INET6, ip6, port);
    if proto == PROTO_UDP {
        // What recvmsg6 looks up: a v4-mapped Service under its IPv4 address.
        let (family, orig) = if v4_mapped {
            (AF_INET, [ip6[3], 0, 0, 0])
        } else {
            (AF_INET6, ip6)
        };
        reverse(&ctx, &redirect, family, orig, port);
    }
    sa.user_ip6[0] = target[0];
    sa.user_ip6[1] = target[1];
    sa.user_ip6[2] = target[2];
    sa.user_ip6[3] = target[3];
    sa.user_port = u32::from(redirect.port);
    if v4_mapped {
        count(Counter::V4MappedRedirected);
    }
    redirected(&redirect);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
fn kt_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in kt_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    count(Counter::UdpSendSeen);
    let key = SvcKey4 {
        addr: sa.user_ip4,
        port: user_port(sa),
        proto: PROTO_UDP,
        _pad: 0,
    };
    // SAFETY: copied out at once, as in kt_connect4.
    let Some(redirect) = (unsafe { KT_SVC4.get(key) }).copied() else {
        return ALLOW;
    };
    if redirect.family != AF_INET || is_skipped(&redirect) {
        return ALLOW;
    }
    reverse(&ctx, &redirect, AF_INET, [key.addr, 0, 0, 0], key.port);
    sa.user_ip4 = redirect.addr4;
    sa.user_port = u32::from(redirect.port);
    datagram_redirected(&redirect);
    ALLOW
}

/// A v4-mapped destination never gets here: the kernel hands such a send to the IPv4 path,
/// whose `sendmsg4` sees it (kernel: `udpv6_sendmsg`).
#[cgroup_sock_addr(sendmsg6)]
fn kt_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in kt_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    count(Counter::UdpSendSeen);
    // Word by word, as in kt_connect6.
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let key = SvcKey6 {
        addr: ip6,
        port: user_port(sa),
        proto: PROTO_UDP,
        _pad: 0,
    };
    // SAFETY: copied out at once, as in kt_connect4.
    let Some(redirect) = (unsafe { KT_SVC6.get(key) }).copied() else {
        return ALLOW;
    };
    if redirect.family != AF_INET6 {
        // The kernel refuses an IPv6 send rewritten to a v4-mapped address (-ENOTSUPP):
        // left to the pods, counted.
        count(Counter::UdpV6ToV4Skipped);
        return ALLOW;
    }
    if is_skipped(&redirect) {
        return ALLOW;
    }
    reverse(&ctx, &redirect, AF_INET6, ip6, key.port);
    sa.user_ip6[0] = redirect.addr6[0];
    sa.user_ip6[1] = redirect.addr6[1];
    sa.user_ip6[2] = redirect.addr6[2];
    sa.user_ip6[3] = redirect.addr6[3];
    sa.user_port = u32::from(redirect.port);
    datagram_redirected(&redirect);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
fn kt_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in kt_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = RevKey4 {
        cookie: cookie(&ctx),
        addr: sa.user_ip4,
        port: user_port(sa),
        _pad: 0,
    };
    if let Some(orig) = restored4(&key)
        && orig.family == AF_INET
    {
        sa.user_ip4 = orig.addr[0];
        sa.user_port = u32::from(orig.port);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
fn kt_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in kt_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = user_port(sa);
    // An IPv4 datagram on a dual-stack socket: its source is v4-mapped, its entry is in
    // the IPv4 map (written by connect6 or sendmsg4).
    let orig = if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
        restored4(&RevKey4 {
            cookie: cookie(&ctx),
            addr: ip6[3],
            port,
            _pad: 0,
        })
    } else {
        restored6(&RevKey6 {
            cookie: cookie(&ctx),
            addr: ip6,
            port,
            _pad0: 0,
            _pad1: 0,
        })
    };
    let Some(orig) = orig else {
        return ALLOW;
    };
    let shown = match orig.family {
        AF_INET => [0, 0, V4_MAPPED_WORD, orig.addr[0]],
        _ => orig.addr,
    };
    sa.user_ip6[0] = shown[0];
    sa.user_ip6[1] = shown[1];
    sa.user_ip6[2] = shown[2];
    sa.user_ip6[3] = shown[3];
    sa.user_port = u32::from(orig.port);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
fn kt_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_of_peer(&ctx) {
        // SAFETY: as in kt_connect4.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.addr[0];
        sa.user_port = u32::from(orig.port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
fn kt_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_of_peer(&ctx) {
        // SAFETY: as in kt_connect4.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = orig.addr[0];
        sa.user_ip6[1] = orig.addr[1];
        sa.user_ip6[2] = orig.addr[2];
        sa.user_ip6[3] = orig.addr[3];
        sa.user_port = u32::from(orig.port);
    }
    ALLOW
}

/// [`PROTO_TCP`] or [`PROTO_UDP`] for a socket of either; `None` for any other.
#[inline(always)]
fn transport(sa: &aya_ebpf::bindings::bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        p if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        p if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Keeps, for this socket and the redirect target, the Service address it sent to: what
/// recvmsg shows a reply from the target as coming from. Written only when it changed (a
/// `sendto` loop must not write the map per datagram).
#[inline(always)]
fn reverse(ctx: &SockAddrContext, redirect: &Redirect, family: u8, addr: [u32; 4], port: u16) {
    let value = RevVal {
        addr,
        port,
        family,
        _pad: 0,
        svc_id: redirect.svc_id,
    };
    let written = match redirect.family {
        AF_INET => {
            let key = RevKey4 {
                cookie: cookie(ctx),
                addr: redirect.addr4,
                port: redirect.port,
                _pad: 0,
            };
            // SAFETY: copied out at once.
            if unsafe { KT_UDP_REV4.get(key) }.is_some_and(|v| *v == value) {
                return;
            }
            KT_UDP_REV4.insert(key, value, 0)
        }
        _ => {
            let key = RevKey6 {
                cookie: cookie(ctx),
                addr: redirect.addr6,
                port: redirect.port,
                _pad0: 0,
                _pad1: 0,
            };
            // SAFETY: copied out at once.
            if unsafe { KT_UDP_REV6.get(key) }.is_some_and(|v| *v == value) {
                return;
            }
            KT_UDP_REV6.insert(key, value, 0)
        }
    };
    if written.is_err() {
        count(Counter::RevStoreFailed);
        if let Some(stats) = svc_stats(redirect.svc_id) {
            stats.errors += 1;
        }
    }
}

/// The Service address a datagram from the IPv4 target `key` answers, if the redirect that
/// sent the socket there still stands (a stale entry is removed and counted).
#[inline(always)]
fn restored4(key: &RevKey4) -> Option<RevVal> {
    // SAFETY: copied out at once.
    let orig = unsafe { KT_UDP_REV4.get(key) }.copied()?;
    let current = service_redirect(&orig);
    if let Some(redirect) = current
        && redirect.family == AF_INET
        && redirect.addr4 == key.addr
        && redirect.port == key.port
    {
        return Some(replied(orig));
    }
    count(Counter::UdpRevStale);
    let _ = KT_UDP_REV4.remove(key);
    None
}

/// The IPv6 twin of [`restored4`].
#[inline(always)]
fn restored6(key: &RevKey6) -> Option<RevVal> {
    // SAFETY: copied out at once.
    let orig = unsafe { KT_UDP_REV6.get(key) }.copied()?;
    let current = service_redirect(&orig);
    if let Some(redirect) = current
        && redirect.family == AF_INET6
        && redirect.addr6 == key.addr
        && redirect.port == key.port
    {
        return Some(replied(orig));
    }
    count(Counter::UdpRevStale);
    let _ = KT_UDP_REV6.remove(key);
    None
}

/// The UDP redirect of the Service address `orig` now, if any.
#[inline(always)]
fn service_redirect(orig: &RevVal) -> Option<Redirect> {
    match orig.family {
        // SAFETY: copied out at once.
        AF_INET => unsafe {
            KT_SVC4.get(SvcKey4 {
                addr: orig.addr[0],
                port: orig.port,
                proto: PROTO_UDP,
                _pad: 0,
            })
        },
        // SAFETY: copied out at once.
        _ => unsafe {
            KT_SVC6.get(SvcKey6 {
                addr: orig.addr,
                port: orig.port,
                proto: PROTO_UDP,
                _pad: 0,
            })
        },
    }
    .copied()
}

#[inline(always)]
fn replied(orig: RevVal) -> RevVal {
    count(Counter::UdpReplyRestored);
    if let Some(stats) = svc_stats(orig.svc_id) {
        stats.replies_restored += 1;
    }
    orig
}

/// The destination port, network order, read with one 4-byte load (older kernels reject
/// narrower loads of `user_port`; the port sits in its low-addressed two bytes).
#[inline(always)]
fn user_port(sa: &aya_ebpf::bindings::bpf_sock_addr) -> u16 {
    // SAFETY: a plain read of a context field.
    unsafe { core::ptr::read_volatile(&sa.user_port) as u16 }
}

/// Whether the caller belongs to a cgroup that must not be redirected (the agent itself,
/// which dials the real endpoints).
#[inline(always)]
fn is_skipped(redirect: &Redirect) -> bool {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: only presence is checked.
    if unsafe { KT_SKIP_CGROUP.get(cgroup) }.is_none() {
        return false;
    }
    count(Counter::ConnectSkipped);
    if let Some(stats) = svc_stats(redirect.svc_id) {
        stats.skipped_self += 1;
    }
    true
}

/// Keeps the original destination on the socket for getpeername.
#[inline(always)]
fn remember(ctx: &SockAddrContext, redirect: &Redirect, family: u8, addr: [u32; 4], port: u16) {
    if redirect.flags & FLAG_RESTORE_PEER == 0 {
        return;
    }
    // SAFETY: `ctx.sk` is the socket being connected, valid for this call.
    let slot = unsafe { KT_ORIG_DST.get_or_insert_ptr_mut(ctx, None) };
    if slot.is_null() {
        count(Counter::OrigStoreFailed);
        if let Some(stats) = svc_stats(redirect.svc_id) {
            stats.errors += 1;
        }
        error!(ctx, "kt: no socket storage for svc {}", redirect.svc_id);
        return;
    }
    let orig = OrigDst {
        svc_id: redirect.svc_id,
        addr,
        port,
        family,
        _pad0: 0,
        redirected_port: redirect.port,
        _pad1: 0,
    };
    // SAFETY: non-null storage owned by this socket; a reconnect overwrites it whole.
    unsafe { *slot = orig };
}

/// The original destination if the socket was redirected and its peer still is the target.
#[inline(always)]
fn original_of_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: lookup without create on the socket of this call.
    let slot = unsafe { KT_ORIG_DST.get_ptr_mut(ctx) };
    if slot.is_null() {
        return None;
    }
    // SAFETY: non-null storage owned by this socket.
    let orig = unsafe { *slot };
    // SAFETY: as in kt_connect4.
    let sa = unsafe { &*ctx.sock_addr };
    if orig.redirected_port != user_port(sa) {
        return None;
    }
    count(Counter::PeernameRestored);
    if let Some(stats) = svc_stats(orig.svc_id) {
        stats.peername_restored += 1;
    }
    Some(orig)
}

#[inline(always)]
fn redirected(redirect: &Redirect) {
    count(Counter::ConnectRedirected);
    if let Some(stats) = svc_stats(redirect.svc_id) {
        stats.connects_redirected += 1;
    }
}

#[inline(always)]
fn datagram_redirected(redirect: &Redirect) {
    count(Counter::UdpSendRedirected);
    if let Some(stats) = svc_stats(redirect.svc_id) {
        stats.datagrams_redirected += 1;
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = KT_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn svc_stats(svc_id: u32) -> Option<&'static mut SvcStats> {
    // SAFETY: this CPU's slot of a per-CPU array, as in `count`.
    KT_SVC_STATS.get_ptr_mut(svc_id).map(|p| unsafe { &mut *p })
}

// Host-side checks link std, which brings its own handler.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Host builds (`cargo build --workspace`) need an entry point; the real artefact is the
/// eBPF object that kt-node-agent's build script produces.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
