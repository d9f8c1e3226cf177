//! kube-proxy in nftables mode, one table per node, rewritten atomically whenever Services
//! or EndpointSlices change: ClusterIP and NodePort DNAT to ready endpoints chosen at
//! random, SNAT for hairpin and NodePort traffic, and a reject for services without
//! endpoints.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::api::store::Store;

const TABLE: &str = "kt_proxy";
/// Marks packets that need SNAT to the node (hairpin, NodePort from outside).
const MARK: &str = "0x4000";

/// One service port with its ready endpoints.
#[derive(Debug, PartialEq, Eq)]
struct Frontend {
    cluster_ip: Option<Ipv4Addr>,
    node_port: Option<u16>,
    port: u16,
    proto: String,
    endpoints: Vec<(Ipv4Addr, u16)>,
}

fn frontends(services: &[Value], slices: &[Value]) -> Vec<Frontend> {
    // Slices by (namespace, Service): one lookup per Service, not a scan of every slice.
    let mut by_service: HashMap<(&str, &str), Vec<&Value>> = HashMap::new();
    for slice in slices {
        let ns = slice["metadata"]["namespace"].as_str().unwrap_or_default();
        if let Some(service) = slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str() {
            by_service.entry((ns, service)).or_default().push(slice);
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let cluster_ip = svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|s| s.parse().ok());
        let svc_slices = by_service
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
            let port_name = port["name"].as_str().unwrap_or_default();
            let protocol = port["protocol"].as_str().unwrap_or("TCP");
            let mut endpoints = Vec::new();
            for slice in svc_slices {
                // A slice port stands for the Service port of the same name and protocol.
                let Some(target) = slice["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| {
                        p["name"].as_str().unwrap_or_default() == port_name
                            && p["protocol"].as_str().unwrap_or("TCP") == protocol
                    })
                    .and_then(|p| p["port"].as_u64())
                else {
                    continue;
                };
                for ep in slice["endpoints"].as_array().into_iter().flatten() {
                    // A missing `ready` means ready (the API's default for hand-made slices).
                    if ep["conditions"]["ready"] == false {
                        continue;
                    }
                    for addr in ep["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str()?.parse().ok())
                    {
                        endpoints.push((addr, target as u16));
                    }
                }
            }
            endpoints.sort();
            endpoints.dedup();
            out.push(Frontend {
                cluster_ip,
                node_port: port["nodePort"].as_u64().map(|p| p as u16),
                port: port["port"].as_u64().unwrap_or(0) as u16,
                proto: port["protocol"].as_str().unwrap_or("TCP").to_lowercase(),
                endpoints,
            });
        }
    }
    out
}

/// The whole nft script for a node: delete and recreate the table in one transaction.
///
/// Shaped like kube-proxy's nftables mode so that it loads in about a second with 10 000
/// Services: one verdict map from (ClusterIP, protocol, port) to the Service's chain, one
/// set of the (address, protocol, port) without endpoints, and per Service one chain that
/// picks an endpoint as kube-proxy's iptables mode does (endpoint `j` of `n` with
/// probability 1/(n − j), the last always). No anonymous map per Service: each one makes
/// the kernel's loop check of every jump walk all of them, and a table of 10 000 took 40 s
/// to load (60 s or more to replace). Hairpin traffic (a pod reaching itself through its
/// Service) is found after DNAT as source = destination in the set of endpoint addresses.
pub fn script(services: &[Value], slices: &[Value], node_ip: Ipv4Addr) -> String {
    let mut chains = BTreeMap::new();
    let mut dispatch = Vec::new();
    let mut node_ports = Vec::new();
    let mut rejects = Vec::new();
    let mut endpoint_ips = std::collections::BTreeSet::new();
    for (i, f) in frontends(services, slices).into_iter().enumerate() {
        let svc_chain = format!("svc_{i}");
        if f.endpoints.is_empty() {
            if let Some(ip) = f.cluster_ip {
                rejects.push(format!("{ip} . {} . {}", f.proto, f.port));
            }
            continue;
        }
        let n = f.endpoints.len();
        let body: Vec<String> = f
            .endpoints
            .iter()
            .enumerate()
            .map(|(j, (ip, port))| {
                endpoint_ips.insert(*ip);
                let pick = if j + 1 < n {
                    format!("numgen random mod {} == 0 ", n - j)
                } else {
                    String::new()
                };
                format!("{pick}meta l4proto {} dnat to {ip}:{port}", f.proto)
            })
            .collect();
        chains.insert(svc_chain.clone(), body);
        if let Some(ip) = f.cluster_ip {
            dispatch.push(format!(
                "{ip} . {} . {} : jump {svc_chain}",
                f.proto, f.port
            ));
        }
        if let Some(np) = f.node_port {
            node_ports.push(format!("ip daddr {node_ip} {} dport {np} meta mark set meta mark | {MARK} jump {svc_chain}", f.proto));
        }
    }
    let mut services_rules = node_ports;
    if !dispatch.is_empty() {
        services_rules.insert(
            0,
            format!(
                "ip daddr . meta l4proto . th dport vmap {{ {} }}",
                dispatch.join(", ")
            ),
        );
    }
    let mut postrouting = vec![format!("meta mark & {MARK} == {MARK} snat to {node_ip}")];
    if !endpoint_ips.is_empty() {
        let pairs: Vec<String> = endpoint_ips
            .iter()
            .map(|ip| format!("{ip} . {ip}"))
            .collect();
        postrouting.push(format!(
            "ct status dnat ip saddr . ip daddr {{ {} }} snat to {node_ip}",
            pairs.join(", ")
        ));
    }
    let no_endpoints: Vec<String> = if rejects.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "ip daddr . meta l4proto . th dport {{ {} }} reject",
            rejects.join(", ")
        )]
    };
    let rules =
        |rules: &[String]| -> String { rules.iter().map(|r| format!("    {r}\n")).collect() };
    let mut s = format!("add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s.push_str("  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n");
    s.push_str(
        "  chain output { type nat hook output priority -100; policy accept; jump services; }\n",
    );
    s.push_str(&format!(
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{}  }}\n",
        rules(&postrouting)
    ));
    s.push_str("  chain filter_out { type filter hook output priority filter; policy accept; jump no_endpoints; }\n");
    s.push_str("  chain filter_fwd { type filter hook forward priority filter; policy accept; jump no_endpoints; }\n");
    s.push_str(&format!(
        "  chain no_endpoints {{\n{}  }}\n",
        rules(&no_endpoints)
    ));
    s.push_str(&format!(
        "  chain services {{\n{}  }}\n",
        rules(&services_rules)
    ));
    for (name, body) in chains {
        s.push_str(&format!("  chain {name} {{\n{}  }}\n", rules(&body)));
    }
    s.push_str("}\n");
    s
}

fn apply(netns: &str, script: &str) -> std::io::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nft in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The shortest time between two table rebuilds (kube-proxy's default is 1 s; the tests
/// want changes to show sooner).
const MIN_SYNC_PERIOD: Duration = Duration::from_millis(200);

/// Keeps one node's table in step with the store until `shutdown`.
pub async fn run(store: Arc<Store>, netns: String, node_ip: Ipv4Addr, shutdown: CancellationToken) {
    let mut rx = store.subscribe();
    let mut last = String::new();
    let mut resync = tokio::time::interval(Duration::from_secs(1));
    // Whether the table may differ from the store: a Service or slice changed, events were
    // lost, or the last apply failed. With 10 000 Services a rebuild copies 20 000 objects
    // and writes megabytes of script: not once a second for nothing.
    let mut stale = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = resync.tick() => {
                if !stale {
                    continue;
                }
            }
            ev = rx.recv() => {
                if let Ok(ev) = &ev && ev.plural != "services" && ev.plural != "endpointslices" {
                    continue;
                }
                while rx.try_recv().is_ok() {}
            }
        }
        stale = false;
        // Tens of milliseconds with 10 000 Services: off the runtime's workers.
        let from = store.clone();
        let Ok(script) = tokio::task::spawn_blocking(move || {
            script(
                &from.all("", "services"),
                &from.all("discovery.k8s.io", "endpointslices"),
                node_ip,
            )
        })
        .await
        else {
            stale = true;
            continue;
        };
        if script != last {
            let (ns, text) = (netns.clone(), script.clone());
            match tokio::task::spawn_blocking(move || apply(&ns, &text)).await {
                Ok(Ok(())) => last = script,
                Ok(Err(e)) => {
                    eprintln!("kube-proxy: {e}");
                    stale = true;
                }
                Err(_) => stale = true,
            }
            // Like kube-proxy's minSyncPeriod: changes arriving meanwhile are applied
            // together, so a burst of Services costs a few rebuilds, not one each.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(MIN_SYNC_PERIOD) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(name: &str, ip: &str, ports: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": {"clusterIP": ip, "ports": ports}})
    }

    /// A slice of `svc` with one port (name, number, protocol: the API server always sets it).
    fn slice(
        svc: &str,
        (port_name, port, protocol): (&str, u16, &str),
        eps: &[(&str, bool)],
    ) -> Value {
        json!({"metadata": {"namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
               "ports": [{"name": port_name, "port": port, "protocol": protocol}],
               "endpoints": eps.iter().map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}})).collect::<Vec<_>>()})
    }

    #[test]
    fn ready_endpoints_get_dnat_chains_and_not_ready_are_skipped() {
        let services = [svc(
            "web",
            "10.96.1.5",
            json!([{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]),
        )];
        let slices = [slice(
            "web",
            ("http", 8080, "TCP"),
            &[
                ("10.244.1.2", true),
                ("10.244.2.3", true),
                ("10.244.1.9", false),
            ],
        )];
        let s = script(&services, &slices, Ipv4Addr::new(172, 30, 0, 11));
        assert!(
            s.contains(
                "ip daddr . meta l4proto . th dport vmap { 10.96.1.5 . tcp . 80 : jump svc_0 }"
            ),
            "{s}"
        );
        // The first of two endpoints with probability 1/2, else the second.
        assert!(
            s.contains("chain svc_0 {\n    numgen random mod 2 == 0 meta l4proto tcp dnat to 10.244.1.2:8080\n    meta l4proto tcp dnat to 10.244.2.3:8080\n  }"),
            "{s}"
        );
        assert!(!s.contains("10.244.1.9"));
        assert!(s.contains(
            "ct status dnat ip saddr . ip daddr { 10.244.1.2 . 10.244.1.2, 10.244.2.3 . 10.244.2.3 } snat to 172.30.0.11"
        ), "hairpin: {s}");
        assert!(s.contains(
            "ip daddr 172.30.0.11 tcp dport 30080 meta mark set meta mark | 0x4000 jump svc_0"
        ));
        assert!(
            s.starts_with("add table ip kt_proxy\ndelete table ip kt_proxy\n"),
            "atomic replace"
        );
    }

    #[test]
    fn no_endpoints_rejects_and_udp_is_supported() {
        let services = [
            svc(
                "dns",
                "10.96.0.10",
                json!([{"name": "dns", "port": 53, "protocol": "UDP"}]),
            ),
            svc(
                "empty",
                "10.96.1.9",
                json!([{"port": 80, "protocol": "TCP"}]),
            ),
        ];
        let slices = [slice("dns", ("dns", 53, "UDP"), &[("10.244.1.4", true)])];
        let s = script(&services, &slices, Ipv4Addr::new(172, 30, 0, 11));
        assert!(s.contains("10.96.0.10 . udp . 53 : jump svc_0"), "{s}");
        assert!(s.contains("meta l4proto udp dnat to 10.244.1.4:53"), "{s}");
        assert!(
            s.contains("ip daddr . meta l4proto . th dport { 10.96.1.9 . tcp . 80 } reject"),
            "{s}"
        );
    }
}

#[cfg(test)]
mod nft {
    use serde_json::json;

    /// The generated script loads in a real nftables (root, in a namespace of its own), twice.
    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "needs root for a network namespace: tests/run test"
    )]
    fn script_is_accepted_by_nft() {
        let ns = crate::sys::netns::NetNs::new(crate::sys::unique_name("nft")).unwrap();
        let services = [
            json!({"metadata": {"name": "web", "namespace": "d"}, "spec": {"clusterIP": "10.96.1.5", "ports": [{"name": "", "port": 80, "protocol": "TCP", "nodePort": 30080}]}}),
            json!({"metadata": {"name": "dns", "namespace": "d"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
            json!({"metadata": {"name": "none", "namespace": "d"}, "spec": {"clusterIP": "10.96.1.9", "ports": [{"port": 80, "protocol": "TCP"}]}}),
        ];
        let slices = [
            json!({"metadata": {"namespace": "d", "labels": {"kubernetes.io/service-name": "web"}}, "ports": [{"name": "", "port": 8080}],
                             "endpoints": [{"addresses": ["10.244.1.2"]}, {"addresses": ["10.244.2.3"]}]}),
            json!({"metadata": {"namespace": "d", "labels": {"kubernetes.io/service-name": "dns"}}, "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
                             "endpoints": [{"addresses": ["10.244.1.4"], "conditions": {"ready": true}}]}),
        ];
        let script = super::script(&services, &slices, std::net::Ipv4Addr::new(172, 30, 0, 11));
        super::apply(ns.name(), &script).unwrap();
        super::apply(ns.name(), &script).unwrap();
    }
}
