//! [`TABLE`] over nftables' own netlink protocol: the agent needs no `nft` program (its image
//! is `FROM scratch`), and the socket that created the table is the agent's own.
//!
//! Ownership (Linux ≥ 5.12, `NFT_TABLE_F_OWNER`): the kernel binds an owned table to the
//! netlink socket that created it. No other socket may change it (`EPERM`; `nft flush
//! ruleset` skips it), and the kernel deletes it when that socket's last reference closes —
//! when the agent exits, `kill -9` included, or when [`OwnedTable`] is dropped. The socket is
//! `SOCK_CLOEXEC` and never duplicated, so no child can keep the table alive.
//!
//! One [`OwnedTable::apply`] is one nftables transaction (a netlink batch the kernel runs
//! inside `send()`): the table and its chains created if missing, every rule deleted, the
//! new rules added. Readers see the old rules or the new ones, never half.
//!
//! Written by hand (about 550 lines, on `libc`) because no crate serves: `rustables` is
//! GPL-3.0 and runs bindgen, has no `fib` expression and drops its socket after each batch
//! (which would delete an owned table at once); `nf_tables` and `netlink-packet-netfilter`
//! have no `nat`, `masq`, `ct` or `fib`; `nlink` has no `fib` and needs Rust 1.97; `nftnl`
//! links libnftnl (C). The wire format: `linux/netfilter/nf_tables.h` and `nfnetlink.h`
//! (constant values), `net/netfilter/nfnetlink.c` (batches, acknowledgements), and what
//! `nft -c --debug=netlink,mnl` 1.0.6 sends for the same rules (the expression bytecode).

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use super::{Frontend, Ruleset, SourceRange, TABLE};

// Netlink framing (`linux/netlink.h`).
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const NLM_F_APPEND: u16 = libc::NLM_F_APPEND as u16;
const NLM_F_ACK_TLVS: u16 = libc::NLM_F_ACK_TLVS as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;

// nfnetlink (`linux/netfilter/nfnetlink.h`).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNETLINK_V0: u8 = 0;
const NFPROTO_IPV4: u8 = 2;

// nf_tables messages and attributes (`linux/netfilter/nf_tables.h`).
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_OWNER: u32 = 0x2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_ACCEPT: u32 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
/// `NFT_REG_1` and `NFT_REG_2`: the 16-byte registers nft uses for these rules.
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// The two base chains: name, hook (`NF_INET_PRE_ROUTING` 0, `LOCAL_OUT` 3) and priority,
/// `dstnat - 10` (`NF_IP_PRI_NAT_DST` is -100): before kube-proxy's DNAT.
const CHAINS: [(&str, u32, i32); 2] = [("prerouting", 0, -110), ("output", 3, -110)];

/// How long the kernel may take to answer a transaction (it answers inside `send()`; this
/// only guards against one that does not).
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed step of [`OwnedTable::open`] or [`OwnedTable::apply`]. After any of them the
/// table's state is unknown: drop the [`OwnedTable`] (which deletes the table) and open a
/// new one.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `EPROTONOSUPPORT`: a kernel without nfnetlink.
    #[error("failed to open a netfilter netlink socket")]
    Open(#[source] io::Error),
    /// The kernel refused the transaction as a whole (the answer to `BATCH_BEGIN`): `EPERM`
    /// without `CAP_NET_ADMIN` in the node's network namespace (opening the socket needs
    /// none), `EOPNOTSUPP` without nf_tables. Retrying will not help.
    #[error("nftables is not available (no CAP_NET_ADMIN, or no nf_tables in the kernel)")]
    Unavailable(#[source] io::Error),
    /// `EMSGSIZE`: the transaction is larger than the socket's send buffer may be made.
    #[error("failed to send the nftables transaction ({bytes} bytes)")]
    Send {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    /// `ENOBUFS`: answers were lost.
    #[error("failed to read the kernel's answer")]
    Receive(#[source] io::Error),
    /// The kernel refused the transaction (and applied none of it): `EPERM` when another
    /// socket owns a table of this name, `EOPNOTSUPP` for an owned table on Linux < 5.12 or
    /// an unowned table of this name, `ENOENT` for a missing expression module.
    #[error("the kernel refused {what}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        what: String,
        detail: Option<String>,
        #[source]
        errno: io::Error,
    },
    #[error("the kernel did not answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed netlink answer")]
    Malformed,
}

/// The netlink socket that owns [`TABLE`] in the network namespace it was opened in;
/// dropping it deletes the table (see the module's doc).
#[derive(Debug)]
pub struct OwnedTable {
    socket: OwnedFd,
    /// The socket's netlink port id, which the kernel records as the table's owner.
    port_id: u32,
    next_seq: u32,
}

impl OwnedTable {
    /// Opens the socket (in the calling thread's network namespace). The table itself is
    /// made by the first [`apply`](Self::apply).
    ///
    /// # Errors
    /// [`NftError::Open`] when the socket cannot be opened or bound.
    pub fn open() -> Result<Self, NftError> {
        // SAFETY: plain syscall; the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(NftError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero `sockaddr_nl` is valid (port id 0: the kernel assigns one).
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let mut length = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `address` is a valid `sockaddr_nl` of `length` bytes.
        if unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                length,
            )
        } != 0
            || unsafe {
                libc::getsockname(
                    socket.as_raw_fd(),
                    std::ptr::from_mut(&mut address).cast(),
                    &mut length,
                )
            } != 0
        {
            return Err(NftError::Open(io::Error::last_os_error()));
        }
        // Errors carry the kernel's message text; acknowledgements do not echo the request;
        // answers beyond the receive buffer (a large batch that fails in every message) are
        // dropped rather than failing the read with ENOBUFS, which would lose the first
        // refusal, the one worth reporting. All optional: an older kernel just says less.
        for option in [
            libc::NETLINK_EXT_ACK,
            libc::NETLINK_CAP_ACK,
            libc::NETLINK_NO_ENOBUFS,
        ] {
            let _ = set_option(&socket, libc::SOL_NETLINK, option, 1);
        }
        Ok(Self {
            socket,
            port_id: address.nl_pid,
            next_seq: 1,
        })
    }

    /// The socket's netlink port id: what `nft list` shows as the table's owner.
    pub fn port_id(&self) -> u32 {
        self.port_id
    }

    /// Makes [`TABLE`] hold exactly `ruleset`, in one transaction. Blocking, but the kernel
    /// runs the transaction inside `send()` (well under a millisecond for hundreds of rules).
    ///
    /// # Errors
    /// See [`NftError`]. After [`NftError::Refused`] or [`NftError::Unavailable`] nothing of
    /// this transaction was applied; after the others what the kernel did is unknown.
    pub fn apply(&mut self, ruleset: &Ruleset) -> Result<(), NftError> {
        let batch = encode(ruleset, self.next_seq);
        self.next_seq = batch.end_seq.wrapping_add(1);
        // A batch must go out in one `send()`, which the kernel refuses beyond the send
        // buffer; `SO_SNDBUFFORCE` (CAP_NET_ADMIN) may exceed `net.core.wmem_max`.
        let wanted = batch.bytes.len() * 2 + 4096;
        let _ = set_option(&self.socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, wanted)
            .or_else(|_| set_option(&self.socket, libc::SOL_SOCKET, libc::SO_SNDBUF, wanted));
        // SAFETY: the buffer is valid for its length.
        let sent = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                batch.bytes.as_ptr().cast(),
                batch.bytes.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(NftError::Send {
                bytes: batch.bytes.len(),
                source: io::Error::last_os_error(),
            });
        }
        self.read_answers(&batch)
    }

    /// Reads the kernel's answers to `batch` until the acknowledgement of its last
    /// message. The kernel answers every message that failed and the one that asked for an
    /// acknowledgement; it does not stop at the first failure, and before Linux 6.10 it
    /// never acknowledges `BATCH_END`, so the last message before it asks instead. A failure
    /// in the commit itself comes with `BATCH_BEGIN`'s sequence number.
    fn read_answers(&self, batch: &Batch) -> Result<(), NftError> {
        let deadline = Instant::now() + APPLY_TIMEOUT;
        let mut buffer = vec![0u8; 64 * 1024];
        let mut refused: Option<NftError> = None;
        loop {
            // SAFETY: the buffer is valid for its length.
            let read = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if read < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::WouldBlock {
                    return Err(NftError::Receive(error));
                }
                // Every answer is queued by now: a refusal without the acknowledgement
                // (an aborted batch) is the whole answer.
                if let Some(refused) = refused {
                    return Err(refused);
                }
                wait_readable(&self.socket, deadline)?;
                continue;
            }
            let mut done = false;
            for answer in answers(&buffer[..read.unsigned_abs()]) {
                let answer = answer?;
                if answer.seq.wrapping_sub(batch.begin_seq)
                    > batch.end_seq.wrapping_sub(batch.begin_seq)
                {
                    continue; // an answer to an earlier transaction, already given up on
                }
                if answer.errno != 0 && refused.is_none() {
                    let errno = io::Error::from_raw_os_error(answer.errno);
                    refused = Some(
                        if answer.seq == batch.begin_seq
                            && matches!(answer.errno, libc::EPERM | libc::EOPNOTSUPP)
                        {
                            NftError::Unavailable(errno)
                        } else {
                            NftError::Refused {
                                what: batch.describe(answer.seq),
                                detail: answer.message,
                                errno,
                            }
                        },
                    );
                }
                done |= answer.seq == batch.ack_seq;
            }
            if done {
                return refused.map_or(Ok(()), Err);
            }
        }
    }
}

fn set_option(
    socket: &OwnedFd,
    level: libc::c_int,
    option: libc::c_int,
    value: usize,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a valid c_int for the call's duration.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until `socket` has something to read, or fails at `deadline`.
fn wait_readable(socket: &OwnedFd, deadline: Instant) -> Result<(), NftError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(NftError::Timeout(APPLY_TIMEOUT));
    }
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut poll, 1, millis) } {
        0 => Err(NftError::Timeout(APPLY_TIMEOUT)),
        n if n < 0 => {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(NftError::Receive(error))
            }
        }
        _ => Ok(()),
    }
}

/// One `NLMSG_ERROR` answer: `errno` 0 is an acknowledgement.
struct Answer {
    seq: u32,
    errno: i32,
    message: Option<String>,
}

/// The `NLMSG_ERROR` answers in one datagram (other message types are skipped).
fn answers(mut bytes: &[u8]) -> impl Iterator<Item = Result<Answer, NftError>> + '_ {
    std::iter::from_fn(move || {
        while bytes.len() >= NLMSG_HDRLEN {
            let length = u32::from_ne_bytes(bytes[0..4].try_into().ok()?) as usize;
            if length < NLMSG_HDRLEN || length > bytes.len() {
                bytes = &[];
                return Some(Err(NftError::Malformed));
            }
            let message = &bytes[..length];
            bytes = &bytes[align(length).min(bytes.len())..];
            let kind = u16::from_ne_bytes([message[4], message[5]]);
            let flags = u16::from_ne_bytes([message[6], message[7]]);
            if kind != NLMSG_ERROR {
                continue;
            }
            let seq = u32::from_ne_bytes(message[8..12].try_into().ok()?);
            let Some(error) = message.get(16..20) else {
                return Some(Err(NftError::Malformed));
            };
            let errno = -i32::from_ne_bytes(error.try_into().ok()?);
            // After the error code: the request's header (all of the request when the
            // socket does not cap acknowledgements), then the extended-ack attributes.
            let message_text = (flags & NLM_F_ACK_TLVS != 0)
                .then(|| {
                    let request_length = message
                        .get(20..24)
                        .map(|l| u32::from_ne_bytes(l.try_into().unwrap_or_default()) as usize)?;
                    let echoed = if flags & (libc::NLM_F_CAPPED as u16) != 0 {
                        NLMSG_HDRLEN
                    } else {
                        align(request_length)
                    };
                    attribute(message.get(20 + echoed..)?, NLMSGERR_ATTR_MSG)
                })
                .flatten()
                .map(|text| {
                    String::from_utf8_lossy(text)
                        .trim_end_matches('\0')
                        .to_owned()
                });
            return Some(Ok(Answer {
                seq,
                errno,
                message: message_text,
            }));
        }
        None
    })
}

/// The payload of the first attribute of type `kind` in `attributes`.
fn attribute(mut attributes: &[u8], kind: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let this = u16::from_ne_bytes([attributes[2], attributes[3]]) & !NLA_F_NESTED;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if this == kind {
            return Some(&attributes[4..length]);
        }
        attributes = attributes.get(align(length)..).unwrap_or(&[]);
    }
    None
}

fn align(length: usize) -> usize {
    length.next_multiple_of(4)
}

/// One encoded transaction: its bytes, and what each sequence number was for (for errors).
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// `BATCH_BEGIN`'s sequence number (a commit failure is reported with it).
    pub begin_seq: u32,
    /// The message that asks for the acknowledgement: the last one before `BATCH_END`.
    pub ack_seq: u32,
    pub end_seq: u32,
    what: Vec<String>,
}

impl Batch {
    /// What the message with sequence number `seq` did, in nft's words.
    fn describe(&self, seq: u32) -> String {
        self.what
            .get(seq.wrapping_sub(self.begin_seq) as usize)
            .cloned()
            .unwrap_or_else(|| format!("message {seq}"))
    }
}

/// The netlink transaction that makes [`TABLE`] hold exactly `ruleset` (pure): create the
/// table (owned) and its chains if missing, delete every rule of the table, add the rules.
/// Sequence numbers start at `first_seq`. The rules are the bytecode `nft` 1.0.6 generates
/// for [`Ruleset::script`]'s lines.
pub fn encode(ruleset: &Ruleset, first_seq: u32) -> Batch {
    let mut out = Encoder {
        bytes: Vec::with_capacity(512 * (2 * ruleset.redirects.len() + 4)),
        next_seq: first_seq,
        what: Vec::new(),
        last_request: 0,
    };
    let batch_seq = out.message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        0, // AF_UNSPEC
        NFNL_SUBSYS_NFTABLES,
        "the transaction".into(),
        |_| {},
    );
    let create = NLM_F_REQUEST | NLM_F_CREATE;
    out.table_message(
        NFT_MSG_NEWTABLE,
        create,
        format!("add table ip {TABLE}"),
        |b| {
            put_str(b, NFTA_TABLE_NAME, TABLE);
            put_u32(b, NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER);
        },
    );
    for (chain, hook, priority) in CHAINS {
        out.table_message(
            NFT_MSG_NEWCHAIN,
            create,
            format!("add chain {chain}"),
            |b| {
                put_str(b, NFTA_CHAIN_TABLE, TABLE);
                put_str(b, NFTA_CHAIN_NAME, chain);
                nest(b, NFTA_CHAIN_HOOK, |b| {
                    put_u32(b, NFTA_HOOK_HOOKNUM, hook);
                    put_u32(b, NFTA_HOOK_PRIORITY, priority.cast_unsigned());
                });
                put_u32(b, NFTA_CHAIN_POLICY, NF_ACCEPT);
                put_str(b, NFTA_CHAIN_TYPE, "nat");
            },
        );
    }
    // A DELRULE naming only the table deletes every rule of every chain (`flush table`).
    out.table_message(NFT_MSG_DELRULE, NLM_F_REQUEST, "flush table".into(), |b| {
        put_str(b, NFTA_RULE_TABLE, TABLE);
    });
    let append = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND;
    for (frontend, to) in &ruleset.redirects {
        for chain in ["prerouting", "output"] {
            out.rule(
                chain,
                append,
                format!("{chain} rule {frontend} → {to}"),
                |b| {
                    match frontend {
                        Frontend::NodePort(port) => {
                            // fib daddr type local
                            expression(b, "fib", |b| {
                                put_u32(b, 1, REG_1); // NFTA_FIB_DREG
                                put_u32(b, 2, 3); // NFTA_FIB_RESULT: NFT_FIB_RESULT_ADDRTYPE
                                put_u32(b, 3, 0x2); // NFTA_FIB_FLAGS: NFTA_FIB_F_DADDR
                            });
                            compare(b, 0, &2u32.to_ne_bytes()); // RTN_LOCAL
                            tcp_destination_port(b, *port);
                        }
                        Frontend::Address(at) => {
                            ip_destination(b, *at.ip());
                            tcp_destination_port(b, at.port());
                        }
                        Frontend::AddressFrom(at, from) => {
                            ip_source(b, *from);
                            ip_destination(b, *at.ip());
                            tcp_destination_port(b, at.port());
                        }
                    }
                    // dnat to <to>
                    immediate(b, REG_1, &to.ip().octets());
                    immediate(b, REG_2, &to.port().to_be_bytes());
                    expression(b, "nat", |b| {
                        put_u32(b, 1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
                        put_u32(b, 2, u32::from(NFPROTO_IPV4)); // NFTA_NAT_FAMILY
                        put_u32(b, 3, REG_1); // NFTA_NAT_REG_ADDR_MIN
                        put_u32(b, 5, REG_2); // NFTA_NAT_REG_PROTO_MIN
                        put_u32(b, 7, 0x2); // NFTA_NAT_FLAGS: NF_NAT_RANGE_PROTO_SPECIFIED
                    });
                },
            );
        }
    }
    let flags = with_ack(&out.bytes, out.last_request);
    out.bytes[out.last_request + 6..out.last_request + 8].copy_from_slice(&flags.to_ne_bytes());
    let ack_seq = out.next_seq.wrapping_sub(1);
    let end_seq = out.message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        0,
        NFNL_SUBSYS_NFTABLES,
        "the commit".into(),
        |_| {},
    );
    Batch {
        bytes: out.bytes,
        begin_seq: batch_seq,
        ack_seq,
        end_seq,
        what: out.what,
    }
}

/// The flags of the message at `start` with `NLM_F_ACK` added.
fn with_ack(bytes: &[u8], start: usize) -> u16 {
    u16::from_ne_bytes([bytes[start + 6], bytes[start + 7]]) | NLM_F_ACK
}

struct Encoder {
    bytes: Vec<u8>,
    next_seq: u32,
    /// What each message did, by sequence number since the first.
    what: Vec<String>,
    /// Where the last nf_tables message starts (it asks for the acknowledgement).
    last_request: usize,
}

impl Encoder {
    /// Appends one message (`nlmsghdr`, `nfgenmsg`, attributes) and returns its sequence
    /// number.
    fn message(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        resource: u16,
        what: String,
        attributes: impl FnOnce(&mut Vec<u8>),
    ) -> u32 {
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        self.what.push(what);
        let start = self.bytes.len();
        self.bytes.extend([0; NLMSG_HDRLEN]);
        self.bytes.extend([family, NFNETLINK_V0]);
        self.bytes.extend(resource.to_be_bytes());
        attributes(&mut self.bytes);
        let length = u32::try_from(self.bytes.len() - start).unwrap_or(u32::MAX);
        let header = &mut self.bytes[start..start + NLMSG_HDRLEN];
        header[0..4].copy_from_slice(&length.to_ne_bytes());
        header[4..6].copy_from_slice(&kind.to_ne_bytes());
        header[6..8].copy_from_slice(&flags.to_ne_bytes());
        header[8..12].copy_from_slice(&seq.to_ne_bytes());
        // Port id 0: to the kernel.
        seq
    }

    fn table_message(
        &mut self,
        message: u16,
        flags: u16,
        what: String,
        attributes: impl FnOnce(&mut Vec<u8>),
    ) {
        self.last_request = self.bytes.len();
        self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | message,
            flags,
            NFPROTO_IPV4,
            0,
            what,
            attributes,
        );
    }

    fn rule(
        &mut self,
        chain: &str,
        flags: u16,
        what: String,
        expressions: impl FnOnce(&mut Vec<u8>),
    ) {
        self.table_message(NFT_MSG_NEWRULE, flags, what, |b| {
            put_str(b, NFTA_RULE_TABLE, TABLE);
            put_str(b, NFTA_RULE_CHAIN, chain);
            nest(b, NFTA_RULE_EXPRESSIONS, expressions);
        });
    }
}

/// Appends an attribute (`nlattr`: length without padding, type), padded to 4 bytes.
fn put(bytes: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let length = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    bytes.extend(length.to_ne_bytes());
    bytes.extend(kind.to_ne_bytes());
    bytes.extend(payload);
    bytes.resize(align(bytes.len()), 0);
}

/// A 32-bit attribute: big-endian on the wire (the kernel reads it with `ntohl`).
fn put_u32(bytes: &mut Vec<u8>, kind: u16, value: u32) {
    put(bytes, kind, &value.to_be_bytes());
}

/// A string attribute, NUL-terminated.
fn put_str(bytes: &mut Vec<u8>, kind: u16, value: &str) {
    let mut payload = Vec::with_capacity(value.len() + 1);
    payload.extend(value.as_bytes());
    payload.push(0);
    put(bytes, kind, &payload);
}

/// A nested attribute holding what `inner` appends.
fn nest(bytes: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = bytes.len();
    bytes.extend([0; 4]);
    inner(bytes);
    let length = u16::try_from(bytes.len() - start).unwrap_or(u16::MAX);
    bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    bytes[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// One expression of a rule's list: its name and its attributes.
fn expression(bytes: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    nest(bytes, NFTA_LIST_ELEM, |b| {
        put_str(b, NFTA_EXPR_NAME, name);
        nest(b, NFTA_EXPR_DATA, data);
    });
}

/// `cmp` of register 1 with `value` (`op` 0 is `NFT_CMP_EQ`, 1 `NFT_CMP_NEQ`).
fn compare(bytes: &mut Vec<u8>, op: u32, value: &[u8]) {
    expression(bytes, "cmp", |b| {
        put_u32(b, 1, REG_1); // NFTA_CMP_SREG
        put_u32(b, 2, op); // NFTA_CMP_OP
        nest(b, 3, |b| put(b, NFTA_DATA_VALUE, value)); // NFTA_CMP_DATA
    });
}

/// `payload load <length>b @ <base> + <offset> => reg 1` (base 1: network header,
/// 2: transport header).
fn load_payload(bytes: &mut Vec<u8>, base: u32, offset: u32, length: u32) {
    expression(bytes, "payload", |b| {
        put_u32(b, 1, REG_1); // NFTA_PAYLOAD_DREG
        put_u32(b, 2, base); // NFTA_PAYLOAD_BASE
        put_u32(b, 3, offset); // NFTA_PAYLOAD_OFFSET
        put_u32(b, 4, length); // NFTA_PAYLOAD_LEN
    });
}

/// `reg 1 = (reg 1 & <mask>) ^ 0`, over as many bytes as `mask` has.
fn mask(bytes: &mut Vec<u8>, mask: &[u8]) {
    let length = u32::try_from(mask.len()).expect("a short mask");
    expression(bytes, "bitwise", |b| {
        put_u32(b, 1, REG_1); // NFTA_BITWISE_SREG
        put_u32(b, 2, REG_1); // NFTA_BITWISE_DREG
        put_u32(b, 3, length); // NFTA_BITWISE_LEN
        nest(b, 4, |b| put(b, NFTA_DATA_VALUE, mask)); // NFTA_BITWISE_MASK
        nest(b, 5, |b| put(b, NFTA_DATA_VALUE, &vec![0; mask.len()])); // NFTA_BITWISE_XOR
    });
}

/// `ip saddr <range>`: the IPv4 header's source, 4 bytes at offset 12, masked to the
/// range's prefix (as nft does for a prefix that is not byte-aligned; nft loads fewer bytes
/// for a byte-aligned one, which matches the same packets and lists the same); a /32 is
/// compared without a mask.
fn ip_source(bytes: &mut Vec<u8>, range: SourceRange) {
    load_payload(bytes, 1, 12, 4);
    if range.prefix() < 32 {
        mask(bytes, &(u32::MAX << (32 - range.prefix())).to_be_bytes());
    }
    compare(bytes, 0, &range.network().octets());
}

/// `ip daddr <address>`: the IPv4 header's destination, 4 bytes at offset 16.
fn ip_destination(bytes: &mut Vec<u8>, address: Ipv4Addr) {
    load_payload(bytes, 1, 16, 4);
    compare(bytes, 0, &address.octets());
}

/// `tcp dport <port>`: `meta l4proto tcp`, then 2 bytes at offset 2 of the TCP header.
fn tcp_destination_port(bytes: &mut Vec<u8>, port: u16) {
    expression(bytes, "meta", |b| {
        put_u32(b, 1, REG_1); // NFTA_META_DREG
        put_u32(b, 2, 16); // NFTA_META_KEY: NFT_META_L4PROTO
    });
    compare(bytes, 0, &[libc::IPPROTO_TCP as u8]);
    load_payload(bytes, 2, 2, 2);
    compare(bytes, 0, &port.to_be_bytes());
}

/// `immediate reg <register> <value>`.
fn immediate(bytes: &mut Vec<u8>, register: u32, value: &[u8]) {
    expression(bytes, "immediate", |b| {
        put_u32(b, 1, register); // NFTA_IMMEDIATE_DREG
        nest(b, 2, |b| put(b, NFTA_DATA_VALUE, value)); // NFTA_IMMEDIATE_DATA
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded attribute: type (nested flag removed) and payload or children.
    #[derive(Clone, Debug, PartialEq)]
    enum Attr {
        Bytes(u16, Vec<u8>),
        Nested(u16, Vec<Attr>),
    }

    fn decode(mut bytes: &[u8]) -> Vec<Attr> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let length = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
            let kind = u16::from_ne_bytes([bytes[2], bytes[3]]);
            assert!(
                length >= 4 && length <= bytes.len(),
                "attribute length {length}"
            );
            let payload = &bytes[4..length];
            out.push(if kind & NLA_F_NESTED != 0 {
                Attr::Nested(kind & !NLA_F_NESTED, decode(payload))
            } else {
                Attr::Bytes(kind, payload.to_vec())
            });
            bytes = &bytes[align(length).min(bytes.len())..];
        }
        out
    }

    /// Each message: type, flags, sequence number, nfgenmsg family, attributes.
    fn messages(batch: &Batch) -> Vec<(u16, u16, u32, u8, Vec<Attr>)> {
        let mut out = Vec::new();
        let mut bytes = &batch.bytes[..];
        while !bytes.is_empty() {
            let length = u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize;
            assert_eq!(length % 4, 0, "messages are padded");
            let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
            let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
            let seq = u32::from_ne_bytes(bytes[8..12].try_into().unwrap());
            out.push((kind, flags, seq, bytes[16], decode(&bytes[20..length])));
            bytes = &bytes[length..];
        }
        out
    }

    fn ruleset() -> Ruleset {
        Ruleset {
            redirects: vec![
                (Frontend::NodePort(30080), "10.0.0.7:40001".parse().unwrap()),
                (
                    Frontend::Address("192.0.2.10:80".parse().unwrap()),
                    "10.0.0.7:40001".parse().unwrap(),
                ),
            ],
        }
    }

    fn value(kind: u16, bytes: &[u8]) -> Attr {
        Attr::Nested(kind, vec![Attr::Bytes(NFTA_DATA_VALUE, bytes.to_vec())])
    }

    fn be32(kind: u16, v: u32) -> Attr {
        Attr::Bytes(kind, v.to_be_bytes().to_vec())
    }

    fn string(kind: u16, s: &str) -> Attr {
        Attr::Bytes(kind, format!("{s}\0").into_bytes())
    }

    fn expressions(rule: &[Attr]) -> Vec<(String, &[Attr])> {
        let Some(Attr::Nested(NFTA_RULE_EXPRESSIONS, list)) = rule.get(2) else {
            panic!("no expressions: {rule:?}");
        };
        list.iter()
            .map(|elem| match elem {
                Attr::Nested(NFTA_LIST_ELEM, e) => match &e[..] {
                    [
                        Attr::Bytes(NFTA_EXPR_NAME, name),
                        Attr::Nested(NFTA_EXPR_DATA, data),
                    ] => (
                        String::from_utf8(name.clone())
                            .unwrap()
                            .trim_end_matches('\0')
                            .to_owned(),
                        &data[..],
                    ),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_transaction_creates_an_owned_table_flushes_it_and_acknowledges_only_its_last_rule() {
        let batch = encode(&ruleset(), 7);
        let messages = messages(&batch);
        let kinds: Vec<u16> = messages.iter().map(|m| m.0).collect();
        let table = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        assert_eq!(
            kinds,
            [
                vec![NFNL_MSG_BATCH_BEGIN, table(NFT_MSG_NEWTABLE)],
                vec![table(NFT_MSG_NEWCHAIN); 2],
                vec![table(NFT_MSG_DELRULE)],
                vec![table(NFT_MSG_NEWRULE); 4], // 2 frontends × 2 chains
                vec![NFNL_MSG_BATCH_END],
            ]
            .concat()
        );
        let seqs: Vec<u32> = messages.iter().map(|m| m.2).collect();
        assert_eq!(seqs, (7..17).collect::<Vec<_>>());
        assert_eq!((batch.begin_seq, batch.ack_seq, batch.end_seq), (7, 15, 16));
        let acked: Vec<u32> = messages
            .iter()
            .filter(|m| m.1 & NLM_F_ACK != 0)
            .map(|m| m.2)
            .collect();
        assert_eq!(acked, [15], "one acknowledgement, not BATCH_END's");
        // The batch messages address the nftables subsystem; the rest are family ip.
        assert_eq!(&batch.bytes[18..20], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
        assert!(messages[1..9].iter().all(|m| m.3 == NFPROTO_IPV4));
        assert_eq!(
            messages[1].4,
            [
                string(NFTA_TABLE_NAME, TABLE),
                be32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER)
            ]
        );
        assert_eq!(
            messages[2].4,
            [
                string(NFTA_CHAIN_TABLE, TABLE),
                string(NFTA_CHAIN_NAME, "prerouting"),
                Attr::Nested(
                    NFTA_CHAIN_HOOK,
                    vec![
                        be32(NFTA_HOOK_HOOKNUM, 0),
                        be32(NFTA_HOOK_PRIORITY, (-110i32).cast_unsigned())
                    ]
                ),
                be32(NFTA_CHAIN_POLICY, NF_ACCEPT),
                string(NFTA_CHAIN_TYPE, "nat"),
            ]
        );
        assert_eq!(messages[4].4, [string(NFTA_RULE_TABLE, TABLE)], "flush");
        assert_eq!(batch.describe(10), "add chain output");
        assert_eq!(batch.describe(11), "flush table");
        assert_eq!(batch.describe(99), "message 99");
    }

    #[test]
    fn a_node_port_rule_is_nfts_bytecode_for_fib_local_tcp_dport_dnat() {
        let batch = encode(&ruleset(), 1);
        let messages = messages(&batch);
        let rule = &messages[5].4;
        assert_eq!(
            rule[..2],
            [
                string(NFTA_RULE_TABLE, TABLE),
                string(NFTA_RULE_CHAIN, "prerouting")
            ]
        );
        let exprs = expressions(rule);
        let names: Vec<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "fib",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "immediate",
                "immediate",
                "nat"
            ]
        );
        assert_eq!(exprs[0].1, [be32(1, 1), be32(2, 3), be32(3, 2)]);
        assert_eq!(
            exprs[1].1,
            [be32(1, 1), be32(2, 0), value(3, &2u32.to_ne_bytes())]
        );
        assert_eq!(exprs[3].1[2], value(3, &[6]));
        assert_eq!(exprs[4].1, [be32(1, 1), be32(2, 2), be32(3, 2), be32(4, 2)]);
        assert_eq!(exprs[5].1[2], value(3, &30080u16.to_be_bytes()));
        assert_eq!(exprs[6].1, [be32(1, 1), value(2, &[10, 0, 0, 7])]);
        assert_eq!(exprs[7].1, [be32(1, 2), value(2, &40001u16.to_be_bytes())]);
        assert_eq!(
            exprs[8].1,
            [be32(1, 1), be32(2, 2), be32(3, 1), be32(5, 2), be32(7, 2)]
        );
        // The same rule in `output`, then the ingress rule: ip daddr first.
        assert_eq!(expressions(&messages[6].4), exprs);
        let ingress = expressions(&messages[7].4);
        assert_eq!(
            ingress[0].1,
            [be32(1, 1), be32(2, 1), be32(3, 16), be32(4, 4)]
        );
        assert_eq!(ingress[1].1[2], value(3, &[192, 0, 2, 10]));
        assert_eq!(ingress[5].1[2], value(3, &80u16.to_be_bytes()));
    }

    /// nft 1.0.6 for `ip saddr 172.16.0.0/12 ip daddr 192.0.2.10 tcp dport 80`: `payload
    /// load 4b @ network header + 12`, `bitwise reg 1 = (reg 1 & 0x0000f0ff) ^ 0`, `cmp eq
    /// 0x000010ac`, then the destination; a /32 source is compared without a mask.
    #[test]
    fn a_source_range_is_a_masked_compare_of_the_source_address_before_the_destination() {
        let from = |range: &str| {
            let rules = Ruleset {
                redirects: vec![(
                    Frontend::AddressFrom(
                        "192.0.2.10:80".parse().unwrap(),
                        SourceRange::of(range.parse().unwrap()).unwrap(),
                    ),
                    "10.0.0.7:40001".parse().unwrap(),
                )],
            };
            let messages = messages(&encode(&rules, 1));
            expressions(&messages[5].4)
                .into_iter()
                .map(|(name, attrs)| (name, attrs.to_vec()))
                .collect::<Vec<_>>()
        };
        let exprs = from("172.16.0.0/12");
        let names: Vec<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..5], ["payload", "bitwise", "cmp", "payload", "cmp"]);
        assert_eq!(
            exprs[0].1,
            [be32(1, 1), be32(2, 1), be32(3, 12), be32(4, 4)]
        );
        assert_eq!(
            exprs[1].1,
            [
                be32(1, 1),
                be32(2, 1),
                be32(3, 4),
                value(4, &[255, 240, 0, 0]),
                value(5, &[0, 0, 0, 0])
            ]
        );
        assert_eq!(exprs[2].1[2], value(3, &[172, 16, 0, 0]));
        assert_eq!(exprs[4].1[2], value(3, &[192, 0, 2, 10]));
        let single = from("198.51.100.7/32");
        let names: Vec<&str> = single.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..4], ["payload", "cmp", "payload", "cmp"]);
        assert_eq!(single[1].1[2], value(3, &[198, 51, 100, 7]));
    }

    #[test]
    fn an_empty_ruleset_still_makes_the_table_and_asks_for_the_flush_to_be_acknowledged() {
        let batch = encode(&Ruleset::default(), 1);
        let messages = messages(&batch);
        assert_eq!(messages.len(), 6);
        assert_eq!(batch.ack_seq, 5);
        assert_ne!(messages[4].1 & NLM_F_ACK, 0, "the flush asks");
    }

    /// An answer datagram as the kernel builds it: an acknowledgement (capped, no text) and
    /// a refusal with an extended-ack message, then a non-error message.
    #[test]
    fn answers_are_read_with_their_sequence_number_errno_and_message() {
        let mut datagram = Vec::new();
        let mut push = |seq: u32, error: i32, flags: u16, tail: &[u8]| {
            let mut body = Vec::new();
            body.extend(error.to_ne_bytes());
            body.extend(40u32.to_ne_bytes()); // the request's length
            body.extend([0u8; 12]);
            body.extend(tail);
            let length = (NLMSG_HDRLEN + body.len()) as u32;
            datagram.extend(length.to_ne_bytes());
            datagram.extend(NLMSG_ERROR.to_ne_bytes());
            datagram.extend(flags.to_ne_bytes());
            datagram.extend(seq.to_ne_bytes());
            datagram.extend(0u32.to_ne_bytes());
            datagram.extend(body);
            datagram.resize(align(datagram.len()), 0);
        };
        push(5, 0, libc::NLM_F_CAPPED as u16, &[]);
        let mut tlv = Vec::new();
        put_str(&mut tlv, NLMSGERR_ATTR_MSG, "Operation not permitted");
        push(
            6,
            -libc::EPERM,
            libc::NLM_F_CAPPED as u16 | NLM_F_ACK_TLVS,
            &tlv,
        );
        datagram.extend(16u32.to_ne_bytes());
        datagram.extend(3u16.to_ne_bytes()); // NLMSG_DONE
        datagram.extend([0u8; 10]);
        let got: Vec<Answer> = answers(&datagram).map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].seq, got[0].errno, got[0].message.as_deref()),
            (5, 0, None)
        );
        assert_eq!(
            (got[1].seq, got[1].errno, got[1].message.as_deref()),
            (6, libc::EPERM, Some("Operation not permitted"))
        );
        let truncated = &datagram[..datagram.len() - 30];
        assert!(
            answers(truncated).any(|a| a.is_err()),
            "a cut message is malformed"
        );
    }
}
