//! Notifications: the payloads of PagerDuty Events API v2, Alertmanager's
//! `/api/v2/alerts` and Alertmanager's webhook, and their delivery from the durable
//! outbox (retries with exponential backoff and jitter on 429, 5xx and network errors,
//! none on other 4xx, a rate limit per PagerDuty routing key).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlake_model::retry::RetryPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{ReceiverConfig, ReceiverKind};
use crate::error::AlertError;
use crate::redact;
use crate::state::{Instance, Labels};
use crate::time::rfc3339;

/// PagerDuty's limit on `summary`.
pub const SUMMARY_MAX: usize = 1024;
/// PagerDuty's limit on `dedup_key`.
pub const DEDUP_KEY_MAX: usize = 255;
/// PagerDuty's limit on a request body.
pub const BODY_MAX: usize = 512 * 1024;

/// One notification waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Outbox sequence number.
    pub id: u64,
    /// Receiver name.
    pub receiver: String,
    /// What it is, for logs and metrics (`trigger`, `resolve`, `alerts`, `webhook`).
    pub kind: String,
    /// The JSON body posted.
    pub body: Value,
    /// A newer message with the same key replaces this one if it is still waiting
    /// (Alertmanager receivers get the whole current state each time).
    pub coalesce: Option<String>,
    /// When it was queued.
    pub created_ms: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this time.
    pub next_attempt_ms: i64,
}

/// What a fleet incident is about: one rule firing for many accounts.
#[derive(Debug, Clone)]
pub struct FleetIncident<'a> {
    /// Labels common to the incident (alertname, rule labels, `fleet="true"`).
    pub labels: &'a Labels,
    /// The accounts firing.
    pub accounts: &'a [String],
    /// Counts by region.
    pub by_region: &'a BTreeMap<String, usize>,
    /// Counts by owner team.
    pub by_team: &'a BTreeMap<String, usize>,
    /// Instances firing.
    pub instances: usize,
}

/// Truncates `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The PagerDuty dedup key of an instance: stable for its rule and labels.
pub fn dedup_key(alertname: &str, fingerprint: &str) -> String {
    truncate(
        &format!("fleetlake/{alertname}/{fingerprint}"),
        DEDUP_KEY_MAX,
    )
}

fn pd_severity(labels: &Labels) -> &'static str {
    match labels
        .get("severity")
        .map(|s| s.to_ascii_lowercase())
        .as_deref()
    {
        Some("critical" | "page") => "critical",
        Some("warning" | "warn") => "warning",
        Some("info" | "none") => "info",
        _ => "error",
    }
}

fn summary_of(instance: &Instance) -> String {
    let alertname = instance
        .labels
        .get("alertname")
        .cloned()
        .unwrap_or_default();
    let text = instance
        .annotations
        .get("summary")
        .cloned()
        .unwrap_or_else(|| {
            let labels: Vec<String> = instance
                .labels
                .iter()
                .filter(|(k, _)| *k != "alertname")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(
                "{alertname}: {} (value {})",
                labels.join(", "),
                instance.value
            )
        });
    truncate(&text, SUMMARY_MAX)
}

/// The link to an instance in fleetlake's HTTP API.
pub fn alert_link(external_url: &str, fingerprint: &str) -> String {
    format!(
        "{}/api/v1/alerts?fingerprint={fingerprint}",
        external_url.trim_end_matches('/')
    )
}

/// A PagerDuty `trigger` or `resolve` event for an instance.
pub fn pagerduty_event(
    receiver: &ReceiverConfig,
    action: &str,
    fingerprint: &str,
    instance: &Instance,
    external_url: &str,
) -> Value {
    let alertname = instance
        .labels
        .get("alertname")
        .cloned()
        .unwrap_or_default();
    let key = dedup_key(&alertname, fingerprint);
    let routing_key = receiver.routing_key.clone().unwrap_or_default();
    if action == "resolve" {
        return json!({"routing_key": routing_key, "event_action": "resolve", "dedup_key": key});
    }
    let mut links =
        vec![json!({"href": alert_link(external_url, fingerprint), "text": "Alert in fleetlake"})];
    if let Some(runbook) = instance.annotations.get("runbook_url") {
        links.push(json!({"href": runbook, "text": "Runbook"}));
    }
    let source = instance
        .labels
        .get("account_id")
        .cloned()
        .unwrap_or_else(|| "fleetlake".into());
    let mut payload = json!({
        "summary": summary_of(instance),
        "source": source,
        "severity": pd_severity(&instance.labels),
        "timestamp": rfc3339(instance.fired_at.unwrap_or(instance.active_at)),
        "class": alertname,
        "custom_details": {
            "labels": instance.labels,
            "annotations": instance.annotations,
            "value": instance.value,
            "active_since": rfc3339(instance.active_at),
            "link": alert_link(external_url, fingerprint),
        },
    });
    for (field, label) in [("component", "function"), ("group", "owner_team")] {
        if let Some(v) = instance.labels.get(label) {
            payload[field] = json!(v);
        }
    }
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": key,
        "payload": payload,
        "links": links,
        "client": "fleetlake",
        "client_url": external_url,
    })
}

/// The summary line and details of a fleet incident.
fn fleet_text(incident: &FleetIncident<'_>) -> (String, Value) {
    let alertname = incident
        .labels
        .get("alertname")
        .cloned()
        .unwrap_or_default();
    let top = |m: &BTreeMap<String, usize>| {
        let mut v: Vec<(&String, &usize)> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter()
            .take(5)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let summary = truncate(
        &format!(
            "[FLEET] {alertname} firing for {} accounts (regions: {}; teams: {})",
            incident.accounts.len(),
            top(incident.by_region),
            top(incident.by_team)
        ),
        SUMMARY_MAX,
    );
    // Keep the body under PagerDuty's 512 KB whatever the fleet's size.
    let mut accounts: Vec<&String> = incident.accounts.iter().collect();
    let budget = BODY_MAX / 2;
    let mut used = 0;
    let mut listed = 0;
    for a in &accounts {
        used += a.len() + 3;
        if used > budget {
            break;
        }
        listed += 1;
    }
    accounts.truncate(listed);
    let details = json!({
        "accounts": accounts,
        "accounts_firing": incident.accounts.len(),
        "accounts_listed": listed,
        "instances_firing": incident.instances,
        "by_region": incident.by_region,
        "by_owner_team": incident.by_team,
        "labels": incident.labels,
    });
    (summary, details)
}

/// A PagerDuty event for a fleet incident.
pub fn pagerduty_fleet_event(
    receiver: &ReceiverConfig,
    action: &str,
    key: &str,
    incident: &FleetIncident<'_>,
    started_ms: i64,
    external_url: &str,
) -> Value {
    let routing_key = receiver.routing_key.clone().unwrap_or_default();
    if action == "resolve" {
        return json!({"routing_key": routing_key, "event_action": "resolve", "dedup_key": key});
    }
    let (summary, details) = fleet_text(incident);
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": key,
        "payload": {
            "summary": summary,
            "source": "fleetlake",
            "severity": pd_severity(incident.labels),
            "timestamp": rfc3339(started_ms),
            "class": incident.labels.get("alertname").cloned().unwrap_or_default(),
            "group": "fleet",
            "custom_details": details,
        },
        "links": [{"href": format!("{}/api/v1/alerts", external_url.trim_end_matches('/')), "text": "Alerts in fleetlake"}],
        "client": "fleetlake",
        "client_url": external_url,
    })
}

/// An alert as Alertmanager's API and webhook carry it.
#[derive(Debug, Clone, Copy)]
pub struct AmAlert<'a> {
    /// The instance's fingerprint.
    pub fingerprint: &'a str,
    /// Its labels.
    pub labels: &'a Labels,
    /// Its annotations.
    pub annotations: &'a Labels,
    /// When it started firing, epoch ms.
    pub starts_ms: i64,
    /// When it ends (resolved, or how long Alertmanager should hold it), epoch ms.
    pub ends_ms: Option<i64>,
    /// Whether it is resolved.
    pub resolved: bool,
}

impl AmAlert<'_> {
    /// The alert in Alertmanager's JSON: `/api/v2/alerts`, or the webhook's form
    /// (with `status`, `fingerprint` and Go's zero time for no end).
    pub fn to_json(&self, external_url: &str, for_webhook: bool) -> Value {
        let mut alert = json!({
            "labels": self.labels,
            "annotations": self.annotations,
            "startsAt": rfc3339(self.starts_ms),
            "generatorURL": alert_link(external_url, self.fingerprint),
        });
        match self.ends_ms {
            Some(end) => alert["endsAt"] = json!(rfc3339(end)),
            None if for_webhook => alert["endsAt"] = json!("0001-01-01T00:00:00Z"),
            None => {}
        }
        if for_webhook {
            alert["status"] = json!(if self.resolved { "resolved" } else { "firing" });
            alert["fingerprint"] = json!(self.fingerprint);
        }
        alert
    }
}

/// Alertmanager's webhook payload for one group of alerts.
pub fn webhook_payload(
    receiver: &str,
    alertname: &str,
    alerts: Vec<Value>,
    external_url: &str,
) -> Value {
    let common = |field: &str| {
        let mut common: Option<serde_json::Map<String, Value>> = None;
        for alert in &alerts {
            let map = alert[field].as_object().cloned().unwrap_or_default();
            common = Some(match common {
                None => map,
                Some(c) => c
                    .into_iter()
                    .filter(|(k, v)| map.get(k) == Some(v))
                    .collect(),
            });
        }
        Value::Object(common.unwrap_or_default())
    };
    let firing = alerts.iter().any(|a| a["status"] == "firing");
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{alertname}\"}}"),
        "truncatedAlerts": 0,
        "status": if firing { "firing" } else { "resolved" },
        "receiver": receiver,
        "groupLabels": {"alertname": alertname},
        "commonLabels": common("labels"),
        "commonAnnotations": common("annotations"),
        "externalURL": external_url,
        "alerts": alerts,
    })
}

/// Posts one message. A refusal is an [`AlertError::Notify`], retryable for 429, 408,
/// 5xx and network errors, not for other 4xx (do not send it again).
pub async fn send(
    client: &reqwest::Client,
    receiver: &ReceiverConfig,
    body: &Value,
) -> Result<(), AlertError> {
    let response = client
        .post(receiver.endpoint())
        .timeout(receiver.timeout)
        .json(body)
        .send()
        .await;
    // Neither the URL (its query string, user info or path may hold a token) nor the
    // routing key may reach a log line: reqwest's errors lose their URL, and what the
    // receiver answered (which may echo the request) is scrubbed.
    let secrets = receiver.secrets();
    let failed = |message: String, retryable: bool| AlertError::Notify {
        receiver: receiver.name.clone(),
        message,
        retryable,
    };
    match response {
        Err(e) => Err(failed(
            redact::scrub(&redact::reqwest_error(e), &secrets),
            true,
        )),
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let text = truncate(&redact::scrub(&text, &secrets), 500);
            if status.is_success() {
                Ok(())
            } else {
                let retryable =
                    status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error();
                Err(failed(format!("{status}: {text}"), retryable))
            }
        }
    }
}

/// The wait before attempt `attempts + 1` (`attempts` ≥ 1 failures so far), by the
/// service's one retry policy ([`RetryPolicy`]): `initial` doubled per failure up to
/// `max`, with full jitter (a uniform draw below that), so that receivers recovering
/// from an outage are not hit by every retry at once. Attempts are not limited in
/// number: the outbox gives up after `give_up_after`.
pub fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let mut waits = RetryPolicy::forever(initial.min(max), max).waits();
    // Past 32 doublings every wait is drawn below the maximum.
    for _ in 1..attempts.clamp(1, 32) {
        waits.next_wait();
    }
    waits.next_wait()
}

/// Token buckets per PagerDuty routing key.
#[derive(Debug, Default, Clone)]
pub struct RateLimits {
    buckets: Arc<Mutex<HashMap<String, (f64, i64)>>>,
}

impl RateLimits {
    /// How long to wait before an event for `key` may go at `now` (epoch ms), at
    /// `per_minute`; takes the token when the answer is zero.
    pub fn wait(&self, key: &str, per_minute: u32, now: i64) -> Duration {
        let capacity = per_minute as f64;
        let rate = capacity / 60_000.0;
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((capacity, now));
        *tokens = (*tokens + (now - *at) as f64 * rate).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_millis(((1.0 - *tokens) / rate).ceil() as u64)
        }
    }
}

/// The receiver's kind as a metric label.
pub fn kind_name(kind: ReceiverKind) -> &'static str {
    match kind {
        ReceiverKind::Pagerduty => "pagerduty",
        ReceiverKind::Alertmanager => "alertmanager",
        ReceiverKind::Webhook => "webhook",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_characters_and_limits() {
        let s = "é".repeat(600);
        let t = truncate(&s, SUMMARY_MAX);
        assert!(t.len() <= SUMMARY_MAX);
        assert!(t.ends_with("..."));
        assert_eq!(truncate("short", 10), "short");
        assert!(dedup_key(&"x".repeat(400), "0123456789abcdef").len() <= DEDUP_KEY_MAX);
    }

    #[test]
    fn backoff_doubles_with_full_jitter_up_to_the_max() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(10));
        for attempts in 1..=40 {
            // Without jitter: 1, 2, 4, 8, 10, 10, ... seconds; full jitter draws below.
            let base = (i * 2u32.pow(attempts.min(20) - 1)).min(m);
            let waits: Vec<Duration> = (0..50).map(|_| backoff(attempts, i, m)).collect();
            for wait in &waits {
                assert!(*wait <= base, "attempt {attempts}: {wait:?} over {base:?}");
            }
            // The draws reach past half the schedule's value: it doubles.
            assert!(
                waits.iter().any(|w| *w > base / 2),
                "attempt {attempts}: {waits:?}"
            );
        }
        // Jitter spreads the waits.
        let waits: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| backoff(2, i, m)).collect();
        assert!(waits.len() > 1, "{waits:?}");
        // A maximum below the first wait bounds it.
        assert!(backoff(1, m, i) <= i);
    }

    #[test]
    fn rate_limit_allows_a_burst_then_spaces_events() {
        let limits = RateLimits::default();
        let now = 1_000_000;
        for _ in 0..3 {
            assert_eq!(limits.wait("k", 3, now), Duration::ZERO);
        }
        let wait = limits.wait("k", 3, now);
        assert!(wait.abs_diff(Duration::from_secs(20)) <= Duration::from_millis(1));
        // A token comes back every 20 s.
        let wait = limits.wait("k", 3, now + 5_000);
        assert!(wait.abs_diff(Duration::from_secs(15)) <= Duration::from_millis(1));
        assert_eq!(limits.wait("k", 3, now + 21_000), Duration::ZERO);
        assert_eq!(limits.wait("other", 3, now), Duration::ZERO);
    }

    #[test]
    fn webhook_payload_has_common_labels() {
        let a = |account: &str| {
            let labels = Labels::from([
                ("alertname".to_string(), "X".to_string()),
                ("account_id".to_string(), account.to_string()),
            ]);
            AmAlert {
                fingerprint: "f",
                labels: &labels,
                annotations: &Labels::new(),
                starts_ms: 0,
                ends_ms: None,
                resolved: false,
            }
            .to_json("http://h", true)
        };
        let p = webhook_payload("hook", "X", vec![a("1"), a("2")], "http://h");
        assert_eq!(p["status"], "firing");
        assert_eq!(p["commonLabels"], json!({"alertname": "X"}));
        assert_eq!(p["groupKey"], "{}:{alertname=\"X\"}");
        assert_eq!(p["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    }
}
