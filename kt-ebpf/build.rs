//! Rebuild when bpf-linker changes: aya-build links this crate with it.

fn main() {
    // `which` resolves through PATH the same way aya-build's cargo invocation will.
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
