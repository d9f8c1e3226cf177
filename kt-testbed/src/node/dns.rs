//! The cluster DNS (image `kt-testbed/dns`), as the kube-dns/CoreDNS specification has it:
//! A records for `<svc>.<ns>.svc.cluster.local` (the ClusterIP, or the ready endpoints of a
//! headless Service), for each ready endpoint of a headless Service by its hostname
//! (`web-0.peers.<ns>.svc.cluster.local`, a StatefulSet's pod) or dashed IP, SRV for named
//! ports (per endpoint for a headless Service), `<a-b-c-d>.<ns>.pod.cluster.local`, NXDOMAIN for
//! other names in the cluster domain and SERVFAIL outside it (no upstream here). It reads
//! Services and EndpointSlices with kube-rs from in-cluster configuration, as a pod does.

use std::{net::Ipv4Addr, str::FromStr as _, sync::Arc};

use futures::StreamExt as _;
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SRV},
    },
};
use k8s_openapi::api::{
    core::v1::Service,
    discovery::v1::{Endpoint, EndpointSlice},
};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub const DOMAIN: &str = "cluster.local";
const TTL: u32 = 5;

/// What a query resolves to.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these A records (empty: the name exists, no data of that type).
    A(Vec<Ipv4Addr>),
    /// NOERROR with SRV records `(port, target)`.
    Srv(Vec<(u16, String)>),
    NxDomain,
    ServFail,
}

/// The cluster state the resolver answers from.
pub trait Directory {
    fn service(&self, ns: &str, name: &str) -> Option<Service>;
    fn slices(&self, ns: &str, name: &str) -> Vec<EndpointSlice>;
}

/// Resolves `name` (lower-case, no trailing dot) for `qtype`.
pub fn resolve(dir: &dyn Directory, name: &str, qtype: RecordType) -> Answer {
    let Some(local) = name.strip_suffix(DOMAIN).and_then(|n| n.strip_suffix('.')) else {
        return if name == DOMAIN {
            Answer::A(vec![])
        } else {
            Answer::ServFail
        };
    };
    let labels: Vec<&str> = local.split('.').collect();
    match labels.as_slice() {
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
            let Some(service) = dir.service(ns, svc) else {
                return Answer::NxDomain;
            };
            let (port_name, proto) = (&port[1..], proto[1..].to_uppercase());
            let found = service
                .spec
                .and_then(|s| s.ports)
                .unwrap_or_default()
                .into_iter()
                .find(|p| {
                    p.name.as_deref() == Some(port_name)
                        && p.protocol.as_deref().unwrap_or("TCP") == proto
                });
            let headless = dir.service(ns, svc).is_some_and(|s| is_headless(&s));
            match found {
                Some(_) if qtype != RecordType::SRV => Answer::A(vec![]),
                // Headless: one target per ready endpoint, at the port its slice gives.
                Some(_) if headless => Answer::Srv(
                    ready_endpoints(dir, ns, svc)
                        .into_iter()
                        .filter_map(|(slice, e)| {
                            let port = slice.ports.as_ref()?.iter().find(|p| {
                                p.name.as_deref() == Some(port_name)
                                    && p.protocol.as_deref().unwrap_or("TCP") == proto
                            })?;
                            Some((
                                port.port? as u16,
                                format!("{}.{svc}.{ns}.svc.{DOMAIN}.", endpoint_label(&e)?),
                            ))
                        })
                        .collect(),
                ),
                Some(p) => Answer::Srv(vec![(p.port as u16, format!("{svc}.{ns}.svc.{DOMAIN}."))]),
                None => Answer::NxDomain,
            }
        }
        // A ready endpoint of a headless Service, by its hostname (a StatefulSet's
        // `web-0.peers.ns.svc…`) or its dashed IP.
        [host, svc, ns, "svc"] => {
            let Some(service) = dir.service(ns, svc) else {
                return Answer::NxDomain;
            };
            if !is_headless(&service) {
                return Answer::NxDomain;
            }
            let mut ips: Vec<Ipv4Addr> = ready_endpoints(dir, ns, svc)
                .into_iter()
                .filter(|(_, e)| endpoint_label(e).as_deref() == Some(*host))
                .flat_map(|(_, e)| e.addresses)
                .filter_map(|a| a.parse().ok())
                .collect();
            ips.sort();
            ips.dedup();
            match ips.is_empty() {
                true => Answer::NxDomain,
                false if qtype == RecordType::A => Answer::A(ips),
                false => Answer::A(vec![]),
            }
        }
        [svc, ns, "svc"] => {
            let Some(service) = dir.service(ns, svc) else {
                return Answer::NxDomain;
            };
            if qtype != RecordType::A {
                return Answer::A(vec![]);
            }
            match service.spec.and_then(|s| s.cluster_ip) {
                Some(ip) if ip != "None" => Answer::A(ip.parse().into_iter().collect()),
                _ => {
                    let mut ips: Vec<Ipv4Addr> = ready_endpoints(dir, ns, svc)
                        .into_iter()
                        .flat_map(|(_, e)| e.addresses)
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    ips.sort();
                    ips.dedup();
                    Answer::A(ips)
                }
            }
        }
        [pod_ip, _ns, "pod"] => match Ipv4Addr::from_str(&pod_ip.replace('-', ".")) {
            Ok(ip) if qtype == RecordType::A => Answer::A(vec![ip]),
            Ok(_) => Answer::A(vec![]),
            Err(_) => Answer::NxDomain,
        },
        // `svc.cluster.local`, `<ns>.svc.cluster.local`: names without data.
        ["svc"] | [_, "svc"] | ["pod"] => Answer::A(vec![]),
        _ => Answer::NxDomain,
    }
}

fn is_headless(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_none_or(|ip| ip == "None")
}

/// The ready endpoints of Service `svc`, each with its slice.
fn ready_endpoints(dir: &dyn Directory, ns: &str, svc: &str) -> Vec<(EndpointSlice, Endpoint)> {
    dir.slices(ns, svc)
        .into_iter()
        .flat_map(|slice| {
            slice
                .endpoints
                .clone()
                .into_iter()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .map(move |e| (slice.clone(), e))
        })
        .collect()
}

/// An endpoint's name under its Service: its hostname, else its IP with dashes.
fn endpoint_label(endpoint: &Endpoint) -> Option<String> {
    endpoint
        .hostname
        .clone()
        .or_else(|| Some(endpoint.addresses.first()?.replace('.', "-")))
}

/// Builds the response to a raw query.
pub fn respond(dir: &dyn Directory, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let Some(q) = request.queries.first().cloned() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    response.add_query(q.clone());
    let name = q.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.');
    match resolve(dir, name, q.query_type()) {
        Answer::A(ips) => {
            response.metadata.authoritative = true;
            for ip in ips {
                response.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
            }
        }
        Answer::Srv(targets) => {
            response.metadata.authoritative = true;
            for (port, target) in targets {
                let target = Name::from_ascii(&target).ok()?;
                response.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 100, port, target)),
                ));
            }
        }
        Answer::NxDomain => {
            response.metadata.authoritative = true;
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        Answer::ServFail => response.metadata.response_code = ResponseCode::ServFail,
    }
    response.to_vec().ok()
}

struct Stores {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
}

impl Directory for Stores {
    fn service(&self, ns: &str, name: &str) -> Option<Service> {
        self.services
            .get(&reflector::ObjectRef::new(name).within(ns))
            .map(|s| (*s).clone())
    }

    fn slices(&self, ns: &str, name: &str) -> Vec<EndpointSlice> {
        self.slices
            .state()
            .into_iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(name)
            })
            .map(|s| (*s).clone())
            .collect()
    }
}

/// The DNS pod's main: serve UDP and TCP on :53 until killed.
pub async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let config = kube::Config::incluster()?;
    let client = kube::Client::try_from(config)?;
    let (services, svc_writer) = reflector::store();
    let (slices, slice_writer) = reflector::store();
    let svc_stream = reflector(
        svc_writer,
        watcher(
            kube::Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .applied_objects()
    .for_each(|_| async {});
    let slice_stream = reflector(
        slice_writer,
        watcher(
            kube::Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        ),
    )
    .applied_objects()
    .for_each(|_| async {});
    let dir = Arc::new(Stores {
        services: services.clone(),
        slices: slices.clone(),
    });
    // The reflectors run as tasks: readiness needs them polled.
    let reflectors = tokio::spawn(async move { tokio::join!(svc_stream, slice_stream) });
    services.wait_until_ready().await?;
    let udp = tokio::net::UdpSocket::bind("0.0.0.0:53").await?;
    let tcp = tokio::net::TcpListener::bind("0.0.0.0:53").await?;
    eprintln!("kt-testbed dns: serving {DOMAIN} on :53");
    let udp_loop = {
        let dir = dir.clone();
        async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(reply) = respond(dir.as_ref(), &buf[..n]) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        }
    };
    let tcp_loop = async move {
        loop {
            let Ok((mut conn, _)) = tcp.accept().await else {
                continue;
            };
            let dir = dir.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if conn.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(reply) = respond(dir.as_ref(), &query) else {
                        return;
                    };
                    let framed = [&(reply.len() as u16).to_be_bytes()[..], &reply].concat();
                    if conn.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    };
    tokio::join!(udp_loop, tcp_loop);
    reflectors.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    struct Fixed(Vec<Service>, Vec<EndpointSlice>);

    impl Directory for Fixed {
        fn service(&self, ns: &str, name: &str) -> Option<Service> {
            self.0
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(ns)
                        && s.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }
        fn slices(&self, _ns: &str, name: &str) -> Vec<EndpointSlice> {
            self.1
                .iter()
                .filter(|s| {
                    s.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"] == name
                })
                .cloned()
                .collect()
        }
    }

    fn dir() -> Fixed {
        let svc = |name: &str, ip: &str| {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}))
            .unwrap()
        };
        let slice = serde_json::from_value(json!({"metadata": {"name": "h-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "headless"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.3"], "hostname": "web-0", "conditions": {"ready": true}},
                          {"addresses": ["10.244.2.5"], "conditions": {"ready": true}},
                          {"addresses": ["10.244.2.4"], "hostname": "web-1", "conditions": {"ready": false}}]})).unwrap();
        Fixed(
            vec![svc("web", "10.96.1.2"), svc("headless", "None")],
            vec![slice],
        )
    }

    #[test]
    fn services_headless_srv_pods_and_misses() {
        let d = dir();
        assert_eq!(
            resolve(&d, "web.default.svc.cluster.local", RecordType::A),
            Answer::A(vec![Ipv4Addr::new(10, 96, 1, 2)])
        );
        assert_eq!(
            resolve(&d, "web.default.svc.cluster.local", RecordType::AAAA),
            Answer::A(vec![])
        );
        assert_eq!(
            resolve(&d, "headless.default.svc.cluster.local", RecordType::A),
            Answer::A(vec![
                Ipv4Addr::new(10, 244, 1, 3),
                Ipv4Addr::new(10, 244, 2, 5)
            ])
        );
        assert_eq!(
            resolve(
                &d,
                "web-0.headless.default.svc.cluster.local",
                RecordType::A
            ),
            Answer::A(vec![Ipv4Addr::new(10, 244, 1, 3)])
        );
        assert_eq!(
            resolve(
                &d,
                "10-244-2-5.headless.default.svc.cluster.local",
                RecordType::A
            ),
            Answer::A(vec![Ipv4Addr::new(10, 244, 2, 5)])
        );
        assert_eq!(
            resolve(
                &d,
                "web-1.headless.default.svc.cluster.local",
                RecordType::A
            ),
            Answer::NxDomain,
            "not ready"
        );
        assert_eq!(
            resolve(&d, "web-0.web.default.svc.cluster.local", RecordType::A),
            Answer::NxDomain,
            "not headless"
        );
        assert_eq!(
            resolve(
                &d,
                "_http._tcp.headless.default.svc.cluster.local",
                RecordType::SRV
            ),
            Answer::Srv(vec![
                (8080, "web-0.headless.default.svc.cluster.local.".into()),
                (
                    8080,
                    "10-244-2-5.headless.default.svc.cluster.local.".into()
                )
            ])
        );
        assert_eq!(
            resolve(
                &d,
                "_http._tcp.web.default.svc.cluster.local",
                RecordType::SRV
            ),
            Answer::Srv(vec![(80, "web.default.svc.cluster.local.".into())])
        );
        assert_eq!(
            resolve(&d, "10-244-1-9.default.pod.cluster.local", RecordType::A),
            Answer::A(vec![Ipv4Addr::new(10, 244, 1, 9)])
        );
        assert_eq!(
            resolve(&d, "nope.default.svc.cluster.local", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            resolve(&d, "web.other.svc.cluster.local", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            resolve(&d, "web.default.cluster.local", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(resolve(&d, "example.com", RecordType::A), Answer::ServFail);
    }

    #[test]
    fn wire_round_trip() {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("WEB.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let reply = Message::from_vec(&respond(&dir(), &q.to_vec().unwrap()).unwrap()).unwrap();
        assert_eq!(reply.metadata.id, q.metadata.id);
        assert_eq!(reply.answers.len(), 1);
        let mut miss = Message::query();
        miss.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("x.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let reply = Message::from_vec(&respond(&dir(), &miss.to_vec().unwrap()).unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    }
}
