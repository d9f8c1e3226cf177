//! `ktctl birdseye`: who holds which Service of the namespace, and with `--showConnector`
//! who is connected to the cluster (ktctl v0.3.7 `command/birdseye.go`,
//! `birdseye/common.go`). The report is [`view`]'s (pure); it goes to stdout.

pub mod view;

use std::io::Write as _;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod},
};
use kt_proto::session::KtSession;
use kube::{Api, api::ListParams};

use crate::{
    args::BirdseyeArgs,
    cluster::{
        self, ClusterError,
        stale::{Inventory, inventory::kt_selector},
    },
    settings::Settings,
};

/// Why `birdseye` failed.
#[derive(Debug, thiserror::Error)]
pub enum BirdseyeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("failed to write the report")]
    Write(#[source] std::io::Error),
    #[error("namespace '{0}' not found")]
    NoNamespace(String),
}

/// Runs `birdseye`.
pub async fn run(settings: &Settings, args: &BirdseyeArgs) -> Result<(), BirdseyeError> {
    let cluster = cluster::connect(&settings.cluster).await?;
    let inventory = Inventory::read(&cluster.client, &cluster.namespace).await?;
    if inventory.services.is_empty() {
        // Listing a namespace that does not exist answers an empty list (a typo in `-n`
        // looked like an empty namespace); ask for it. A user allowed only inside the
        // namespace may not read Namespace objects (403): then the empty report stands.
        let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
        if let Err(kube::Error::Api(status)) = namespaces.get(&cluster.namespace).await
            && status.code == 404
        {
            return Err(BirdseyeError::NoNamespace(cluster.namespace.clone()));
        }
    }
    let sort_by = if args.sort_by == "name" {
        view::SortBy::Name
    } else {
        view::SortBy::Status
    };
    let lines = view::services(&inventory, sort_by, args.hide_natural_service);
    let mut report = view::render_services(&cluster.namespace, &lines);
    if args.show_connector {
        // Connectors of every namespace, as v0.3.7 lists them.
        let everywhere = connectors_everywhere(&cluster.client).await?;
        let found = view::connectors(
            &everywhere.workloads(),
            &everywhere.sessions,
            cluster.clock.now(),
        );
        report.push_str(&view::render_connectors(&found));
    }
    std::io::stdout()
        .lock()
        .write_all(report.as_bytes())
        .map_err(BirdseyeError::Write)
}

/// kt's pods and Deployments and the sessions of every namespace.
async fn connectors_everywhere(client: &kube::Client) -> Result<Inventory, ClusterError> {
    let kt = ListParams::default().labels(&kt_selector());
    Ok(Inventory {
        pods: Api::<Pod>::all(client.clone())
            .list(&kt)
            .await
            .map_err(ClusterError::api("list pods in all namespaces"))?
            .items,
        deployments: Api::<Deployment>::all(client.clone())
            .list(&kt)
            .await
            .map_err(ClusterError::api("list deployments in all namespaces"))?
            .items,
        sessions: cluster::stale::inventory::sessions(Api::<KtSession>::all(client.clone()))
            .await?,
        ..Inventory::default()
    })
}
