//! `clean`'s local part (ktctl v0.3.7 `clean/common.go`): pid files of processes that are
//! gone, key files of sessions that are gone, and the DNS and hosts changes a killed
//! `connect` left. Unlike v0.3.7, which deletes every `~/.kt/key/*.key` (the keys of live
//! sessions too), a key goes only when its session cannot be alive: no ktctl runs on this
//! machine, or no kt object of that name exists in any namespace.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod},
};
use kt_proto::session::KtSession;
use kube::{Api, api::ListParams};

use crate::{cluster::stale::inventory::kt_selector, commands::connect::system};

/// A pid file `~/.kt/pid/<component>-<pid>.pid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidFile {
    pub path: PathBuf,
    pub component: String,
    pub pid: u32,
    pub alive: bool,
}

/// What the local part does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPlan {
    pub pid_files: Vec<PathBuf>,
    pub key_files: Vec<PathBuf>,
    /// Why key files are kept, when some are.
    pub keys_kept: Option<String>,
    /// The system files to restore, or why that is skipped.
    pub dns: Result<Vec<PathBuf>, String>,
}

/// Decides the local part (pure): dead pid files go; a key file (named after its shadow or
/// session) goes when no ktctl runs here (`pids` has no live one) or when `existing` — the
/// names of kt's objects in every namespace, when known — lacks its name; DNS and hosts are
/// restored (`dns_changed`) only by root and only when no connect runs.
pub fn plan(
    pids: &[PidFile],
    keys: &[(PathBuf, String)],
    existing: Option<&BTreeSet<String>>,
    root: bool,
    dns_changed: Vec<PathBuf>,
) -> LocalPlan {
    let any_alive = pids.iter().any(|p| p.alive);
    let mut key_files = Vec::new();
    let mut kept = 0;
    for (path, name) in keys {
        let gone = !any_alive || existing.is_some_and(|names| !names.contains(name));
        if gone {
            key_files.push(path.clone());
        } else {
            kept += 1;
        }
    }
    let keys_kept = (kept > 0).then(|| {
        if existing.is_some() {
            format!("{kept} key files belong to sessions that still exist, kept")
        } else {
            format!(
                "{kept} key files kept: a ktctl runs here and which sessions are gone cannot be told without listing the cluster's kt objects"
            )
        }
    });
    let connect = pids
        .iter()
        .find(|p| p.alive && p.component == "connect")
        .map(|p| p.pid);
    let dns = if let Some(pid) = connect {
        Err(format!(
            "Connect process {pid} is running, DNS cleanup skipped"
        ))
    } else if !root {
        Err("Not root user, DNS cleanup skipped".to_owned())
    } else {
        Ok(dns_changed)
    };
    LocalPlan {
        pid_files: pids
            .iter()
            .filter(|p| !p.alive)
            .map(|p| p.path.clone())
            .collect(),
        key_files,
        keys_kept,
        dns,
    }
}

impl LocalPlan {
    /// Whether there is nothing to remove, restore or report.
    pub fn is_empty(&self) -> bool {
        self.pid_files.is_empty()
            && self.key_files.is_empty()
            && self.keys_kept.is_none()
            && self.dns.as_ref().is_ok_and(Vec::is_empty)
    }

    /// The `--dryRun` listing, in the cluster part's format.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (what, files) in [
            ("dead pid files", &self.pid_files),
            ("key files of ended sessions", &self.key_files),
        ] {
            if !files.is_empty() {
                lines.push(format!("Find {} {what} to remove:", files.len()));
                lines.extend(files.iter().map(|f| format!(" * {}", f.display())));
            }
        }
        if let Ok(files) = &self.dns
            && !files.is_empty()
        {
            lines.push(format!(
                "Find {} system files a killed connect changed to restore:",
                files.len()
            ));
            lines.extend(files.iter().map(|f| format!(" * {}", f.display())));
        }
        lines
    }
}

/// The pid files under `home`.
pub fn pid_files(home: &Path) -> Vec<PidFile> {
    let Ok(entries) = std::fs::read_dir(home.join("pid")) else {
        return Vec::new();
    };
    let mut found: Vec<PidFile> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (component, pid) = name.strip_suffix(".pid")?.rsplit_once('-')?;
            let pid: u32 = pid.parse().ok()?;
            Some(PidFile {
                path: entry.path(),
                component: component.to_owned(),
                pid,
                alive: system::process_alive(pid),
            })
        })
        .collect();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// The key files under `home` with the name each is for.
pub fn key_files(home: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(home.join("key")) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, String)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let session = name.strip_suffix(".key")?.to_owned();
            Some((entry.path(), session))
        })
        .collect();
    found.sort();
    found
}

/// The names of kt's pods, Deployments, ConfigMaps and sessions in every namespace; `None`
/// when this user may not list them all.
pub async fn names_everywhere(client: &kube::Client) -> Option<BTreeSet<String>> {
    let kt = ListParams::default().labels(&kt_selector());
    let mut names = BTreeSet::new();
    let mut add = |metas: Vec<kube::api::ObjectMeta>| {
        names.extend(metas.into_iter().filter_map(|m| m.name));
    };
    let pods = Api::<Pod>::all(client.clone()).list_metadata(&kt).await;
    add(pods.ok()?.items.into_iter().map(|p| p.metadata).collect());
    let cms = Api::<ConfigMap>::all(client.clone())
        .list_metadata(&kt)
        .await;
    add(cms.ok()?.items.into_iter().map(|p| p.metadata).collect());
    let deployments = Api::<Deployment>::all(client.clone())
        .list_metadata(&kt)
        .await;
    add(deployments
        .ok()?
        .items
        .into_iter()
        .map(|p| p.metadata)
        .collect());
    let sessions =
        crate::cluster::stale::inventory::sessions(Api::<KtSession>::all(client.clone())).await;
    add(sessions.ok()?.into_iter().map(|s| s.metadata).collect());
    Some(names)
}

/// Carries out `plan`, logging each step.
pub fn execute(plan: &LocalPlan, home: &Path) {
    for path in &plan.pid_files {
        if std::fs::remove_file(path).is_ok() {
            tracing::info!("Removed pid file {}", path.display());
        }
    }
    for path in &plan.key_files {
        if std::fs::remove_file(path).is_ok() {
            tracing::info!("Removed key file {}", path.display());
        }
    }
    if let Some(kept) = &plan.keys_kept {
        tracing::info!("{kept}");
    }
    match &plan.dns {
        Err(why) => tracing::info!("{why}"),
        Ok(files) if files.is_empty() => {}
        Ok(_) => match system::repair(home) {
            Ok(repaired) => {
                for path in repaired {
                    tracing::info!(
                        "Restored {} (a connect that did not finish had changed it)",
                        path.display()
                    );
                }
            }
            Err(error) => tracing::warn!("{}", kt_proto::error_chain(&error)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(component: &str, pid: u32, alive: bool) -> PidFile {
        PidFile {
            path: PathBuf::from(format!("/h/pid/{component}-{pid}.pid")),
            component: component.into(),
            pid,
            alive,
        }
    }

    fn keys() -> Vec<(PathBuf, String)> {
        ["web-kt-exchange-aaaaa", "kt-connect-shadow-bbbbb"]
            .iter()
            .map(|n| (PathBuf::from(format!("/h/key/{n}.key")), (*n).to_owned()))
            .collect()
    }

    #[test]
    fn only_the_keys_of_sessions_that_are_gone_go() {
        let pids = [pid("exchange", 10, true), pid("mesh", 11, false)];
        let existing = BTreeSet::from(["kt-connect-shadow-bbbbb".to_owned()]);
        let p = plan(&pids, &keys(), Some(&existing), true, Vec::new());
        assert_eq!(p.pid_files, [PathBuf::from("/h/pid/mesh-11.pid")]);
        assert_eq!(
            p.key_files,
            [PathBuf::from("/h/key/web-kt-exchange-aaaaa.key")]
        );
        assert!(p.keys_kept.is_some());
        // Without the cluster's names, a live ktctl keeps every key; none running, all go.
        let p = plan(&pids, &keys(), None, true, Vec::new());
        assert!(p.key_files.is_empty() && p.keys_kept.is_some());
        let p = plan(&[pid("mesh", 11, false)], &keys(), None, true, Vec::new());
        assert_eq!((p.key_files.len(), p.keys_kept), (2, None));
    }

    #[test]
    fn dns_is_restored_by_root_only_and_never_under_a_running_connect() {
        let changed = vec![PathBuf::from("/etc/resolv.conf")];
        let p = plan(&[], &[], None, true, changed.clone());
        assert_eq!(p.dns, Ok(changed.clone()));
        assert!(p.describe().iter().any(|l| l == " * /etc/resolv.conf"));
        let p = plan(&[], &[], None, false, changed.clone());
        assert_eq!(p.dns, Err("Not root user, DNS cleanup skipped".into()));
        let p = plan(&[pid("connect", 42, true)], &[], None, true, changed);
        assert_eq!(
            p.dns,
            Err("Connect process 42 is running, DNS cleanup skipped".into())
        );
    }
}
