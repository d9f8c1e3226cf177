//! The arithmetic of a Deployment's RollingUpdate, as the deployment controller does it
//! (`pkg/controller/deployment/rolling.go`): how far the new ReplicaSet may grow
//! (`maxSurge`) and how far the old ones may shrink (`maxUnavailable`, counting only
//! available pods). Pure: the controller feeds it counts and applies what it returns.

use serde_json::Value;

/// A ReplicaSet as the rollout counts it: its wanted replicas, and how many of its pods
/// are available (at most `replicas`: pods beyond it are about to go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) replicas: i64,
    pub(super) available: i64,
}

/// An int-or-string (`3`, `"25%"`) against `total`; a percentage rounds up or down.
/// `None` when it is neither.
pub(super) fn scaled_value(value: &Value, total: i64, round_up: bool) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let percent: i64 = s.strip_suffix('%')?.parse().ok()?;
            let product = percent * total;
            Some(if round_up {
                (product + 99) / 100
            } else {
                product / 100
            })
        }
        _ => None,
    }
}

/// `(maxSurge, maxUnavailable)` of a Deployment's `spec.strategy.rollingUpdate` for
/// `replicas`: surge rounds up, unavailability down, and were both zero, one pod may be
/// unavailable (the API forbids both zero; the controller guards anyway).
pub(super) fn fenceposts(rolling_update: &Value, replicas: i64) -> (i64, i64) {
    let get = |key: &str, round_up: bool| {
        let value = rolling_update
            .get(key)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or_else(|| Value::from("25%"));
        scaled_value(&value, replicas, round_up).unwrap_or(0).max(0)
    };
    let (surge, unavailable) = (get("maxSurge", true), get("maxUnavailable", false));
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// The new ReplicaSet's replicas: down to `desired` if above it, else up by as much as
/// `max_surge` leaves room for over `all_replicas` (the replicas of every ReplicaSet).
pub(super) fn new_replicas(desired: i64, max_surge: i64, new: i64, all_replicas: i64) -> i64 {
    if new >= desired {
        return desired;
    }
    let max_total = desired + max_surge;
    if all_replicas >= max_total {
        return new;
    }
    new + (max_total - all_replicas).min(desired - new)
}

/// The old ReplicaSets' replicas (same order: oldest first) after this step: first the
/// unavailable pods of old ReplicaSets go, as far as the new ReplicaSet's unavailable pods
/// allow; then available ones, as long as at least `desired - max_unavailable` pods stay
/// available.
pub(super) fn old_replicas(
    desired: i64,
    max_unavailable: i64,
    new: Counts,
    olds: &[Counts],
) -> Vec<i64> {
    let mut olds: Vec<Counts> = olds.to_vec();
    let all: i64 = new.replicas + olds.iter().map(|o| o.replicas).sum::<i64>();
    let min_available = desired - max_unavailable;
    let new_unavailable = new.replicas - new.available;
    let max_scaled_down = all - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return olds.iter().map(|o| o.replicas).collect();
    }
    let mut cleaned = 0;
    for old in &mut olds {
        if cleaned >= max_scaled_down {
            break;
        }
        let unhealthy = old.replicas - old.available;
        if old.replicas == 0 || unhealthy <= 0 {
            continue;
        }
        let down = (max_scaled_down - cleaned).min(unhealthy);
        old.replicas -= down;
        cleaned += down;
    }
    let available: i64 = new.available + olds.iter().map(|o| o.available).sum::<i64>();
    if available > min_available {
        let allowed = available - min_available;
        let mut scaled = 0;
        for old in &mut olds {
            if scaled >= allowed {
                break;
            }
            let down = old.replicas.min(allowed - scaled);
            old.replicas -= down;
            scaled += down;
        }
    }
    olds.iter().map(|o| o.replicas).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn c(replicas: i64, available: i64) -> Counts {
        Counts {
            replicas,
            available,
        }
    }

    #[test]
    fn percentages_round_up_for_surge_and_down_for_unavailability() {
        assert_eq!(fenceposts(&json!({}), 4), (1, 1));
        assert_eq!(fenceposts(&json!({}), 3), (1, 0));
        assert_eq!(fenceposts(&json!({}), 1), (1, 0));
        assert_eq!(
            fenceposts(&json!({"maxSurge": 0, "maxUnavailable": "50%"}), 5),
            (0, 2)
        );
        assert_eq!(
            fenceposts(&json!({"maxSurge": "0%", "maxUnavailable": 0}), 10),
            (0, 1),
            "both zero: one may be unavailable"
        );
        assert_eq!(
            fenceposts(&json!({"maxSurge": 2, "maxUnavailable": "10%"}), 10),
            (2, 1)
        );
        assert_eq!(scaled_value(&json!("x%"), 10, true), None);
    }

    #[test]
    fn the_new_replica_set_grows_within_the_surge() {
        assert_eq!(new_replicas(4, 1, 0, 4), 1);
        assert_eq!(new_replicas(4, 1, 1, 5), 1, "at the surge limit");
        assert_eq!(new_replicas(4, 1, 1, 4), 2);
        assert_eq!(new_replicas(3, 0, 0, 3), 0, "no surge: olds go first");
        assert_eq!(new_replicas(3, 2, 0, 0), 3, "a fresh Deployment");
        assert_eq!(new_replicas(2, 1, 5, 5), 2, "scaled down to desired");
    }

    #[test]
    fn old_replica_sets_shrink_while_enough_pods_stay_available() {
        // 4 wanted, 1 may be unavailable: one old pod can go before any new one is ready.
        assert_eq!(old_replicas(4, 1, c(1, 0), &[c(4, 4)]), [3]);
        // Nothing more until the new pod is available.
        assert_eq!(old_replicas(4, 1, c(2, 0), &[c(3, 3)]), [3]);
        assert_eq!(old_replicas(4, 1, c(2, 1), &[c(3, 3)]), [2]);
        // No unavailability allowed: only available new pods let old ones go.
        assert_eq!(old_replicas(2, 0, c(1, 0), &[c(2, 2)]), [2]);
        assert_eq!(old_replicas(2, 0, c(1, 1), &[c(2, 2)]), [1]);
        // Unavailable old pods go first, within what the new ones leave room for.
        assert_eq!(old_replicas(3, 1, c(1, 1), &[c(3, 1)]), [1]);
        // Oldest first, across several old ReplicaSets.
        assert_eq!(old_replicas(4, 2, c(0, 0), &[c(2, 2), c(2, 2)]), [0, 2]);
        // Done: nothing left to scale.
        assert_eq!(old_replicas(2, 0, c(2, 2), &[c(0, 0)]), [0]);
    }

    /// A simulated rollout (pods become available one step after they are wanted) never
    /// has fewer than `desired - maxUnavailable` available pods, nor more than
    /// `desired + maxSurge` wanted, and ends with only new pods.
    #[test]
    fn a_whole_rollout_keeps_both_bounds_and_finishes() {
        for (desired, surge, unavailable) in
            [(4, 1, 1), (3, 0, 1), (5, 2, 0), (1, 1, 0), (10, 3, 2)]
        {
            let (mut new, mut old) = (c(0, 0), c(desired, desired));
            for step in 0.. {
                assert!(
                    step < 100,
                    "{desired}/{surge}/{unavailable} does not finish"
                );
                let all = new.replicas + old.replicas;
                new.replicas = new_replicas(desired, surge, new.replicas, all);
                old.replicas = old_replicas(desired, unavailable, new, &[old])[0];
                old.available = old.available.min(old.replicas);
                assert!(new.replicas + old.replicas <= desired + surge);
                assert!(new.available + old.available >= desired - unavailable);
                if new == c(desired, desired) && old.replicas == 0 {
                    break;
                }
                new.available = new.replicas;
            }
        }
    }
}
