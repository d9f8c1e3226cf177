//! The RBAC matrix (unprivileged: the API server alone, `deploy/` applied unmodified with
//! `kubectl apply -k`). For each verb each agent-mode command of ktctl and the node agent
//! use (read from kt-cli and kt-node-agent), and for the verbs they must not have, one row:
//! who asks, what, where, whether `deploy/README.md` says it is allowed, and why. Three
//! identities: `alice`, with only the `kt-developer` ClusterRole bound in `dev`; `bob`,
//! authenticated with no binding; and the agents' ServiceAccount `kt-system/kt-node-agent`.
//! Each row is asked as that identity with a SelfSubjectAccessReview (what `kubectl auth
//! can-i` sends), and a few rows are also tried as real requests, which must agree.
//!
//! The v0.3.7 modes (selector, scale, ephemeral exchange; shadow preview; manual and router
//! mesh) create pods and patch Services and Deployments: `kt-developer` does not grant them
//! (rows below show it), as `deploy/README.md` says.

use std::path::PathBuf;

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::ConfigMap,
};
use kt_proto::session::KtSession;
use kt_testbed::api::{
    api_only::{ApiOptions, UnprivilegedApi, client_for},
    auth::UserInfo,
};
use kt_tests::harness::{apps::DEPLOY, kubectl::kubectl_ok};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// `alice`: `kt-developer` bound in `dev` only.
    Dev,
    /// `bob`: authenticated, nothing bound.
    NoRole,
    /// `system:serviceaccount:kt-system:kt-node-agent`.
    Agent,
}

use Who::{Agent, Dev, NoRole};

const DEV: Option<&str> = Some("dev");
const OTHER: Option<&str> = Some("other");
const SYS: Option<&str> = Some("kt-system");
/// Cluster-wide: a cluster-scoped resource, or a namespaced one across all namespaces.
const ALL: Option<&str> = None;

/// One cell: `who` may (`allowed`) `verb` `group`/`resource` (`resource/subresource`) in
/// `ns`, because `why`.
struct Row {
    who: Who,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    ns: Option<&'static str>,
    allowed: bool,
    why: &'static str,
}

const fn row(
    who: Who,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    ns: Option<&'static str>,
    allowed: bool,
    why: &'static str,
) -> Row {
    Row {
        who,
        verb,
        group,
        resource,
        ns,
        allowed,
        why,
    }
}

const KT: &str = "kt.dev";
const CORE: &str = "";
const DISCOVERY: &str = "discovery.k8s.io";

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    // A developer, agent mode: exchange, mesh, connect and preview write one KtSession.
    row(Dev, "create", KT, "ktsessions", DEV, true, "every agent-mode command creates its session"),
    row(Dev, "create", KT, "ktsessions", OTHER, false, "kt-developer is bound in dev only"),
    row(Dev, "get", KT, "ktsessions", DEV, true, "ktctl waits for the holder's status and the acks"),
    row(Dev, "watch", KT, "ktsessions", DEV, true, "ktctl waits for the holder's status and the acks"),
    row(Dev, "list", KT, "ktsessions", DEV, true, "conflict check: who else exchanges or meshes the Service"),
    row(Dev, "list", KT, "ktsessions", ALL, false, "ktctl falls back to its namespace"),
    row(Dev, "delete", KT, "ktsessions", DEV, true, "Ctrl-C, recover and clean end the session"),
    row(Dev, "patch", KT, "ktsessions", DEV, true, "granted (spec edits); a status in the body is ignored"),
    row(Dev, "patch", KT, "ktsessions/status", DEV, false, "status is the holding agent's"),
    row(Dev, "update", KT, "ktsessions/status", DEV, false, "status is the holding agent's"),
    row(Dev, "get", CORE, "services", DEV, true, "the exchanged Service and its ports"),
    row(Dev, "list", CORE, "pods", DEV, true, "the Service's pods: named target ports, v0.3.7 conflicts"),
    row(Dev, "list", DISCOVERY, "endpointslices", DEV, true, "which nodes hold the endpoints (agent choice)"),
    row(Dev, "create", CORE, "services", DEV, true, "preview publishes a Service"),
    row(Dev, "delete", CORE, "services", DEV, true, "preview's Ctrl-C"),
    row(Dev, "create", DISCOVERY, "endpointslices", DEV, true, "preview's EndpointSlice"),
    row(Dev, "patch", DISCOVERY, "endpointslices", DEV, true, "preview points its slice at the holder"),
    row(Dev, "delete", DISCOVERY, "endpointslices", DEV, true, "preview's Ctrl-C"),
    row(Dev, "create", CORE, "services", OTHER, false, "kt-developer is bound in dev only"),
    row(Dev, "patch", CORE, "services", DEV, false, "agent mode leaves Services alone (selector mode needs more)"),
    row(Dev, "create", CORE, "pods", DEV, false, "agent mode starts no pod (shadow modes need more)"),
    row(Dev, "patch", "apps", "deployments", DEV, false, "scale mode is not part of kt-developer"),
    row(Dev, "list", CORE, "pods", SYS, true, "kt-agent-access: ktctl finds a ready agent"),
    row(Dev, "create", CORE, "pods/portforward", SYS, true, "kt-agent-access: the agent's SSH host key"),
    row(Dev, "get", "apps", "daemonsets", SYS, true, "kt-agent-access: nodes without a ready agent"),
    row(Dev, "create", CORE, "configmaps", SYS, false, "an agent's record vouches for a status"),
    row(Dev, "patch", CORE, "configmaps", SYS, false, "an agent's record vouches for a status"),
    row(Dev, "list", CORE, "nodes", ALL, false, "connect falls back to the pods' addresses"),
    row(Dev, "get", CORE, "secrets", DEV, false, "nothing kt does reads Secrets"),
    // Authenticated, no binding: nothing but finding the agents.
    row(NoRole, "create", KT, "ktsessions", DEV, false, "no kt-developer binding"),
    row(NoRole, "get", KT, "ktsessions", DEV, false, "no kt-developer binding"),
    row(NoRole, "get", CORE, "services", DEV, false, "no kt-developer binding"),
    row(NoRole, "create", CORE, "services", DEV, false, "no kt-developer binding"),
    row(NoRole, "list", CORE, "pods", SYS, true, "kt-agent-access is every authenticated user's"),
    row(NoRole, "create", CORE, "pods/portforward", SYS, true, "the agents' SSH servers admit only session keys"),
    row(NoRole, "patch", CORE, "configmaps", SYS, false, "only agents write records"),
    // The agents' ServiceAccount: five watches, hold, acknowledge, collect, report, record.
    row(Agent, "list", KT, "ktsessions", ALL, true, "watch-sessions"),
    row(Agent, "watch", KT, "ktsessions", ALL, true, "watch-sessions"),
    row(Agent, "get", KT, "ktsessions", DEV, true, "a login newer than its cache"),
    row(Agent, "patch", KT, "ktsessions/status", DEV, true, "the holder's status and every agent's ack"),
    row(Agent, "update", KT, "ktsessions/status", DEV, false, "it only patches status"),
    row(Agent, "delete", KT, "ktsessions", DEV, true, "collects sessions nobody holds"),
    row(Agent, "create", KT, "ktsessions", DEV, false, "sessions are the developers'"),
    row(Agent, "patch", KT, "ktsessions", DEV, false, "a session's spec is the developer's"),
    row(Agent, "list", CORE, "services", ALL, true, "watch-services"),
    row(Agent, "watch", CORE, "services", ALL, true, "watch-services"),
    row(Agent, "list", DISCOVERY, "endpointslices", ALL, true, "watch-endpointslices"),
    row(Agent, "watch", DISCOVERY, "endpointslices", ALL, true, "watch-endpointslices"),
    row(Agent, "list", CORE, "nodes", ALL, true, "watch-nodes: pod ranges, node addresses"),
    row(Agent, "watch", CORE, "nodes", ALL, true, "watch-nodes"),
    row(Agent, "patch", CORE, "services", DEV, false, "it programs eBPF, never Services"),
    row(Agent, "create", CORE, "events", DEV, true, "ForgedStatus events on the session"),
    row(Agent, "list", CORE, "configmaps", SYS, true, "watch-agent-records"),
    row(Agent, "watch", CORE, "configmaps", SYS, true, "watch-agent-records"),
    row(Agent, "create", CORE, "configmaps", SYS, true, "its first record (server-side apply creates)"),
    row(Agent, "patch", CORE, "configmaps", SYS, true, "its record (server-side apply)"),
    row(Agent, "update", CORE, "configmaps", SYS, false, "it only applies its record"),
    row(Agent, "delete", CORE, "configmaps", SYS, false, "records are emptied, never deleted"),
    row(Agent, "patch", CORE, "configmaps", DEV, false, "records live in kt-system only"),
    row(Agent, "list", CORE, "pods", ALL, false, "it reads EndpointSlices, not pods"),
    row(Agent, "create", CORE, "pods", SYS, false, "it starts nothing"),
    row(Agent, "get", CORE, "secrets", SYS, false, "nothing it does reads Secrets"),
];

/// The API server with `deploy/` applied, namespaces `dev` and `other`, `kt-developer`
/// bound to `alice` in `dev`, and a kubeconfig for each identity.
struct Cluster {
    api: UnprivilegedApi,
    _dir: kt_testbed::sys::tempdir::TempDir,
    dev: PathBuf,
    no_role: PathBuf,
    agent: PathBuf,
}

impl Cluster {
    async fn start() -> Self {
        let api = UnprivilegedApi::start(ApiOptions::default()).await.unwrap();
        let admin = &api.kubeconfig;
        kubectl_ok(admin, &["apply", "-k", DEPLOY]);
        for ns in ["dev", "other"] {
            kubectl_ok(admin, &["create", "namespace", ns]);
        }
        // As deploy/README.md tells an admin to grant it.
        kubectl_ok(
            admin,
            &[
                "create",
                "rolebinding",
                "kt-developer",
                "--clusterrole=kt-developer",
                "--user=alice",
                "-n",
                "dev",
            ],
        );
        let dir = kt_testbed::sys::tempdir::TempDir::new("rbac").unwrap();
        let server = format!("https://{}", api.addr);
        let kubeconfig = |file: &str, user: UserInfo| {
            let path = dir.path().join(file);
            let token = api.api.tokens.issue(user.clone());
            kt_testbed::kubeconfig::write(
                &path,
                &server,
                &user.name,
                &token,
                "dev",
                Some(&api.ca_pem),
            )
            .unwrap();
            path
        };
        let dev = kubeconfig("alice", UserInfo::user("alice"));
        let no_role = kubeconfig("bob", UserInfo::user("bob"));
        let agent = kubeconfig(
            "agent",
            UserInfo::service_account("kt-system", "kt-node-agent"),
        );
        Self {
            api,
            _dir: dir,
            dev,
            no_role,
            agent,
        }
    }

    async fn client(&self, who: Who) -> kube::Client {
        client_for(match who {
            Dev => &self.dev,
            NoRole => &self.no_role,
            Agent => &self.agent,
        })
        .await
    }
}

/// Whether the API server allows `row` to its identity, as `kubectl auth can-i` asks.
async fn can_i(client: &kube::Client, row: &Row) -> bool {
    let (resource, subresource) = match row.resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (row.resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(row.verb.into()),
                group: Some(row.group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: row.ns.map(Into::into),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    answer.status.expect("a review's status").allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_roles_allow_each_identity_exactly_what_the_documentation_says() {
    let cluster = Cluster::start().await;
    let mut wrong = Vec::new();
    for who in [Dev, NoRole, Agent] {
        let client = cluster.client(who).await;
        for row in MATRIX.iter().filter(|r| r.who == who) {
            let allowed = can_i(&client, row).await;
            if allowed != row.allowed {
                wrong.push(format!(
                    "{:?} {} {}{} in {}: {} but the matrix says {} ({})",
                    row.who,
                    row.verb,
                    if row.group.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", row.group)
                    },
                    row.resource,
                    row.ns.unwrap_or("all namespaces"),
                    if allowed { "allowed" } else { "forbidden" },
                    if row.allowed { "allowed" } else { "forbidden" },
                    row.why,
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "RBAC differs from the matrix:\n{}",
        wrong.join("\n")
    );
}

fn forbidden<T>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403)
}

/// A few cells as real requests: the authoriser that serves them is the one the reviews ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_requests_are_allowed_and_forbidden_as_the_matrix_says() {
    let cluster = Cluster::start().await;
    let session: KtSession = serde_json::from_value(json!({
        "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
        "metadata": {"name": "s"},
        "spec": {"owner": "alice", "mode": "exchange", "service": "web",
                 "ports": [{"port": 80, "localPort": 8080}], "publicKey": "ssh-ed25519 AAAA"},
    }))
    .expect("a KtSession");

    let dev = cluster.client(Dev).await;
    Api::<KtSession>::namespaced(dev.clone(), "dev")
        .create(&PostParams::default(), &session)
        .await
        .expect("alice creates a session in dev");
    assert!(forbidden(
        Api::<KtSession>::namespaced(dev.clone(), "other")
            .create(&PostParams::default(), &session)
            .await
    ));
    let record = json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "kt-node-agent-node-1"}, "data": {}});
    let apply = PatchParams::apply("rbac-test").force();
    assert!(forbidden(
        Api::<ConfigMap>::namespaced(dev, "kt-system")
            .patch("kt-node-agent-node-1", &apply, &Patch::Apply(&record))
            .await
    ));
    let no_role = cluster.client(NoRole).await;
    assert!(forbidden(
        Api::<KtSession>::namespaced(no_role, "dev")
            .create(&PostParams::default(), &session)
            .await
    ));
    let agent = cluster.client(Agent).await;
    Api::<ConfigMap>::namespaced(agent.clone(), "kt-system")
        .patch("kt-node-agent-node-1", &apply, &Patch::Apply(&record))
        .await
        .expect("the agent applies its record");
    assert!(forbidden(
        Api::<KtSession>::namespaced(agent, "dev")
            .create(&PostParams::default(), &session)
            .await
    ));
    drop(cluster.api);
}
