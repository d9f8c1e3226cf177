//! The pure part of `mesh`: the version mark and whom the Service already belongs to.

use chrono::{DateTime, Utc};
use kt_proto::session::{HeaderMatch, KtSession, SessionMode};

use crate::commands::exchange::plan::Conflict;

/// The header key when `--versionMark` names none (ktctl v0.3.7 `mesh/common.go`).
pub const DEFAULT_KEY: &str = "version";

/// A `--versionMark` that cannot be a header match.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionMarkError {
    #[error(
        "invalid --versionMark key '{0}': it must match ^[a-z][a-z0-9_-]*$ (a lower-case header name)"
    )]
    Key(String),
    #[error(
        "invalid --versionMark value '{0}': it must be visible ASCII without spaces (a header value)"
    )]
    Value(String),
    #[error(
        "invalid --versionMark value '{0}' for manual mode: it names the shadow pod and labels it, so it must be lower-case letters, digits and '-' (at most 40), starting and ending with a letter or digit"
    )]
    ManualValue(String),
}

/// Manual mode names the shadow `<svc>-kt-mesh-<value>` and labels it `<key>=<value>`: the
/// value must fit a DNS-1123 label (Kubernetes "Object Names and IDs") and a label value;
/// 40 characters leave room for the Service's name.
pub fn check_manual_version(header: &HeaderMatch) -> Result<(), VersionMarkError> {
    let v = &header.value;
    let ok = !v.is_empty()
        && v.len() <= 40
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(VersionMarkError::ManualValue(v.clone()))
    }
}

/// v0.3.7's manual-mode banner line (between lines of 57 dashes), with its trailing space.
pub fn manual_banner(header: &HeaderMatch) -> String {
    format!(
        " Now you can update Istio rule by label '{}={}' ",
        header.name, header.value
    )
}

/// `--versionMark` as ktctl v0.3.7 reads it: `val`, `key:` or `key:val`; the key defaults to
/// [`DEFAULT_KEY`], the value to 5 random lower-case letters (`random` gives them). Unlike
/// v0.3.7, which warned and used `version`, a bad key is refused: the developer would
/// otherwise send a header nobody routes on.
pub fn parse_version_mark(
    mark: &str,
    random: impl FnOnce() -> String,
) -> Result<HeaderMatch, VersionMarkError> {
    let (key, value) = match mark.split_once(':') {
        Some((key, value)) => (key, value),
        None => (DEFAULT_KEY, mark),
    };
    let key_ok = key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !key_ok {
        return Err(VersionMarkError::Key(key.to_owned()));
    }
    let value = if value.is_empty() {
        random()
    } else {
        value.to_owned()
    };
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(VersionMarkError::Value(value));
    }
    Ok(HeaderMatch {
        name: key.to_owned(),
        value,
    })
}

/// v0.3.7's banner line: the key upper-cased, with its trailing space.
pub fn banner(header: &HeaderMatch) -> String {
    format!(
        " Now you can access your service by header '{}: {}' ",
        header.name.to_ascii_uppercase(),
        header.value
    )
}

/// Why the Service cannot be meshed with this header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeshConflict {
    /// v0.3.7's text.
    #[error("another user ({holder}) is exchanging service '{service}', cannot apply mesh")]
    Exchanged { service: String, holder: String },
    /// v0.3.7's text, with the holder.
    #[error("another user ({holder}) is meshing service '{service}' via version '{value}'")]
    SameVersion {
        service: String,
        holder: String,
        value: String,
    },
    #[error(
        "service '{service}' is meshed through a router pod (ktctl v0.3.7 auto mode); agent-mode mesh cannot share it: end that mesh first (ktctl recover {service})"
    )]
    RouterMesh { service: String },
    #[error(
        "service '{service}' is meshed in agent mode by {holders}; a router-pod mesh cannot share it"
    )]
    AgentMesh { service: String, holders: String },
}

/// Whether the Service (whose exchange conflict, as [`crate::commands::exchange::plan::conflict`]
/// decides it, is `exchange`) can be meshed with `header` given the live `sessions`: an
/// exchange in any mode refuses it, a mesh of the other kind too (agent sessions, or a v0.3.7
/// router; `router` tells which this one is — the router pod itself sets the version check
/// for its own kind), and so does a live mesh session of the same header name
/// (case-insensitive) and value.
pub fn mesh_conflict(
    service: &str,
    exchange: Option<Conflict>,
    sessions: &[KtSession],
    header: &HeaderMatch,
    now: DateTime<Utc>,
    router: bool,
) -> Option<MeshConflict> {
    match exchange {
        Some(Conflict::Exchanged { holder, .. }) => {
            return Some(MeshConflict::Exchanged {
                service: service.to_owned(),
                holder,
            });
        }
        Some(Conflict::Meshed { .. }) if !router => {
            return Some(MeshConflict::RouterMesh {
                service: service.to_owned(),
            });
        }
        Some(Conflict::MeshedBy { holders, .. }) if router => {
            return Some(MeshConflict::AgentMesh {
                service: service.to_owned(),
                holders,
            });
        }
        Some(Conflict::Meshed { .. } | Conflict::MeshedBy { .. }) | None => {}
    }
    sessions
        .iter()
        .filter(|s| {
            s.spec.service == service
                && s.spec.mode == SessionMode::Mesh
                && s.metadata.deletion_timestamp.is_none()
                && s.lease_live(now)
        })
        .find(|s| {
            s.spec.header.as_ref().is_some_and(|h| {
                h.name.eq_ignore_ascii_case(&header.name) && h.value == header.value
            })
        })
        .map(|s| MeshConflict::SameVersion {
            service: service.to_owned(),
            holder: s.spec.owner.clone(),
            value: header.value.clone(),
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mark(m: &str) -> Result<HeaderMatch, VersionMarkError> {
        parse_version_mark(m, || "abcde".to_owned())
    }

    fn header(name: &str, value: &str) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn version_marks_follow_v0_3_7() {
        assert_eq!(mark(""), Ok(header("version", "abcde")));
        assert_eq!(mark("feo3x"), Ok(header("version", "feo3x")));
        assert_eq!(mark("x-dev:"), Ok(header("x-dev", "abcde")));
        assert_eq!(mark("x-dev:alice"), Ok(header("x-dev", "alice")));
        assert_eq!(
            mark("k:a:b"),
            Ok(header("k", "a:b")),
            "the first colon splits"
        );
        assert_eq!(
            mark("Version:x"),
            Err(VersionMarkError::Key("Version".into()))
        );
        assert_eq!(mark("1k:x"), Err(VersionMarkError::Key("1k".into())));
        assert_eq!(mark(":x"), Err(VersionMarkError::Key(String::new())));
        assert_eq!(mark("k:a b"), Err(VersionMarkError::Value("a b".into())));
        assert_eq!(
            mark("Version:x").unwrap_err().to_string(),
            "invalid --versionMark key 'Version': it must match ^[a-z][a-z0-9_-]*$ (a lower-case header name)"
        );
    }

    #[test]
    fn manual_mode_needs_a_value_that_names_a_pod() {
        assert_eq!(check_manual_version(&header("version", "feo3x")), Ok(()));
        for bad in ["Feo", "a_b", "-a", "a-", "a.b", &"x".repeat(41)] {
            assert!(
                check_manual_version(&header("version", bad)).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            manual_banner(&header("version", "feo3x")),
            " Now you can update Istio rule by label 'version=feo3x' "
        );
    }

    #[test]
    fn the_banner_upper_cases_the_key_and_keeps_v0_3_7s_trailing_space() {
        assert_eq!(
            banner(&header("version", "feo3x")),
            " Now you can access your service by header 'VERSION: feo3x' "
        );
    }

    fn mesh(owner: &str, name: &str, value: &str, renewed: DateTime<Utc>) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": owner, "namespace": "default"},
            "spec": {"owner": owner, "mode": "mesh", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k",
                     "header": {"name": name, "value": value}},
            "status": {"renewTime": renewed}
        }))
        .unwrap()
    }

    #[test]
    fn a_second_developer_is_refused_only_for_the_same_value() {
        let now = Utc::now();
        let alice = mesh("alice@a", "version", "aaaaa", now);
        let gone = mesh(
            "old@o",
            "version",
            "bbbbb",
            now - chrono::TimeDelta::seconds(60),
        );
        let sessions = [alice, gone];
        assert_eq!(
            mesh_conflict(
                "web",
                None,
                &sessions,
                &header("VERSION", "aaaaa"),
                now,
                false
            )
            .unwrap()
            .to_string(),
            "another user (alice@a) is meshing service 'web' via version 'aaaaa'"
        );
        assert_eq!(
            mesh_conflict(
                "web",
                None,
                &sessions,
                &header("version", "bbbbb"),
                now,
                false
            ),
            None,
            "expired"
        );
        assert_eq!(
            mesh_conflict(
                "web",
                None,
                &sessions,
                &header("x-dev", "aaaaa"),
                now,
                false
            ),
            None,
            "another key"
        );
        assert_eq!(
            mesh_conflict(
                "api",
                None,
                &sessions,
                &header("version", "aaaaa"),
                now,
                false
            ),
            None
        );
    }

    #[test]
    fn an_exchange_or_a_router_refuses_a_mesh() {
        let now = Utc::now();
        let exchanged = Some(Conflict::Exchanged {
            service: "web".into(),
            holder: "carol@c".into(),
        });
        assert_eq!(
            mesh_conflict("web", exchanged, &[], &header("version", "x"), now, false)
                .unwrap()
                .to_string(),
            "another user (carol@c) is exchanging service 'web', cannot apply mesh"
        );
        let router = || {
            Some(Conflict::Meshed {
                service: "web".into(),
            })
        };
        assert!(matches!(
            mesh_conflict("web", router(), &[], &header("version", "x"), now, false),
            Some(MeshConflict::RouterMesh { .. })
        ));
        assert_eq!(
            mesh_conflict("web", router(), &[], &header("version", "x"), now, true),
            None,
            "a second router-pod mesh joins the router"
        );
        let agents = Some(Conflict::MeshedBy {
            service: "web".into(),
            holders: "alice@a".into(),
        });
        assert!(matches!(
            mesh_conflict("web", agents, &[], &header("version", "x"), now, true),
            Some(MeshConflict::AgentMesh { .. })
        ));
    }
}
