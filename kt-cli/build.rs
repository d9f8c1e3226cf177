//! Records the git commit and target triple `ktctl --version` reports.

include!("../kt-node-agent/proto/build/version_info.rs");

fn main() {
    emit_version_info();
}
