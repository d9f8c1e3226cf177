//! The pure part of `connect`: its flags validated (v0.3.7's rules and texts), the routes
//! into the tunnel, and which names are the cluster's.

use std::{collections::BTreeSet, net::IpAddr};

use kt_proto::net::{Cidr, CidrError};

use crate::args::ConnectArgs;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid --mode '{0}', should be tun2socks or sshuttle")]
    Mode(String),
    #[error("invalid --dnsMode '{0}', should be localDNS[:order], podDNS or hosts[:namespace,...]")]
    DnsMode(String),
    /// v0.3.7's text.
    #[error("dns mode 'podDNS' is not available for connect mode 'tun2socks'")]
    PodDnsWithTun,
    #[error("invalid {flag} '{value}'")]
    Range {
        flag: &'static str,
        value: String,
        #[source]
        source: CidrError,
    },
    /// v0.3.7's text.
    #[error("Includes single IP '{0}' is not allow in tun2socks mode")]
    SingleIp(String),
    #[error("invalid --ingressIp '{0}'")]
    IngressIp(String),
    #[error("invalid --proxyAddr '{0}'")]
    ProxyAddr(String),
    #[error("--proxyAddr is for the socks5 proxy without tun device: give --disableTunDevice too")]
    ProxyAddrWithTun,
    #[error("--{0} is for tun2socks mode")]
    TunOnly(&'static str),
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A TUN device (or, with `--disableTunDevice`, a SOCKS5 proxy) carried over SSH.
    Tun2socks,
    /// The system's `sshuttle` over the shadow's SSH.
    Sshuttle,
}

/// Where a `localDNS` answer comes from, in the order given (`localDNS:<a>,<b>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsSource {
    /// The cluster DNS, through the tunnel.
    Cluster,
    /// The resolver this machine had before.
    Upstream,
    /// A server of the user's (`IP`, `IP:PORT`, `tcp:IP:PORT`, `udp:IP:PORT`).
    Server {
        address: std::net::SocketAddr,
        tcp: bool,
    },
}

/// `--dnsMode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// A resolver on this machine answers cluster names.
    Local { order: Vec<DnsSource> },
    /// (sshuttle) The system resolver asks the shadow pod.
    Pod,
    /// Service names written into `/etc/hosts`, for these namespaces (the current one when
    /// none is given).
    Hosts { namespaces: Vec<String> },
}

/// `connect`'s flags, validated.
#[derive(Clone, Debug)]
pub struct ConnectPlan {
    pub mode: Mode,
    pub dns: DnsMode,
    pub include: Vec<Cidr>,
    pub exclude: Vec<Cidr>,
    pub ingress_ip: Option<IpAddr>,
    pub proxy: std::net::SocketAddr,
}

/// v0.3.7's default `--proxyAddr`.
const DEFAULT_PROXY_ADDR: &str = "127.0.0.1";

impl ConnectPlan {
    /// Validates the flags, as v0.3.7 does (and where it did not, clearly).
    pub fn from_args(args: &ConnectArgs) -> Result<Self, PlanError> {
        let mode = match args.mode.as_str() {
            "tun2socks" => Mode::Tun2socks,
            "sshuttle" => Mode::Sshuttle,
            other => return Err(PlanError::Mode(other.to_owned())),
        };
        let dns = parse_dns_mode(&args.dns_mode)?;
        if mode == Mode::Tun2socks && dns == DnsMode::Pod {
            return Err(PlanError::PodDnsWithTun);
        }
        let include = parse_ranges("--includeIps", &args.include_ips)?;
        if mode == Mode::Tun2socks
            && let Some(single) = include
                .iter()
                .find(|c| c.prefix() == if c.network().is_ipv4() { 32 } else { 128 })
        {
            return Err(PlanError::SingleIp(single.network().to_string()));
        }
        let exclude = parse_ranges("--excludeIps", &args.exclude_ips)?;
        let ingress_ip = (!args.ingress_ip.is_empty())
            .then(|| args.ingress_ip.parse())
            .transpose()
            .map_err(|_| PlanError::IngressIp(args.ingress_ip.clone()))?;
        let proxy_ip: IpAddr = args
            .proxy_addr
            .parse()
            .map_err(|_| PlanError::ProxyAddr(args.proxy_addr.clone()))?;
        if args.proxy_addr != DEFAULT_PROXY_ADDR && !args.disable_tun_device {
            return Err(PlanError::ProxyAddrWithTun);
        }
        if mode == Mode::Sshuttle {
            for (flag, given) in [
                ("disableTunDevice", args.disable_tun_device),
                ("disableTunRoute", args.disable_tun_route),
            ] {
                if given {
                    return Err(PlanError::TunOnly(flag));
                }
            }
        }
        Ok(Self {
            mode,
            dns,
            include,
            exclude,
            ingress_ip,
            proxy: std::net::SocketAddr::new(proxy_ip, args.proxy_port),
        })
    }
}

/// `localDNS[:order]`, `podDNS` or `hosts[:ns,...]`.
pub fn parse_dns_mode(text: &str) -> Result<DnsMode, PlanError> {
    let bad = || PlanError::DnsMode(text.to_owned());
    let (mode, rest) = match text.split_once(':') {
        Some((mode, rest)) => (mode, Some(rest)),
        None => (text, None),
    };
    let items = |rest: &str| -> Vec<String> {
        rest.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match (mode, rest) {
        ("localDNS", None) => Ok(DnsMode::Local {
            order: vec![DnsSource::Cluster, DnsSource::Upstream],
        }),
        ("localDNS", Some(rest)) => {
            let order = items(rest)
                .iter()
                .map(|item| parse_dns_source(item).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()?;
            if order.is_empty() {
                return Err(bad());
            }
            Ok(DnsMode::Local { order })
        }
        ("podDNS", None) => Ok(DnsMode::Pod),
        ("hosts", rest) => Ok(DnsMode::Hosts {
            namespaces: rest.map(items).unwrap_or_default(),
        }),
        _ => Err(bad()),
    }
}

fn parse_dns_source(item: &str) -> Option<DnsSource> {
    match item {
        "cluster" => return Some(DnsSource::Cluster),
        "upstream" => return Some(DnsSource::Upstream),
        _ => {}
    }
    let (tcp, address) = match item.split_once(':') {
        Some(("tcp", rest)) => (true, rest),
        Some(("udp", rest)) => (false, rest),
        _ => (false, item),
    };
    let address = address
        .parse::<std::net::SocketAddr>()
        .ok()
        .or_else(|| Some(std::net::SocketAddr::new(address.parse().ok()?, 53)))?;
    Some(DnsSource::Server { address, tcp })
}

/// A comma-separated list of ranges; a single address is a /32 (or /128).
pub fn parse_ranges(flag: &'static str, text: &str) -> Result<Vec<Cidr>, PlanError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let parsed = if item.contains('/') {
                item.parse::<Cidr>()
            } else {
                item.parse::<IpAddr>()
                    .map(|ip| Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 }))
                    .map_err(|_| item.parse::<Cidr>().unwrap_err())
            };
            parsed.map_err(|source| PlanError::Range {
                flag,
                value: item.to_owned(),
                source,
            })
        })
        .collect()
}

/// The routes into the tunnel: the cluster's ranges and `include`, without `exclude` and
/// without `keep_out` — the addresses the tunnel itself travels to (the API server, the SSH
/// peer), which routing into the tunnel would loop. Sorted, overlaps merged away.
pub fn routes(
    cluster: &[Cidr],
    include: &[Cidr],
    exclude: &[Cidr],
    keep_out: &[IpAddr],
) -> Vec<Cidr> {
    let mut wanted: Vec<Cidr> = cluster.iter().chain(include).copied().collect();
    let holes = exclude.iter().copied().chain(
        keep_out
            .iter()
            .map(|ip| Cidr::new(*ip, if ip.is_ipv4() { 32 } else { 128 })),
    );
    for hole in holes {
        wanted = wanted
            .into_iter()
            .flat_map(|range| subtract(range, hole))
            .collect();
    }
    // Drop ranges another one holds.
    let unique: BTreeSet<Cidr> = wanted.iter().copied().collect();
    unique
        .iter()
        .filter(|c| {
            !unique.iter().any(|other| {
                other != *c && other.prefix() < c.prefix() && other.contains(c.network())
            })
        })
        .copied()
        .collect()
}

/// `range` without `hole`: itself, nothing, or the halves around the hole, split down to it.
fn subtract(range: Cidr, hole: Cidr) -> Vec<Cidr> {
    let max = if range.network().is_ipv4() { 32 } else { 128 };
    if !range.overlaps(&hole) {
        return vec![range];
    }
    if hole.prefix() <= range.prefix() {
        return Vec::new();
    }
    let (low, high) = range.halves();
    let mut out = subtract(low, hole);
    out.extend(subtract(high, hole));
    debug_assert!(range.prefix() < max);
    out
}

/// The name to ask the cluster DNS for, when `asked` may be a cluster name: names in
/// `cluster_domain`, `*.svc`, and short names (one or two labels: a Service of `namespace`,
/// or `svc.ns`), after the workstation's own search domains are taken off. `None`: not the
/// cluster's (ask the upstream).
pub fn cluster_name(
    asked: &str,
    namespace: &str,
    cluster_domain: &str,
    local_domains: &[String],
) -> Option<String> {
    let mut name = asked.trim_end_matches('.').to_ascii_lowercase();
    let domain = cluster_domain.trim_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return None;
    }
    if name == domain || name.ends_with(&format!(".{domain}")) {
        return Some(name);
    }
    for local in local_domains {
        let local = local.trim_matches('.').to_ascii_lowercase();
        if let Some(stripped) = name.strip_suffix(&format!(".{local}")) {
            name = stripped.to_owned();
            break;
        }
    }
    if name.ends_with(".svc") {
        return Some(format!("{name}.{domain}"));
    }
    match name.split('.').count() {
        1 => Some(format!("{name}.{namespace}.svc.{domain}")),
        2 => Some(format!("{name}.svc.{domain}")),
        _ => None,
    }
}

/// The `/etc/hosts` block ktctl writes (v0.3.7's markers).
pub const HOSTS_BEGIN: &str = "# Kt Hosts Begin";
pub const HOSTS_END: &str = "# Kt Hosts End";

/// `hosts` with ktctl's block replaced by `entries` (name, address), or removed when empty.
pub fn with_hosts_block(hosts: &str, entries: &[(String, IpAddr)]) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in hosts.lines() {
        match line.trim() {
            HOSTS_BEGIN => inside = true,
            HOSTS_END => inside = false,
            _ if !inside => {
                out.push_str(line);
                out.push('\n');
            }
            _ => {}
        }
    }
    if !entries.is_empty() {
        out.push_str(HOSTS_BEGIN);
        out.push('\n');
        for (name, address) in entries {
            out.push_str(&format!("{address} {name}\n"));
        }
        out.push_str(HOSTS_END);
        out.push('\n');
    }
    out
}

/// v0.3.7's marks on the lines of `/etc/resolv.conf` it changes.
const REMOVED: &str = " # Removed by KtConnect";
const ADDED: &str = " # Added by KtConnect";

/// `resolv.conf` pointed at `server` (v0.3.7's way): every `nameserver` line commented out
/// and marked, ktctl's own first. A file ktctl already changed is restored first, so changes
/// never stack.
pub fn resolv_conf_with(resolv_conf: &str, server: IpAddr) -> String {
    let original = resolv_conf_restored(resolv_conf);
    let mut out = format!("nameserver {server}{ADDED}\n");
    for line in original.lines() {
        if line.trim_start().starts_with("nameserver") {
            out.push_str(&format!("#{line}{REMOVED}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `resolv.conf` without ktctl's changes.
pub fn resolv_conf_restored(resolv_conf: &str) -> String {
    let mut out = String::new();
    for line in resolv_conf.lines() {
        if line.ends_with(ADDED) {
            continue;
        }
        match line.strip_suffix(REMOVED) {
            Some(removed) => out.push_str(removed.strip_prefix('#').unwrap_or(removed)),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether ktctl's changes are in `text` (a resolv.conf or hosts file): a killed connect
/// left them, and the next one restores them first.
pub fn has_kt_changes(text: &str) -> bool {
    text.lines()
        .any(|l| l.ends_with(ADDED) || l.ends_with(REMOVED) || l.trim() == HOSTS_BEGIN)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    fn plan(args: &[&str]) -> Result<ConnectPlan, PlanError> {
        let cli = Cli::try_parse_from(["ktctl", "connect"].iter().chain(args)).unwrap();
        let Some(Command::Connect(args)) = cli.command else {
            unreachable!()
        };
        ConnectPlan::from_args(&args)
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn flags_are_validated_with_v0_3_7_texts() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.mode, Mode::Tun2socks);
        assert_eq!(
            p.dns,
            DnsMode::Local {
                order: vec![DnsSource::Cluster, DnsSource::Upstream]
            }
        );
        let err = |args: &[&str]| plan(args).unwrap_err().to_string();
        assert_eq!(
            err(&["--dnsMode", "podDNS"]),
            "dns mode 'podDNS' is not available for connect mode 'tun2socks'"
        );
        assert_eq!(
            err(&["--includeIps", "10.1.2.3"]),
            "Includes single IP '10.1.2.3' is not allow in tun2socks mode"
        );
        assert_eq!(
            err(&["--dnsMode", "magic"]),
            "invalid --dnsMode 'magic', should be localDNS[:order], podDNS or hosts[:namespace,...]"
        );
        assert!(
            err(&["--excludeIps", "10.0.0.0/40"]).starts_with("invalid --excludeIps '10.0.0.0/40'")
        );
        assert!(err(&["--mode", "vpn"]).contains("'vpn'"));
        assert!(err(&["--proxyAddr", "0.0.0.0"]).contains("--disableTunDevice"));
        assert!(plan(&["--proxyAddr", "0.0.0.0", "--disableTunDevice"]).is_ok());
        assert!(
            plan(&[
                "--mode",
                "sshuttle",
                "--dnsMode",
                "podDNS",
                "--includeIps",
                "10.1.2.3"
            ])
            .is_ok()
        );
    }

    #[test]
    fn dns_modes_parse() {
        assert_eq!(
            parse_dns_mode("hosts:default,dev").unwrap(),
            DnsMode::Hosts {
                namespaces: vec!["default".into(), "dev".into()]
            }
        );
        assert_eq!(
            parse_dns_mode("localDNS:upstream,tcp:10.0.0.2:5353,8.8.8.8").unwrap(),
            DnsMode::Local {
                order: vec![
                    DnsSource::Upstream,
                    DnsSource::Server {
                        address: "10.0.0.2:5353".parse().unwrap(),
                        tcp: true
                    },
                    DnsSource::Server {
                        address: "8.8.8.8:53".parse().unwrap(),
                        tcp: false
                    },
                ]
            }
        );
        for bad in ["localDNS:", "localDNS:nowhere", "podDNS:x", "local"] {
            assert!(parse_dns_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_leave_out_excluded_ranges_and_the_tunnels_own_path() {
        let cluster = [
            cidr("10.244.0.0/16"),
            cidr("10.96.0.0/12"),
            cidr("10.244.1.0/24"),
        ];
        let r = routes(
            &cluster,
            &[cidr("172.20.0.0/16")],
            &[cidr("10.244.128.0/17")],
            &[],
        );
        let shown: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.96.0.0/12", "10.244.0.0/17", "172.20.0.0/16"]);
        // The SSH peer inside a pod range gets a hole of its own.
        let r = routes(
            &[cidr("10.244.2.0/30")],
            &[],
            &[],
            &["10.244.2.1".parse().unwrap()],
        );
        let shown: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.244.2.0/32", "10.244.2.2/31"]);
    }

    #[test]
    fn cluster_names_are_told_from_the_rest() {
        let ask = |n: &str| cluster_name(n, "dev", "cluster.local", &["corp.example".to_owned()]);
        assert_eq!(ask("web").as_deref(), Some("web.dev.svc.cluster.local"));
        assert_eq!(
            ask("web.corp.example.").as_deref(),
            Some("web.dev.svc.cluster.local")
        );
        assert_eq!(
            ask("web.other").as_deref(),
            Some("web.other.svc.cluster.local")
        );
        assert_eq!(
            ask("web.other.svc").as_deref(),
            Some("web.other.svc.cluster.local")
        );
        assert_eq!(
            ask("WEB-0.Peers.dev.svc.cluster.local").as_deref(),
            Some("web-0.peers.dev.svc.cluster.local")
        );
        assert_eq!(ask("www.example.org"), None);
        assert_eq!(ask(""), None);
    }

    #[test]
    fn the_hosts_block_is_replaced_and_removed() {
        let hosts = "127.0.0.1 localhost\n";
        let ip: IpAddr = "10.96.0.5".parse().unwrap();
        let with = with_hosts_block(hosts, &[("web".into(), ip), ("web.dev".into(), ip)]);
        assert_eq!(
            with,
            "127.0.0.1 localhost\n# Kt Hosts Begin\n10.96.0.5 web\n10.96.0.5 web.dev\n# Kt Hosts End\n"
        );
        assert_eq!(
            with_hosts_block(&with, &[("db".into(), ip)])
                .matches(HOSTS_BEGIN)
                .count(),
            1
        );
        assert_eq!(with_hosts_block(&with, &[]), hosts);
        assert!(has_kt_changes(&with) && !has_kt_changes(hosts));
    }

    #[test]
    fn resolv_conf_changes_are_marked_restorable_and_never_stack() {
        let original = "search corp.example\nnameserver 172.30.0.53\noptions ndots:2\n";
        let ip: IpAddr = "127.0.0.153".parse().unwrap();
        let changed = resolv_conf_with(original, ip);
        assert_eq!(
            changed,
            "nameserver 127.0.0.153 # Added by KtConnect\nsearch corp.example\n#nameserver 172.30.0.53 # Removed by KtConnect\noptions ndots:2\n"
        );
        assert_eq!(resolv_conf_restored(&changed), original);
        assert_eq!(
            resolv_conf_with(&changed, ip),
            changed,
            "a second connect does not stack"
        );
        assert!(has_kt_changes(&changed));
    }
}
