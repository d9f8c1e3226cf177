//! `~/.kt/config`: whatever parses renders to YAML that parses to the same groups (empty
//! groups left out, as `render` does).
#![no_main]

use std::path::Path;

use kt_cli::config::{parse, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = Path::new("/fuzz/config");
    let Ok(groups) = parse(path, text) else {
        return;
    };
    let rendered = render(&groups).expect("parsed groups render");
    let again = parse(path, &rendered).expect("rendered config parses");
    let kept: kt_cli::config::Groups = groups.into_iter().filter(|(_, i)| !i.is_empty()).collect();
    assert_eq!(again, kept, "{text:?} rendered as {rendered:?}");
});
