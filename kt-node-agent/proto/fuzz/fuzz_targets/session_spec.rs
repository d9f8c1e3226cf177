//! A `KtSession` as an agent's watch receives it (JSON any developer may write): reading never
//! panics, and a spec that passes `kt_proto::validate::spec` holds what the agent relies on
//! — a Service name of its own namespace, at most 100 distinct non-zero ports, and a header
//! that the `http` crate (the mesh router's) takes as a field name and value.
#![no_main]

use std::collections::BTreeSet;

use kt_proto::{
    session::{KtSession, SessionMode},
    validate,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(session) = serde_json::from_slice::<KtSession>(data) else {
        return;
    };
    // What was read is written back and read again unchanged (an agent's status patch and a
    // ktctl update go through the same types); an unknown mode has no spelling to write.
    if session.spec.mode != SessionMode::Unknown {
        let written = serde_json::to_vec(&session).expect("a session serializes");
        let again: KtSession = serde_json::from_slice(&written).expect("reads back");
        assert_eq!(again.spec, session.spec);
        assert_eq!(again.status, session.status);
    }
    let spec = &session.spec;
    if validate::spec(spec).is_err() || spec.mode == SessionMode::Unknown {
        return;
    }
    assert!(spec.service.is_empty() || validate::is_dns1035_label(&spec.service));
    assert!(
        !spec.service.contains(['.', '/']),
        "another namespace's Service"
    );
    assert!(spec.ports.len() <= validate::MAX_PORTS);
    let distinct: BTreeSet<u16> = spec.ports.iter().map(|p| p.port).collect();
    assert_eq!(distinct.len(), spec.ports.len());
    assert!(spec.ports.iter().all(|p| p.port > 0 && p.local_port > 0));
    if let Some(header) = &spec.header {
        assert!(header.name.len() + header.value.len() + 2 <= validate::MAX_HEADER_LINE);
        http::HeaderName::from_bytes(header.name.as_bytes())
            .unwrap_or_else(|e| panic!("valid name {:?} refused by http: {e}", header.name));
        http::HeaderValue::from_bytes(header.value.as_bytes())
            .unwrap_or_else(|e| panic!("valid value {:?} refused by http: {e}", header.value));
    }
});
