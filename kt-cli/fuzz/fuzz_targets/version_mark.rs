//! `--versionMark`: a mark that parses is a header the mesh router can match — `http` takes
//! its name and value, and the agents' spec rules accept a mesh session carrying it — and
//! `key:value` of the result parses to the same header.
#![no_main]

use kt_cli::commands::mesh::plan::parse_version_mark;
use kt_proto::{
    session::{PortMapping, SessionMode, SessionSpec},
    validate,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(header) = parse_version_mark(text, || "abcde".to_owned()) else {
        return;
    };
    let again = parse_version_mark(&format!("{}:{}", header.name, header.value), || {
        unreachable!("the value is given")
    });
    assert_eq!(again.as_ref(), Ok(&header), "{text:?}");
    http::HeaderName::from_bytes(header.name.as_bytes()).expect("a header name");
    http::HeaderValue::from_bytes(header.value.as_bytes()).expect("a header value");
    let spec = SessionSpec {
        owner: "dev@host".into(),
        mode: SessionMode::Mesh,
        service: "web".into(),
        ports: vec![PortMapping {
            port: 80,
            local_port: 8080,
        }],
        udp_ports: Vec::new(),
        public_key: "ssh-ed25519 AAAA dev@host".into(),
        header: Some(header),
        lease_seconds: 10,
    };
    // Longer than an HTTP field line may be is refused by the agents; anything shorter that
    // ktctl accepts, they accept too.
    let line = spec
        .header
        .as_ref()
        .map_or(0, |h| h.name.len() + 2 + h.value.len());
    if line <= validate::MAX_HEADER_LINE {
        assert_eq!(validate::spec(&spec), Ok(()), "{text:?}");
    }
});
