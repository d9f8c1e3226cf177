//! `localDNS` where systemd-resolved runs the workstation's DNS (`/etc/resolv.conf` is its
//! `stub-resolv.conf`, the usual link on Ubuntu and Fedora): ktctl's resolver is given to
//! resolved for the link `kt0` only (`resolvectl`), so that resolved sends kt the cluster's
//! names and nothing else, and ktctl never writes `/etc/resolv.conf` — resolved's own file,
//! which it rewrites at will. When ktctl ends, even by `kill -9`, the kernel removes `kt0`
//! and resolved forgets what was set on it: nothing is left to repair.
//!
//! Which names reach kt ([`link_domains`]): the pod search domains (`<ns>.svc.<domain>`,
//! `svc.<domain>`, `<domain>`, as a pod's resolv.conf lists them) — resolved writes them
//! into `stub-resolv.conf`, so glibc completes `web` with them, as resolved does for its own
//! clients, and every name under them goes to `kt0` — and routing-only domains for the
//! other names [`super::plan::cluster_name`] takes for the cluster's: `~svc`, one
//! `~<namespace>` per namespace (`db.other`), and each `--ingressIp` host. A namespace named
//! like a top-level domain (`dev`) so sends that domain's names to kt too; kt's resolver
//! answers them from the upstream once the cluster says NXDOMAIN, as Telepresence's does.
//! resolved takes at most [`MAX_DOMAINS`] domains per link: past that, namespaces are left
//! out (said once), and their `svc.ns` names do not resolve (full names still do).
//!
//! The server is `kt0`'s own address, port 53 ([`super::tun::DEVICE_ADDRESS`]): resolved
//! sends a link's queries out through that link, and the kernel delivers a packet for the
//! link's own address locally all the same; a loopback address works only on some systemd
//! versions (systemd issues 23010, 25397), and a port other than 53 needs systemd 246.
//!
//! Why `resolvectl` and not D-Bus: it ships wherever resolved does (Debian's
//! systemd-resolved package, Ubuntu's systemd), and it spares ktctl a D-Bus client.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use super::system::{self, SystemError};

/// resolved's stub listener: where its `stub-resolv.conf` points, and where ktctl checks
/// that resolved sends the cluster's names to kt.
pub(super) const STUB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);
/// The file resolved keeps with its stub and every link's search domains.
const STUB_RESOLV_CONF: &str = "/run/systemd/resolve/stub-resolv.conf";
/// The most domains resolved takes for one link (`LINK_SEARCH_DOMAINS_MAX`, systemd's
/// resolved-link.h).
pub(super) const MAX_DOMAINS: usize = 256;
/// How long one `resolvectl` call may take (it waits for resolved on the system bus).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `resolv_conf` is resolved's `stub-resolv.conf` itself (through a link or a bind
/// mount: the same file): only then do programs ask resolved's stub with the search domains
/// resolved keeps. A copy naming 127.0.0.53 is the machine's own file, rewritten as v0.3.7
/// does.
#[cfg(unix)]
pub(super) fn is_resolveds_stub_file(resolv_conf: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (
        std::fs::metadata(resolv_conf),
        std::fs::metadata(STUB_RESOLV_CONF),
    ) {
        (Ok(ours), Ok(stub)) => ours.dev() == stub.dev() && ours.ino() == stub.ino(),
        _ => false,
    }
}

/// systemd-resolved runs on Linux only (connect too, for now).
#[cfg(not(unix))]
pub(super) fn is_resolveds_stub_file(_resolv_conf: &Path) -> bool {
    false
}

/// The domains set on `kt0`, in `resolvectl domain` syntax (`~` marks a routing-only
/// domain): the pod search domains of `namespace`, `~svc`, `~<namespace>`, then one
/// routing domain per Ingress host (a wildcard host `*.a.b` routes `a.b`) and per other
/// namespace, sorted, without duplicates, at most [`MAX_DOMAINS`] in all. Also how many
/// namespaces were left out for that bound.
pub(super) fn link_domains(
    namespace: &str,
    cluster_domain: &str,
    namespaces: &BTreeSet<String>,
    ingress_hosts: &BTreeSet<String>,
) -> (Vec<String>, usize) {
    let domain = cluster_domain.trim_matches('.');
    let mut domains = vec![
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.to_owned(),
        "~svc".to_owned(),
        format!("~{namespace}"),
    ];
    let routed = |name: &str| format!("~{}", name.trim_matches('.'));
    let hosts: BTreeSet<String> = ingress_hosts
        .iter()
        .map(|h| h.strip_prefix("*.").unwrap_or(h))
        .filter(|h| !h.trim_matches('.').is_empty())
        .map(routed)
        .filter(|d| !domains.contains(d))
        .collect();
    domains.extend(hosts);
    let others: Vec<String> = namespaces
        .iter()
        .map(|n| routed(n))
        .filter(|d| !domains.contains(d))
        .collect();
    let room = MAX_DOMAINS.saturating_sub(domains.len());
    let left_out = others.len().saturating_sub(room);
    domains.extend(others.into_iter().take(room));
    domains.truncate(MAX_DOMAINS);
    (domains, left_out)
}

/// `resolvectl ARGS…`, within [`CALL_TIMEOUT`].
async fn resolvectl(args: &[&str]) -> Result<(), SystemError> {
    system::run_within("resolvectl", args, CALL_TIMEOUT).await
}

/// Whether resolved runs and answers `resolvectl` (on the system bus); the reason when not.
pub(super) async fn reachable() -> Result<(), SystemError> {
    resolvectl(&["status", "--no-pager"]).await
}

/// Makes `server` (an address, port 53) the DNS server of `device` for `domains`, and of
/// nothing else: never the default route, no LLMNR or mDNS, plain DNS without DNSSEC (the
/// cluster's zone is not signed). The server is set last, so that no query reaches it
/// before the rest holds.
pub(super) async fn install(
    device: &str,
    server: IpAddr,
    domains: &[String],
) -> Result<(), SystemError> {
    for (setting, value) in [
        ("default-route", "false"),
        ("llmnr", "no"),
        ("mdns", "no"),
        ("dnssec", "no"),
        ("dnsovertls", "no"),
    ] {
        resolvectl(&[setting, device, value]).await?;
    }
    set_domains(device, domains).await?;
    resolvectl(&["dns", device, &server.to_string()]).await
}

/// Replaces the domains of `device` with `domains`.
pub(super) async fn set_domains(device: &str, domains: &[String]) -> Result<(), SystemError> {
    let mut args = vec!["domain", device];
    args.extend(domains.iter().map(String::as_str));
    resolvectl(&args).await
}

/// Whether resolved still has `server` as a DNS server of `device` (another network manager
/// may have set the link's DNS since).
pub(super) async fn still_set(device: &str, server: IpAddr) -> Result<bool, SystemError> {
    let out = system::output_within("resolvectl", &["dns", device], CALL_TIMEOUT).await?;
    Ok(out
        .split_whitespace()
        .any(|word| word.parse::<IpAddr>().ok() == Some(server)))
}

/// Takes back everything set on `device` (done by the kernel too when the device goes).
pub(super) async fn revert(device: &str) -> Result<(), SystemError> {
    resolvectl(&["revert", device]).await
}

/// Tells NetworkManager, when it runs, to leave `device` alone: it may otherwise take the
/// new link over and set its DNS empty. Best effort: most machines do not run it.
pub(super) async fn unmanage(device: &str) {
    if let Err(error) = system::run_within(
        "nmcli",
        &["device", "set", device, "managed", "no"],
        CALL_TIMEOUT,
    )
    .await
    {
        tracing::debug!(%error, device, "NetworkManager not told to leave the device alone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_link_gets_the_pod_search_domains_and_routes_the_other_cluster_names() {
        let (domains, left_out) = link_domains(
            "dev",
            "cluster.local.",
            &set(&["default", "other", "dev"]),
            &set(&["app.example.test", "*.wild.example.test", "*."]),
        );
        assert_eq!(
            domains,
            [
                "dev.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "~svc",
                "~dev",
                "~app.example.test",
                "~wild.example.test",
                "~default",
                "~other",
            ]
        );
        assert_eq!(left_out, 0);
        // Namespaces not listable (the kt-developer role): the current one still routes.
        let (domains, _) = link_domains("team-a", "corp.k8s", &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(
            domains,
            [
                "team-a.svc.corp.k8s",
                "svc.corp.k8s",
                "corp.k8s",
                "~svc",
                "~team-a"
            ]
        );
    }

    #[test]
    fn past_resolveds_bound_namespaces_are_left_out_and_counted_never_the_current_one() {
        let namespaces: BTreeSet<String> = (0..300).map(|i| format!("ns-{i:03}")).collect();
        let (domains, left_out) =
            link_domains("ns-299", "cluster.local", &namespaces, &set(&["a.test"]));
        assert_eq!(domains.len(), MAX_DOMAINS);
        assert!(domains.contains(&"~ns-299".to_owned()));
        assert!(domains.contains(&"~a.test".to_owned()));
        // 6 fixed and host domains, 250 other namespaces: 49 of the 299 left out.
        assert_eq!(left_out, 299 - (MAX_DOMAINS - 6));
    }
}
