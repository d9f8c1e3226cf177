//! The workspace's binaries, found in the target profile directory of the running test,
//! benchmark or binary: cargo gives a test `CARGO_BIN_EXE_*` only for its own package's
//! binaries, and `kt-testbed`, `kt-tools`, `ktctl` and `kt-node-agent` are other packages'.

use std::path::{Path, PathBuf};

/// `target/<profile>/NAME`, next to the running executable (a binary) or one directory up
/// (tests and benchmarks run from `target/<profile>/deps`). Panics if it is not built.
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable's path");
    let mut dir = exe.parent().unwrap_or(Path::new("."));
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// The simulated cluster's command (`up`, `down`, `exec`, and what pods run).
pub fn kt_testbed() -> PathBuf {
    built("kt-testbed")
}

/// The test clients (`dig`, `port-forward`, `load`, `forward`, `bulk`, `rr`).
pub fn kt_tools() -> PathBuf {
    built("kt-tools")
}

/// kt's CLI.
pub fn ktctl() -> PathBuf {
    built("ktctl")
}

/// kt's node agent (also kt's shadow).
pub fn kt_node_agent() -> PathBuf {
    built("kt-node-agent")
}

/// The one-shot TCP client of the eBPF tests.
pub fn kt_probe() -> PathBuf {
    built("kt-probe")
}

/// A path as a `&str` for command lines (the target directory's path is UTF-8).
pub fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}
