//! Fleet-wide alerting end to end: rules evaluated in the real service over Firehose
//! data, pages to a fake PagerDuty that checks every field as the Events API v2 does
//! (and answers 202, 400, 429 or 500 on demand), alerts to a real Alertmanager, kill -9
//! in the middle, a fleet of 6,000 accounts, silences, and `fleetlake rules check`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};

use crate::support::{
    FirehoseRequest, Moto, Server, account_id, aws_env, cli, client, free_port, metric_sum,
    settle_alerting, wait_until,
};

/// The integration key the fake PagerDuty accepts.
const ROUTING_KEY: &str = "R0UT1NGKEYR0UT1NGKEYR0UT1NGKEY32";

/// What the fake receivers saw.
#[derive(Default)]
struct Seen {
    /// Statuses to answer the next PagerDuty events with (then 202).
    script: VecDeque<u16>,
    /// Every PagerDuty event and the status it got.
    events: Vec<(u16, Value)>,
    /// Fields of events the API would refuse (a test fails on any).
    invalid: Vec<String>,
    /// Alertmanager webhook payloads.
    webhooks: Vec<Value>,
}

/// A fake PagerDuty Events API v2 (`/v2/enqueue`) and webhook receiver (`/webhook`).
struct FakeReceivers {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    _runtime: tokio::runtime::Runtime,
}

fn is_rfc3339(text: &str) -> bool {
    humantime::parse_rfc3339_weak(text.trim_end_matches('Z').split('+').next().unwrap_or(""))
        .is_ok()
        && (text.ends_with('Z') || text.contains('+'))
}

/// What PagerDuty would refuse in `event`, as its documentation of Events API v2 says.
fn pagerduty_problems(event: &Value, size: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let mut bad = |p: String| problems.push(p);
    if size > 512 * 1024 {
        bad(format!("body of {size} bytes is over 512 KB"));
    }
    let Some(object) = event.as_object() else {
        return vec!["not a JSON object".into()];
    };
    for key in object.keys() {
        if ![
            "routing_key",
            "event_action",
            "dedup_key",
            "payload",
            "links",
            "images",
            "client",
            "client_url",
        ]
        .contains(&key.as_str())
        {
            bad(format!("unknown field {key}"));
        }
    }
    if event["routing_key"] != ROUTING_KEY {
        bad(format!(
            "routing_key {} is not the integration's",
            event["routing_key"]
        ));
    }
    let action = event["event_action"].as_str().unwrap_or_default();
    if !["trigger", "acknowledge", "resolve"].contains(&action) {
        bad(format!("event_action {action:?}"));
    }
    match &event["dedup_key"] {
        Value::String(key) if !key.is_empty() && key.chars().count() <= 255 => {}
        Value::Null if action == "trigger" => {}
        other => bad(format!("dedup_key {other}")),
    }
    if action == "trigger" {
        let payload = &event["payload"];
        match payload["summary"].as_str() {
            Some(s) if !s.is_empty() && s.chars().count() <= 1024 => {}
            other => bad(format!("payload.summary {other:?}")),
        }
        if payload["source"].as_str().is_none_or(str::is_empty) {
            bad("payload.source missing".into());
        }
        let severity = payload["severity"].as_str().unwrap_or_default();
        if !["critical", "error", "warning", "info"].contains(&severity) {
            bad(format!("payload.severity {severity:?}"));
        }
        if let Some(ts) = payload.get("timestamp")
            && !ts.as_str().is_some_and(is_rfc3339)
        {
            bad(format!("payload.timestamp {ts}"));
        }
        for field in ["component", "group", "class"] {
            if let Some(v) = payload.get(field)
                && !v.is_string()
            {
                bad(format!("payload.{field} {v}"));
            }
        }
        if let Some(details) = payload.get("custom_details")
            && !details.is_object()
        {
            bad("payload.custom_details is not an object".into());
        }
    }
    if let Some(links) = event.get("links") {
        let ok = links.as_array().is_some_and(|l| {
            l.iter().all(|link| {
                link["href"].is_string() && link.get("text").is_none_or(Value::is_string)
            })
        });
        if !ok {
            bad(format!("links {links}"));
        }
    }
    problems
}

/// What Alertmanager's webhook v4 payload must hold.
fn webhook_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for field in [
        "version",
        "groupKey",
        "truncatedAlerts",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    ] {
        if body.get(field).is_none() {
            problems.push(format!("webhook payload without {field}"));
        }
    }
    if body["version"] != "4" {
        problems.push(format!("version {}", body["version"]));
    }
    for alert in body["alerts"].as_array().into_iter().flatten() {
        for field in [
            "status",
            "labels",
            "annotations",
            "startsAt",
            "endsAt",
            "generatorURL",
            "fingerprint",
        ] {
            if alert.get(field).is_none() {
                problems.push(format!("webhook alert without {field}"));
            }
        }
    }
    problems
}

async fn enqueue(State(seen): State<Arc<Mutex<Seen>>>, body: String) -> (StatusCode, String) {
    let mut seen = seen.lock().unwrap();
    let Ok(event) = serde_json::from_str::<Value>(&body) else {
        seen.invalid.push(format!("not JSON: {body}"));
        return (
            StatusCode::BAD_REQUEST,
            r#"{"status":"invalid event","message":"Event object is invalid"}"#.into(),
        );
    };
    let problems = pagerduty_problems(&event, body.len());
    if !problems.is_empty() {
        seen.invalid.extend(problems.iter().cloned());
        seen.events.push((400, event));
        let reply = json!({"status": "invalid event", "message": "Event object is invalid", "errors": problems});
        return (StatusCode::BAD_REQUEST, reply.to_string());
    }
    let status = seen.script.pop_front().unwrap_or(202);
    let dedup_key = event["dedup_key"].clone();
    seen.events.push((status, event));
    let reply = match status {
        202 => json!({"status": "success", "message": "Event processed", "dedup_key": dedup_key}),
        429 => {
            json!({"status": "throttle event", "message": "Requests for this service are arriving too quickly. Please retry later."})
        }
        400 => {
            json!({"status": "invalid event", "message": "Event object is invalid", "errors": ["scripted"]})
        }
        _ => json!({"status": "error", "message": "internal error"}),
    };
    (StatusCode::from_u16(status).unwrap(), reply.to_string())
}

async fn webhook(State(seen): State<Arc<Mutex<Seen>>>, body: String) -> StatusCode {
    let mut seen = seen.lock().unwrap();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let problems = webhook_problems(&body);
    seen.invalid.extend(problems);
    seen.webhooks.push(body);
    StatusCode::OK
}

impl FakeReceivers {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Router::new()
            .route("/v2/enqueue", post(enqueue))
            .route("/webhook", post(webhook))
            .with_state(Arc::clone(&seen));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            seen,
            _runtime: runtime,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next events with these statuses.
    fn answer_next(&self, statuses: &[u16]) {
        self.seen.lock().unwrap().script.extend(statuses);
    }

    /// Events PagerDuty accepted (202), in order.
    fn accepted(&self) -> Vec<Value> {
        let seen = self.seen.lock().unwrap();
        assert!(
            seen.invalid.is_empty(),
            "invalid events: {:?}",
            seen.invalid
        );
        seen.events
            .iter()
            .filter(|(status, _)| *status == 202)
            .map(|(_, e)| e.clone())
            .collect()
    }

    fn statuses(&self) -> Vec<u16> {
        self.seen
            .lock()
            .unwrap()
            .events
            .iter()
            .map(|(s, _)| *s)
            .collect()
    }

    fn webhooks(&self) -> Vec<Value> {
        self.seen.lock().unwrap().webhooks.clone()
    }
}

/// One account record of the registry.
fn account_record(index: usize, state: &str) -> String {
    json!({
        "account_id": account_id(index),
        "account_name": format!("tenant-{index}"),
        "environment": if index.is_multiple_of(2) { "prod" } else { "staging" },
        "workload_type": "saas",
        "owner_team": format!("team-{}", index % 4),
        "cost_center": "cc-1",
        "compliance_scope": "none",
        "automation_level": "full",
        "created_by": "vending",
        "lifecycle_state": state,
    })
    .to_string()
}

/// `ErrorsHigh`: one instance per account whose latest `Errors` datapoint is over 10.
const ERRORS_RULE: &str = r#"groups:
  - name: test
    interval: 1s
    rules:
      - alert: ErrorsHigh
        expr: |
          SELECT account_id, region, last_value(sum ORDER BY time) AS value
          FROM metrics
          WHERE metric_name = 'Errors'
          GROUP BY account_id, region
          HAVING last_value(sum ORDER BY time) > 10
        labels:
          severity: critical
        annotations:
          summary: "{{ $value }} errors in {{ $labels.account_id }} ({{ $labels.account_name }})"
"#;

/// A data directory with a registry of `accounts` (those in `retired` retired), the
/// rules, and a config sending everything to `receivers`.
struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(accounts: usize, retired: &[usize], rules: &str, alerting: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("accounts.jsonl");
        let records: Vec<String> = (0..accounts)
            .map(|i| {
                account_record(
                    i,
                    if retired.contains(&i) {
                        "retired"
                    } else {
                        "active"
                    },
                )
            })
            .collect();
        std::fs::write(&registry, records.join("\n")).unwrap();
        let rule_file = dir.path().join("test.rules.yml");
        std::fs::write(&rule_file, rules).unwrap();
        let config = dir.path().join("fleetlake.toml");
        std::fs::write(
            &config,
            format!(
                "[accounts]\nfile = {registry:?}\nreload_interval = \"1s\"\n\n[alerting]\nrule_files = [{rule_file:?}]\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{alerting}\n"
            ),
        )
        .unwrap();
        Self {
            data: dir.path().join("data"),
            config,
            _dir: dir,
        }
    }

    fn start(&self) -> Server {
        Server::start(
            &self.data,
            &[("FLEETLAKE_CONFIG", self.config.to_str().unwrap())],
        )
    }
}

fn pagerduty_receiver(fake: &FakeReceivers) -> String {
    format!(
        "default_receiver = \"pd\"\n\n[[alerting.receivers]]\nname = \"pd\"\ntype = \"pagerduty\"\nurl = \"{}\"\nrouting_key = \"{ROUTING_KEY}\"\n",
        fake.url("/v2/enqueue")
    )
}

/// `Errors` datapoints of minute `minute`, one per (account, value).
fn errors(server: &Server, request: &str, minute: i64, values: &[(usize, f64)]) {
    let lines: Vec<String> = values
        .iter()
        .map(|(a, v)| crate::support::datapoint(&account_id(*a), "api", "Errors", minute, *v))
        .collect();
    let records: Vec<String> = lines.chunks(500).map(|c| c.join("\n")).collect();
    let (status, body) = server.post(&FirehoseRequest::new(request, records));
    assert_eq!(status, 200, "{body}");
}

/// Waits for the resolve in `server`'s `alerts` table, then checks it holds one
/// firing and one resolved transition.
fn one_firing_and_one_resolved_in_the_alerts_table(server: &Server) {
    wait_until("the resolve in the alerts table", || {
        server
            .sql("SELECT count(*) AS n FROM alerts WHERE state = 'resolved'")
            .first()
            .is_some_and(|r| r["n"] == 1)
    });
    let rows = server.sql("SELECT state, count(*) AS n FROM alerts GROUP BY state ORDER BY state");
    assert_eq!(
        rows,
        vec![
            json!({"state": "firing", "n": 1}),
            json!({"state": "resolved", "n": 1})
        ]
    );
}

fn alerts_api(server: &Server) -> Vec<Value> {
    let body: Value = client()
        .get(server.url("/api/v1/alerts"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    body["data"]["alerts"].as_array().unwrap().clone()
}

fn actions(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["event_action"].as_str().unwrap().to_string(),
                e["dedup_key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A windowed sum: evaluated from partial aggregates, not by a scan.
const WINDOW_RULE: &str = r#"groups:
  - name: windowed
    interval: 1s
    rules:
      - alert: ErrorsInWindow
        expr: |
          SELECT account_id, region, sum(sum) AS value
          FROM metrics
          WHERE metric_name = 'Errors' AND time > now() - INTERVAL '8 seconds'
          GROUP BY account_id, region
          HAVING sum(sum) > 10
        labels:
          severity: critical
        annotations:
          summary: "{{ $value }} errors in {{ $labels.account_id }}"
"#;

#[test]
fn an_incremental_rule_pages_from_fresh_rows_and_resolves_as_its_window_passes() {
    let fake = FakeReceivers::start();
    let setup = Setup::new(2, &[], WINDOW_RULE, &pagerduty_receiver(&fake));
    let server = setup.start();
    // The first round starts the rule's partials (from an empty lake).
    settle_alerting(&server, 1);
    errors_now(&server, "w1", &[(0, 50.0), (1, 2.0)]);
    wait_until("the page", || !fake.accepted().is_empty());
    let events = fake.accepted();
    assert_eq!(events[0]["event_action"], "trigger");
    assert_eq!(
        events[0]["payload"]["custom_details"]["labels"]["account_id"],
        account_id(0)
    );
    assert_eq!(events[0]["payload"]["custom_details"]["value"], 50.0);
    // Nothing more arrives: the datapoint leaves the window and the alert resolves.
    wait_until("the resolve", || fake.accepted().len() >= 2);
    assert_eq!(
        actions(&fake.accepted())
            .into_iter()
            .map(|(a, _)| a)
            .collect::<Vec<_>>(),
        vec!["trigger", "resolve"]
    );
    // Every round of the rule came from its partials.
    let text = server.metrics_text();
    assert!(evaluations(&text, "incremental") >= 3.0, "{text}");
    assert_eq!(
        evaluations(&text, "sql"),
        0.0,
        "no round of the rule was a scan"
    );
}

/// Posts one `Errors` datapoint per `(account, value)` stamped now, as one Firehose
/// request `request`.
fn errors_now(server: &Server, request: &str, values: &[(usize, f64)]) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let lines: Vec<String> = values
        .iter()
        .map(|(a, v)| {
            format!(
                r#"{{"account_id":"{}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{{"FunctionName":"api"}},"timestamp":{now_ms},"value":{{"count":1.0,"sum":{v:.1},"max":{v:.1},"min":{v:.1}}},"unit":"Count"}}"#,
                account_id(*a)
            )
        })
        .collect();
    let (status, body) = server.post(&FirehoseRequest::new(request, vec![lines.join("\n")]));
    assert_eq!(status, 200, "{body}");
}

/// Rule evaluations by `path` (`incremental`, `sql`) in a metrics exposition.
fn evaluations(text: &str, path: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with("fleetlake_rule_evaluations_total")
                && l.contains(&format!("path=\"{path}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

#[test]
fn pages_trigger_and_resolve_once_each_in_order_and_429_is_retried() {
    let fake = FakeReceivers::start();
    // Account 3 is retired: it breaches too, but must never page.
    let setup = Setup::new(4, &[3], ERRORS_RULE, &pagerduty_receiver(&fake));
    let server = setup.start();
    fake.answer_next(&[429, 500]);
    errors(&server, "m1", 1, &[(0, 50.0), (1, 2.0), (3, 99.0)]);

    wait_until("the trigger to be accepted", || !fake.accepted().is_empty());
    let events = fake.accepted();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        fake.statuses(),
        vec![429, 500, 202],
        "429 and 500 are retried"
    );
    let trigger = &events[0];
    assert_eq!(trigger["event_action"], "trigger");
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(
        trigger["payload"]["summary"],
        "50 errors in 100000000000 (tenant-0)"
    );
    let details = &trigger["payload"]["custom_details"];
    assert_eq!(details["labels"]["account_id"], "100000000000");
    assert_eq!(
        details["labels"]["owner_team"], "team-0",
        "registry fields are labels"
    );
    assert_eq!(details["labels"]["environment"], "prod");
    assert_eq!(details["value"], 50.0);
    assert!(
        trigger["links"][0]["href"]
            .as_str()
            .unwrap()
            .starts_with("http://")
    );
    let key = trigger["dedup_key"].as_str().unwrap().to_string();

    // Account 0 recovers; the resolve carries the trigger's key.
    errors(&server, "m2", 2, &[(0, 1.0)]);
    wait_until("the resolve", || fake.accepted().len() >= 2);
    // A few more evaluations: nothing else may be sent.
    settle_alerting(&server, 3);
    assert_eq!(
        actions(&fake.accepted()),
        vec![
            ("trigger".into(), key.clone()),
            ("resolve".into(), key.clone())
        ]
    );

    // The retired account fires, is recorded, and paged no one.
    let retired = alerts_api(&server)
        .into_iter()
        .find(|a| a["labels"]["account_id"] == "100000000003")
        .expect("the retired account's alert is evaluated");
    assert_eq!(retired["state"], "firing");
    assert_eq!(retired["notified"], false);

    // Every transition is in the alerts table, queryable with SQL.
    wait_until("transitions in the alerts table", || {
        server
            .sql("SELECT count(*) AS n FROM alerts WHERE state = 'resolved'")
            .first()
            .is_some_and(|r| r["n"] == 1)
    });
    let rows = server.sql(
        "SELECT account_id, state, previous_state, notification FROM alerts ORDER BY time, account_id, state",
    );
    let rows: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["account_id"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
                r["notification"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        rows.contains(&("100000000000".into(), "firing".into(), "pd".into())),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("100000000000".into(), "resolved".into(), "pd".into())),
        "{rows:?}"
    );
    assert!(
        rows.contains(&(
            "100000000003".into(),
            "firing".into(),
            "inactive account".into()
        )),
        "{rows:?}"
    );
    // Joined with the registry.
    let joined = server.sql(
        "SELECT a.owner_team, count(*) AS n FROM alerts al JOIN accounts a ON a.account_id = al.account_id \
         WHERE al.state = 'firing' GROUP BY a.owner_team ORDER BY a.owner_team",
    );
    assert_eq!(
        joined,
        vec![
            json!({"owner_team": "team-0", "n": 1}),
            json!({"owner_team": "team-3", "n": 1})
        ]
    );
    let metrics = server.metrics_text();
    assert!(
        metrics.contains("fleetlake_notifications_total"),
        "{metrics}"
    );
    server.stop();
}

#[test]
fn a_kill_in_the_middle_sends_nothing_twice_and_loses_nothing() {
    let fake = FakeReceivers::start();
    let setup = Setup::new(3, &[], ERRORS_RULE, &pagerduty_receiver(&fake));

    // PagerDuty fails while the trigger is queued; fleetlake dies with it unsent.
    fake.answer_next(&[500; 1000]);
    let server = setup.start();
    errors(&server, "k1", 1, &[(0, 50.0)]);
    wait_until("a failed attempt", || !fake.statuses().is_empty());
    server.kill9();
    fake.seen.lock().unwrap().script.clear();

    // After the restart the queued trigger goes out, once.
    let server = setup.start();
    wait_until("the trigger", || !fake.accepted().is_empty());
    settle_alerting(&server, 3);
    assert_eq!(fake.accepted().len(), 1, "{:?}", fake.accepted());

    // Killed while firing and notified: the next start neither re-pages nor forgets.
    server.kill9();
    let server = setup.start();
    wait_until("an evaluation after the restart", || {
        server
            .metrics_text()
            .contains("fleetlake_rule_group_evaluations_total")
    });
    settle_alerting(&server, 3);
    assert_eq!(
        fake.accepted().len(),
        1,
        "no second trigger: {:?}",
        fake.accepted()
    );
    let firing = alerts_api(&server);
    assert_eq!(firing.len(), 1);
    assert_eq!(firing[0]["state"], "firing");

    // The data came back from the write-ahead log; the account recovers: one resolve.
    errors(&server, "k2", 2, &[(0, 0.0)]);
    wait_until("the resolve", || fake.accepted().len() == 2);
    settle_alerting(&server, 3);
    let sent = actions(&fake.accepted());
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        (sent[0].0.as_str(), sent[1].0.as_str()),
        ("trigger", "resolve")
    );
    assert_eq!(sent[0].1, sent[1].1);

    // Each transition is in the alerts table once.
    one_firing_and_one_resolved_in_the_alerts_table(&server);
    server.stop();
}

#[test]
fn a_400_is_not_retried_and_silences_stop_pages_but_not_evaluation() {
    let fake = FakeReceivers::start();
    let setup = Setup::new(3, &[], ERRORS_RULE, &pagerduty_receiver(&fake));
    let server = setup.start();

    // A silence for account 1, over the HTTP API.
    let ends = humantime::format_rfc3339(
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    );
    let created: Value = client()
        .post(server.url("/api/v1/silences"))
        .json(&json!({
            "matchers": [{"name": "account_id", "value": "100000000001", "isRegex": false}],
            "endsAt": ends.to_string(),
            "comment": "maintenance",
            "createdBy": "ops",
        }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let silence = created["silenceID"]
        .as_str()
        .expect("a silence id")
        .to_string();
    let bad = client()
        .post(server.url("/api/v1/silences"))
        .body(r#"{"matchers": ["account_id=~\"(\""], "endsAt": "2030-01-01T00:00:00Z"}"#)
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);

    // PagerDuty refuses account 0's trigger with 400: dropped, not retried.
    fake.answer_next(&[400]);
    errors(&server, "s1", 1, &[(0, 50.0), (1, 60.0)]);
    wait_until("account 1 evaluated as firing", || {
        alerts_api(&server)
            .iter()
            .any(|a| a["labels"]["account_id"] == "100000000001" && a["state"] == "firing")
    });
    wait_until("the refused trigger", || !fake.statuses().is_empty());
    settle_alerting(&server, 3);
    assert_eq!(
        fake.statuses(),
        vec![400],
        "a 400 is not retried; the silenced alert sends nothing"
    );

    // The silence ends: account 1, still firing, pages now.
    let expired = client()
        .delete(server.url(&format!("/api/v1/silences/{silence}")))
        .send()
        .unwrap();
    assert_eq!(expired.status(), 200);
    let missing = client()
        .delete(server.url("/api/v1/silences/nope"))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    wait_until("account 1's page", || !fake.accepted().is_empty());
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(
        accepted[0]["payload"]["custom_details"]["labels"]["account_id"],
        "100000000001"
    );
    let silences: Value = client()
        .get(server.url("/api/v1/silences"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(silences[0]["status"]["state"], "expired");
    assert_eq!(silences[0]["matchers"][0], "account_id=\"100000000001\"");
    server.stop();
}

#[test]
fn a_fleet_of_6000_accounts_pages_3_then_one_fleet_incident_for_2000() {
    let fake = FakeReceivers::start();
    let setup = Setup::new(
        6000,
        &[],
        ERRORS_RULE,
        &format!(
            "storm_accounts = 100\n{}\n[[alerting.receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{}\"\n\n[[alerting.routes]]\nreceiver = \"pd\"\ncontinue = true\n\n[[alerting.routes]]\nreceiver = \"hook\"\n",
            pagerduty_receiver(&fake),
            fake.url("/webhook")
        ),
    );
    let server = setup.start();

    // Minute 1: every account reports, 3 breach.
    let breaching = [18usize, 2025, 5997];
    let values: Vec<(usize, f64)> = (0..6000)
        .map(|a| (a, if breaching.contains(&a) { 40.0 } else { 1.0 }))
        .collect();
    errors(&server, "f1", 1, &values);
    wait_until("3 pages", || fake.accepted().len() >= 3);
    settle_alerting(&server, 3);
    let pages = fake.accepted();
    assert_eq!(pages.len(), 3, "{pages:?}");
    let mut paged: Vec<String> = pages
        .iter()
        .map(|p| {
            p["payload"]["custom_details"]["labels"]["account_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    paged.sort();
    assert_eq!(
        paged,
        breaching.iter().map(|a| account_id(*a)).collect::<Vec<_>>()
    );

    // Minute 2: 2,000 accounts breach (the 3 among them): one fleet incident.
    let values: Vec<(usize, f64)> = (0..6000usize)
        .map(|a| {
            (
                a,
                if a.is_multiple_of(3) || breaching.contains(&a) {
                    40.0
                } else {
                    1.0
                },
            )
        })
        .collect();
    let storm: usize = values.iter().filter(|(_, v)| *v > 10.0).count();
    assert_eq!(storm, 2000);
    errors(&server, "f2", 2, &values);
    wait_until("the fleet incident", || fake.accepted().len() >= 4);
    settle_alerting(&server, 3);
    let pages = fake.accepted();
    assert_eq!(pages.len(), 4, "one fleet incident, not {storm} pages");
    let incident = &pages[3];
    assert_eq!(incident["event_action"], "trigger");
    let details = &incident["payload"]["custom_details"];
    assert_eq!(details["accounts_firing"], storm, "{details}");
    let listed = details["accounts"].as_array().unwrap();
    assert_eq!(listed.len(), storm);
    assert_eq!(details["by_region"]["us-east-1"], storm);
    let teams: u64 = details["by_owner_team"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(teams as usize, storm);
    assert!(
        incident["payload"]["summary"]
            .as_str()
            .unwrap()
            .contains(&storm.to_string())
    );

    // Every per-account alert is still recorded.
    wait_until("the storm's transitions in the alerts table", || {
        server
            .sql("SELECT count(DISTINCT account_id) AS n FROM alerts WHERE state = 'firing' AND alertname = 'ErrorsHigh'")
            .first()
            .is_some_and(|r| r["n"].as_u64() == Some(storm as u64))
    });
    let firing = alerts_api(&server)
        .iter()
        .filter(|a| a["state"] == "firing")
        .count();
    assert_eq!(firing, storm + 1, "every instance plus the fleet incident");

    // The webhook receiver got the 3 alerts and then the fleet alert, in v4 payloads.
    let hooks = fake.webhooks();
    assert!(!hooks.is_empty());
    assert!(fake.seen.lock().unwrap().invalid.is_empty());
    let last = hooks.last().unwrap();
    assert!(
        last["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["fleet"] == "true"),
        "{last}"
    );
    server.stop();
}

/// Debian's `prometheus-alertmanager`, installed by scripts/test.sh.
fn alertmanager_binary() -> PathBuf {
    for candidate in ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!(
        "Alertmanager is not installed: scripts/test.sh installs Debian's prometheus-alertmanager"
    );
}

struct Alertmanager {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Alertmanager {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\n  group_by: [alertname]\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let port = free_port();
        let child = std::process::Command::new(alertmanager_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start alertmanager");
        let url = format!("http://127.0.0.1:{port}");
        wait_until("alertmanager to answer", || {
            client()
                .get(format!("{url}/-/ready"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        Self {
            child,
            url,
            _dir: dir,
        }
    }
}

#[test]
fn alertmanager_shows_the_alerts_fleetlake_posts_with_their_labels() {
    let am = Alertmanager::start();
    let setup = Setup::new(
        3,
        &[],
        ERRORS_RULE,
        &format!(
            "default_receiver = \"am\"\n\n[[alerting.receivers]]\nname = \"am\"\ntype = \"alertmanager\"\nurl = \"{}\"\n",
            am.url
        ),
    );
    let server = setup.start();
    errors(&server, "a1", 1, &[(1, 70.0)]);
    let mut shown = Value::Null;
    wait_until("the alert in alertmanager", || {
        let Ok(response) = client().get(format!("{}/api/v2/alerts", am.url)).send() else {
            return false;
        };
        let alerts: Value = response.json().unwrap_or(Value::Null);
        match alerts
            .as_array()
            .and_then(|a| a.iter().find(|x| x["labels"]["alertname"] == "ErrorsHigh"))
        {
            Some(alert) => {
                shown = alert.clone();
                true
            }
            None => false,
        }
    });
    let labels = &shown["labels"];
    assert_eq!(labels["account_id"], "100000000001");
    assert_eq!(labels["account_name"], "tenant-1");
    assert_eq!(labels["owner_team"], "team-1");
    assert_eq!(labels["severity"], "critical");
    assert_eq!(labels["region"], "us-east-1");
    assert_eq!(
        shown["annotations"]["summary"],
        "70 errors in 100000000001 (tenant-1)"
    );
    assert_eq!(shown["status"]["state"], "active");
    assert!(
        shown["generatorURL"]
            .as_str()
            .unwrap()
            .contains("/api/v1/alerts")
    );
    server.stop();
}

#[test]
fn rules_check_validates_files_against_the_schema_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let examples: Vec<String> = ["lambda.rules.yml", "fleet.rules.yml"]
        .iter()
        .map(|f| format!("{}/alert-rules/examples/{f}", env!("CARGO_MANIFEST_DIR")))
        .collect();
    let mut args = vec!["rules", "check", "--data-dir", data.to_str().unwrap()];
    args.extend(examples.iter().map(String::as_str));
    let (ok, stdout, stderr) = cli(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("5 rule(s): OK"), "{stdout}");

    let bad = dir.path().join("bad.rules.yml");
    std::fs::write(
        &bad,
        r#"groups:
  - name: broken
    interval: 30s
    rules:
      - alert: NoSuchTable
        expr: |
          SELECT account_id, count(*) AS value
          FROM metricz
          GROUP BY account_id
      - alert: NoValue
        expr: SELECT account_id FROM metrics
      - alert: UnknownLabel
        expr: SELECT account_id, 1.0 AS value FROM metrics
        annotations:
          summary: "{{ $labels.function }}"
      - alert: SyntaxError
        expr: |
          SELECT account_id,
                 count(*) AS value
          FROM metrics WHERE
"#,
    )
    .unwrap();
    // A file whose template does not parse is reported with the others.
    let template = dir.path().join("template.rules.yml");
    std::fs::write(
        &template,
        "groups:\n  - name: templates\n    rules:\n      - alert: BadTemplate\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        annotations:\n          summary: \"{{ $labels.account_id \"\n",
    )
    .unwrap();
    let (ok, _, stderr) = cli(&[
        "rules",
        "check",
        "--data-dir",
        data.to_str().unwrap(),
        bad.to_str().unwrap(),
        template.to_str().unwrap(),
    ]);
    assert!(!ok, "{stderr}");
    let file = bad.to_str().unwrap();
    let expect = [
        (format!("{file}:7:"), "metricz"),
        (format!("{file}:11:"), "value"),
        (format!("{file}:15:"), "function"),
        (format!("{file}:1"), "SyntaxError"),
        (format!("{}:7:", template.display()), "unclosed action"),
    ];
    for (place, word) in &expect {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(place.as_str()) && l.contains(word)),
            "no error at {place} about {word}:\n{stderr}"
        );
    }
    // YAML errors have a place too.
    std::fs::write(
        &bad,
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: [\n",
    )
    .unwrap();
    let (ok, _, stderr) = cli(&["rules", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.starts_with(&format!("{file}:")), "{stderr}");
}

/// One metric-stream JSON line at `ms`.
fn point_at(account: usize, metric: &str, ms: i64, value: &str) -> String {
    format!(
        r#"{{"metric_stream_name":"fleet","account_id":"{}","region":"eu-west-1","namespace":"AWS/Lambda","metric_name":"{metric}","dimensions":{{"FunctionName":"checkout"}},"timestamp":{ms},"value":{value},"unit":"Count"}}"#,
        account_id(account)
    )
}

#[test]
fn the_shipped_example_rules_find_what_they_are_about() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let registry = dir.path().join("accounts.jsonl");
    let mut records: Vec<String> = (0..8)
        .map(|i| account_record(i, if i == 5 { "suspended" } else { "active" }))
        .collect();
    // Fields of the platform's own: accounts 0 and 1 set their error-rate thresholds.
    for (i, tier, threshold) in [(0, "bronze", 0.5), (1, "platinum", 0.005)] {
        let mut record: Value = serde_json::from_str(&records[i]).unwrap();
        record["tier"] = json!(tier);
        record["error_rate_threshold"] = json!(threshold);
        records[i] = record.to_string();
    }
    std::fs::write(&registry, records.join("\n")).unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(&config, format!("[accounts]\nfile = {registry:?}\n")).unwrap();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let minute = now - 60_000;
    let plain = |v: f64| format!(r#"{{"count":1.0,"sum":{v:.1},"max":{v:.1},"min":{v:.1}}}"#);
    let mut lines = Vec::new();
    // Accounts 0-4 and 7 report now; 6 reported 30 minutes ago only; 5 (suspended) never.
    for a in [0, 1, 2, 3, 4, 7] {
        lines.push(point_at(a, "Invocations", minute, &plain(100.0)));
        let errors = if a == 0 { 20.0 } else { 1.0 };
        lines.push(point_at(a, "Errors", minute, &plain(errors)));
        let throttles = if a == 1 { 50.0 } else { 0.0 };
        lines.push(point_at(a, "Throttles", minute, &plain(throttles)));
        let p99 = if a == 2 { 15_000.0 } else { 300.0 };
        lines.push(point_at(
            a,
            "Duration",
            minute,
            &format!(r#"{{"count":100.0,"sum":20000.0,"max":{p99:.1},"min":10.0,"p99":{p99:.1}}}"#),
        ));
    }
    lines.push(point_at(6, "Invocations", now - 30 * 60_000, &plain(5.0)));
    let metrics = dir.path().join("metrics.json");
    std::fs::write(&metrics, lines.join("\n")).unwrap();

    // Account 3 logs 150 error lines (and some noise) in a minute; account 4 only 20.
    let logs_payload = |account: usize, errors: usize| {
        let events: Vec<Value> = (0..errors + 30)
            .map(|i| {
                json!({
                    "id": format!("{account}{i:08}"),
                    "timestamp": minute + i as i64,
                    "message": if i < errors { format!("ERROR request {i} failed") } else { format!("INFO request {i} ok") },
                })
            })
            .collect();
        crate::support::gzip(
            json!({
                "messageType": "DATA_MESSAGE",
                "owner": account_id(account),
                "logGroup": "/aws/lambda/checkout",
                "logStream": "2026/11/30/[$LATEST]abc",
                "subscriptionFilters": ["errors"],
                "logEvents": events,
            })
            .to_string()
            .as_bytes(),
        )
    };
    let logs = dir.path().join("logs.gz");
    let mut body = logs_payload(3, 150);
    body.extend(logs_payload(4, 20));
    std::fs::write(&logs, body).unwrap();

    let d = data.to_str().unwrap();
    let c = config.to_str().unwrap();
    let (ok, _, err) = cli(&[
        "replay",
        "--config",
        c,
        "--data-dir",
        d,
        metrics.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&[
        "replay",
        "--config",
        c,
        "--data-dir",
        d,
        "--format",
        "cwlogs",
        logs.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");

    let examples = format!("{}/alert-rules/examples", env!("CARGO_MANIFEST_DIR"));
    let (lambda, fleet) = (
        format!("{examples}/lambda.rules.yml"),
        format!("{examples}/fleet.rules.yml"),
    );
    // `rules eval --format json`, then `args`: one JSON object per alert instance.
    let eval = |args: &[&str]| -> Vec<Value> {
        let mut all = vec![
            "rules",
            "eval",
            "--config",
            c,
            "--data-dir",
            d,
            "--format",
            "json",
        ];
        all.extend_from_slice(args);
        let (ok, out, err) = cli(&all);
        assert!(ok, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let found = eval(&[&lambda, &fleet]);
    let out = format!("{found:?}");
    let mut by_rule: Vec<(String, String, f64)> = found
        .iter()
        .map(|f| {
            (
                f["alert"].as_str().unwrap().to_string(),
                f["labels"]["account_id"].as_str().unwrap().to_string(),
                f["value"].as_f64().unwrap(),
            )
        })
        .collect();
    by_rule.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let names: Vec<(&str, String)> = by_rule
        .iter()
        .map(|(r, a, _)| (r.as_str(), a.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("AccountStoppedReporting", account_id(6)),
            ("LambdaDurationP99High", account_id(2)),
            ("LambdaErrorRateHigh", account_id(0)),
            ("LambdaThrottled", account_id(1)),
            ("LogErrorBurst", account_id(3)),
        ],
        "{out}"
    );
    let value = |rule: &str| by_rule.iter().find(|(r, _, _)| r == rule).unwrap().2;
    assert!((value("LambdaErrorRateHigh") - 0.2).abs() < 1e-9);
    assert_eq!(value("LambdaThrottled"), 50.0);
    assert_eq!(value("LambdaDurationP99High"), 15.0);
    assert_eq!(value("LogErrorBurst"), 150.0);
    let stopped = value("AccountStoppedReporting");
    assert!((1790.0..2400.0).contains(&stopped), "{stopped}");
    // Labels from the SQL, the registry and the rule; annotations expanded.
    let error_rate = found
        .iter()
        .find(|f| f["alert"] == "LambdaErrorRateHigh")
        .unwrap();
    assert_eq!(error_rate["labels"]["function"], "checkout");
    assert_eq!(error_rate["labels"]["owner_team"], "team-0");
    assert_eq!(error_rate["labels"]["severity"], "critical");
    assert_eq!(
        error_rate["annotations"]["summary"],
        format!(
            "Lambda checkout in {} (eu-west-1) fails 20% of invocations",
            account_id(0)
        )
    );
    let p99 = found
        .iter()
        .find(|f| f["alert"] == "LambdaDurationP99High")
        .unwrap();
    assert!(
        p99["annotations"]["summary"]
            .as_str()
            .unwrap()
            .ends_with("p99 duration 15s"),
        "{p99}"
    );

    // Per-account thresholds: the registry's own fields are typed columns of
    // `accounts` and `$account` in templates. Account 0 fails 20 % (its threshold is
    // 50 %), account 1 fails 1 % (its threshold 0.5 %), the others 1 % (default 5 %).
    let own = dir.path().join("own.rules.yml");
    std::fs::write(
        &own,
        r#"groups:
  - name: own
    rules:
      - alert: ErrorRateOverOwnThreshold
        expr: |
          SELECT m.account_id, m.errors / m.invocations AS value
          FROM (SELECT account_id,
                       sum(CASE WHEN metric_name = 'Errors' THEN sum END) AS errors,
                       sum(CASE WHEN metric_name = 'Invocations' THEN sum END) AS invocations
                FROM metrics
                WHERE namespace = 'AWS/Lambda' AND time > now() - INTERVAL '5 minutes'
                GROUP BY account_id) m
          JOIN accounts a ON a.account_id = m.account_id
          WHERE m.errors / m.invocations > coalesce(a.error_rate_threshold, 0.05)
        labels:
          tier: "{{ $account.tier }}"
        annotations:
          summary: "{{ $value | humanizePercentage }} of invocations fail in {{ $labels.account_id }}, over its {{ $account.error_rate_threshold | humanizePercentage }}"
"#,
    )
    .unwrap();
    let (ok, _, err) = cli(&[
        "rules",
        "check",
        "--config",
        c,
        "--data-dir",
        d,
        own.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let found = eval(&[own.to_str().unwrap()]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["labels"]["account_id"], account_id(1));
    assert_eq!(found[0]["labels"]["tier"], "platinum");
    assert_eq!(
        found[0]["annotations"]["summary"],
        format!("1% of invocations fail in {}, over its 0.5%", account_id(1))
    );

    // As of 20 minutes from now, every rule's `now()` is that instant: the 5-minute
    // windows hold nothing, and every active account has stopped reporting, for as
    // long as the instant says.
    let later = now + 20 * 60_000;
    let at = fleetlake_alert_rules::time::rfc3339(later);
    let mut stopped: Vec<(String, String, f64)> = eval(&["--at", &at, &lambda, &fleet])
        .iter()
        .map(|f| {
            (
                f["alert"].as_str().unwrap().to_string(),
                f["labels"]["account_id"].as_str().unwrap().to_string(),
                f["value"].as_f64().unwrap(),
            )
        })
        .collect();
    let out = format!("{stopped:?}");
    stopped.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let expected: Vec<(String, String, f64)> = [0, 1, 2, 3, 4, 6, 7]
        .into_iter()
        .map(|a| {
            let last = if a == 6 { now - 30 * 60_000 } else { minute };
            (
                "AccountStoppedReporting".to_string(),
                account_id(a),
                (later - last) as f64 / 1000.0,
            )
        })
        .collect();
    assert_eq!(stopped.len(), expected.len(), "{out}");
    for (got, want) in stopped.iter().zip(&expected) {
        assert_eq!((&got.0, &got.1), (&want.0, &want.1), "{out}");
        assert!((got.2 - want.2).abs() < 1e-3, "{got:?} against {want:?}");
    }
    // An instant SQL cannot hold is refused with the flag's name, before any rule runs.
    let (ok, _, err) = cli(&[
        "rules",
        "eval",
        "--data-dir",
        d,
        "--at",
        "2300-01-01T00:00:00Z",
        &fleet,
    ]);
    assert!(!ok);
    assert!(err.contains("--at") && err.contains("2262-04-11"), "{err}");
}

/// SQL over HTTP with a bearer token; the JSON rows.
fn sql_as(server: &Server, token: &str, sql: &str) -> Vec<Value> {
    let response = client()
        .post(server.url("/api/v1/sql?format=json"))
        .bearer_auth(token)
        .body(sql.to_string())
        .send()
        .unwrap();
    assert_eq!(response.status(), 200, "{sql}");
    response.json().unwrap()
}

fn alerts_as(server: &Server, token: &str) -> Vec<Value> {
    let body: Value = client()
        .get(server.url("/api/v1/alerts"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    body["data"]["alerts"].as_array().unwrap().clone()
}

#[test]
fn a_team_credential_sees_its_teams_accounts_in_sql_and_alerts() {
    let users = "\n[[query.users]]\nname = \"ops\"\ntoken = \"ops-token\"\n\n[[query.users]]\nname = \"team0\"\ntoken = \"team0-token\"\nowner_teams = [\"team-0\"]\n";
    let setup = Setup::new(4, &[], ERRORS_RULE, "");
    let mut config = std::fs::read_to_string(&setup.config).unwrap();
    config.push_str(users);
    std::fs::write(&setup.config, config).unwrap();
    let server = setup.start();
    let request = FirehoseRequest::new(
        "t1",
        vec![
            [0, 1, 2]
                .iter()
                .map(|a| crate::support::datapoint(&account_id(*a), "api", "Errors", 1, 50.0))
                .collect::<Vec<_>>()
                .join("\n"),
        ],
    );
    let (status, _) = server.post(&request);
    assert_eq!(status, 200);
    wait_until("3 firing alerts", || {
        alerts_as(&server, "ops-token").len() == 3
    });

    let ids = |rows: Vec<Value>| -> Vec<String> {
        rows.iter()
            .map(|r| r["account_id"].as_str().unwrap().to_string())
            .collect()
    };
    let q = "SELECT DISTINCT account_id FROM metrics ORDER BY account_id";
    assert_eq!(ids(sql_as(&server, "team0-token", q)), [account_id(0)]);
    assert_eq!(
        ids(sql_as(
            &server,
            "team0-token",
            "SELECT account_id FROM accounts ORDER BY 1"
        )),
        [account_id(0)]
    );
    let mine = alerts_as(&server, "team0-token");
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["labels"]["account_id"], account_id(0));
    let refused = client()
        .post(server.url("/api/v1/silences"))
        .bearer_auth("team0-token")
        .body(r#"{"matchers": ["alertname=\"ErrorsHigh\""], "endsAt": "2030-01-01T00:00:00Z"}"#)
        .send()
        .unwrap();
    assert_eq!(refused.status(), 403);
    let anonymous = client().get(server.url("/api/v1/alerts")).send().unwrap();
    assert_eq!(anonymous.status(), 401);

    // Account 1 moves to team-0 in the registry: visible at the next request.
    let registry = setup.config.parent().unwrap().join("accounts.jsonl");
    let text = std::fs::read_to_string(&registry)
        .unwrap()
        .replace(r#""owner_team":"team-1""#, r#""owner_team":"team-0""#);
    std::fs::write(&registry, text).unwrap();
    wait_until("the registry reload", || {
        sql_as(&server, "team0-token", q).len() == 2
    });
    assert_eq!(
        ids(sql_as(&server, "team0-token", q)),
        [account_id(0), account_id(1)]
    );
    server.stop();
}

/// Two instances share a lake and the Kinesis lease table; Firehose deliveries go to
/// them in turn. The rule group is evaluated by the holder of its lease only; killed
/// with -9 while its alert fires, the other instance takes the group over with its
/// state (no second page, no flap) and resolves it once.
#[test]
fn two_instances_page_once_and_the_next_evaluator_takes_over_after_a_kill() {
    two_instances_take_over(false);
}

/// The same with the lake (and so the groups' states and silences) in S3.
#[test]
fn two_instances_on_an_s3_lake_page_once_and_take_over_after_a_kill() {
    two_instances_take_over(true);
}

/// With several instances, incremental rules take in what the other instances accept
/// before they commit it: a breach accepted by the instance that does not evaluate the
/// rule, which flushes only once an hour, pages from the evaluator's partial aggregates
/// (no scan of the lake) through the rows that instance published beside the lake
/// (moto's S3), and resolves as its window passes.
#[test]
fn two_instances_evaluate_incremental_rules_over_rows_either_accepted() {
    let TwoInstances {
        moto: _moto,
        fake,
        _dir,
        a,
        b,
    } = TwoInstances::start_flushing(WINDOW_RULE, true, "1h");
    let held = |s: &Server| metric_sum(&s.metrics_text(), "fleetlake_alert_groups_held");
    wait_until("one instance holding the group", || {
        held(&a) + held(&b) >= 1.0
    });
    let (evaluator, other) = if held(&a) >= 1.0 { (a, b) } else { (b, a) };
    // The rule's partials start (from an empty lake).
    settle_alerting(&evaluator, 1);
    errors_now(&evaluator, "w1", &[(1, 2.0)]);
    errors_now(&other, "w2", &[(0, 50.0), (1, 3.0)]);
    wait_until("the page", || !fake.accepted().is_empty());
    let events = fake.accepted();
    assert_eq!(
        events[0]["payload"]["custom_details"]["labels"]["account_id"],
        account_id(0)
    );
    assert_eq!(events[0]["payload"]["custom_details"]["value"], 50.0);
    let text = evaluator.metrics_text();
    assert!(evaluations(&text, "incremental") >= 1.0, "{text}");
    assert_eq!(
        evaluations(&text, "sql"),
        0.0,
        "no round was a scan: {text}"
    );
    assert!(
        metric_sum(&text, "fleetlake_peer_mirrored_rows_total") >= 2.0,
        "the other instance's rows came from what it published: {text}"
    );
    assert_eq!(
        metric_sum(&text, "fleetlake_lake_followed_rows_total"),
        0.0,
        "the other instance committed nothing: {text}"
    );
    // Nothing more arrives: the datapoint leaves the window and the alert resolves.
    wait_until("the resolve", || fake.accepted().len() >= 2);
    settle_alerting(&evaluator, 2);
    assert_eq!(
        actions(&fake.accepted())
            .into_iter()
            .map(|(a, _)| a)
            .collect::<Vec<_>>(),
        vec!["trigger", "resolve"]
    );
    evaluator.stop();
    other.stop();
}

/// Two instances sharing a Kinesis lease table (in moto) and a lake (in moto's S3
/// with `s3`, else a local directory), with the rules of `rules` paging the fake
/// PagerDuty.
struct TwoInstances {
    moto: Moto,
    fake: FakeReceivers,
    _dir: tempfile::TempDir,
    a: Server,
    b: Server,
}

impl TwoInstances {
    fn start(rules: &str, s3: bool) -> Self {
        Self::start_flushing(rules, s3, "250ms")
    }

    /// As [`TwoInstances::start`], each instance flushing every `flush_interval`.
    fn start_flushing(rules: &str, s3: bool, flush_interval: &str) -> Self {
        let moto = Moto::start();
        moto.python(
            "client('kinesis').create_stream(StreamName='shared', ShardCount=1)\n\
             client('s3').create_bucket(Bucket='fleet-lake')\nprint('{}')",
            &[],
        );
        let fake = FakeReceivers::start();
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("accounts.jsonl");
        let records: Vec<String> = (0..3).map(|i| account_record(i, "active")).collect();
        std::fs::write(&registry, records.join("\n")).unwrap();
        let rule_file = dir.path().join("test.rules.yml");
        std::fs::write(&rule_file, rules).unwrap();
        let config = dir.path().join("fleetlake.toml");
        std::fs::write(
            &config,
            format!(
                "[buffer]\nflush_interval = \"{flush_interval}\"\n\n[lake]\n{lake}\n\n\
                 [accounts]\nfile = {registry:?}\n\n\
                 [alerting]\nrule_files = [{rule_file:?}]\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{receiver}\n\
                 [[kinesis]]\nstream = \"shared\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n\
                 idle_wait = \"100ms\"\ndiscovery_interval = \"1s\"\n\
                 lease_table = \"fleetlake-leases\"\nlease_endpoint_url = \"{endpoint}\"\n\
                 lease_duration = \"3s\"\n",
                lake = if s3 {
                    format!(
                        "location = \"s3://fleet-lake/lake\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"",
                        moto.endpoint
                    )
                } else {
                    format!("dir = {:?}", dir.path().join("lake"))
                },
                receiver = pagerduty_receiver(&fake),
                endpoint = moto.endpoint,
            ),
        )
        .unwrap();
        let args = ["--config", config.to_str().unwrap()];
        let a = Server::start_with_args(&dir.path().join("a"), &aws_env(), &args);
        let b = Server::start_with_args(&dir.path().join("b"), &aws_env(), &args);
        Self {
            moto,
            fake,
            _dir: dir,
            a,
            b,
        }
    }
}

fn two_instances_take_over(s3: bool) {
    let TwoInstances {
        moto,
        fake,
        _dir,
        a,
        b,
    } = TwoInstances::start(ERRORS_RULE, s3);
    let held = |s: &Server| metric_sum(&s.metrics_text(), "fleetlake_alert_groups_held");
    wait_until("one instance holding the group", || {
        held(&a) + held(&b) >= 1.0
    });
    assert_eq!(held(&a) + held(&b), 1.0, "exactly one evaluator");

    // Deliveries go to both instances in turn; the breach reaches the one that does
    // not evaluate the group.
    let (evaluator, other) = if held(&a) >= 1.0 { (a, b) } else { (b, a) };
    errors(&evaluator, "r1", 1, &[(0, 5.0), (1, 1.0)]);
    errors(&other, "r2", 2, &[(0, 60.0), (1, 2.0)]);
    wait_until("the page", || !fake.accepted().is_empty());
    // Paged from the row the other instance accepted (once it flushed it).
    assert_eq!(
        fake.accepted()[0]["payload"]["custom_details"]["value"],
        60.0
    );
    settle_alerting(&evaluator, 2);
    // The other instance shows the alert too, as the evaluator saved it.
    wait_until("the alert shown by the other instance", || {
        alerts_api(&other).len() == 1
    });
    assert_eq!(alerts_api(&other)[0]["state"], "firing");

    // The evaluator dies mid-incident; the other takes the group over once its
    // lease expires and goes on from its state.
    evaluator.kill9();
    wait_until("the group taken over", || held(&other) >= 1.0);
    settle_alerting(&other, 3);
    // The trigger's delivery was saved before the kill (the outbox was empty for two
    // rounds): the new evaluator sends nothing again.
    let sent = actions(&fake.accepted());
    assert_eq!(sent.len(), 1, "one page, no resolve: {sent:?}");
    assert_eq!(sent[0].0, "trigger");
    let firing = alerts_api(&other);
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(firing[0]["state"], "firing");

    // The account recovers: one resolve.
    errors(&other, "r3", 3, &[(0, 0.0)]);
    wait_until("the resolve", || {
        actions(&fake.accepted())
            .iter()
            .any(|(a, _)| a == "resolve")
    });
    settle_alerting(&other, 3);
    let sent = actions(&fake.accepted());
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[1].0.as_str(), &sent[1].1), ("resolve", &sent[0].1));
    // Each transition once in the alerts table, whichever instance wrote it.
    one_firing_and_one_resolved_in_the_alerts_table(&other);
    if s3 {
        // The group's state was kept in the bucket, a version per save.
        let keys = moto.python(
            "import json\nr = client('s3').list_objects_v2(Bucket='fleet-lake', Prefix='lake/_fleetlake/alerting/groups/')\n\
             print(json.dumps([o['Key'] for o in r.get('Contents', [])]))",
            &[],
        );
        let keys: Vec<&str> = keys
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            keys.iter()
                .any(|k| k.starts_with("lake/_fleetlake/alerting/groups/test-")
                    && k.ends_with(".json")),
            "{keys:?}"
        );
    }
    other.stop();
}
