//! Compiles the Kubernetes protobuf schema into a descriptor set the API server decodes
//! request bodies with (`src/api/protobuf.rs`).
//!
//! The schema is the `.proto` files of the Kubernetes release k8s-openapi is built for
//! (1.33), as the crates.io package `k8s-rs-pb` ships them (`src/v1_33/**/generated.proto`;
//! packages renamed from `k8s.io.api.…` to `api.…`, field numbers unchanged). That package
//! is a build-dependency without features, so none of its generated code is compiled; its
//! directory is found through `cargo metadata`. protox compiles the files in pure Rust.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The Kubernetes release of the schema, as `k8s-rs-pb` names its folders.
const RELEASE: &str = "v1_33";

fn main() {
    let root = schema_root();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect_protos(&root, &root, &mut files);
    files.sort();
    assert!(
        !files.is_empty(),
        "no .proto files under {}",
        root.display()
    );
    let mut compiler = protox::Compiler::new([&root]).expect("protox starts");
    compiler.include_source_info(false).include_imports(true);
    compiler
        .open_files(&files)
        .unwrap_or_else(|e| panic!("compiling the Kubernetes schema: {e}"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("kubernetes.fds");
    std::fs::write(&out, compiler.encode_file_descriptor_set())
        .expect("writing the descriptor set");
}

/// `<k8s-rs-pb>/src/v1_33`, from the package cargo resolved for this build.
fn schema_root() -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(&env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "metadata",
        "--format-version",
        "1",
        "--locked",
        "--manifest-path",
    ])
    .arg(&manifest);
    if let Ok(target) = env::var("TARGET") {
        cmd.args(["--filter-platform", &target]);
    }
    let output = cmd.output().expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "k8s-rs-pb")
        .expect("k8s-rs-pb is a build-dependency");
    let manifest_path = package["manifest_path"].as_str().expect("manifest_path");
    Path::new(manifest_path)
        .parent()
        .expect("package directory")
        .join("src")
        .join(RELEASE)
}

/// Every `.proto` file below `dir`, relative to `root` (as imports name them).
fn collect_protos(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_protos(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root).expect("below root").to_path_buf());
        }
    }
}
