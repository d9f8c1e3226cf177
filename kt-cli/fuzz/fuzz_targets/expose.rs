//! `--expose`: what parses is 1 to N items of non-zero ports, and printing them back as
//! `local[:remote][/udp],…` parses to the same items.
#![no_main]

use kt_cli::commands::exchange::plan::parse_expose;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(items) = parse_expose(text) else {
        return;
    };
    assert!(!items.is_empty(), "{text:?} parsed to no port");
    assert!(
        items
            .iter()
            .all(|i| i.local > 0 && i.remote.is_none_or(|r| r > 0)),
        "{text:?} gave port 0: {items:?}"
    );
    let shown: Vec<String> = items.iter().map(ToString::to_string).collect();
    assert_eq!(parse_expose(&shown.join(",")).ok(), Some(items), "{text:?}");
});
