//! `[alerting]`: rule files, receivers, routes, silences, storm control and the
//! notification outbox's retry policy.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::AlertError;
use crate::matchers::Matcher;

/// Where PagerDuty's Events API v2 takes events.
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// The `[alerting]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Rule files (paths, `*` allowed in the file name).
    pub rule_files: Vec<PathBuf>,
    /// The URL people reach fleetlake's HTTP API at, for links in notifications.
    pub external_url: Option<String>,
    /// A rule firing for more than this many accounts in one evaluation sends one fleet
    /// incident instead of a page per account (unset: no limit by number).
    pub storm_accounts: Option<usize>,
    /// … or for more than this share (0-1) of the registry's active accounts.
    pub storm_share: Option<f64>,
    /// How long resolved alerts are still sent to Alertmanager receivers.
    #[serde(with = "humantime_serde")]
    pub resend_resolved_for: Duration,
    /// First wait before a failed notification is sent again (doubled each time, plus a
    /// random part of up to as much again, at most `retry_max`).
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// A notification still failing after this long is dropped (and counted).
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// Receivers by name.
    pub receivers: Vec<ReceiverConfig>,
    /// Routes, tried in order: the first whose matchers all match decides (unless it
    /// says `continue`).
    pub routes: Vec<RouteConfig>,
    /// Receiver of alerts no route matches (none: such alerts are only recorded).
    pub default_receiver: Option<String>,
    /// Silences from the configuration (more can be added over HTTP).
    pub silences: Vec<SilenceConfig>,
    /// Evaluate rules of the incremental shape from partial aggregates kept as rows
    /// arrive, instead of a scan each round (`fleetlake rules check` shows each rule's
    /// path). Unset: on (with several instances on the lake, each follows the others'
    /// commits into its partials).
    pub incremental: Option<bool>,
    /// Bytes of recent rows kept per table for rules that read rows in a window but not
    /// only as mergeable aggregates (`rules check` says which); past it, such rules
    /// read the lake.
    pub window_bytes: usize,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            rule_files: Vec::new(),
            external_url: None,
            incremental: None,
            window_bytes: 512 << 20,
            storm_accounts: Some(100),
            storm_share: None,
            resend_resolved_for: Duration::from_secs(15 * 60),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
            receivers: Vec::new(),
            routes: Vec::new(),
            default_receiver: None,
            silences: Vec::new(),
        }
    }
}

/// What kind of system a receiver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverKind {
    /// PagerDuty Events API v2.
    Pagerduty,
    /// An Alertmanager: alerts are posted to its `/api/v2/alerts`.
    Alertmanager,
    /// Any URL taking Alertmanager's webhook payload.
    Webhook,
}

/// `[[alerting.receivers]]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Name routes refer to.
    pub name: String,
    /// `pagerduty`, `alertmanager` or `webhook`.
    #[serde(rename = "type")]
    pub kind: ReceiverKind,
    /// PagerDuty: the Events API URL (default the public one). Alertmanager: its base
    /// URL. Webhook: the URL posted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PagerDuty: the integration's routing key (32 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// PagerDuty: most events per minute per routing key (PagerDuty allows about 120).
    #[serde(default = "default_rate")]
    pub rate_limit_per_minute: u32,
    /// Request timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// The routing key is a secret, and so may be the URL's user info, path or query
/// string: never printed.
impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(crate::redact::url))
            .field(
                "routing_key",
                &self.routing_key.as_ref().map(|_| "<redacted>"),
            )
            .field("rate_limit_per_minute", &self.rate_limit_per_minute)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn default_rate() -> u32 {
    120
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ReceiverConfig {
    /// The URL notifications are posted to.
    pub fn endpoint(&self) -> String {
        match self.kind {
            ReceiverKind::Pagerduty => self.url.clone().unwrap_or_else(|| PAGERDUTY_URL.into()),
            ReceiverKind::Alertmanager => format!(
                "{}/api/v2/alerts",
                self.url
                    .as_deref()
                    .unwrap_or_default()
                    .trim_end_matches('/')
            ),
            ReceiverKind::Webhook => self.url.clone().unwrap_or_default(),
        }
    }

    /// The receiver's secrets (routing key; URL, endpoint and their secret parts), for
    /// [`crate::redact::scrub`].
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = self.routing_key.iter().cloned().collect();
        secrets.extend(crate::redact::url_secrets(&self.endpoint()));
        if let Some(url) = &self.url {
            secrets.extend(crate::redact::url_secrets(url));
        }
        secrets
    }

    /// Where notifications go, as logs may show it (scheme, host and port).
    pub fn shown_endpoint(&self) -> String {
        crate::redact::url(&self.endpoint())
    }
}

/// `[[alerting.routes]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Label matchers (`owner_team="payments"`, `severity=~"critical|page"`).
    #[serde(default)]
    pub matchers: Vec<Matcher>,
    /// The receiver of matching alerts.
    pub receiver: String,
    /// Go on to the next routes after a match.
    #[serde(default, rename = "continue")]
    pub continue_: bool,
}

/// `[[alerting.silences]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceConfig {
    /// Alerts matching all of these are silenced.
    pub matchers: Vec<Matcher>,
    /// RFC 3339 start (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    /// RFC 3339 end.
    pub ends_at: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
    /// Who.
    #[serde(default)]
    pub created_by: String,
}

impl AlertingConfig {
    /// Checks receivers, routes and silences against each other.
    pub fn validate(&self) -> Result<(), AlertError> {
        let bad = |at: &str, message: &str| AlertError::Config {
            at: at.to_string(),
            message: message.to_string(),
        };
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            let at = format!("alerting.receivers[{i}] ({})", r.name);
            if !names.insert(r.name.as_str()) {
                return Err(bad(&at, "receiver name used twice"));
            }
            if r.url.as_deref().is_some_and(|u| u.trim().is_empty()) {
                return Err(bad(&at, "url is set but empty"));
            }
            if r.routing_key
                .as_deref()
                .is_some_and(|k| k.trim().is_empty())
            {
                return Err(bad(&at, "routing_key is set but empty"));
            }
            match r.kind {
                ReceiverKind::Pagerduty => {
                    let key = r.routing_key.as_deref().unwrap_or_default();
                    if key.len() != 32 {
                        return Err(bad(
                            &at,
                            "routing_key must be PagerDuty's 32-character integration key",
                        ));
                    }
                }
                ReceiverKind::Alertmanager | ReceiverKind::Webhook => {
                    if r.url.as_deref().is_none_or(str::is_empty) {
                        return Err(bad(&at, "url is required"));
                    }
                }
            }
            if let Some(url) = &r.url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(bad(&at, "url must be http:// or https://"));
            }
            if r.rate_limit_per_minute == 0 {
                return Err(bad(&at, "rate_limit_per_minute must be more than 0"));
            }
        }
        let known = |name: &str| names.contains(name);
        for (i, route) in self.routes.iter().enumerate() {
            if !known(&route.receiver) {
                return Err(bad(
                    &format!("alerting.routes[{i}]"),
                    &format!("no receiver named {:?}", route.receiver),
                ));
            }
        }
        if let Some(d) = &self.default_receiver
            && !known(d)
        {
            return Err(bad(
                "alerting.default_receiver",
                &format!("no receiver named {d:?}"),
            ));
        }
        if let Some(share) = self.storm_share
            && !(share > 0.0 && share <= 1.0)
        {
            return Err(bad("alerting.storm_share", "must be in (0, 1]"));
        }
        for (i, s) in self.silences.iter().enumerate() {
            crate::time::parse_rfc3339(&s.ends_at)
                .map_err(|e| bad(&format!("alerting.silences[{i}].ends_at"), &e.to_string()))?;
            if let Some(start) = &s.starts_at {
                crate::time::parse_rfc3339(start).map_err(|e| {
                    bad(&format!("alerting.silences[{i}].starts_at"), &e.to_string())
                })?;
            }
            if s.matchers.is_empty() {
                return Err(bad(
                    &format!("alerting.silences[{i}]"),
                    "needs at least one matcher",
                ));
            }
        }
        Ok(())
    }
}
