// Shared by the build scripts of ktctl (kt-cli) and kt-node-agent (`include!`d, so each binary
// says which commit and target it was built from without a build-time dependency that
// would rebuild every crate on each commit). Sets `KT_GIT_COMMIT` (12 hex digits, or
// `unknown` outside a git checkout) and `KT_TARGET` (the target triple) for `env!`.

/// Emits the `cargo:` lines for `KT_GIT_COMMIT` and `KT_TARGET`, and reruns the build
/// script when HEAD or the branch it names moves.
fn emit_version_info() {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KT_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=KT_TARGET={}",
        std::env::var("TARGET").unwrap_or_else(|_| "unknown".into())
    );
    // HEAD lives in the worktree's git dir; the branch it points at (or packed-refs) in
    // the common dir. Only files that exist: cargo counts a missing one as changed on every
    // build, which reran this script (and rebuilt the crate and all that depends on it) each
    // time in a checkout without packed-refs.
    let watch = |path: String| {
        if std::fs::metadata(&path).is_ok() {
            println!("cargo:rerun-if-changed={path}");
        }
    };
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch(format!("{git_dir}/HEAD"));
    }
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        watch(format!("{common}/{branch}"));
        watch(format!("{common}/packed-refs"));
    }
}
