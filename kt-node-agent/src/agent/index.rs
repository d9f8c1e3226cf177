//! The cluster's Services and EndpointSlices as the agent keeps them: only the fields the
//! redirects and the network need ([`ServiceView`], [`SliceView`]), indexed by Service and
//! kept current from watch events one object at a time ([`Index::apply_service`],
//! [`Index::apply_slice`]), so that neither memory nor a reconcile pass grows with what the
//! watch caches of whole objects would hold (issue 17: 10 000 Services, 30 000 endpoints).
//! Pure: the events come from the caller.
//!
//! A slice belongs to the Service its `kubernetes.io/service-name` label names in its own
//! namespace; a slice without the label or a namespace belongs to none. A slice may exist
//! before or after its Service (the index keeps it under the name either way).

use std::{collections::BTreeMap, net::IpAddr};

// foldhash, not SipHash: looked up per session or Service each pass (see `kept`).
use foldhash::{HashMap, HashMapExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_proto::net::Cidr;

use crate::ebpf::Transport;

/// The label an EndpointSlice carries naming its Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `(namespace, name)` of a Service or of an EndpointSlice.
pub type Key = (String, String);

/// The transport of a port's `protocol`, TCP when it has none (Kubernetes' default);
/// `None` for SCTP, which kt does not redirect.
fn transport_of(protocol: Option<&String>) -> Option<Transport> {
    match protocol.map(String::as_str) {
        None | Some("TCP") => Some(Transport::Tcp),
        Some("UDP") => Some(Transport::Udp),
        Some(_) => None,
    }
}

/// One port of a Service or an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortView {
    /// The port's name, `""` when it has none.
    pub name: String,
    pub port: u16,
    /// Its protocol: TCP (Kubernetes' default) or UDP; `None` for SCTP.
    pub transport: Option<Transport>,
}

/// What the agent needs of a Service: its ClusterIPs (parsed; `None` and unparsable ones
/// left out) and its ports; for traffic that reaches it without a pod's connect()
/// ([`super::node_ports`]), its TCP ports' nodePorts, its LoadBalancer ingress IPs with the
/// sources allowed to use them, and its external IPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceView {
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortView>,
    /// `(port, nodePort)` of each TCP port that has a nodePort (`spec.ports[].nodePort`).
    pub node_ports: Vec<(u16, u16)>,
    /// `status.loadBalancer.ingress[].ip`, parsed, except those with `ipMode: Proxy`: such
    /// a load balancer proxies to the nodePorts itself, and kube-proxy leaves the IP alone
    /// (Kubernetes docs, "Specifying IPMode of load balancer status").
    pub ingress_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` as kube-proxy reads them (`newBaseServiceInfo`):
    /// trimmed, parsed as Go's `ParseCIDRSloppy` does (leading zeros allowed), the ranges
    /// that do not parse left out. Who may reach `ingress_ips` of each address family
    /// ([`super::node_ports`] applies it): anyone when no range of the family is left or
    /// one is `/0`. (The `service.beta.kubernetes.io/load-balancer-source-ranges`
    /// annotation is read by cloud providers, not by kube-proxy.)
    pub source_ranges: Vec<Cidr>,
    /// `spec.externalIPs`, parsed: kube-proxy sends them to the endpoints, from any source.
    pub external_ips: Vec<IpAddr>,
}

/// [`ServiceView::source_ranges`] of `service`.
fn source_ranges(service: &Service) -> Vec<Cidr> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|range| parse_cidr_sloppy(range.trim()))
        .collect()
}

/// `text` as an address range as Go's `netutils.ParseCIDRSloppy` reads it (Kubernetes
/// validated this field with it): the prefix length digits only; an IPv4 address of four
/// decimal octets, leading zeros allowed (`010.0.0.0/8` is 10.0.0.0/8); an IPv6 one as
/// written. An IPv4-mapped IPv6 range of prefix 96 or more (`::ffff:203.0.113.0/120`) is
/// the IPv4 range it maps (203.0.113.0/24), as Go files it under IPv4. `None` otherwise.
fn parse_cidr_sloppy(text: &str) -> Option<Cidr> {
    let (address, prefix) = text.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(prefix) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    // Four decimal octets, leading zeros allowed.
    let sloppy_v4 = |text: &str| -> Option<std::net::Ipv4Addr> {
        let octets: Vec<u8> = text
            .split('.')
            .map(|o| digits(o).then(|| o.parse().ok()).flatten())
            .collect::<Option<_>>()?;
        <[u8; 4]>::try_from(octets)
            .ok()
            .map(std::net::Ipv4Addr::from)
    };
    if address.contains(':') {
        // An embedded IPv4 part may have leading zeros too (`::ffff:010.0.0.0`).
        let address: std::net::Ipv6Addr = address.parse().ok().or_else(|| {
            let (head, tail) = address.rsplit_once(':')?;
            format!("{head}:{}", sloppy_v4(tail)?).parse().ok()
        })?;
        if prefix > 128 {
            return None;
        }
        let range = Cidr::new(IpAddr::V6(address), prefix);
        return match range.network() {
            IpAddr::V6(network) if prefix >= 96 => match network.to_ipv4_mapped() {
                Some(v4) => Some(Cidr::new(IpAddr::V4(v4), prefix - 96)),
                None => Some(range),
            },
            _ => Some(range),
        };
    }
    let address = sloppy_v4(address)?;
    (prefix <= 32).then(|| Cidr::new(IpAddr::V4(address), prefix))
}

impl From<&Service> for ServiceView {
    fn from(service: &Service) -> Self {
        let spec = service.spec.as_ref();
        let cluster_ips = spec
            .and_then(|s| {
                s.cluster_ips
                    .clone()
                    .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(PortView {
                    name: p.name.clone().unwrap_or_default(),
                    port: u16::try_from(p.port).ok()?,
                    transport: transport_of(p.protocol.as_ref()),
                })
            })
            .collect();
        let node_ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| transport_of(p.protocol.as_ref()) == Some(Transport::Tcp))
            .filter_map(|p| {
                Some((
                    u16::try_from(p.port).ok()?,
                    u16::try_from(p.node_port?).ok()?,
                ))
            })
            .collect();
        let ingress_ips = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        let external_ips = spec
            .and_then(|s| s.external_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        Self {
            cluster_ips,
            ports,
            node_ports,
            ingress_ips,
            source_ranges: source_ranges(service),
            external_ips,
        }
    }
}

/// What the agent needs of an EndpointSlice: the Service it belongs to, its ports and the
/// addresses of its ready endpoints (an endpoint without a `ready` condition counts as
/// ready, as Kubernetes says).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceView {
    /// The `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub ports: Vec<PortView>,
    pub ready: Vec<IpAddr>,
}

impl From<&EndpointSlice> for SliceView {
    fn from(slice: &EndpointSlice) -> Self {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(PortView {
                    name: p.name.clone().unwrap_or_default(),
                    port: u16::try_from(p.port?).ok()?,
                    transport: transport_of(p.protocol.as_ref()),
                })
            })
            .collect();
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| &e.addresses)
            .filter_map(|a| a.parse().ok())
            .collect();
        Self {
            service,
            ports,
            ready,
        }
    }
}

/// A watch event, reduced to what the index needs (kube's `watcher::Event` with the object
/// turned into its key and view).
#[derive(Clone, Debug)]
pub enum Change<V> {
    /// A list starts over: what it lists replaces everything once it is done.
    Relist,
    /// An object of the list in progress.
    Listed(Key, V),
    /// The list is complete.
    ListDone,
    /// An object was created or changed.
    Applied(Key, V),
    /// An object was deleted.
    Deleted(Key),
}

impl<V> Change<V> {
    /// The change a watch event makes; `None` for an object without a name.
    pub fn of<K: kube::Resource>(
        event: kube::runtime::watcher::Event<K>,
        view: impl Fn(&K) -> V,
    ) -> Option<Self> {
        use kube::runtime::watcher::Event;
        let key = key_of::<K>;
        Some(match event {
            Event::Init => Change::Relist,
            Event::InitDone => Change::ListDone,
            Event::InitApply(object) => Change::Listed(key(&object)?, view(&object)),
            Event::Apply(object) => Change::Applied(key(&object)?, view(&object)),
            Event::Delete(object) => Change::Deleted(key(&object)?),
        })
    }
}

/// The `(namespace, name)` of an object (namespace `""` when it has none); `None` without a
/// name.
fn key_of<K: kube::Resource>(object: &K) -> Option<Key> {
    let meta = object.meta();
    Some((
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone()?,
    ))
}

/// What the index holds for one Service name.
#[derive(Clone, Debug, Default)]
struct Entry {
    service: Option<ServiceView>,
    /// By slice name.
    slices: BTreeMap<String, SliceView>,
    /// The index's [`Index::revision`] when this entry last changed.
    revision: u64,
}

/// The Services and their EndpointSlices by Service `(namespace, name)`: a lookup costs
/// what the Service has, an event what the object has.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// By namespace, then Service name: a lookup by `&str` allocates nothing (every pass
    /// looks up every session's Service, several times).
    entries: HashMap<String, HashMap<String, Entry>>,
    /// Each indexed slice's Service name (the slice's key is `(namespace, slice name)`).
    owners: HashMap<Key, String>,
    /// A Services list in progress, and a slices list.
    listing_services: Option<HashMap<Key, ServiceView>>,
    listing_slices: Option<HashMap<Key, SliceView>>,
    /// Bumped whenever the set of Services or any Service's ClusterIPs change.
    generation: u64,
    /// Bumped with every change to any entry ([`Index::revision_of`]).
    revision: u64,
}

impl Index {
    /// The index of `services` and `slices` (as if each had been listed).
    pub fn of(services: &[&Service], slices: &[&EndpointSlice]) -> Self {
        let mut index = Self::default();
        for service in services {
            if let Some(key) = key_of(*service) {
                index.put_service(key, ServiceView::from(*service));
            }
        }
        for slice in slices {
            if let Some(key) = key_of(*slice) {
                index.put_slice(key, SliceView::from(*slice));
            }
        }
        index
    }

    /// Applies a Service's change.
    pub fn apply_service(&mut self, change: Change<ServiceView>) {
        match change {
            Change::Relist => self.listing_services = Some(HashMap::new()),
            Change::Listed(key, view) => {
                self.listing_services
                    .get_or_insert_default()
                    .insert(key, view);
            }
            Change::ListDone => {
                let listed = self.listing_services.take().unwrap_or_default();
                let gone: Vec<Key> = self
                    .entries()
                    .filter(|(key, e)| e.service.is_some() && !listed.contains_key(key))
                    .map(|(key, _)| key)
                    .collect();
                for key in gone {
                    self.remove_service(&key);
                }
                for (key, view) in listed {
                    self.put_service(key, view);
                }
            }
            Change::Applied(key, view) => self.put_service(key, view),
            Change::Deleted(key) => self.remove_service(&key),
        }
    }

    /// Applies an EndpointSlice's change.
    pub fn apply_slice(&mut self, change: Change<SliceView>) {
        match change {
            Change::Relist => self.listing_slices = Some(HashMap::new()),
            Change::Listed(key, view) => {
                self.listing_slices
                    .get_or_insert_default()
                    .insert(key, view);
            }
            Change::ListDone => {
                let listed = self.listing_slices.take().unwrap_or_default();
                let gone: Vec<Key> = self
                    .owners
                    .keys()
                    .filter(|key| !listed.contains_key(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    self.remove_slice(&key);
                }
                for (key, view) in listed {
                    self.put_slice(key, view);
                }
            }
            Change::Applied(key, view) => self.put_slice(key, view),
            Change::Deleted(key) => self.remove_slice(&key),
        }
    }

    fn put_service(&mut self, key: Key, view: ServiceView) {
        self.revision += 1;
        let (namespace, name) = key;
        let entry = self
            .entries
            .entry(namespace)
            .or_default()
            .entry(name)
            .or_default();
        if entry.service.as_ref().map(|s| &s.cluster_ips) != Some(&view.cluster_ips) {
            self.generation += 1;
        }
        entry.service = Some(view);
        entry.revision = self.revision;
    }

    fn remove_service(&mut self, key: &Key) {
        let revision = self.revision + 1;
        let Some(entry) = self.entry_mut(&key.0, &key.1) else {
            return;
        };
        entry.revision = revision;
        let had_service = entry.service.take().is_some();
        let empty = entry.slices.is_empty();
        self.revision = revision;
        if had_service {
            self.generation += 1;
        }
        if empty {
            self.remove_entry(&key.0, &key.1);
        }
    }

    fn put_slice(&mut self, key: Key, view: SliceView) {
        self.remove_slice(&key);
        let (namespace, name) = key;
        // A slice without a namespace or an owner belongs to no Service.
        let Some(owner) = view.service.clone().filter(|_| !namespace.is_empty()) else {
            return;
        };
        self.revision += 1;
        let entry = self
            .entries
            .entry(namespace.clone())
            .or_default()
            .entry(owner.clone())
            .or_default();
        entry.slices.insert(name.clone(), view);
        entry.revision = self.revision;
        self.owners.insert((namespace, name), owner);
    }

    fn remove_slice(&mut self, key: &Key) {
        let Some(owner) = self.owners.remove(key) else {
            return;
        };
        let revision = self.revision + 1;
        if let Some(entry) = self.entry_mut(&key.0, &owner) {
            entry.slices.remove(&key.1);
            entry.revision = revision;
            let empty = entry.service.is_none() && entry.slices.is_empty();
            self.revision = revision;
            if empty {
                self.remove_entry(&key.0, &owner);
            }
        }
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceView> {
        self.entry(namespace, name)?.service.as_ref()
    }

    /// The EndpointSlices of the Service `namespace/name`, by slice name.
    pub fn slices(&self, namespace: &str, name: &str) -> impl Iterator<Item = &SliceView> {
        self.entry(namespace, name)
            .into_iter()
            .flat_map(|e| e.slices.values())
    }

    /// The names of the EndpointSlices of the Service `namespace/name`, in order.
    pub fn slice_names(&self, namespace: &str, name: &str) -> Vec<&str> {
        self.entry(namespace, name)
            .into_iter()
            .flat_map(|e| e.slices.keys().map(String::as_str))
            .collect()
    }

    fn entry(&self, namespace: &str, name: &str) -> Option<&Entry> {
        self.entries.get(namespace)?.get(name)
    }

    fn entry_mut(&mut self, namespace: &str, name: &str) -> Option<&mut Entry> {
        self.entries.get_mut(namespace)?.get_mut(name)
    }

    /// Drops the entry `namespace/name`, and its namespace's map when that empties.
    fn remove_entry(&mut self, namespace: &str, name: &str) {
        if let Some(names) = self.entries.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                self.entries.remove(namespace);
            }
        }
    }

    /// Every entry with its key.
    fn entries(&self) -> impl Iterator<Item = (Key, &Entry)> + '_ {
        self.entries.iter().flat_map(|(namespace, names)| {
            names
                .iter()
                .map(move |(name, entry)| ((namespace.clone(), name.clone()), entry))
        })
    }

    /// Every Service's ClusterIPs.
    pub fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.entries
            .values()
            .flat_map(HashMap::values)
            .filter_map(|e| e.service.as_ref())
            .flat_map(|s| s.cluster_ips.iter().copied())
    }

    /// A number that changes whenever [`Index::cluster_ips`] may have: what is computed
    /// from them needs computing again only then.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A number that changes whenever the Service `namespace/name` or any of its slices
    /// changes (it is the index-wide revision of that change; 0 when neither exists): what
    /// is computed from one Service needs computing again only then.
    pub fn revision_of(&self, namespace: &str, name: &str) -> u64 {
        self.entry(namespace, name).map_or(0, |e| e.revision)
    }

    /// The index-wide revision: it grows with every change to any Service or slice, so
    /// while it stands every [`Index::revision_of`] does.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// How many Services are indexed.
    pub fn services(&self) -> usize {
        self.entries
            .values()
            .flat_map(HashMap::values)
            .filter(|e| e.service.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(namespace: &str, name: &str) -> Key {
        (namespace.into(), name.into())
    }

    fn svc(ip: &str) -> ServiceView {
        ServiceView {
            cluster_ips: vec![ip.parse().unwrap()],
            ports: vec![PortView {
                name: String::new(),
                port: 80,
                transport: Some(Transport::Tcp),
            }],
            ..ServiceView::default()
        }
    }

    fn slice(service: Option<&str>, ip: &str) -> SliceView {
        SliceView {
            service: service.map(str::to_owned),
            ports: vec![],
            ready: vec![ip.parse().unwrap()],
        }
    }

    #[test]
    fn views_keep_what_the_redirects_need() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "dev",
                         "annotations": {"big": "x".repeat(1000)}},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                               {"port": 53, "protocol": "UDP", "nodePort": 30053}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}, {"hostname": "lb.example"},
                                                    {"ip": "192.0.2.11", "ipMode": "Proxy"},
                                                    {"ip": "192.0.2.12", "ipMode": "VIP"}]}}
        }))
        .unwrap();
        assert_eq!(
            ServiceView::from(&service),
            ServiceView {
                cluster_ips: vec!["10.96.0.20".parse().unwrap(), "fd00::20".parse().unwrap()],
                ports: vec![
                    PortView {
                        name: "http".into(),
                        port: 80,
                        transport: Some(Transport::Tcp)
                    },
                    PortView {
                        name: String::new(),
                        port: 53,
                        transport: Some(Transport::Udp)
                    },
                ],
                // The UDP port's nodePort is not one kt redirects; a hostname is no IP; a
                // proxying load balancer's IP is not the node's to answer.
                node_ports: vec![(80, 30080)],
                ingress_ips: vec!["192.0.2.10".parse().unwrap(), "192.0.2.12".parse().unwrap()],
                source_ranges: Vec::new(),
                external_ips: Vec::new(),
            }
        );
        let ranged = |spec: serde_json::Value, annotations: serde_json::Value| {
            let service: Service = serde_json::from_value(json!({
                "metadata": {"name": "web", "annotations": annotations}, "spec": spec}))
            .unwrap();
            ServiceView::from(&service)
        };
        let cidrs = |list: &[&str]| {
            list.iter()
                .map(|c| c.parse().unwrap())
                .collect::<Vec<Cidr>>()
        };
        let view = ranged(
            json!({"loadBalancerSourceRanges": ["10.0.0.0/8", " 192.168.1.0/24 ", "garbage",
                                                "010.001.0.0/16", "fd00::/8", "10.0.0.0/33",
                                                "::ffff:203.0.113.0/120", "::ffff:010.0.0.0/104",
                                                "10.0.0.0/+8",
                                                "10.0.0.0 /8", "1.2.3/8", "256.0.0.0/8"],
                   "externalIPs": ["198.51.100.7", "not-an-ip"]}),
            json!({"service.beta.kubernetes.io/load-balancer-source-ranges": "172.16.0.0/12"}),
        );
        assert_eq!(
            view.source_ranges,
            cidrs(&[
                "10.0.0.0/8",
                "192.168.1.0/24",
                "10.1.0.0/16",
                "fd00::/8",
                "203.0.113.0/24",
                "10.0.0.0/8"
            ]),
            "trimmed, leading zeros read as decimal, an IPv4-mapped range as IPv4, what Go does not \
             parse left out, the annotation ignored"
        );
        assert_eq!(
            view.external_ips,
            ["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
        let view = ranged(
            json!({}),
            json!({"service.beta.kubernetes.io/load-balancer-source-ranges": "172.16.0.0/12"}),
        );
        assert!(
            view.source_ranges.is_empty(),
            "kube-proxy does not read the annotation"
        );
        let headless: Service = serde_json::from_value(
            json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}}),
        )
        .unwrap();
        assert!(ServiceView::from(&headless).cluster_ips.is_empty());
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-x", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.7"], "conditions": {"ready": false}},
                {"addresses": ["10.244.2.8"]}
            ]
        }))
        .unwrap();
        assert_eq!(
            SliceView::from(&slice),
            SliceView {
                service: Some("web".into()),
                ports: vec![PortView {
                    name: "http".into(),
                    port: 8080,
                    transport: Some(Transport::Tcp)
                }],
                ready: vec!["10.244.1.5".parse().unwrap(), "10.244.2.8".parse().unwrap()],
            }
        );
    }

    #[test]
    fn events_move_deleted_and_relabelled_slices() {
        let mut index = Index::default();
        index.apply_service(Change::Applied(key("dev", "web"), svc("10.96.0.1")));
        index.apply_service(Change::Applied(key("dev", "api"), svc("10.96.0.2")));
        for (name, owner, ip) in [
            ("m", Some("web"), "10.244.1.1"),
            ("k", Some("web"), "10.244.1.2"),
            ("u", None, "10.244.1.3"),
        ] {
            index.apply_slice(Change::Applied(key("dev", name), slice(owner, ip)));
        }
        index.apply_slice(Change::Applied(
            key("", "nowhere"),
            slice(Some("web"), "10.244.1.4"),
        ));
        assert_eq!(index.slice_names("dev", "web"), ["k", "m"]);
        // m moves to api, k is deleted.
        index.apply_slice(Change::Applied(
            key("dev", "m"),
            slice(Some("api"), "10.244.1.1"),
        ));
        index.apply_slice(Change::Deleted(key("dev", "k")));
        assert!(index.slice_names("dev", "web").is_empty());
        assert_eq!(index.slice_names("dev", "api"), ["m"]);
        assert_eq!(
            index.slices("dev", "api").next().unwrap().ready,
            ["10.244.1.1".parse::<IpAddr>().unwrap()]
        );
        // A slice outlives its Service, and a Service's deletion leaves its slices.
        index.apply_service(Change::Deleted(key("dev", "api")));
        assert!(index.service("dev", "api").is_none());
        assert_eq!(index.slice_names("dev", "api"), ["m"]);
        index.apply_slice(Change::Deleted(key("dev", "m")));
        assert_eq!(index.entries().count(), 1, "only web is left: {index:?}");
    }

    #[test]
    fn a_relist_replaces_what_it_does_not_list_once_done() {
        let mut index = Index::default();
        index.apply_service(Change::Applied(key("dev", "web"), svc("10.96.0.1")));
        index.apply_service(Change::Applied(key("dev", "old"), svc("10.96.0.2")));
        index.apply_slice(Change::Applied(
            key("dev", "web-a"),
            slice(Some("web"), "10.244.1.1"),
        ));
        index.apply_slice(Change::Applied(
            key("dev", "old-a"),
            slice(Some("old"), "10.244.1.2"),
        ));
        index.apply_service(Change::Relist);
        index.apply_service(Change::Listed(key("dev", "web"), svc("10.96.0.1")));
        index.apply_slice(Change::Relist);
        index.apply_slice(Change::Listed(
            key("dev", "web-b"),
            slice(Some("web"), "10.244.1.3"),
        ));
        assert!(
            index.service("dev", "old").is_some(),
            "nothing changes before the list is done"
        );
        let before = index.generation();
        index.apply_service(Change::ListDone);
        index.apply_slice(Change::ListDone);
        assert!(index.service("dev", "old").is_none());
        assert!(index.generation() > before, "old's ClusterIP went");
        assert_eq!(index.slice_names("dev", "web"), ["web-b"]);
        assert!(index.slice_names("dev", "old").is_empty());
        assert_eq!(index.services(), 1);
        assert_eq!(
            index.cluster_ips().collect::<Vec<_>>(),
            ["10.96.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_services_revision_changes_with_it_and_its_slices_only() {
        let svc = |name: &str| -> Service {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "dev"},
                "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}}))
            .unwrap()
        };
        let slice = |name: &str, service: &str, ip: &str| -> EndpointSlice {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "dev",
                    "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4", "ports": [{"port": 8080}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]}))
            .unwrap()
        };
        let key = |name: &str| ("dev".to_owned(), name.to_owned());
        let mut index = Index::default();
        assert_eq!(index.revision_of("dev", "web"), 0);
        index.apply_service(Change::Applied(key("web"), ServiceView::from(&svc("web"))));
        index.apply_service(Change::Applied(
            key("other"),
            ServiceView::from(&svc("other")),
        ));
        let web = index.revision_of("dev", "web");
        assert_ne!(web, 0);
        // Another Service's slice: web's revision stays.
        let other = slice("other-1", "other", "10.244.1.9");
        index.apply_slice(Change::Applied(key("other-1"), SliceView::from(&other)));
        assert_eq!(index.revision_of("dev", "web"), web);
        let mut revisions = vec![web];
        let ours = slice("web-1", "web", "10.244.1.7");
        index.apply_slice(Change::Applied(key("web-1"), SliceView::from(&ours)));
        revisions.push(index.revision_of("dev", "web"));
        index.apply_slice(Change::Deleted(key("web-1")));
        revisions.push(index.revision_of("dev", "web"));
        index.apply_service(Change::Deleted(key("web")));
        revisions.push(index.revision_of("dev", "web"));
        index.apply_service(Change::Applied(key("web"), ServiceView::from(&svc("web"))));
        revisions.push(index.revision_of("dev", "web"));
        let distinct: std::collections::BTreeSet<_> = revisions.iter().collect();
        assert_eq!(
            distinct.len(),
            revisions.len(),
            "each change a new revision: {revisions:?}"
        );
        assert_eq!(revisions[3], 0, "gone with its last slice");
    }

    #[test]
    fn the_generation_follows_cluster_ips_only() {
        let mut index = Index::default();
        let start = index.generation();
        index.apply_service(Change::Applied(key("dev", "web"), svc("10.96.0.1")));
        let added = index.generation();
        assert_ne!(added, start);
        let mut more_ports = svc("10.96.0.1");
        more_ports.ports[0].port = 81;
        index.apply_service(Change::Applied(key("dev", "web"), more_ports));
        index.apply_slice(Change::Applied(
            key("dev", "web-a"),
            slice(Some("web"), "10.244.1.1"),
        ));
        assert_eq!(
            index.generation(),
            added,
            "ports and slices change no ClusterIP"
        );
        index.apply_service(Change::Applied(key("dev", "web"), svc("10.96.0.9")));
        assert_ne!(index.generation(), added);
    }
}
