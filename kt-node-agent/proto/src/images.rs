//! kt's container images: their names and the registry they are published under, in one
//! place. `deploy/base/kustomization.yaml` (kustomize `images:`) and `deploy/images.env`
//! (read by `tests/scripts/images.sh`, which builds the images) are generated from these
//! constants (`KT_BLESS=1 cargo test -p kt-proto --test deploy`; the test fails when they
//! differ), and ktctl names kt's shadow image from them.
//!
//! To publish under another registry, change [`REGISTRY`] and bless; an admin who mirrors
//! the images elsewhere uses a kustomize overlay instead (`deploy/overlays/private-registry`).

/// The registry and namespace kt's images are published under (no trailing `/`).
pub const REGISTRY: &str = "ghcr.io/kt-dev";

/// The node agent's repository: one static `kt-node-agent`, the role given as the first
/// argument (`agent` in the DaemonSet, `shadow`, `router`; `/usr/sbin/router` is v0.3.7's
/// router command). It has no default role.
pub const AGENT: &str = "kt-node-agent";

/// kt's shadow image, for ktctl's `--image`: the same binary, whose entrypoint is the
/// `shadow` role, since ktctl's shadow pods (v0.3.7's spec) give no command.
pub const SHADOW: &str = "kt-shadow";

/// The tag of every image of this release: the crate version (no `v`).
pub const TAG: &str = crate::VERSION;

/// `<REGISTRY>/<repository>:<TAG>`, e.g. `ghcr.io/kt-dev/kt-node-agent:0.1.0`.
pub fn reference(repository: &str) -> String {
    format!("{REGISTRY}/{repository}:{TAG}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_registry_repository_and_version() {
        assert_eq!(
            reference(AGENT),
            format!("ghcr.io/kt-dev/kt-node-agent:{}", crate::VERSION)
        );
        assert!(reference(SHADOW).ends_with(&format!("/kt-shadow:{TAG}")));
        assert!(!REGISTRY.ends_with('/'));
    }
}
