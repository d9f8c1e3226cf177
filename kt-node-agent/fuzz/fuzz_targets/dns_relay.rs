//! The shadow's DNS relay, one wire-format message at a time (`Relay::respond`, what its UDP
//! and TCP listeners call). The upstream nameserver is a closed loopback port, so every
//! lookup fails fast (ECONNREFUSED) and nothing leaves the machine. Properties: a message
//! that hickory reads gets an answer; the answer reads back, is a response with the
//! query's id, and echoes its first question (or is FORMERR without one). Also the expansion
//! of the asked name (`candidates`) under a resolv.conf read from the same bytes: one
//! candidate per search domain plus the name itself.
#![no_main]

use std::{net::UdpSocket, sync::LazyLock};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use kt_node_agent::dns_relay::{Relay, ResolvConf, candidates};
use libfuzzer_sys::fuzz_target;

/// A loopback UDP port nobody listens on (bound once to find a free one, then closed).
static CLOSED_PORT: LazyLock<u16> = LazyLock::new(|| {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    socket.local_addr().expect("local address").port()
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let conf_text = format!(
        "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local\n{}",
        String::from_utf8_lossy(&data[..data.len().min(64)])
    );
    let Some(mut conf) = ResolvConf::parse(&conf_text) else {
        panic!("a resolv.conf with a nameserver line parses: {conf_text:?}");
    };
    conf.nameserver.set_port(*CLOSED_PORT);
    let Ok(request) = Message::from_vec(data) else {
        return;
    };
    if let Some(q) = request.queries.first() {
        let asked = q.name.to_ascii();
        let names = candidates(&asked, &conf, &["corp.example".to_owned()]);
        assert_eq!(names.len(), conf.search.len() + 1, "{asked:?} → {names:?}");
    }
    // Search domains make one upstream attempt each: keep each run to a few.
    if conf.search.len() > 4 {
        return;
    }
    let relay = Relay::new(conf, vec!["corp.example".to_owned()]);
    let Some(answer) = RUNTIME.block_on(relay.respond(data)) else {
        // hickory read the message but the response could not be written (a name too long
        // to encode again): nothing is sent, which the listener tolerates.
        return;
    };
    let response = Message::from_vec(&answer).expect("the relay's answer parses");
    assert_eq!(response.metadata.id, request.metadata.id);
    assert_eq!(response.metadata.message_type, MessageType::Response);
    match request.queries.first() {
        Some(q) => assert_eq!(response.queries.first(), Some(q)),
        None => assert_eq!(response.metadata.response_code, ResponseCode::FormErr),
    }
});
