//! `ktctl clean`: deletes what ktctl runs that did not finish left in the namespace — kt's
//! and the Go ktctl v0.3.7's objects, judged by their heartbeat and the cluster's clock, and
//! kt's sessions whose lease ended — puts back the Services and Deployments they had
//! changed, and tidies this machine (ktctl v0.3.7 `command/clean.go`, `clean/common.go`).
//! The cluster part's decision is [`crate::cluster::stale::plan`] (the same as `connect`'s
//! startup cleanup), the local part's [`local::plan`]; both pure.
//!
//! `--dryRun` lists what both parts would do and changes nothing (v0.3.7 skips the local
//! part instead). `--localOnly` skips the cluster part.

pub mod local;

use std::time::Duration;

use crate::{
    args::CleanArgs,
    cluster::{
        self, ClusterError,
        stale::{Action, ActionError, Inventory, action, plan},
    },
    commands::connect::system,
    lifecycle::kt_home,
    settings::Settings,
};

/// Why `clean` failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Some actions failed (each is logged); the first is the source.
    #[error("{count} of the cleanup's changes failed")]
    Incomplete {
        count: usize,
        #[source]
        first: ActionError,
    },
}

/// Runs `clean`.
pub async fn run(settings: &Settings, args: &CleanArgs) -> Result<(), CleanError> {
    let threshold = Duration::from_secs(u64::from(args.threshold_in_minus) * 60);
    let mut existing = None;
    let mut failed = Vec::new();
    if !args.local_only {
        let cluster = cluster::connect(&settings.cluster).await?;
        let inventory = Inventory::read(&cluster.client, &cluster.namespace).await?;
        let plan = plan::plan(&inventory, cluster.clock.now(), threshold);
        if plan.is_empty() {
            tracing::info!("No unavailing kt resource found (^.^)YYa!!");
        } else if args.dry_run {
            for line in plan.describe() {
                tracing::info!("{line}");
            }
        } else {
            for (kind, objects) in &plan.delete {
                if !objects.is_empty() {
                    tracing::info!("Deleting {} unavailing kt {}", objects.len(), kind.plural());
                }
            }
            let actions: Vec<Action> = plan.actions();
            failed = action::execute(&cluster.client, &cluster.namespace, &actions).await;
            tracing::info!("Done");
        }
        existing = local::names_everywhere(&cluster.client).await;
    }
    let home = kt_home();
    let mut pids = local::pid_files(&home);
    if let Some(pid) = system::other_connect_running()
        && !pids.iter().any(|p| p.pid == pid)
    {
        pids.push(local::PidFile {
            path: std::path::PathBuf::new(),
            component: "connect".into(),
            pid,
            alive: true,
        });
    }
    let local = local::plan(
        &pids,
        &local::key_files(&home),
        existing.as_ref(),
        system::is_root(),
        system::needing_repair(),
    );
    if args.local_only && local.is_empty() {
        // The cluster part's "nothing found" line is not printed with `--localOnly`.
        tracing::info!("No unavailing local kt file found (^.^)YYa!!");
    } else if args.dry_run {
        for line in local.describe() {
            tracing::info!("{line}");
        }
        if let Some(kept) = &local.keys_kept {
            tracing::info!("{kept}");
        }
        if let Err(why) = &local.dns {
            tracing::info!("{why}");
        }
    } else {
        local::execute(&local, &home);
    }
    for error in failed.iter().skip(1) {
        tracing::error!("{}", kt_proto::error_chain(error));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        let count = failed.len();
        Err(CleanError::Incomplete {
            count,
            first: failed.remove(0),
        })
    }
}
