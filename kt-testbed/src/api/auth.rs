//! Authentication (bearer tokens: the admin's, users', service accounts', and tokens with
//! an expiry as an OIDC or webhook token authenticator has them; client certificates in
//! `tls.rs`) and RBAC authorisation from the Roles, ClusterRoles and bindings in the store.

use std::{collections::HashMap, sync::RwLock, time::SystemTime};

use serde_json::{Value, json};

use crate::api::store::Store;

pub const ADMIN_USER: &str = "kubernetes-admin";
pub const MASTERS: &str = "system:masters";

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn admin() -> Self {
        Self {
            name: ADMIN_USER.into(),
            groups: vec![MASTERS.into(), "system:authenticated".into()],
        }
    }

    pub fn user(name: &str) -> Self {
        Self {
            name: name.into(),
            groups: vec!["system:authenticated".into()],
        }
    }

    pub fn service_account(ns: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        }
    }

    /// `(namespace, name)` when this is a service account.
    fn service_account_of(&self) -> Option<(&str, &str)> {
        self.name
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')
    }
}

/// Bearer token → user, and when the token stops being accepted (`None`: never).
#[derive(Debug, Default)]
pub struct Tokens {
    by_token: RwLock<HashMap<String, (UserInfo, Option<SystemTime>)>>,
}

impl Tokens {
    pub fn issue(&self, user: UserInfo) -> String {
        self.issue_until(user, None)
    }

    /// A token refused from `expires` on, as kube-apiserver's OIDC authenticator refuses an
    /// ID token past its `exp` and a webhook authenticator one its service says has expired:
    /// `401 Unauthorized`, like an unknown token.
    pub fn issue_until(&self, user: UserInfo, expires: Option<SystemTime>) -> String {
        let token: String = (0..32)
            .map(|_| format!("{:x}", rand::random_range(0..16u8)))
            .collect();
        self.by_token
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), (user, expires));
        token
    }

    pub fn authenticate(&self, token: &str) -> Option<UserInfo> {
        self.authenticate_at(token, SystemTime::now())
    }

    fn authenticate_at(&self, token: &str, now: SystemTime) -> Option<UserInfo> {
        let tokens = self.by_token.read().unwrap_or_else(|e| e.into_inner());
        let (user, expires) = tokens.get(token)?;
        expires.is_none_or(|e| now < e).then(|| user.clone())
    }
}

/// What a request wants to do, in RBAC terms.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `pods` or `pods/log`.
    pub resource: &'a str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// Whether RBAC allows `attrs` for `user`.
pub fn authorize(store: &Store, user: &UserInfo, attrs: &Attributes<'_>) -> bool {
    if user.groups.iter().any(|g| g == MASTERS) {
        return true;
    }
    if attrs.group == "authorization.k8s.io" && attrs.verb == "create" {
        // system:basic-user: everyone may ask what they may do.
        return true;
    }
    rules_for(store, user, attrs.namespace)
        .iter()
        .any(|rule| rule_allows(rule, attrs))
}

/// Every rule that applies to `user` in `namespace` (cluster-wide ones included).
pub fn rules_for(store: &Store, user: &UserInfo, namespace: Option<&str>) -> Vec<Value> {
    let mut rules = Vec::new();
    let cluster_roles = store.all("rbac.authorization.k8s.io", "clusterroles");
    let role_rules = |kind: &str, name: &str, ns: &str, roles: &[Value]| -> Vec<Value> {
        let found = if kind == "ClusterRole" {
            cluster_roles.iter().find(|r| r["metadata"]["name"] == name)
        } else {
            roles
                .iter()
                .find(|r| r["metadata"]["name"] == name && r["metadata"]["namespace"] == ns)
        };
        found
            .and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default()
    };
    for b in store.all("rbac.authorization.k8s.io", "clusterrolebindings") {
        if binds(&b, user, "") {
            rules.extend(role_rules(
                "ClusterRole",
                b["roleRef"]["name"].as_str().unwrap_or_default(),
                "",
                &[],
            ));
        }
    }
    if let Some(ns) = namespace {
        let roles: Vec<Value> = store
            .all("rbac.authorization.k8s.io", "roles")
            .into_iter()
            .filter(|r| r["metadata"]["namespace"] == ns)
            .collect();
        for b in store.all("rbac.authorization.k8s.io", "rolebindings") {
            if b["metadata"]["namespace"] == ns && binds(&b, user, ns) {
                let kind = b["roleRef"]["kind"].as_str().unwrap_or("Role");
                rules.extend(role_rules(
                    kind,
                    b["roleRef"]["name"].as_str().unwrap_or_default(),
                    ns,
                    &roles,
                ));
            }
        }
    }
    rules
}

fn binds(binding: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s["name"].as_str().unwrap_or_default();
            match s["kind"].as_str() {
                Some("User") => name == user.name,
                Some("Group") => user.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    let ns = s["namespace"]
                        .as_str()
                        .filter(|n| !n.is_empty())
                        .unwrap_or(binding_ns);
                    user.service_account_of() == Some((ns, name))
                }
                _ => false,
            }
        })
}

fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let has = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|v| v == "*" || v == want)
    };
    let names: Vec<&str> = rule["resourceNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let name_ok = names.is_empty() || a.name.is_some_and(|n| names.contains(&n));
    has("verbs", a.verb) && has("apiGroups", a.group) && has("resources", a.resource) && name_ok
}

/// The default ClusterRoles of a cluster that kt's manifests and tests bind to.
pub fn default_cluster_roles() -> Vec<Value> {
    let all = json!([
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection"
    ]);
    let read = json!(["get", "list", "watch"]);
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "rules": rules})
    };
    vec![
        role(
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]),
        ),
        role(
            "admin",
            json!([{"apiGroups": ["", "apps", "discovery.k8s.io", "coordination.k8s.io", "rbac.authorization.k8s.io"], "resources": ["*"], "verbs": all}]),
        ),
        role(
            "edit",
            json!([{"apiGroups": ["", "apps", "discovery.k8s.io", "coordination.k8s.io"], "resources": ["*"], "verbs": all}]),
        ),
        role(
            "view",
            json!([{"apiGroups": ["", "apps", "discovery.k8s.io"], "resources": ["*"], "verbs": read}]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::Registry;

    fn store_with(objects: &[(&str, Value)]) -> std::sync::Arc<Store> {
        let store = Store::new(100);
        let reg = Registry::default();
        store
            .create(
                &reg.find("", "v1", "namespaces").unwrap(),
                "",
                json!({"metadata": {"name": "dev"}}),
                false,
            )
            .unwrap();
        for (plural, obj) in objects {
            let rt = reg.find("rbac.authorization.k8s.io", "v1", plural).unwrap();
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            store.create(&rt, &ns, obj.clone(), false).unwrap();
        }
        store
    }

    fn attrs<'a>(verb: &'a str, resource: &'a str, ns: Option<&'a str>) -> Attributes<'a> {
        Attributes {
            verb,
            group: "",
            resource,
            namespace: ns,
            name: None,
        }
    }

    #[test]
    fn a_token_is_refused_from_its_expiry_on() {
        let tokens = Tokens::default();
        let now = SystemTime::now();
        let expires = now + std::time::Duration::from_secs(5);
        let token = tokens.issue_until(UserInfo::user("alice"), Some(expires));
        assert_eq!(
            tokens.authenticate_at(&token, now),
            Some(UserInfo::user("alice"))
        );
        assert_eq!(tokens.authenticate_at(&token, expires), None);
        let forever = tokens.issue(UserInfo::user("bob"));
        assert!(tokens.authenticate_at(&forever, expires).is_some());
    }

    #[test]
    fn role_binding_grants_only_in_its_namespace() {
        let store = store_with(&[
            (
                "roles",
                json!({"metadata": {"name": "pods", "namespace": "dev"},
                "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}]}),
            ),
            (
                "rolebindings",
                json!({"metadata": {"name": "b", "namespace": "dev"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
                "subjects": [{"kind": "User", "name": "alice"}]}),
            ),
        ]);
        let alice = UserInfo::user("alice");
        assert!(authorize(
            &store,
            &alice,
            &attrs("list", "pods", Some("dev"))
        ));
        assert!(authorize(
            &store,
            &alice,
            &attrs("get", "pods/log", Some("dev"))
        ));
        assert!(!authorize(
            &store,
            &alice,
            &attrs("delete", "pods", Some("dev"))
        ));
        assert!(!authorize(
            &store,
            &alice,
            &attrs("list", "pods", Some("default"))
        ));
        assert!(!authorize(
            &store,
            &UserInfo::user("bob"),
            &attrs("list", "pods", Some("dev"))
        ));
        assert!(authorize(
            &store,
            &UserInfo::admin(),
            &attrs("delete", "nodes", None)
        ));
    }

    #[test]
    fn service_accounts_and_cluster_roles() {
        let mut objects: Vec<(&str, Value)> = default_cluster_roles()
            .into_iter()
            .map(|r| ("clusterroles", r))
            .collect();
        objects.push(("clusterrolebindings", json!({"metadata": {"name": "agent"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "kt", "namespace": "kt-system"}]})));
        let store = store_with(&objects);
        let sa = UserInfo::service_account("kt-system", "kt");
        assert!(authorize(
            &store,
            &sa,
            &attrs("watch", "services", Some("any"))
        ));
        assert!(!authorize(
            &store,
            &sa,
            &attrs("create", "services", Some("any"))
        ));
        assert!(!authorize(
            &store,
            &UserInfo::service_account("other", "kt"),
            &attrs("get", "pods", Some("x"))
        ));
    }
}
