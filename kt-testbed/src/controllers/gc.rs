//! Garbage collection by ownerReferences (background, foreground and orphan propagation),
//! namespace finalisation, and each namespace's `default` ServiceAccount.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::{Ctl, ns_name, terminating, uid};
use crate::api::store::{Event, EventKind, finalizers};

/// What the collector reads of an object: its metadata's namespace, name, uid,
/// ownerReferences, finalizers and deletionTimestamp, in an object of the same shape, so that
/// a pass copies a few fields per object, not whole objects (with 10 000 Services a pass
/// on every change copying the whole store kept a core busy).
fn collected_fields(obj: &Value) -> Value {
    let meta = &obj["metadata"];
    let mut out = serde_json::Map::new();
    for field in [
        "namespace",
        "name",
        "uid",
        "ownerReferences",
        "finalizers",
        "deletionTimestamp",
    ] {
        if let Some(value) = meta.get(field) {
            out.insert(field.to_owned(), value.clone());
        }
    }
    json!({"metadata": out})
}

/// Every stored object with its (group, plural), as [`collected_fields`].
fn everything(ctl: &Ctl) -> Vec<(String, String, Value)> {
    ctl.store
        .registry
        .all()
        .into_iter()
        .filter(|t| !t.review)
        .map(|t| (t.group, t.plural))
        .collect::<HashSet<_>>()
        .into_iter()
        .flat_map(|(g, p)| {
            ctl.store
                .all_as(&g, &p, collected_fields)
                .into_iter()
                .map(move |o| (g.clone(), p.clone(), o))
        })
        .collect()
}

/// Whether a change can give [`collect`] work, as the real collector's graph sees it: an
/// object deleted (its dependents may be left without owners, a foreground owner may be
/// done), one being deleted (finalizers), one whose ownerReferences appeared, changed or
/// went (its owner may be gone, or be waiting for it in foreground deletion). A status write of an object with no owners — most writes — is
/// none of these: with 10 000 Services a pass on every change kept a core busy.
pub(super) fn gives_work(ev: &Event) -> bool {
    fn owners(o: &Value) -> &Value {
        &o["metadata"]["ownerReferences"]
    }
    ev.kind == EventKind::Deleted
        || !ev.object["metadata"]["deletionTimestamp"].is_null()
        || ev.prev.as_ref().map_or_else(
            || !owners(&ev.object).is_null(),
            // Removed references too: an owner in foreground deletion may be done.
            |prev| owners(prev) != owners(&ev.object),
        )
}

fn owner_uids(obj: &Value) -> Vec<&str> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
        .collect()
}

pub(super) fn collect(ctl: &Ctl) {
    let all = everything(ctl);
    let live: HashSet<&str> = all.iter().map(|(_, _, o)| uid(o)).collect();
    for (group, plural, obj) in &all {
        let owners = owner_uids(obj);
        // Background: a dependent whose owners are all gone goes too. The listing above is
        // one type at a time, so an owner created meanwhile looks absent: confirm each owner
        // by a direct lookup first, as the real collector does.
        if !owners.is_empty()
            && owners.iter().all(|u| !live.contains(u))
            && !terminating(obj)
            && !any_owner_exists(ctl, obj)
        {
            ctl.delete(group, plural, obj, Some("Background"));
        }
        if !terminating(obj) {
            continue;
        }
        let fins = finalizers(obj);
        let dependents: Vec<&(String, String, Value)> = all
            .iter()
            .filter(|(_, _, d)| owner_uids(d).contains(&uid(obj)))
            .collect();
        if fins.contains(&"orphan") {
            for (g, p, d) in &dependents {
                let owner = uid(obj).to_owned();
                let _ = ctl.modify(g, p, d, |o| {
                    let refs: Vec<Value> = o["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| r["uid"] != owner.as_str())
                        .cloned()
                        .collect();
                    o["metadata"]["ownerReferences"] = json!(refs);
                });
            }
            remove_finalizer(ctl, group, plural, obj, "orphan");
        } else if fins.contains(&"foregroundDeletion") {
            for (g, p, d) in &dependents {
                if !terminating(d) {
                    ctl.delete(g, p, d, Some("Foreground"));
                }
            }
            if dependents.is_empty() {
                remove_finalizer(ctl, group, plural, obj, "foregroundDeletion");
            }
        }
    }
}

/// Whether any owner named in `obj`'s ownerReferences exists now, with the same uid.
fn any_owner_exists(ctl: &Ctl, obj: &Value) -> bool {
    let ns = ns_name(obj).0;
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| {
            let (Some(api_version), Some(kind), Some(name)) = (
                r["apiVersion"].as_str(),
                r["kind"].as_str(),
                r["name"].as_str(),
            ) else {
                return false;
            };
            let Some(rt) = ctl.store.registry.find_kind(api_version, kind) else {
                return false;
            };
            ctl.store
                .get(&rt, ns, name)
                .is_ok_and(|owner| owner["metadata"]["uid"] == r["uid"])
        })
}

fn remove_finalizer(ctl: &Ctl, group: &str, plural: &str, obj: &Value, name: &str) {
    let _ = ctl.modify(group, plural, obj, |o| {
        let rest: Vec<Value> = finalizers(o)
            .into_iter()
            .filter(|f| *f != name)
            .map(|f| json!(f))
            .collect();
        o["metadata"]["finalizers"] = json!(rest);
    });
}

pub(super) fn namespaces(ctl: &Ctl) {
    let accounts = ctl.list("", "serviceaccounts");
    for ns in ctl.list("", "namespaces") {
        let (_, name) = ns_name(&ns);
        if !terminating(&ns) {
            if !accounts.iter().any(|a| ns_name(a) == (name, "default")) {
                let _ = ctl.create(
                    "",
                    "serviceaccounts",
                    name,
                    json!({"metadata": {"name": "default"}}),
                );
            }
            continue;
        }
        // Finalise: delete everything in it; remove it once nothing is left.
        let mut left = 0;
        for t in ctl
            .store
            .registry
            .all()
            .into_iter()
            .filter(|t| t.namespaced && !t.review)
        {
            for obj in ctl
                .list(&t.group, &t.plural)
                .into_iter()
                .filter(|o| ns_name(o).0 == name)
            {
                left += 1;
                if !terminating(&obj) {
                    ctl.delete(&t.group, &t.plural, &obj, Some("Background"));
                }
            }
        }
        if left == 0 {
            let _ = ctl.store.purge(&ctl.rt("", "namespaces"), "", name);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Event, EventKind, collected_fields, gives_work};

    #[test]
    fn only_deletion_and_ownership_changes_give_the_collector_work() {
        let event = |kind, object: serde_json::Value, prev: Option<serde_json::Value>| Event {
            rev: 1,
            kind,
            group: String::new(),
            plural: "pods".into(),
            namespace: "dev".into(),
            object,
            prev,
        };
        let owned = json!({"metadata": {"ownerReferences": [{"uid": "rs1"}]}, "status": {"phase": "Running"}});
        let owned_later = json!({"metadata": {"ownerReferences": [{"uid": "rs1"}]}, "status": {"phase": "Succeeded"}});
        let plain = json!({"metadata": {"name": "s"}, "status": {"x": 1}});
        assert!(gives_work(&event(EventKind::Deleted, plain.clone(), None)));
        assert!(
            gives_work(&event(EventKind::Added, owned.clone(), None)),
            "its owner may be gone"
        );
        assert!(!gives_work(&event(EventKind::Added, plain.clone(), None)));
        assert!(
            !gives_work(&event(
                EventKind::Modified,
                owned_later,
                Some(owned.clone())
            )),
            "a status write of an owned object"
        );
        let orphaned = json!({"metadata": {"ownerReferences": []}});
        assert!(gives_work(&event(
            EventKind::Modified,
            orphaned,
            Some(owned.clone())
        )));
        assert!(
            gives_work(&event(EventKind::Modified, plain.clone(), Some(owned))),
            "references removed: a foreground owner may be waiting for this one"
        );
        let terminating = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert!(gives_work(&event(
            EventKind::Modified,
            terminating,
            Some(plain.clone())
        )));
        assert!(!gives_work(&event(
            EventKind::Modified,
            plain.clone(),
            Some(plain)
        )));
    }

    #[test]
    fn the_collector_reads_only_ownership_and_deletion() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "dev", "uid": "u1",
                         "labels": {"app": "web"}, "resourceVersion": "7",
                         "ownerReferences": [{"uid": "rs1", "kind": "ReplicaSet"}],
                         "finalizers": ["orphan"],
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running"}
        });
        assert_eq!(
            collected_fields(&pod),
            json!({"metadata": {"name": "web-1", "namespace": "dev", "uid": "u1",
                                "ownerReferences": [{"uid": "rs1", "kind": "ReplicaSet"}],
                                "finalizers": ["orphan"],
                                "deletionTimestamp": "2026-01-01T00:00:00Z"}})
        );
        let bare = json!({"metadata": {"name": "x"}, "spec": {}});
        assert_eq!(collected_fields(&bare), json!({"metadata": {"name": "x"}}));
    }
}
