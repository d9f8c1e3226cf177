//! The workstation's own resolver — an ISP's or a company's DNS in real life — on the
//! control plane's address (`172.30.0.1:53`, UDP and TCP), so that a resolver on the
//! workstation which forwards non-cluster names (`ktctl connect`'s) forwards for real. It
//! knows one zone, `example.test` (RFC 2606): `www.example.test` and
//! `upstream.example.test`, with addresses from RFC 5737's documentation range; every other
//! name is NXDOMAIN.

use std::net::{Ipv4Addr, SocketAddr};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{node::netio, topology::API_IP};

/// Where the workstation's resolv.conf points.
pub const ADDRESS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(API_IP), 53);
/// The names this resolver knows, with their addresses.
pub const NAMES: [(&str, Ipv4Addr); 2] = [
    ("www.example.test", Ipv4Addr::new(192, 0, 2, 10)),
    ("upstream.example.test", Ipv4Addr::new(192, 0, 2, 53)),
];
const TTL: u32 = 30;

/// The answer to one wire-format query; `None` when it does not parse.
pub fn respond(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    if let Some(question) = request.queries.first() {
        response.add_query(question.clone());
        let asked = question
            .name
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match NAMES.iter().find(|(name, _)| *name == asked) {
            Some((_, ip)) if question.query_type == RecordType::A => {
                response.add_answer(Record::from_rdata(
                    question.name.clone(),
                    TTL,
                    RData::A(A(*ip)),
                ));
            }
            Some(_) => {}
            None => response.metadata.response_code = ResponseCode::NXDomain,
        }
    } else {
        response.metadata.response_code = ResponseCode::FormErr;
    }
    response.to_vec().ok()
}

/// Serves [`respond`] at [`ADDRESS`] inside the network namespace `netns` until `shutdown`.
pub fn spawn(
    netns: &std::path::Path,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let udp = netio::udp(netns, ADDRESS)?;
    let tcp = netio::listen(netns, ADDRESS)?;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = tokio::select! {
                () = stop.cancelled() => return,
                received = udp.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    Err(_) => continue,
                },
            };
            if let Some(reply) = respond(&buf[..n]) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    });
    let connections = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = tcp.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let stop = shutdown.clone();
            connections.spawn(async move {
                let serve = async {
                    loop {
                        let len = conn.read_u16().await?;
                        let mut query = vec![0u8; usize::from(len)];
                        conn.read_exact(&mut query).await?;
                        let Some(reply) = respond(&query) else {
                            return Ok::<(), std::io::Error>(());
                        };
                        let len = u16::try_from(reply.len()).map_err(std::io::Error::other)?;
                        conn.write_all(&[&len.to_be_bytes()[..], &reply].concat())
                            .await?;
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = serve => {}
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use hickory_proto::{op::Query, rr::Name};

    use super::*;

    fn ask(name: &str) -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        Message::from_vec(&respond(&query.to_vec().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn it_knows_its_zone_and_nothing_else() {
        let reply = ask("WWW.example.test.");
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            reply.answers[0].data,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 10)))
        );
        assert_eq!(
            ask("web.default.svc.cluster.local.").metadata.response_code,
            ResponseCode::NXDomain
        );
    }
}
