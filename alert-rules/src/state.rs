//! Alert instance state as Prometheus keeps it: a new result is **pending** (active
//! since the evaluation that first returned it), **firing** once it has been returned
//! for `for`, and when it is no longer returned a pending instance is dropped while a
//! firing one is **resolved**, unless `keep_firing_for` still runs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Label set of an alert instance.
pub type Labels = BTreeMap<String, String>;

/// Where an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// Returned, not yet for `for`.
    Pending,
    /// Returned for at least `for` (or kept firing).
    Firing,
    /// Was firing, no longer returned.
    Resolved,
}

impl AlertState {
    /// `pending`, `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// Name of a state or of its absence (`inactive`).
pub fn state_name(state: Option<AlertState>) -> &'static str {
    state.map(AlertState::as_str).unwrap_or("inactive")
}

/// One alert instance of a rule. Labels and annotations are shared with the
/// evaluation that made them (an instance that stays keeps the same ones round after
/// round without copying them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Its labels (alertname, the row's columns, registry fields, rule labels).
    pub labels: Arc<Labels>,
    /// Its annotations, expanded at the last evaluation that returned it.
    pub annotations: Arc<Labels>,
    /// Its value at the last evaluation that returned it.
    pub value: f64,
    /// Its state.
    pub state: AlertState,
    /// When it was first returned (epoch ms).
    pub active_at: i64,
    /// When it started firing.
    pub fired_at: Option<i64>,
    /// When it was resolved.
    pub resolved_at: Option<i64>,
    /// The last evaluation that returned it.
    pub last_seen: i64,
    /// The first evaluation that no longer returned it while it kept firing.
    pub keep_firing_since: Option<i64>,
    /// The receivers its trigger was sent to; its resolve goes to the same ones.
    pub receivers: Vec<String>,
    /// Whether its trigger was sent (queued in the outbox).
    pub notified: bool,
}

/// One sample of a rule's result: labels, annotations and value of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The instance's fingerprint (from its labels).
    pub fingerprint: Arc<str>,
    /// Labels.
    pub labels: Arc<Labels>,
    /// Annotations, expanded.
    pub annotations: Arc<Labels>,
    /// Value.
    pub value: f64,
}

/// A change of an instance's state at one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Which instance.
    pub fingerprint: String,
    /// Its state before (`None`: inactive).
    pub from: Option<AlertState>,
    /// Its state after (`None`: inactive, i.e. a pending instance dropped).
    pub to: Option<AlertState>,
    /// The instance as it was at the transition.
    pub instance: Instance,
}

/// Applies one evaluation's `samples`, taken at `now`, to a rule's `instances`;
/// returns the transitions. Resolved instances older than `keep_resolved` are
/// forgotten.
pub fn apply(
    instances: &mut BTreeMap<String, Instance>,
    samples: Vec<Sample>,
    now: i64,
    for_: Duration,
    keep_firing_for: Duration,
    keep_resolved: Duration,
) -> Vec<Transition> {
    let mut transitions = Vec::new();
    let seen: HashSet<&str> = samples.iter().map(|s| &*s.fingerprint).collect();
    let for_ms = for_.as_millis() as i64;
    for sample in &samples {
        let existing = instances
            .get_mut(&*sample.fingerprint)
            .filter(|i| i.state != AlertState::Resolved);
        match existing {
            Some(instance) => {
                instance.value = sample.value;
                instance.annotations = Arc::clone(&sample.annotations);
                instance.labels = Arc::clone(&sample.labels);
                instance.last_seen = now;
                instance.keep_firing_since = None;
                if instance.state == AlertState::Pending && now - instance.active_at >= for_ms {
                    instance.state = AlertState::Firing;
                    instance.fired_at = Some(now);
                    transitions.push(Transition {
                        fingerprint: sample.fingerprint.to_string(),
                        from: Some(AlertState::Pending),
                        to: Some(AlertState::Firing),
                        instance: instance.clone(),
                    });
                }
            }
            None => {
                let firing = for_.is_zero();
                let instance = Instance {
                    labels: Arc::clone(&sample.labels),
                    annotations: Arc::clone(&sample.annotations),
                    value: sample.value,
                    state: if firing {
                        AlertState::Firing
                    } else {
                        AlertState::Pending
                    },
                    active_at: now,
                    fired_at: firing.then_some(now),
                    resolved_at: None,
                    last_seen: now,
                    keep_firing_since: None,
                    receivers: Vec::new(),
                    notified: false,
                };
                transitions.push(Transition {
                    fingerprint: sample.fingerprint.to_string(),
                    from: None,
                    to: Some(instance.state),
                    instance: instance.clone(),
                });
                instances.insert(sample.fingerprint.to_string(), instance);
            }
        }
    }
    let keep_ms = keep_firing_for.as_millis() as i64;
    let mut dropped = Vec::new();
    for (fingerprint, instance) in instances.iter_mut() {
        if seen.contains(fingerprint.as_str()) {
            continue;
        }
        match instance.state {
            AlertState::Pending => {
                dropped.push(fingerprint.clone());
                transitions.push(Transition {
                    fingerprint: fingerprint.clone(),
                    from: Some(AlertState::Pending),
                    to: None,
                    instance: instance.clone(),
                });
            }
            AlertState::Firing => {
                let since = *instance.keep_firing_since.get_or_insert(now);
                if keep_ms > 0 && now - since < keep_ms {
                    continue;
                }
                instance.state = AlertState::Resolved;
                instance.resolved_at = Some(now);
                transitions.push(Transition {
                    fingerprint: fingerprint.clone(),
                    from: Some(AlertState::Firing),
                    to: Some(AlertState::Resolved),
                    instance: instance.clone(),
                });
            }
            AlertState::Resolved => {
                if instance
                    .resolved_at
                    .is_some_and(|at| now - at > keep_resolved.as_millis() as i64)
                {
                    dropped.push(fingerprint.clone());
                }
            }
        }
    }
    for fingerprint in dropped {
        instances.remove(&fingerprint);
    }
    transitions
}

/// A stable fingerprint of a label set (16 hex digits).
pub fn fingerprint(labels: &Labels) -> String {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in labels {
        hasher.update(k.as_bytes());
        hasher.update(&[0xff]);
        hasher.update(v.as_bytes());
        hasher.update(&[0xff]);
    }
    format!("{:016x}", hasher.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(account: &str, value: f64) -> Sample {
        let labels = Labels::from([("account_id".to_string(), account.to_string())]);
        Sample {
            fingerprint: fingerprint(&labels).into(),
            labels: Arc::new(labels),
            annotations: Arc::default(),
            value,
        }
    }

    fn kinds(t: &[Transition]) -> Vec<(&str, &str)> {
        t.iter()
            .map(|t| (state_name(t.from), state_name(t.to)))
            .collect()
    }

    const S: i64 = 1000;

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let mut inst = BTreeMap::new();
        let (f, k, r) = (
            Duration::from_secs(120),
            Duration::ZERO,
            Duration::from_secs(900),
        );
        let t = apply(&mut inst, vec![sample("a", 1.0)], 0, f, k, r);
        assert_eq!(kinds(&t), [("inactive", "pending")]);
        assert!(apply(&mut inst, vec![sample("a", 2.0)], 60 * S, f, k, r).is_empty());
        let t = apply(&mut inst, vec![sample("a", 3.0)], 120 * S, f, k, r);
        assert_eq!(kinds(&t), [("pending", "firing")]);
        assert_eq!(t[0].instance.value, 3.0);
        let t = apply(&mut inst, vec![], 180 * S, f, k, r);
        assert_eq!(kinds(&t), [("firing", "resolved")]);
        // Kept for resending, then forgotten.
        assert!(apply(&mut inst, vec![], 600 * S, f, k, r).is_empty());
        assert_eq!(inst.len(), 1);
        apply(&mut inst, vec![], 1200 * S, f, k, r);
        assert!(inst.is_empty());
    }

    #[test]
    fn pending_that_disappears_is_dropped_and_comes_back_new() {
        let mut inst = BTreeMap::new();
        let (f, k, r) = (Duration::from_secs(120), Duration::ZERO, Duration::ZERO);
        apply(&mut inst, vec![sample("a", 1.0)], 0, f, k, r);
        let t = apply(&mut inst, vec![], 60 * S, f, k, r);
        assert_eq!(kinds(&t), [("pending", "inactive")]);
        let t = apply(&mut inst, vec![sample("a", 1.0)], 120 * S, f, k, r);
        assert_eq!(kinds(&t), [("inactive", "pending")]);
        assert_eq!(inst.values().next().unwrap().active_at, 120 * S);
    }

    #[test]
    fn zero_for_fires_at_once_and_keep_firing_for_holds_it() {
        let mut inst = BTreeMap::new();
        let (f, k, r) = (Duration::ZERO, Duration::from_secs(300), Duration::ZERO);
        let t = apply(&mut inst, vec![sample("a", 1.0)], 0, f, k, r);
        assert_eq!(kinds(&t), [("inactive", "firing")]);
        assert!(apply(&mut inst, vec![], 60 * S, f, k, r).is_empty());
        // Back within keep_firing_for: the clock restarts.
        assert!(apply(&mut inst, vec![sample("a", 1.0)], 120 * S, f, k, r).is_empty());
        assert!(apply(&mut inst, vec![], 180 * S, f, k, r).is_empty());
        assert!(apply(&mut inst, vec![], 420 * S, f, k, r).is_empty());
        let t = apply(&mut inst, vec![], 480 * S, f, k, r);
        assert_eq!(kinds(&t), [("firing", "resolved")]);
        // A resolved instance returned again starts over.
        let t = apply(&mut inst, vec![sample("a", 1.0)], 540 * S, f, k, r);
        assert_eq!(kinds(&t), [("inactive", "firing")]);
    }

    #[test]
    fn fingerprints_are_stable_and_label_sensitive() {
        let a = Labels::from([("a".to_string(), "1".to_string())]);
        let b = Labels::from([("a".to_string(), "2".to_string())]);
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
