//! `deploy/` agrees with kt-proto: the CRD is the one `KtSession` derives, the DaemonSet's
//! namespace, labels, ports and environment are the contract's, and the image names and
//! registry are `kt_proto::images`'.
//!
//! `KT_BLESS=1 cargo test -p kt-proto --test deploy` rewrites `deploy/base/crd.yaml` from the
//! type after a change to it, and the `images:` of `deploy/base/kustomization.yaml` and
//! `deploy/images.env` from `kt_proto::images`.

use std::path::PathBuf;

use kt_proto::{agent, env, images, session::KtSession};
use kube::CustomResourceExt as _;
use serde_json::{Value, json};

/// `deploy/<path>`.
fn deploy_path(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

fn deploy_file(name: &str) -> PathBuf {
    deploy_path("base").join(name)
}

/// Every document of a (multi-document) YAML file in `deploy/base/`, as JSON.
fn documents(name: &str) -> Vec<Value> {
    documents_at(&deploy_file(name))
}

fn documents_at(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("deploy file reads");
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

const KUSTOMIZATION_HEADER: &str = "\
# The images' registry and tag come from kt_proto::images, as deploy/images.env does
# (tests/scripts/images.sh builds them). `images:` is generated:
#   KT_BLESS=1 cargo test -p kt-proto --test deploy
# To take the images from another registry, use an overlay (overlays/private-registry).
";

/// The base's kustomize `images:`: the DaemonSet's placeholder `kt-node-agent` becomes
/// `<REGISTRY>/kt-node-agent:<TAG>`.
fn generated_images() -> Value {
    json!([{
        "name": images::AGENT,
        "newName": format!("{}/{}", images::REGISTRY, images::AGENT),
        "newTag": images::TAG,
    }])
}

/// `deploy/images.env`: what tests/scripts/images.sh names the images it builds (a shell
/// file it sources, so the script needs no YAML parser).
fn generated_images_env() -> String {
    format!(
        "# Generated from kt_proto::images (KT_BLESS=1 cargo test -p kt-proto --test deploy):\n\
         # the names tests/scripts/images.sh gives the images it builds.\n\
         REGISTRY={}\nAGENT_IMAGE={}\nSHADOW_IMAGE={}\nTAG={}\n",
        images::REGISTRY,
        images::AGENT,
        images::SHADOW,
        images::TAG
    )
}

#[test]
fn the_image_names_in_deploy_are_kt_protos() {
    let path = deploy_file("kustomization.yaml");
    if std::env::var_os("KT_BLESS").is_some() {
        let mut kustomization = documents_at(&path).remove(0);
        kustomization["images"] = generated_images();
        let yaml = serde_yaml::to_string(&kustomization).expect("kustomization as YAML");
        std::fs::write(&path, format!("{KUSTOMIZATION_HEADER}{yaml}"))
            .expect("kustomization.yaml written");
        std::fs::write(deploy_path("images.env"), generated_images_env())
            .expect("images.env written");
    }
    let bless = "regenerate it with KT_BLESS=1 cargo test -p kt-proto --test deploy";
    let kustomization = documents_at(&path).remove(0);
    assert_eq!(
        kustomization["images"],
        generated_images(),
        "deploy/base/kustomization.yaml's images differ from kt_proto::images; {bless}"
    );
    assert_eq!(
        std::fs::read_to_string(deploy_path("images.env")).expect("deploy/images.env reads"),
        generated_images_env(),
        "deploy/images.env differs from kt_proto::images; {bless}"
    );
    // The DaemonSet names the placeholder the `images:` entry replaces.
    let docs = documents("daemonset.yaml");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        images::AGENT
    );
    // The private-registry overlay rewrites the name the base produces.
    let overlay = documents_at(&deploy_path("overlays/private-registry/kustomization.yaml"));
    assert_eq!(
        overlay[0]["images"][0]["name"],
        format!("{}/{}", images::REGISTRY, images::AGENT)
    );
}
