//! The cluster's controllers, in-process over the store: workloads (Deployment →
//! ReplicaSet → Pods, DaemonSet, StatefulSet, Job), the scheduler, Endpoints and
//! EndpointSlices, garbage collection and namespaces, and the Events they write. Each
//! reconciles everything it owns when a change it cares about arrives, and on a periodic
//! resync where its pass needs one ([`Interests`]). They never touch what they do not own.

mod endpoints;
pub mod events;
mod gc;
mod scheduler;
mod workloads;

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::errors::ApiError,
    api::resources::ResourceType,
    api::store::{DeleteOptions, Event, Part, Store},
};

/// Which changes a controller's passes follow.
#[derive(Clone, Copy)]
struct Interests {
    /// Types whose changes start a pass at once; empty: every type.
    now: &'static [(&'static str, &'static str)],
    /// For a controller whose pass is a function of these types alone (no clock in it):
    /// the periodic resync runs only if one of them changed since the last pass. `None`:
    /// it runs every time (passes that look at the clock, or everything). With 10 000
    /// Services a pass of the endpoints controller is a few hundred milliseconds; one each
    /// second whether or not anything changed would keep a core busy.
    resync_on: Option<&'static [(&'static str, &'static str)]>,
    /// Which changes of those types matter at all (both for `now` and `resync_on`).
    matters: fn(&Event) -> bool,
}

impl Interests {
    fn always(now: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            now,
            resync_on: None,
            matters: |_| true,
        }
    }

    fn names(&self, types: &[(&str, &str)], ev: &Event) -> bool {
        (types.is_empty() || types.iter().any(|(g, p)| ev.group == *g && ev.plural == *p))
            && (self.matters)(ev)
    }
}

/// Starts every controller as a tracked task.
pub fn spawn_all(store: &Arc<Store>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    type Reconcile = fn(&Ctl);
    let all: [(Interests, Reconcile); 9] = [
        (
            Interests::always(&[
                ("apps", "deployments"),
                ("apps", "replicasets"),
                ("", "pods"),
            ]),
            workloads::deployments,
        ),
        (
            Interests::always(&[("apps", "replicasets"), ("", "pods")]),
            workloads::replicasets,
        ),
        (
            Interests::always(&[("apps", "daemonsets"), ("", "pods"), ("", "nodes")]),
            workloads::daemonsets,
        ),
        (
            Interests::always(&[("apps", "statefulsets"), ("", "pods")]),
            workloads::statefulsets,
        ),
        (
            Interests::always(&[("batch", "jobs"), ("", "pods")]),
            workloads::jobs,
        ),
        (
            Interests::always(&[("", "pods"), ("", "nodes")]),
            scheduler::schedule,
        ),
        (
            Interests {
                now: &[("", "services"), ("", "pods")],
                // What a pass reads: hand-written Endpoints are mirrored, and a managed
                // Endpoints or slice someone changed is put back, within a resync.
                resync_on: Some(&[
                    ("", "services"),
                    ("", "pods"),
                    ("", "endpoints"),
                    ("discovery.k8s.io", "endpointslices"),
                ]),
                matters: |_| true,
            },
            endpoints::reconcile,
        ),
        (Interests::always(&[("", "namespaces")]), gc::namespaces),
        // The garbage collector cares about every type, but only about changes of
        // ownership and deletion; its pass reads no clock, so no resync without them.
        (
            Interests {
                now: &[],
                resync_on: Some(&[]),
                matters: gc::gives_work,
            },
            gc::collect,
        ),
    ];
    for (interests, reconcile) in all {
        let ctl = Ctl {
            store: store.clone(),
        };
        tasks.spawn(run(ctl, interests, reconcile, shutdown.clone()));
    }
}

/// Reconciles on start, on every relevant change (batched), and every second when
/// [`Interests::resync_on`] asks for it.
async fn run(ctl: Ctl, interests: Interests, reconcile: fn(&Ctl), shutdown: CancellationToken) {
    let mut rx = ctl.store.subscribe();
    let ctl = Arc::new(ctl);
    pass(&ctl, reconcile).await;
    let mut resync = tokio::time::interval(Duration::from_secs(1));
    // Whether something a resync would look at changed since the last pass.
    let mut changed = false;
    loop {
        let relevant = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = resync.tick() => changed || interests.resync_on.is_none(),
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    changed |= interests.resync_on.is_some_and(|types| interests.names(types, &ev));
                    interests.names(interests.now, &ev)
                }
                Err(RecvError::Lagged(_)) => true,
                Err(RecvError::Closed) => return,
            },
        };
        if relevant {
            while rx.try_recv().is_ok() {}
            changed = false;
            pass(&ctl, reconcile).await;
        }
    }
}

/// One reconcile pass: synchronous work over the whole store (tens of milliseconds with
/// 10 000 Services), so on the blocking pool, where it cannot hold up the two runtime
/// workers that serve the API. A panic in the pass resumes here.
async fn pass(ctl: &Arc<Ctl>, reconcile: fn(&Ctl)) {
    let ctl = ctl.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || reconcile(&ctl)).await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A controller's handle on the store.
pub struct Ctl {
    pub store: Arc<Store>,
}

impl Ctl {
    pub fn rt(&self, group: &str, plural: &str) -> ResourceType {
        self.store
            .registry
            .find_plural(group, plural)
            .expect("built-in type")
    }

    pub fn list(&self, group: &str, plural: &str) -> Vec<Value> {
        self.store.all(group, plural)
    }

    pub fn create(
        &self,
        group: &str,
        plural: &str,
        ns: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        self.store.create(&self.rt(group, plural), ns, obj, false)
    }

    /// Sets `status` unless it is already that (no event for a no-op).
    pub fn set_status(&self, group: &str, plural: &str, obj: &Value, status: Value) {
        if obj["status"] == status {
            return;
        }
        let (ns, name) = ns_name(obj);
        let _ = self.store.modify(
            &self.rt(group, plural),
            ns,
            name,
            Part::Status,
            false,
            |mut o| {
                o["status"] = status;
                Ok(o)
            },
        );
    }

    /// Read-modify-write of a whole object, bypassing client-facing immutability.
    pub fn modify(
        &self,
        group: &str,
        plural: &str,
        obj: &Value,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let (ns, name) = ns_name(obj);
        self.store.modify(
            &self.rt(group, plural),
            ns,
            name,
            Part::System,
            false,
            |mut o| {
                f(&mut o);
                Ok(o)
            },
        )
    }

    pub fn delete(&self, group: &str, plural: &str, obj: &Value, propagation: Option<&str>) {
        let (ns, name) = ns_name(obj);
        let opts = DeleteOptions {
            propagation: propagation.map(String::from),
            ..Default::default()
        };
        let _ = self.store.delete(&self.rt(group, plural), ns, name, &opts);
    }
}

pub fn ns_name(obj: &Value) -> (&str, &str) {
    (
        obj["metadata"]["namespace"].as_str().unwrap_or_default(),
        obj["metadata"]["name"].as_str().unwrap_or_default(),
    )
}

pub fn uid(obj: &Value) -> &str {
    obj["metadata"]["uid"].as_str().unwrap_or_default()
}

pub fn terminating(obj: &Value) -> bool {
    obj["metadata"].get("deletionTimestamp").is_some()
}

/// The uid of the controlling owner, if any.
pub fn controller_uid(obj: &Value) -> Option<&str> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true)
        .and_then(|r| r["uid"].as_str())
}

/// An ownerReference making `owner` the controller of a dependent.
pub fn controller_ref(owner: &Value) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": owner["kind"],
        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// Whether a pod counts as ready (its Ready condition is True).
pub fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Drops zero counters, as Go's `omitempty` does for status integers.
pub fn omit_zeros(mut status: Value) -> Value {
    if let Some(map) = status.as_object_mut() {
        map.retain(|_, v| v.as_i64() != Some(0));
    }
    status
}
