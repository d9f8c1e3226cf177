//! What a container's `securityContext` grants its process, computed as containerd's CRI
//! plugin does (`WithCapabilities` in `pkg/cri/.../container_create_linux.go`): a
//! privileged container gets every capability; any other starts from the runtime's default
//! set, then `add: [ALL]` makes it every capability, `drop: [ALL]` makes it none, then
//! each named `add` is added and each named `drop` removed. Names may carry the `CAP_`
//! prefix or not, in any case (containerd upper-cases and prefixes them). An unknown name
//! fails the container's creation, as containerd does. `allowPrivilegeEscalation: false`
//! sets `no_new_privs` (an explicit `true`, or none, leaves it unset).
//!
//! Applied by the pod runner ([`crate::node::runner`]) just before it executes the program.
//! Not enforced: `readOnlyRootFilesystem`, `seccompProfile`, `runAsUser`/`runAsGroup`,
//! `procMount`, AppArmor/SELinux options.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The capabilities containerd (and CRI-O, Docker) give a container that is not privileged,
/// when its `securityContext` neither adds nor drops any (containerd's `oci.defaultUnixCaps`).
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecurityError {
    #[error("container {container}: unknown capability {name:?} in securityContext.capabilities")]
    UnknownCapability { container: String, name: String },
}

/// What the runner applies to a container's process before it executes the program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSecurity {
    /// The capability names (`CAP_NET_ADMIN`) the process keeps in its bounding, permitted
    /// and effective sets (its inheritable and ambient sets are emptied, as containerd
    /// does since CVE-2022-24769); `None` leaves the runner's own sets (privileged, or
    /// `kubectl exec`).
    pub capabilities: Option<BTreeSet<String>>,
    /// `prctl(PR_SET_NO_NEW_PRIVS)`: no exec may gain privileges (setuid bits, file
    /// capabilities).
    pub no_new_privs: bool,
}

/// `CAP_NET_ADMIN` for `net_admin`, `NET_ADMIN` or `CAP_NET_ADMIN`; `None` for a name the
/// kernel's list does not have.
pub fn canonical(name: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    all_caps().contains(full.as_str()).then_some(full)
}

/// Every capability name this build knows (the kernel's list up to `CAP_CHECKPOINT_RESTORE`).
fn all_caps() -> BTreeSet<String> {
    caps::all().iter().map(|c| c.to_string()).collect()
}

/// The process security of `container` (a pod spec's container or ephemeral container, as
/// JSON) per its `securityContext`.
pub fn for_container(container: &Value) -> Result<ProcessSecurity, SecurityError> {
    let sc = &container["securityContext"];
    let name = container["name"].as_str().unwrap_or_default();
    let no_new_privs = sc["allowPrivilegeEscalation"].as_bool() == Some(false);
    if sc["privileged"].as_bool() == Some(true) {
        return Ok(ProcessSecurity {
            capabilities: None,
            no_new_privs,
        });
    }
    let names = |list: &str| -> Result<(bool, Vec<String>), SecurityError> {
        let mut all = false;
        let mut named = Vec::new();
        for n in sc["capabilities"][list].as_array().into_iter().flatten() {
            let n = n.as_str().unwrap_or_default();
            if n.eq_ignore_ascii_case("ALL") {
                all = true;
                continue;
            }
            named.push(
                canonical(n).ok_or_else(|| SecurityError::UnknownCapability {
                    container: name.to_owned(),
                    name: n.to_owned(),
                })?,
            );
        }
        Ok((all, named))
    };
    let (add_all, add) = names("add")?;
    let (drop_all, drop) = names("drop")?;
    let mut set: BTreeSet<String> = DEFAULT_CAPS.iter().map(|c| (*c).to_owned()).collect();
    if add_all {
        set = all_caps();
    }
    if drop_all {
        set.clear();
    }
    set.extend(add);
    for d in &drop {
        set.remove(d);
    }
    Ok(ProcessSecurity {
        capabilities: Some(set),
        no_new_privs,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn caps_of(sc: Value) -> Option<Vec<String>> {
        for_container(&json!({"name": "c", "securityContext": sc}))
            .unwrap()
            .capabilities
            .map(|s| s.into_iter().collect())
    }

    fn sorted(names: &[&str]) -> Vec<String> {
        let set: BTreeSet<String> = names.iter().map(|n| (*n).to_owned()).collect();
        set.into_iter().collect()
    }

    #[test]
    fn no_security_context_gets_the_runtime_default() {
        assert_eq!(caps_of(json!(null)), Some(sorted(&DEFAULT_CAPS)));
        assert_eq!(caps_of(json!({})), Some(sorted(&DEFAULT_CAPS)));
    }

    #[test]
    fn privileged_keeps_everything() {
        assert_eq!(caps_of(json!({"privileged": true})), None);
        // `privileged: false` is the default set, not everything.
        assert_eq!(
            caps_of(json!({"privileged": false})),
            Some(sorted(&DEFAULT_CAPS))
        );
    }

    #[test]
    fn drop_all_then_add_is_exactly_the_added() {
        let sc =
            json!({"capabilities": {"drop": ["ALL"], "add": ["BPF", "net_admin", "CAP_PERFMON"]}});
        assert_eq!(
            caps_of(sc),
            Some(sorted(&["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]))
        );
    }

    #[test]
    fn add_extends_and_drop_removes_from_the_default() {
        let sc = json!({"capabilities": {"add": ["NET_ADMIN"], "drop": ["NET_RAW", "CHOWN"]}});
        let mut want: Vec<&str> = DEFAULT_CAPS
            .iter()
            .copied()
            .filter(|c| *c != "CAP_NET_RAW" && *c != "CAP_CHOWN")
            .collect();
        want.push("CAP_NET_ADMIN");
        assert_eq!(caps_of(sc), Some(sorted(&want)));
    }

    #[test]
    fn add_all_with_a_drop_is_everything_but_it_and_drop_all_wins_over_add_all() {
        let all_but_chown =
            caps_of(json!({"capabilities": {"add": ["ALL"], "drop": ["CHOWN"]}})).unwrap();
        assert!(all_but_chown.contains(&"CAP_SYS_ADMIN".to_owned()));
        assert!(!all_but_chown.contains(&"CAP_CHOWN".to_owned()));
        assert_eq!(all_but_chown.len(), caps::all().len() - 1);
        assert_eq!(
            caps_of(json!({"capabilities": {"add": ["ALL"], "drop": ["ALL"]}})),
            Some(Vec::new())
        );
    }

    #[test]
    fn unknown_names_fail_the_container() {
        let err = for_container(
            &json!({"name": "agent", "securityContext": {"capabilities": {"add": ["BPFF"]}}}),
        )
        .unwrap_err();
        assert_eq!(
            err,
            SecurityError::UnknownCapability {
                container: "agent".into(),
                name: "BPFF".into()
            }
        );
    }

    #[test]
    fn no_new_privs_only_when_escalation_is_refused() {
        let nnp = |sc: Value| {
            for_container(&json!({"securityContext": sc}))
                .unwrap()
                .no_new_privs
        };
        assert!(nnp(json!({"allowPrivilegeEscalation": false})));
        assert!(!nnp(json!({"allowPrivilegeEscalation": true})));
        assert!(!nnp(json!({})));
    }
}
