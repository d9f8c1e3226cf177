//! Builds the eBPF object (`kt-ebpf`, target bpfel-unknown-none) with the nightly toolchain
//! and bpf-linker, into OUT_DIR, where `src/ebpf.rs` embeds it; records the git commit and
//! target `kt-node-agent --version` reports.

use std::path::Path;

include!("proto/build/version_info.rs");

fn main() -> anyhow::Result<()> {
    emit_version_info();
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).join("../kt-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kt-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
