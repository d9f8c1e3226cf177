//! The Job controller: pods of the Job's template run to completion (their
//! `restartPolicy` is Never or OnFailure), `parallelism` at a time, until `completions`
//! have succeeded (or, without `completions`, until one has and none runs); `Indexed` Jobs
//! give each pod its completion index. More failed pods than `backoffLimit`, or a run longer
//! than `activeDeadlineSeconds`, fail the Job. Status counts active, ready, succeeded and
//! failed pods, with start and completion times and the Complete or Failed condition;
//! `ttlSecondsAfterFinished` removes a finished Job. The selector and the pods' labels
//! (`batch.kubernetes.io/controller-uid`, `job-name`) come from the API server's defaults.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{
    Ctl, PodEvent, active, condition, event, ns_name, owned_by, pod_event, pod_from_template,
    pod_ready,
};
use crate::{
    api::store::now_rfc3339,
    controllers::{events::EventType, terminating},
};

const COMPONENT: &str = "job-controller";
const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// The second time field of a Job's conditions.
const PROBE_TIME: &str = "lastProbeTime";

pub(in crate::controllers) fn jobs(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    for job in ctl.list("batch", "jobs") {
        if terminating(&job) {
            continue;
        }
        sync(ctl, &job, &pods);
    }
}

fn finished(job: &Value) -> Option<&Value> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
}

/// Seconds since the RFC 3339 time `t`.
fn seconds_since(t: &Value) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(t.as_str()?).ok()?;
    Some((chrono::Utc::now() - t.to_utc()).num_seconds())
}

/// `0,2-4` for the indexes {0, 2, 3, 4}, as `completedIndexes` lists them.
fn index_ranges(indexes: &BTreeSet<i64>) -> String {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for &i in indexes {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => ranges.push((i, i)),
        }
    }
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn completion_index(pod: &Value) -> Option<i64> {
    pod["metadata"]["annotations"][COMPLETION_INDEX]
        .as_str()?
        .parse()
        .ok()
}

fn sync(ctl: &Ctl, job: &Value, all_pods: &[Value]) {
    if let Some(done) = finished(job) {
        let ttl = job["spec"]["ttlSecondsAfterFinished"].as_i64();
        let age = seconds_since(&job["status"]["completionTime"])
            .or_else(|| seconds_since(&done["lastTransitionTime"]));
        if let (Some(ttl), Some(age)) = (ttl, age)
            && age >= ttl
        {
            ctl.delete("batch", "jobs", job, Some("Foreground"));
        }
        return;
    }
    let ns = ns_name(job).0;
    let pods = owned_by(all_pods, job);
    let running: Vec<&Value> = pods.iter().copied().filter(|p| active(p)).collect();
    let succeeded: Vec<&Value> = pods
        .iter()
        .copied()
        .filter(|p| p["status"]["phase"] == "Succeeded")
        .collect();
    let failed = pods
        .iter()
        .filter(|p| p["status"]["phase"] == "Failed")
        .count() as i64;
    let spec = &job["spec"];
    let parallelism = spec["parallelism"].as_i64().unwrap_or(1).max(0);
    let completions = spec["completions"].as_i64();
    let indexed = spec["completionMode"] == "Indexed";
    let suspended = spec["suspend"] == true;
    let backoff_limit = spec["backoffLimit"].as_i64().unwrap_or(6);
    let start_time = match &job["status"]["startTime"] {
        Value::String(t) => Some(t.clone()),
        _ if suspended => None,
        _ => Some(now_rfc3339()),
    };
    let done_indexes: BTreeSet<i64> = succeeded
        .iter()
        .filter_map(|p| completion_index(p))
        .collect();

    let failure = if failed > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if let Some(deadline) = spec["activeDeadlineSeconds"].as_i64()
        && start_time
            .as_ref()
            .and_then(|t| seconds_since(&json!(t)))
            .is_some_and(|age| age >= deadline)
    {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    let complete = failure.is_none()
        && match (completions, indexed) {
            (Some(c), true) => (0..c).all(|i| done_indexes.contains(&i)),
            (Some(c), false) => succeeded.len() as i64 >= c,
            (None, _) => !succeeded.is_empty() && running.is_empty(),
        };

    // Pods: as many as parallelism and the remaining completions allow; none once done.
    let wanted = if suspended || failure.is_some() || complete {
        0
    } else {
        match completions {
            Some(c) if indexed => parallelism.min(c - done_indexes.len() as i64),
            Some(c) => parallelism.min(c - succeeded.len() as i64),
            None if succeeded.is_empty() => parallelism,
            None => 0,
        }
    };
    let have = running.len() as i64;
    if have < wanted {
        let taken: BTreeSet<i64> = running
            .iter()
            .filter_map(|p| completion_index(p))
            .chain(done_indexes.iter().copied())
            .collect();
        let mut free = (0..completions.unwrap_or(0)).filter(|i| !taken.contains(i));
        for _ in have..wanted {
            let index = if indexed { free.next() } else { None };
            if indexed && index.is_none() {
                break;
            }
            let mut pod = pod_from_template(job, &spec["template"], None, &[]);
            if let Some(i) = index {
                let (name, i) = (ns_name(job).1, i.to_string());
                pod["metadata"]["generateName"] = json!(format!("{name}-{i}-"));
                pod["metadata"]["annotations"][COMPLETION_INDEX] = json!(i);
                pod["metadata"]["labels"][COMPLETION_INDEX] = json!(i);
                pod["spec"]["hostname"] = json!(format!("{name}-{i}"));
                for c in pod["spec"]["containers"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    let entry = json!({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.annotations['{COMPLETION_INDEX}']")}}});
                    match c["env"].as_array_mut() {
                        Some(env) => env.insert(0, entry),
                        None => c["env"] = json!([entry]),
                    }
                }
            }
            if let Ok(created) = ctl.create("", "pods", ns, pod) {
                pod_event(ctl, COMPONENT, job, PodEvent::Created, &created);
            }
        }
    } else if have > wanted {
        for pod in running.iter().rev().take((have - wanted) as usize) {
            ctl.delete("", "pods", pod, None);
            pod_event(ctl, COMPONENT, job, PodEvent::Deleted, pod);
        }
    }

    let previous = &job["status"]["conditions"];
    // Pods just made or deleted count as they will be, as the controller's expectations do.
    let mut status = json!({
        "active": wanted,
        "ready": running.iter().filter(|p| pod_ready(p)).count(),
        "succeeded": succeeded.len(),
        "failed": failed,
        "terminating": pods.iter().filter(|p| terminating(p)).count(),
        "uncountedTerminatedPods": {},
    });
    if let Some(t) = &start_time {
        status["startTime"] = json!(t);
    }
    if indexed {
        status["completedIndexes"] = json!(index_ranges(&done_indexes));
    }
    let mut conditions: Vec<Value> = Vec::new();
    if suspended {
        conditions.push(condition(
            previous,
            "Suspended",
            true,
            "JobSuspended",
            "Job suspended",
            PROBE_TIME,
        ));
    }
    if let Some((reason, message)) = failure {
        for kind in ["FailureTarget", "Failed"] {
            conditions.push(condition(previous, kind, true, reason, message, PROBE_TIME));
        }
        event(ctl, COMPONENT, job, EventType::Warning, reason, message);
    } else if complete {
        let message = "Reached expected number of succeeded pods";
        for kind in ["SuccessCriteriaMet", "Complete"] {
            conditions.push(condition(
                previous,
                kind,
                true,
                "CompletionsReached",
                message,
                PROBE_TIME,
            ));
        }
        status["completionTime"] = json!(now_rfc3339());
        event(
            ctl,
            COMPONENT,
            job,
            EventType::Normal,
            "Completed",
            "Job completed",
        );
    }
    if !conditions.is_empty() {
        status["conditions"] = json!(conditions);
    }
    ctl.set_status("batch", "jobs", job, status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_indexes_are_listed_as_ranges() {
        let set = |v: &[i64]| v.iter().copied().collect::<BTreeSet<i64>>();
        assert_eq!(index_ranges(&set(&[])), "");
        assert_eq!(index_ranges(&set(&[0])), "0");
        assert_eq!(index_ranges(&set(&[0, 2, 3, 4, 7])), "0,2-4,7");
    }
}
