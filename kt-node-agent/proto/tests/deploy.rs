//! `deploy/` agrees with kt-proto: the CRD is the one `KtSession` derives, and the
//! DaemonSet's namespace, labels, ports and environment are the contract's.
//!
//! `KT_BLESS=1 cargo test -p kt-proto --test deploy` rewrites `deploy/base/crd.yaml` from the
//! type after a change to it.

use std::path::PathBuf;

use kt_proto::{agent, env, session::KtSession};
use kube::CustomResourceExt as _;
use serde_json::{Value, json};

fn deploy_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/base")
        .join(name)
}

/// Every document of a (multi-document) YAML file in `deploy/base/`, as JSON.
fn documents(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy_file(name)).expect("deploy file reads");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

const CRD_HEADER: &str = "\
# One object per redirected Service (agent mode): written by ktctl, renewed by the agent
# holding the session's tunnel, read by every agent. Who may create one in a namespace may
# redirect that namespace's Services (see rbac.yaml, ClusterRole kt-developer).
# Generated from kt-proto's KtSession: KT_BLESS=1 cargo test -p kt-proto --test deploy
";

/// The CRD as deploy/ ships it: the derived one, labelled as part of kt.
fn generated_crd() -> Value {
    let mut crd = serde_json::to_value(KtSession::crd()).expect("CRD serialises");
    crd["metadata"]["labels"] = json!({"app.kubernetes.io/part-of": "kt"});
    crd
}

#[test]
fn the_crd_in_deploy_is_the_one_kt_session_derives() {
    let generated = generated_crd();
    if std::env::var_os("KT_BLESS").is_some() {
        let yaml = serde_yaml::to_string(&generated).expect("CRD as YAML");
        std::fs::write(deploy_file("crd.yaml"), format!("{CRD_HEADER}{yaml}"))
            .expect("crd.yaml written");
    }
    let shipped = documents("crd.yaml");
    assert_eq!(
        shipped,
        [generated],
        "deploy/base/crd.yaml differs from KtSession::crd(); regenerate it with \
         KT_BLESS=1 cargo test -p kt-proto --test deploy"
    );
}

#[test]
fn the_crd_keeps_its_status_subresource_and_columns() {
    let crd = generated_crd();
    let version = &crd["spec"]["versions"][0];
    assert_eq!(crd["metadata"]["name"], "ktsessions.kt.dev");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["kts"]));
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Service", "Mode", "Owner", "Node", "Renewed"]);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["leaseSeconds"]["default"], 10);
    assert_eq!(
        spec["properties"]["mode"]["enum"],
        json!(["exchange", "mesh", "connect", "preview"])
    );
}

#[test]
fn the_daemonset_runs_where_and_how_the_contract_says() {
    let docs = documents("daemonset.yaml");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], agent::NAMESPACE);
    assert_eq!(ds["metadata"]["name"], agent::NAME);
    let (label, value) = agent::LABEL_SELECTOR.split_once('=').unwrap();
    assert_eq!(ds["spec"]["template"]["metadata"]["labels"][label], value);
    assert_eq!(ds["spec"]["selector"]["matchLabels"][label], value);

    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let names: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in &names {
        assert!(env::ALL.contains(name), "{name} is not in kt_proto::env");
    }
    for required in [env::NODE_NAME, env::NODE_IP] {
        assert!(
            names.contains(&required),
            "the DaemonSet does not set {required}"
        );
    }
    let ports: Vec<(&str, u64)> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("http", u64::from(agent::HTTP_PORT)),
            ("ssh", u64::from(agent::SSH_PORT))
        ]
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"],
            agent::HTTP_PORT,
            "{probe}"
        );
    }
    // Least privilege (deploy/README.md): the capabilities measured, nothing else.
    let pod = &ds["spec"]["template"]["spec"];
    assert_ne!(pod["hostPID"], true);
    let sc = &container["securityContext"];
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["capabilities"]["add"], json!(["BPF", "NET_ADMIN"]));
}

#[test]
fn the_agent_access_role_is_in_the_agents_namespace() {
    let rbac = documents("rbac.yaml");
    let role = rbac
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "kt-agent-access")
        .expect("Role kt-agent-access");
    assert_eq!(role["metadata"]["namespace"], agent::NAMESPACE);
    let namespace = documents("namespace.yaml");
    assert_eq!(namespace[0]["metadata"]["name"], agent::NAMESPACE);
}
