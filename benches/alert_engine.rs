//! The alert engine's own work in a round, without SQL: `cargo bench --bench
//! alert_engine`.
//!
//! `FLEETLAKE_BENCH_RULES` rules (default 1,000) in one group at a 5 s interval, each
//! returning `FLEETLAKE_BENCH_INSTANCES` rows (default 64: 64,000 instances, what the
//! end-to-end fleet bench leaves pending) of account, region and function over a
//! registry of 6,000 accounts, with a `summary` annotation template and a static
//! label, `for: 5m` so that every instance stays pending, as most do in a fleet. The
//! SQL source hands out prepared batches; a twelfth of the values change each round
//! (a datapoint a minute, rounds every 5 s). Reported: the first round (every instance
//! new) and the median of `FLEETLAKE_BENCH_ROUNDS` later rounds (default 20), which
//! is what the engine adds to every round of the fleet.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use fleetlake_alert_rules::config::{ReceiverConfig, ReceiverKind, RouteConfig};
use fleetlake_alert_rules::{
    AlertError, Alerting, AlertingConfig, AlertingParts, Queued, Registry, SqlSource, TransitionLog,
};
use fleetlake_model::clock::ManualClock;

// The service's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNTS: usize = 6_000;
const INTERVAL_MS: i64 = 5_000;
/// A minute boundary.
const START_MS: i64 = 1_767_608_400_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Each rule's rows: its SQL text is its number.
struct Rows {
    schema: SchemaRef,
    labels: Vec<(ArrayRef, ArrayRef, ArrayRef)>,
}

#[async_trait]
impl SqlSource for Rows {
    async fn query(&self, sql: &str, at_ms: i64) -> Result<Vec<RecordBatch>, AlertError> {
        let rule: usize = sql.parse().expect("a rule number");
        let (account, region, function) = &self.labels[rule];
        let round = ((at_ms - START_MS) / INTERVAL_MS) as usize;
        // Row j's value moves on once every 12 rounds, a twelfth of the rows each round.
        let values: Float64Array = (0..account.len())
            .map(|j| Some(100.0 + ((round + j) / 12) as f64))
            .collect();
        let columns = vec![
            account.clone(),
            region.clone(),
            function.clone(),
            Arc::new(values) as ArrayRef,
        ];
        Ok(vec![
            RecordBatch::try_new(self.schema.clone(), columns).expect("columns"),
        ])
    }

    async fn plan(&self, _sql: &str) -> Result<SchemaRef, AlertError> {
        Ok(self.schema.clone())
    }
}

struct NoLog;

#[async_trait]
impl TransitionLog for NoLog {
    async fn append(&self, _queued: Vec<Queued>) -> Result<(), AlertError> {
        Ok(())
    }
}

fn main() {
    let rules = env("FLEETLAKE_BENCH_RULES", 1_000);
    let instances = env("FLEETLAKE_BENCH_INSTANCES", 64);
    let rounds = env("FLEETLAKE_BENCH_ROUNDS", 20).clamp(1, 55);
    let dir = tempfile::tempdir().expect("a temporary directory");

    let registry_file = dir.path().join("accounts.jsonl");
    let mut file = std::fs::File::create(&registry_file).expect("registry file");
    for a in 0..ACCOUNTS {
        writeln!(
            file,
            r#"{{"account_id":"{:012}","account_name":"tenant-{a}","environment":"prod","owner_team":"team-{}","lifecycle_state":"active","tier":"gold","error_rate_threshold":0.01}}"#,
            a + 1,
            a % 40
        )
        .expect("registry line");
    }
    drop(file);

    let mut yaml = String::from("groups:\n  - name: fleet\n    interval: 5s\n    rules:\n");
    let mut labels = Vec::new();
    for r in 0..rules {
        yaml.push_str(&format!(
            "      - alert: Rule{r:04}\n        expr: \"{r}\"\n        for: 5m\n        labels:\n          severity: page\n        annotations:\n          summary: \"{{{{ $labels.account_id }}}} at {{{{ $value }}}}\"\n"
        ));
        let rows: Vec<usize> = (0..instances)
            .map(|j| (r * 37 + j * 97) % ACCOUNTS)
            .collect();
        let account: StringArray = rows
            .iter()
            .map(|a| Some(format!("{:012}", a + 1)))
            .collect();
        let region: StringArray = rows
            .iter()
            .map(|a| Some(["eu-west-1", "us-east-1"][a % 2]))
            .collect();
        let function: StringArray = (0..instances).map(|j| Some(format!("fn-{j}"))).collect();
        labels.push((
            Arc::new(account) as ArrayRef,
            Arc::new(region) as ArrayRef,
            Arc::new(function) as ArrayRef,
        ));
    }
    let groups =
        fleetlake_alert_rules::rules::parse(std::path::Path::new("bench.rules.yml"), &yaml)
            .expect("the bench's rules");
    let schema = Arc::new(Schema::new(vec![
        Field::new("account_id", DataType::Utf8, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("function", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]));
    let config = AlertingConfig {
        receivers: vec![ReceiverConfig {
            name: "pd".into(),
            kind: ReceiverKind::Pagerduty,
            url: Some("http://127.0.0.1:9".into()),
            routing_key: Some("r".repeat(32)),
            rate_limit_per_minute: 120,
            timeout: Duration::from_secs(1),
        }],
        routes: vec![RouteConfig {
            matchers: Vec::new(),
            receiver: "pd".into(),
            continue_: false,
        }],
        ..AlertingConfig::default()
    };
    let clock = ManualClock::at(START_MS);
    let alerting = Alerting::open(AlertingParts {
        config,
        groups,
        sql: Arc::new(Rows { schema, labels }),
        log: Arc::new(NoLog),
        registry: Registry::load(&registry_file).expect("the registry"),
        state_dir: dir.path().join("state"),
        external_url: "http://fleetlake".into(),
        clock: clock.clone(),
        shared: None,
    })
    .expect("the alerting stage");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let round = || {
        let started = Instant::now();
        let r = runtime.block_on(alerting.evaluate_group(0));
        let took = started.elapsed();
        assert_eq!(
            r.evaluated, rules,
            "every rule evaluated: {:?}",
            r.rule_errors
        );
        clock.advance(Duration::from_millis(INTERVAL_MS as u64));
        took
    };
    let first = round();
    let mut times: Vec<Duration> = (0..rounds).map(|_| round()).collect();
    times.sort();
    let steady = times[times.len() / 2];
    let pending: HashMap<String, usize> =
        alerting
            .alerts(None)
            .iter()
            .fold(HashMap::new(), |mut counts, alert| {
                *counts
                    .entry(alert["state"].as_str().unwrap_or_default().to_string())
                    .or_default() += 1;
                counts
            });
    assert_eq!(
        pending.get("pending"),
        Some(&(rules * instances)),
        "{pending:?}"
    );

    println!(
        "Alert engine, {rules} rules × {instances} instances ({} pending), no SQL",
        rules * instances
    );
    println!();
    println!("| measure | time |");
    println!("|---|---|");
    println!("| first round (every instance new) | {first:.2?} |");
    println!("| a later round (median of {rounds}) | {steady:.2?} |");
}
