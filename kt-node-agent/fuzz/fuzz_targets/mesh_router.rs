//! The mesh router's routing decision. Input: `<first bytes>\n\n<header block>`.
//! - `classify` on the connection's first bytes: once it decides (HTTP/1, HTTP/2, opaque),
//!   more bytes never change the decision, and it decides within 24 bytes;
//! - `MeshTarget::matches` on a request's headers: the session's field (first line of the
//!   block) matches exactly when a field of that name, compared without case, has exactly
//!   its value.
#![no_main]

use kt_node_agent::agent::{
    mesh::MeshTarget,
    router::{Protocol, classify},
};
use kt_proto::session::HeaderMatch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (seen, block) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut decided: Option<(usize, Protocol)> = None;
    for n in 0..=seen.len() {
        let now = classify(&seen[..n]);
        match (decided, now) {
            (Some((at, p)), q) => {
                assert_eq!(q, Some(p), "decided {p:?} at {at}, then {q:?} at {n}")
            }
            (None, Some(p)) => decided = Some((n, p)),
            (None, None) => assert!(n < 24, "undecided after {n} bytes"),
        }
    }

    let mut lines = block.split(|b| *b == b'\n').filter_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        let name = http::HeaderName::from_bytes(&line[..colon]).ok()?;
        let value = http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
        Some((name, value))
    });
    let Some((name, value)) = lines.next() else {
        return;
    };
    let Ok(value_text) = value.to_str() else {
        return;
    };
    let target = MeshTarget {
        session: "dev/web-alice".into(),
        owner: "alice@laptop".into(),
        header: HeaderMatch {
            name: name.as_str().to_owned(),
            value: value_text.to_owned(),
        },
        to: ([127, 0, 0, 1], 40001).into(),
    };
    let fields: Vec<(http::HeaderName, http::HeaderValue)> = lines.collect();
    let mut headers = http::HeaderMap::new();
    for (n, v) in &fields {
        headers.append(n.clone(), v.clone());
    }
    let expected = fields.iter().any(|(n, v)| {
        n.as_str().eq_ignore_ascii_case(name.as_str()) && v.as_bytes() == value.as_bytes()
    });
    assert_eq!(target.matches(&headers), expected, "{fields:?}");
});
