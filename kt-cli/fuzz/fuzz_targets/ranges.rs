//! `--includeIps`/`--excludeIps` and the routes `connect` makes of them. Input:
//! `<included>|<excluded>`. What parses prints back to itself; the routes hold exactly the
//! addresses of an included range that no excluded range holds (probed at every range's
//! first address and the first address of each half), and none of them holds another.
#![no_main]

use kt_cli::commands::connect::plan::{parse_ranges, routes};
use kt_proto::net::Cidr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (included, excluded) = text.split_once('|').unwrap_or((text, ""));
    let (Ok(include), Ok(exclude)) = (
        parse_ranges("--includeIps", included),
        parse_ranges("--excludeIps", excluded),
    ) else {
        return;
    };
    // Subtracting a /128 from a /0 makes 128 ranges per hole: keep each run fast.
    if include.len() + exclude.len() > 16 {
        return;
    }
    let shown: Vec<String> = include.iter().map(Cidr::to_string).collect();
    assert_eq!(
        parse_ranges("--includeIps", &shown.join(",")).ok(),
        Some(include.clone())
    );
    let made = routes(&[], &include, &exclude, &[]);
    for (i, a) in made.iter().enumerate() {
        for b in &made[i + 1..] {
            assert!(!a.overlaps(b), "{a} and {b} overlap in {made:?}");
        }
    }
    let probes = include.iter().chain(&exclude).chain(&made).flat_map(|c| {
        let (low, high) = c.halves();
        [c.network(), low.network(), high.network()]
    });
    for address in probes {
        let wanted = include.iter().any(|c| c.contains(address))
            && !exclude.iter().any(|c| c.contains(address));
        let routed = made.iter().any(|c| c.contains(address));
        assert_eq!(routed, wanted, "{address} in {made:?}");
    }
});
