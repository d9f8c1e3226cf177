//! What kt and the Go ktctl may have left in a namespace, read in one go: every Service and
//! Deployment (the user's are what gets restored), kt's pods and ConfigMaps (`control-by=kt`),
//! and the agent-mode sessions. `recover`, `clean`, `birdseye` and `connect`'s startup
//! cleanup decide from it without further reads.

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Service},
};
use kt_proto::{compat, session::KtSession};
use kube::{Api, api::ListParams};

use crate::cluster::ClusterError;

/// One namespace's objects (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub services: Vec<Service>,
    pub deployments: Vec<Deployment>,
    /// `control-by=kt` only.
    pub pods: Vec<Pod>,
    /// `control-by=kt` only.
    pub config_maps: Vec<ConfigMap>,
    /// Empty when the `KtSession` kind is not installed or not visible to this user.
    pub sessions: Vec<KtSession>,
}

/// The label selector of everything kt creates.
pub fn kt_selector() -> String {
    format!("{}={}", compat::CONTROL_BY, compat::CONTROL_BY_KT)
}

impl Inventory {
    /// Reads `namespace`'s objects.
    pub async fn read(client: &kube::Client, namespace: &str) -> Result<Self, ClusterError> {
        let all = ListParams::default();
        let kt = ListParams::default().labels(&kt_selector());
        let services = Api::<Service>::namespaced(client.clone(), namespace)
            .list(&all)
            .await
            .map_err(ClusterError::api(format!("list services in {namespace}")))?
            .items;
        let deployments = Api::<Deployment>::namespaced(client.clone(), namespace)
            .list(&all)
            .await
            .map_err(ClusterError::api(format!(
                "list deployments in {namespace}"
            )))?
            .items;
        let pods = Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&kt)
            .await
            .map_err(ClusterError::api(format!("list pods in {namespace}")))?
            .items;
        let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .list(&kt)
            .await
            .map_err(ClusterError::api(format!("list configmaps in {namespace}")))?
            .items;
        let sessions = sessions(Api::namespaced(client.clone(), namespace)).await?;
        Ok(Self {
            services,
            deployments,
            pods,
            config_maps,
            sessions,
        })
    }
}

/// Every session `api` lists; none when the kind is not installed (404) or this user may
/// not list them (403): a cluster without kt's agent has no sessions to look after.
pub async fn sessions(api: Api<KtSession>) -> Result<Vec<KtSession>, ClusterError> {
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => {
            tracing::debug!(code = status.code, "no sessions visible");
            Ok(Vec::new())
        }
        Err(error) => Err(ClusterError::api("list ktsessions")(error)),
    }
}
