//! `Cidr` text (a `--includeIps`/`--excludeIps` item, a session's pod and Service ranges):
//! whatever parses prints back to itself, holds its own network, and splits into two
//! halves it holds.
#![no_main]

use kt_proto::net::Cidr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(cidr) = text.parse::<Cidr>() else {
        return;
    };
    let max = if cidr.network().is_ipv4() { 32 } else { 128 };
    assert!(
        cidr.prefix() <= max,
        "{text:?} gave prefix {}",
        cidr.prefix()
    );
    let shown = cidr.to_string();
    assert_eq!(
        shown.parse::<Cidr>(),
        Ok(cidr),
        "{text:?} printed as {shown:?}"
    );
    assert_eq!(
        Cidr::new(cidr.network(), cidr.prefix()),
        cidr,
        "host bits cleared"
    );
    assert!(cidr.contains(cidr.network()));
    let (low, high) = cidr.halves();
    for half in [low, high] {
        assert!(cidr.contains(half.network()) && cidr.overlaps(&half));
        assert_eq!(half.prefix(), (cidr.prefix() + 1).min(max));
    }
});
