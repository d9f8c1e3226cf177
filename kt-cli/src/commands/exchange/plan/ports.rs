//! Which Service ports an `--expose` item stands for.
//!
//! An item names a **target port**: the port the Service's pods listen on (v0.3.7 — so a
//! script's `--expose 9090:8080` means "what the pods serve on 8080"). Every Service port
//! whose target is that port is exchanged: `api:80` and `api:8080` both target 8080, so both
//! go local, as they do in selector mode where a shadow listens on 8080. A target given by
//! name resolves through the pods' container ports (or, with no pod running, the workloads'
//! pod templates), as Kubernetes resolves it. When no target port has the number, it may
//! name a Service port instead (kt's addition), which stands for that port's target.
//!
//! An item is TCP unless it ends in `/udp` (kt's addition; `/tcp` may be written too), and
//! stands for the Service ports of its protocol only: `53/udp` exchanges the UDP Service
//! ports targeting 53, and leaves TCP on 53 with the pods, as a plain `53` leaves UDP. UDP is
//! carried in agent mode only; SCTP never.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    api::core::v1::{Pod, PodSpec, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::PlanError;

/// The transport of an `--expose` item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    /// The Kubernetes `protocol` of its Service ports.
    pub fn protocol(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        }
    }
}

/// One `--expose` item: the local port, the remote port if given, and the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExposeItem {
    pub local: u16,
    pub remote: Option<u16>,
    pub transport: Transport,
}

impl ExposeItem {
    /// The port it names on the Service's side: the remote port, else the local one.
    pub fn wanted(&self) -> u16 {
        self.remote.unwrap_or(self.local)
    }
}

/// As written: `8080`, `9000:80`, `15353:53/udp` (TCP without a suffix).
impl fmt::Display for ExposeItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.local)?;
        if let Some(remote) = self.remote {
            write!(f, ":{remote}")?;
        }
        if self.transport == Transport::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

/// Refuses UDP items where `command` carries TCP only (selector, scale and ephemeral modes,
/// `mesh`, `preview`): the item named, nothing changed.
pub fn tcp_only(items: &[ExposeItem], command: &str) -> Result<(), PlanError> {
    match items.iter().find(|i| i.transport == Transport::Udp) {
        Some(item) => Err(PlanError::UdpNotCarried {
            item: item.to_string(),
            command: command.to_owned(),
        }),
        None => Ok(()),
    }
}

/// A Service port as exchange sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP` (Kubernetes' default), `UDP` or `SCTP`.
    pub protocol: String,
    pub target: Option<IntOrString>,
}

impl ServicePort {
    /// The ports of `service`.
    pub fn of(service: &Service) -> Vec<Self> {
        service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| Self {
                name: p.name.filter(|n| !n.is_empty()),
                port: u16::try_from(p.port).unwrap_or_default(),
                protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                target: p.target_port,
            })
            .collect()
    }

    pub fn is_tcp(&self) -> bool {
        self.protocol == "TCP"
    }
}

/// `http 80/TCP`, or `80/TCP` for an unnamed port.
impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} {}/{}", self.port, self.protocol),
            None => write!(f, "{}/{}", self.port, self.protocol),
        }
    }
}

/// What the Service's pods call their ports: (name, protocol) → number → a pod (or
/// workload) that says so.
#[derive(Clone, Debug, Default)]
pub struct NamedPorts(BTreeMap<(String, String), BTreeMap<u16, String>>);

impl NamedPorts {
    /// The container ports of `pods`.
    pub fn from_pods(pods: &[Pod]) -> Self {
        let specs = pods.iter().filter_map(|p| {
            Some((
                format!("pod {}", p.metadata.name.as_deref()?),
                p.spec.as_ref()?,
            ))
        });
        Self::from_specs(specs)
    }

    /// The container ports of pod templates, each with the workload that has it
    /// (`deployment web`): the containers', and those of native sidecars (init containers
    /// that keep running), as Kubernetes looks a port name up.
    pub fn from_specs<'a>(specs: impl IntoIterator<Item = (String, &'a PodSpec)>) -> Self {
        let mut named = Self::default();
        for (owner, spec) in specs {
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            let containers = spec.containers.iter().chain(sidecars);
            for port in containers.flat_map(|c| c.ports.iter().flatten()) {
                let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port))
                else {
                    continue;
                };
                let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
                named
                    .0
                    .entry((name.clone(), protocol))
                    .or_default()
                    .entry(number)
                    .or_insert_with(|| owner.clone());
            }
        }
        named
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The numbers `name` stands for, each with who says so.
    fn numbers(&self, name: &str, protocol: &str) -> Option<&BTreeMap<u16, String>> {
        self.0.get(&(name.to_owned(), protocol.to_owned()))
    }
}

/// One exposed target port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    /// The workstation port connections (or datagrams) go to.
    pub local: u16,
    /// The port the pods listen on; a shadow listens there too.
    pub target: u16,
    pub transport: Transport,
    /// The Service ports of `transport` whose target it is.
    pub service_ports: Vec<ServicePort>,
}

impl Exposed {
    /// The container ports a shadow declares, so that the Service's targets resolve to it:
    /// each target name on the target port, else `kt-<port>` (v0.3.7).
    pub fn shadow_ports(&self) -> Vec<(String, u16)> {
        let mut names: Vec<String> = self
            .service_ports
            .iter()
            .filter_map(|p| match &p.target {
                Some(IntOrString::String(name)) => Some(name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            names.push(format!("kt-{}", self.target));
        }
        names.into_iter().map(|n| (n, self.target)).collect()
    }
}

/// What an exchange does with each port of the Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortPlan {
    pub exposed: Vec<Exposed>,
    /// The Service ports no exposed item covers: the pods keep them in agent mode; in
    /// selector and scale modes, where a shadow takes the pods' place, they stop answering.
    pub unexposed: Vec<ServicePort>,
    /// UDP and SCTP ports that share an exposed TCP target port and are not exposed
    /// themselves (a UDP one could be, with `/udp`).
    pub not_carried: Vec<ServicePort>,
    /// Facts the user should hear (a port name with different numbers on different pods).
    pub warnings: Vec<String>,
}

impl PortPlan {
    /// The Service ports that go local, TCP and UDP.
    pub fn service_ports(&self) -> impl Iterator<Item = (&ServicePort, u16)> {
        self.exposed
            .iter()
            .flat_map(|e| e.service_ports.iter().map(|p| (p, e.local)))
    }

    /// The Service ports of `transport` that go local.
    pub fn service_ports_of(
        &self,
        transport: Transport,
    ) -> impl Iterator<Item = (&ServicePort, u16)> {
        self.exposed
            .iter()
            .filter(move |e| e.transport == transport)
            .flat_map(|e| e.service_ports.iter().map(|p| (p, e.local)))
    }
}

/// `--expose`: `port` or `local:remote`, each optionally ending in `/tcp` or `/udp` (either
/// case), comma separated.
pub fn parse_expose(text: &str) -> Result<Vec<ExposeItem>, PlanError> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    let items: Vec<&str> = text.split(',').filter(|p| !p.trim().is_empty()).collect();
    if items.is_empty() {
        return Err(PlanError::NoPort(text.to_owned()));
    }
    items
        .into_iter()
        .map(|item| {
            let malformed = || PlanError::Malformed(item.to_owned());
            let (ports, transport) = match item.trim().rsplit_once('/') {
                None => (item, Transport::Tcp),
                Some((ports, suffix)) if suffix.eq_ignore_ascii_case("tcp") => {
                    (ports, Transport::Tcp)
                }
                Some((ports, suffix)) if suffix.eq_ignore_ascii_case("udp") => {
                    (ports, Transport::Udp)
                }
                Some(_) => return Err(malformed()),
            };
            let (local, remote) = match ports.split_once(':') {
                Some((l, r)) => port(l)
                    .zip(port(r))
                    .map(|(l, r)| (l, Some(r)))
                    .ok_or_else(malformed)?,
                None => (port(ports).ok_or_else(malformed)?, None),
            };
            Ok(ExposeItem {
                local,
                remote,
                transport,
            })
        })
        .collect()
}

/// The Service's ports with the numbers their target resolves to: one for a number or the
/// default, every number a name stands for on the pods (usually one; more when pods
/// disagree, which is reported), none for a name nothing declares.
fn resolve(
    service: &str,
    ports: &[ServicePort],
    named: &NamedPorts,
    warnings: &mut Vec<String>,
) -> Vec<(ServicePort, Vec<u16>)> {
    ports
        .iter()
        .map(|p| {
            let targets = match &p.target {
                None => vec![p.port],
                Some(IntOrString::Int(n)) => u16::try_from(*n).into_iter().collect(),
                Some(IntOrString::String(name)) => {
                    let numbers = named.numbers(name, &p.protocol);
                    if let Some(numbers) = numbers.filter(|n| n.len() > 1) {
                        let seen: Vec<String> =
                            numbers.iter().map(|(n, who)| format!("{n} on {who}")).collect();
                        let warning = format!(
                            "port name '{name}' of service '{service}' stands for different ports: {}",
                            seen.join(", ")
                        );
                        if !warnings.contains(&warning) {
                            warnings.push(warning);
                        }
                    }
                    numbers.map(|n| n.keys().copied().collect()).unwrap_or_default()
                }
            };
            (p.clone(), targets)
        })
        .collect()
}

/// Decides, for each `--expose` item, the target port and the Service ports of its
/// protocol it stands for (see the module doc); `named` resolves named target ports.
pub fn plan(
    service: &str,
    ports: &[ServicePort],
    named: &NamedPorts,
    expose: &[ExposeItem],
) -> Result<PortPlan, PlanError> {
    let mut plan = PortPlan::default();
    let resolved = resolve(service, ports, named, &mut plan.warnings);
    let mut claimed: BTreeMap<(u16, Transport), ExposeItem> = BTreeMap::new();
    for item in expose {
        let protocol = item.transport.protocol();
        let wanted = item.wanted();
        let target = target_of(service, &resolved, protocol, wanted)?;
        if let Some(earlier) = claimed.insert((target, item.transport), *item) {
            let target = match item.transport {
                Transport::Tcp => target.to_string(),
                Transport::Udp => format!("{target}/udp"),
            };
            return Err(PlanError::SameTarget {
                first: earlier.to_string(),
                second: item.to_string(),
                target,
            });
        }
        let (same, other): (Vec<ServicePort>, Vec<ServicePort>) = resolved
            .iter()
            .filter(|(_, targets)| targets.contains(&target))
            .map(|(p, _)| p.clone())
            .partition(|p| p.protocol == protocol);
        if item.transport == Transport::Tcp {
            plan.not_carried
                .extend(other.into_iter().filter(|p| !p.is_tcp()));
        }
        plan.exposed.push(Exposed {
            local: item.local,
            target,
            transport: item.transport,
            service_ports: same,
        });
    }
    // A UDP port sharing a TCP item's target is carried when a `/udp` item exposes it too.
    let exposed: Vec<ServicePort> = plan.service_ports().map(|(p, _)| p.clone()).collect();
    plan.not_carried.retain(|p| !exposed.contains(p));
    plan.not_carried.dedup();
    plan.unexposed = ports
        .iter()
        .filter(|p| !exposed.contains(p))
        .cloned()
        .collect();
    Ok(plan)
}

/// The target port an item of `protocol` naming `wanted` stands for: `wanted` when a Service
/// port of the protocol targets it, else the target of the Service port of the protocol
/// numbered `wanted`. A port only of another protocol is an error that says so.
fn target_of(
    service: &str,
    resolved: &[(ServicePort, Vec<u16>)],
    protocol: &str,
    wanted: u16,
) -> Result<u16, PlanError> {
    let of_protocol = || resolved.iter().filter(|(p, _)| p.protocol == protocol);
    if of_protocol().any(|(_, targets)| targets.contains(&wanted)) {
        return Ok(wanted);
    }
    if let Some((p, targets)) = of_protocol().find(|(p, _)| p.port == wanted) {
        return targets
            .first()
            .copied()
            .ok_or_else(|| PlanError::Unresolved {
                service: service.to_owned(),
                port: p.port,
                name: match &p.target {
                    Some(IntOrString::String(name)) => name.clone(),
                    _ => String::new(),
                },
            });
    }
    // Only a port of another protocol has that number or target.
    let other = resolved
        .iter()
        .find(|(p, targets)| p.port == wanted || targets.contains(&wanted));
    let (port, service) = (wanted, service.to_owned());
    Err(match other.map(|(p, _)| p.protocol.as_str()) {
        None => PlanError::NoSuchPort { port, service },
        Some("UDP") => PlanError::NotTcp { port, service },
        Some("TCP") => PlanError::NotUdp { port, service },
        Some(_) => PlanError::Sctp { port, service },
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn port(
        name: Option<&str>,
        port: u16,
        protocol: &str,
        target: Option<IntOrString>,
    ) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port,
            protocol: protocol.into(),
            target,
        }
    }

    fn int(n: i32) -> Option<IntOrString> {
        Some(IntOrString::Int(n))
    }

    fn named(n: &str) -> Option<IntOrString> {
        Some(IntOrString::String(n.into()))
    }

    fn pod(name: &str, ports: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "app", "ports": ports}]}
        }))
        .unwrap()
    }

    fn tcp(local: u16, remote: Option<u16>) -> ExposeItem {
        ExposeItem {
            local,
            remote,
            transport: Transport::Tcp,
        }
    }

    fn udp(local: u16, remote: Option<u16>) -> ExposeItem {
        ExposeItem {
            transport: Transport::Udp,
            ..tcp(local, remote)
        }
    }

    #[test]
    fn expose_forms_and_errors() {
        assert_eq!(
            parse_expose("8080,9000:81").unwrap(),
            [tcp(8080, None), tcp(9000, Some(81))]
        );
        assert_eq!(
            parse_expose("15353:53/udp,53/UDP,80/tcp, 81:82/Tcp").unwrap(),
            [
                udp(15353, Some(53)),
                udp(53, None),
                tcp(80, None),
                tcp(81, Some(82))
            ]
        );
        assert_eq!(udp(15353, Some(53)).to_string(), "15353:53/udp");
        assert_eq!(tcp(80, None).to_string(), "80", "TCP is written bare");
        for bad in [
            "",
            "x",
            "8080:",
            "0",
            "1:2:3",
            "70000",
            "53/sctp",
            "53/",
            "/udp",
            "53/udp/udp",
            "0/udp",
        ] {
            let err = parse_expose(bad).unwrap_err().to_string();
            assert!(err.contains("--expose"), "{bad}: {err}");
        }
    }

    #[test]
    fn udp_items_are_refused_where_only_tcp_is_carried() {
        let items = parse_expose("8080,15353:53/udp").unwrap();
        assert_eq!(
            tcp_only(&items, "--mode selector").unwrap_err().to_string(),
            "--expose 15353:53/udp: --mode selector carries TCP only (UDP is carried by `exchange --mode agent`)"
        );
        assert!(tcp_only(&items[..1], "mesh").is_ok());
    }

    #[test]
    fn an_unnamed_single_port_is_exposed_by_its_target_or_its_port() {
        let ports = [port(None, 80, "TCP", int(8080))];
        for remote in [8080, 80] {
            let plan = plan(
                "web",
                &ports,
                &NamedPorts::default(),
                &[tcp(18080, Some(remote))],
            )
            .unwrap();
            assert_eq!(plan.exposed[0].target, 8080, "{remote}");
            assert_eq!(plan.exposed[0].service_ports, ports);
            assert!(plan.unexposed.is_empty());
        }
        assert_eq!(
            plan(
                "web",
                &ports,
                &NamedPorts::default(),
                &[tcp(18080, Some(5))]
            )
            .unwrap_err()
            .to_string(),
            "target port 5 not exists in service 'web'"
        );
    }

    #[test]
    fn every_service_port_of_the_exposed_target_goes_local() {
        let ports = [
            port(Some("http"), 80, "TCP", int(8080)),
            port(Some("http-alt"), 8080, "TCP", int(8080)),
            port(Some("admin"), 9090, "TCP", None),
        ];
        let plan = plan(
            "api",
            &ports,
            &NamedPorts::default(),
            &[tcp(18080, Some(8080)), tcp(19090, Some(9090))],
        )
        .unwrap();
        let local: Vec<(u16, u16)> = plan.service_ports().map(|(p, l)| (p.port, l)).collect();
        assert_eq!(local, [(80, 18080), (8080, 18080), (9090, 19090)]);
        assert!(plan.unexposed.is_empty());
        // A Service port stands for its target: 80 means target 8080, so 8080 goes too.
        let by_port = super::plan(
            "api",
            &ports,
            &NamedPorts::default(),
            &[tcp(18080, Some(80))],
        )
        .unwrap();
        assert_eq!(by_port.exposed[0].service_ports.len(), 2);
        assert_eq!(by_port.unexposed, [ports[2].clone()]);
    }

    #[test]
    fn udp_sharing_the_target_is_reported_and_udp_alone_is_refused() {
        let ports = [
            port(Some("dns-udp"), 53, "UDP", int(5353)),
            port(Some("dns-tcp"), 53, "TCP", int(5353)),
            port(Some("http"), 80, "TCP", int(8080)),
        ];
        let dns = plan(
            "mixed",
            &ports,
            &NamedPorts::default(),
            &[tcp(15353, Some(5353))],
        )
        .unwrap();
        assert_eq!(dns.exposed[0].service_ports, [ports[1].clone()]);
        assert_eq!(dns.not_carried, [ports[0].clone()]);
        assert_eq!(dns.unexposed, [ports[0].clone(), ports[2].clone()]);
        let by_port = plan(
            "mixed",
            &ports,
            &NamedPorts::default(),
            &[tcp(15353, Some(53))],
        )
        .unwrap();
        assert_eq!(by_port.exposed[0].target, 5353, "the TCP port 53 is meant");
        let http = plan(
            "mixed",
            &ports,
            &NamedPorts::default(),
            &[tcp(18080, Some(8080))],
        )
        .unwrap();
        assert_eq!(
            http.unexposed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["dns-udp 53/UDP", "dns-tcp 53/TCP"]
        );
        // A UDP port targeting 80 does not hide the TCP Service port 80.
        let crossed = [
            port(Some("web"), 80, "TCP", int(8080)),
            port(Some("odd"), 9000, "UDP", int(80)),
        ];
        let by_port = plan(
            "crossed",
            &crossed,
            &NamedPorts::default(),
            &[tcp(1, Some(80))],
        )
        .unwrap();
        assert_eq!(by_port.exposed[0].target, 8080);
        let udp_only = [port(Some("syslog"), 514, "UDP", None)];
        assert_eq!(
            plan(
                "logs",
                &udp_only,
                &NamedPorts::default(),
                &[tcp(1514, Some(514))]
            )
            .unwrap_err()
            .to_string(),
            "port 514 of service 'logs' is UDP: expose it as '514/udp'"
        );
    }

    #[test]
    fn a_udp_item_stands_for_the_udp_ports_of_its_target_and_leaves_tcp_alone() {
        let ports = [
            port(Some("dns-udp"), 53, "UDP", int(5353)),
            port(Some("dns-tcp"), 53, "TCP", int(5353)),
            port(Some("http"), 80, "TCP", int(8080)),
        ];
        let none = NamedPorts::default();
        // By target and by Service port alike.
        for remote in [5353, 53] {
            let udp_only = plan("mixed", &ports, &none, &[udp(15353, Some(remote))]).unwrap();
            assert_eq!(udp_only.exposed[0].transport, Transport::Udp);
            assert_eq!(udp_only.exposed[0].service_ports, [ports[0].clone()]);
            assert!(udp_only.not_carried.is_empty());
            assert_eq!(udp_only.unexposed, [ports[1].clone(), ports[2].clone()]);
        }
        // TCP and UDP of one target, each to its own local port: nothing left uncarried.
        let both = plan(
            "mixed",
            &ports,
            &none,
            &[tcp(15353, Some(5353)), udp(15353, Some(5353))],
        )
        .unwrap();
        assert!(both.not_carried.is_empty(), "{both:?}");
        assert_eq!(both.unexposed, [ports[2].clone()]);
        let udp_ports: Vec<u16> = both
            .service_ports_of(Transport::Udp)
            .map(|(p, _)| p.port)
            .collect();
        assert_eq!(udp_ports, [53]);
        assert_eq!(
            plan("mixed", &ports, &none, &[udp(1, Some(8080))])
                .unwrap_err()
                .to_string(),
            "port 8080 of service 'mixed' is not UDP: expose it without '/udp'"
        );
        assert_eq!(
            plan(
                "mixed",
                &ports,
                &none,
                &[udp(1, Some(53)), udp(2, Some(5353))]
            )
            .unwrap_err()
            .to_string(),
            "--expose items 1:53/udp and 2:5353/udp both stand for target port 5353/udp"
        );
        let sctp = [port(None, 9899, "SCTP", None)];
        assert!(matches!(
            plan("sctp", &sctp, &none, &[tcp(9899, None)]),
            Err(PlanError::Sctp { port: 9899, .. })
        ));
    }

    #[test]
    fn a_named_target_resolves_through_the_pods_container_ports() {
        let ports = [port(Some("http"), 80, "TCP", named("http"))];
        let pods = [pod(
            "web-1",
            json!([{"name": "http", "containerPort": 8080}]),
        )];
        let plan = plan(
            "web",
            &ports,
            &NamedPorts::from_pods(&pods),
            &[tcp(9090, Some(8080))],
        )
        .unwrap();
        assert_eq!(plan.exposed[0].target, 8080);
        assert_eq!(plan.exposed[0].shadow_ports(), [("http".to_owned(), 8080)]);
        assert!(plan.warnings.is_empty());
        // Without pods nothing resolves the name: by number it is not found, by Service
        // port it cannot be resolved.
        let none = NamedPorts::default();
        assert!(matches!(
            super::plan("web", &ports, &none, &[tcp(9090, Some(8080))]),
            Err(PlanError::NoSuchPort { port: 8080, .. })
        ));
        assert_eq!(
            super::plan("web", &ports, &none, &[tcp(9090, Some(80))])
                .unwrap_err()
                .to_string(),
            "service port 80 of 'web' targets the port named 'http', which no pod or workload of the service declares"
        );
    }

    #[test]
    fn a_name_with_two_numbers_is_reported_naming_both() {
        let ports = [port(Some("http"), 80, "TCP", named("http"))];
        let pods = [
            pod("web-a", json!([{"name": "http", "containerPort": 8080}])),
            pod("web-b", json!([{"name": "http", "containerPort": 9000}])),
        ];
        let plan = plan(
            "web",
            &ports,
            &NamedPorts::from_pods(&pods),
            &[tcp(18080, Some(80))],
        )
        .unwrap();
        assert_eq!(
            plan.warnings,
            [
                "port name 'http' of service 'web' stands for different ports: 8080 on pod web-a, 9000 on pod web-b"
            ]
        );
    }

    #[test]
    fn two_items_for_one_target_are_refused() {
        let ports = [port(None, 80, "TCP", int(8080))];
        assert_eq!(
            plan(
                "web",
                &ports,
                &NamedPorts::default(),
                &[tcp(1, Some(80)), tcp(2, Some(8080))]
            )
            .unwrap_err()
            .to_string(),
            "--expose items 1:80 and 2:8080 both stand for target port 8080"
        );
    }

    #[test]
    fn a_native_sidecar_declares_names_too() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app"}],
                     "initContainers": [
                         {"name": "proxy", "restartPolicy": "Always", "ports": [{"name": "web", "containerPort": 15001}]},
                         {"name": "setup", "ports": [{"name": "once", "containerPort": 1}]}]}
        }))
        .unwrap();
        let named = NamedPorts::from_pods(&[pod]);
        assert!(named.numbers("web", "TCP").is_some());
        assert!(
            named.numbers("once", "TCP").is_none(),
            "a plain init container is gone"
        );
    }

    #[test]
    fn a_shadow_declares_numeric_targets_as_kt_ports() {
        let e = Exposed {
            local: 1,
            target: 9001,
            transport: Transport::Tcp,
            service_ports: vec![port(Some("admin"), 81, "TCP", int(9001))],
        };
        assert_eq!(e.shadow_ports(), [("kt-9001".to_owned(), 9001)]);
    }
}
