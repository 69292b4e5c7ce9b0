//! The synthetic fleet: accounts, regions and Lambda functions, and the datapoints
//! their metric streams send, deterministic for a seed.
//!
//! Datapoints are numbered in the order a fleet's streams deliver them: minute by
//! minute, and within a minute account by account, function by function, metric by
//! metric. Datapoint `g` is a pure function of the seed and `g`, so any range of the
//! sequence (one request's worth) can be made on any thread, in any order, and the
//! same seed always gives the same bytes.
//!
//! Values follow what CloudWatch reports for Lambda: `Invocations` counts samples of
//! 1, `Errors` and `Throttles` are 0/1 samples summed, `Duration` has a mean, spread
//! and p99 per function, `ConcurrentExecutions` is a gauge. Each function has its own
//! traffic level (log-uniform, 1 to 3,000 invocations a minute) with a daily cycle and
//! noise, so the lake sees the spread of real counts and not one repeated value.

use std::fmt::Write as _;

use fleetlake_ingest::otel::{StreamDatapoint, encode_v1_record};

/// The metrics every function reports, in delivery order.
pub(crate) const METRICS: [(&str, &str); 5] = [
    ("Invocations", "Count"),
    ("Errors", "Count"),
    ("Duration", "Milliseconds"),
    ("Throttles", "Count"),
    ("ConcurrentExecutions", "Count"),
];
const ERRORS: usize = 1;
const DURATION: usize = 2;
const THROTTLES: usize = 3;

/// Regions accounts are spread over, in order.
const REGIONS: [&str; 8] = [
    "us-east-1",
    "eu-west-1",
    "us-west-2",
    "ap-southeast-2",
    "eu-central-1",
    "ap-northeast-1",
    "us-east-2",
    "sa-east-1",
];

/// Largest number of regions `--regions` accepts.
pub(crate) const MAX_REGIONS: usize = REGIONS.len();

/// SplitMix64: a well-mixed 64-bit hash of a counter, the generator's only source of
/// randomness (so any datapoint can be made without making the ones before it).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform float in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Rounds to two decimals, as Lambda reports milliseconds.
fn cents(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `bytes` gzip'd (fast level, as load is generated on the machine under test).
pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = gz.write_all(bytes);
    gz.finish().unwrap_or_default()
}

/// The fleet's shape and the parameters of its data.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    seed: u64,
    accounts: Vec<String>,
    regions: usize,
    functions: usize,
    /// Epoch milliseconds of the first minute.
    start_ms: i64,
    /// Accounts whose `Errors` are raised to `error_rate` of their invocations.
    error_accounts: Vec<bool>,
    error_rate: f64,
}

/// One datapoint, with everything it needs to be written in either format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Datapoint {
    pub(crate) account: usize,
    pub(crate) function: usize,
    pub(crate) metric: usize,
    pub(crate) time_ms: i64,
    pub(crate) count: f64,
    pub(crate) sum: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// p99, for `Duration` only.
    pub(crate) p99: Option<f64>,
}

impl Fleet {
    /// A fleet of `accounts` accounts over `regions` regions with `functions` Lambda
    /// functions each; the first datapoint's minute is `start_ms` (rounded down to the
    /// minute). `inject_errors` accounts, picked by the seed, report `error_rate` of
    /// their invocations as errors.
    pub(crate) fn new(
        seed: u64,
        accounts: usize,
        regions: usize,
        functions: usize,
        start_ms: i64,
        inject_errors: usize,
        error_rate: f64,
    ) -> Self {
        // 12-digit ids, distinct for distinct indexes: i ↦ i·7919 + offset is a
        // bijection modulo 9·10¹¹ (7919 is a prime that does not divide it).
        const SPAN: u64 = 900_000_000_000;
        let offset = mix(seed) % SPAN;
        let ids = (0..accounts as u64)
            .map(|i| format!("{}", 100_000_000_000 + (i * 7919 + offset) % SPAN))
            .collect();
        let mut error_accounts = vec![false; accounts];
        // A seeded partial shuffle picks which accounts misbehave.
        let mut order: Vec<usize> = (0..accounts).collect();
        for i in 0..inject_errors.min(accounts) {
            let j = i + (mix(seed ^ 0xe770 ^ i as u64) % (accounts - i) as u64) as usize;
            order.swap(i, j);
            error_accounts[order[i]] = true;
        }
        Self {
            seed,
            accounts: ids,
            regions: regions.clamp(1, MAX_REGIONS),
            functions: functions.max(1),
            start_ms: start_ms - start_ms.rem_euclid(60_000),
            error_accounts,
            error_rate,
        }
    }

    /// Datapoints in one minute of the whole fleet.
    pub(crate) fn per_minute(&self) -> u64 {
        (self.accounts.len() * self.functions * METRICS.len()) as u64
    }

    pub(crate) fn start_ms(&self) -> i64 {
        self.start_ms
    }

    pub(crate) fn account_id(&self, account: usize) -> &str {
        &self.accounts[account]
    }

    /// The fleet's accounts as an account registry in JSON lines: every one active,
    /// named by its index, owned by one of 40 teams.
    pub(crate) fn registry(&self) -> String {
        let mut out = String::new();
        for (i, id) in self.accounts.iter().enumerate() {
            let line = serde_json::json!({
                "account_id": id,
                "account_name": format!("tenant-{i}"),
                "environment": "prod",
                "owner_team": format!("team-{}", i % 40),
                "lifecycle_state": "active",
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        out
    }

    pub(crate) fn region(&self, account: usize) -> &'static str {
        REGIONS[account % self.regions]
    }

    /// The accounts with injected errors, by id.
    pub(crate) fn error_account_ids(&self) -> Vec<&str> {
        (0..self.accounts.len())
            .filter(|&a| self.error_accounts[a])
            .map(|a| self.account_id(a))
            .collect()
    }

    /// The function's name: stable per account and index.
    pub(crate) fn function_name(function: usize) -> String {
        format!("fn-{function}")
    }

    /// Datapoint number `g` of the sequence.
    pub(crate) fn datapoint(&self, g: u64) -> Datapoint {
        let per_minute = self.per_minute();
        let minute = g / per_minute;
        let r = (g % per_minute) as usize;
        let per_account = self.functions * METRICS.len();
        let account = r / per_account;
        let function = (r / METRICS.len()) % self.functions;
        let metric = r % METRICS.len();
        let time_ms = self.start_ms + minute as i64 * 60_000;

        // What the function is like, fixed for the run.
        let fh = mix(self.seed ^ mix((account * 64 + function) as u64));
        let base = 3000f64.powf(unit(fh)); // 1..3000 invocations a minute
        let mean_ms = 5.0 * 600f64.powf(unit(mix(fh ^ 1))); // 5 ms..3 s
        let error_base = 0.01 * unit(mix(fh ^ 2));
        let throttle_rate = if unit(mix(fh ^ 3)) < 0.1 { 0.05 } else { 0.0 };
        // This minute: a daily cycle and noise.
        let mh = mix(fh ^ mix(minute ^ self.seed.rotate_left(17)));
        let day = ((time_ms / 60_000) % 1440) as f64 / 1440.0;
        let cycle = 1.0 + 0.4 * (std::f64::consts::TAU * day).sin();
        let invocations = (base * cycle * (0.8 + 0.4 * unit(mh))).round().max(1.0);
        let noise = |salt: u64| unit(mix(mh ^ salt));

        let (count, sum, min, max, p99) = match metric {
            ERRORS => {
                let rate = if self.error_accounts[account] {
                    self.error_rate
                } else {
                    error_base * noise(4) * 2.0
                };
                let errors = (invocations * rate).floor();
                (invocations, errors, 0.0, f64::from(errors > 0.0), None)
            }
            DURATION => {
                let mean = mean_ms * (0.9 + 0.2 * noise(5));
                let min = cents(mean * (0.2 + 0.2 * noise(6)));
                let p99 = cents(mean * (2.0 + noise(7)));
                let max = cents(p99 * (1.0 + 0.5 * noise(8)));
                (invocations, cents(mean * invocations), min, max, Some(p99))
            }
            THROTTLES => {
                let throttles = (invocations * throttle_rate * noise(9)).floor();
                (
                    invocations + throttles,
                    throttles,
                    0.0,
                    f64::from(throttles > 0.0),
                    None,
                )
            }
            4 => {
                // ConcurrentExecutions: a gauge sampled once in the minute.
                let c = (invocations * mean_ms / 60_000.0 * (0.5 + noise(10))).ceil();
                (1.0, c, c, c, None)
            }
            _ => (invocations, invocations, 1.0, 1.0, None),
        };
        Datapoint {
            account,
            function,
            metric,
            time_ms,
            count,
            sum,
            min,
            max,
            p99,
        }
    }

    /// Appends datapoint `d` as one line of Metric Streams JSON (no newline).
    pub(crate) fn write_json(&self, d: &Datapoint, out: &mut String) {
        let (metric, unit) = METRICS[d.metric];
        let _ = write!(
            out,
            r#"{{"metric_stream_name":"fleet","account_id":"{}","region":"{}","namespace":"AWS/Lambda","metric_name":"{metric}","dimensions":{{"FunctionName":"fn-{}"}},"timestamp":{},"value":{{"max":{:?},"min":{:?},"sum":{:?},"count":{:?}"#,
            self.account_id(d.account),
            self.region(d.account),
            d.function,
            d.time_ms,
            d.max,
            d.min,
            d.sum,
            d.count,
        );
        if let Some(p99) = d.p99 {
            let _ = write!(out, r#","p99":{p99:?}"#);
        }
        let _ = write!(out, r#"}},"unit":"{unit}"}}"#);
    }

    /// Datapoints `range` as one record of Metric Streams JSON lines.
    pub(crate) fn json_record(&self, range: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = String::with_capacity((range.end - range.start) as usize * 300);
        for g in range {
            if !out.is_empty() {
                out.push('\n');
            }
            self.write_json(&self.datapoint(g), &mut out);
        }
        out.into_bytes()
    }

    /// Datapoints `range` as one OpenTelemetry 1.0 record (one length-delimited
    /// message).
    pub(crate) fn otel_record(&self, range: std::ops::Range<u64>) -> Vec<u8> {
        let points: Vec<(Datapoint, String)> = range
            .map(|g| {
                let d = self.datapoint(g);
                (d, Self::function_name(d.function))
            })
            .collect();
        let dims: Vec<[(&str, &str); 1]> = points
            .iter()
            .map(|(_, f)| [("FunctionName", f.as_str())])
            .collect();
        let p99s: Vec<Vec<(f64, f64)>> = points
            .iter()
            .map(|(d, _)| d.p99.map(|p| vec![(0.99, p)]).unwrap_or_default())
            .collect();
        let stream: Vec<StreamDatapoint<'_>> = points
            .iter()
            .zip(&dims)
            .zip(&p99s)
            .map(|(((d, _), dims), p99)| StreamDatapoint {
                account_id: self.account_id(d.account),
                region: self.region(d.account),
                namespace: "AWS/Lambda",
                metric_name: METRICS[d.metric].0,
                dimensions: dims,
                unit: METRICS[d.metric].1,
                time_ms: d.time_ms,
                count: d.count,
                sum: d.sum,
                min: d.min,
                max: d.max,
                percentiles: p99,
            })
            .collect();
        encode_v1_record(&stream)
    }

    /// The log events of the functions whose first metric is in `range`: one
    /// CloudWatch Logs subscription payload (JSON, before the gzip subscription
    /// filters apply on the wire: [`gzip`]) per function-minute, with `events` events
    /// each.
    pub(crate) fn log_payloads(&self, range: std::ops::Range<u64>, events: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for g in range.filter(|g| g % METRICS.len() as u64 == 0) {
            let d = self.datapoint(g);
            let duration = self.datapoint(g + DURATION as u64);
            let account = self.account_id(d.account);
            let group = format!("/aws/lambda/fn-{}", d.function);
            let log_events: Vec<_> = (0..events)
                .map(|i| {
                    let ts = d.time_ms + (i as i64 * 60_000) / events as i64;
                    let request = mix(self.seed ^ g ^ (i as u64) << 40);
                    let message = if i % 10 == 9 {
                        format!("ERROR RequestId: {request:016x} Task timed out after 3.00 seconds")
                    } else {
                        format!("REPORT RequestId: {request:016x} Duration: {:.2} ms", duration.sum / duration.count.max(1.0))
                    };
                    // Event ids are unique within the log group: time and position.
                    serde_json::json!({"id": format!("{ts:020}{g:016}{i:06}"), "timestamp": ts, "message": message})
                })
                .collect();
            let payload = serde_json::json!({
                "messageType": "DATA_MESSAGE",
                "owner": account,
                "logGroup": group,
                "logStream": format!("{}/[$LATEST]{:032x}", d.time_ms / 86_400_000, mix(self.seed ^ g) as u128),
                "subscriptionFilters": ["fleet"],
                "logEvents": log_events,
            });
            out.push(payload.to_string().into_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet::new(7, 50, 3, 4, 1_700_000_040_123, 2, 0.5)
    }

    #[test]
    fn same_seed_same_data_and_distinct_accounts() {
        let (a, b) = (fleet(), fleet());
        assert_eq!(a.json_record(0..2_000), b.json_record(0..2_000));
        let other = Fleet::new(8, 50, 3, 4, 1_700_000_040_123, 2, 0.5);
        assert_ne!(a.json_record(0..100), other.json_record(0..100));
        let mut ids: Vec<_> = (0..50).map(|i| a.account_id(i)).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 50);
        assert!(ids.iter().all(|id| id.len() == 12));
        assert_eq!(a.start_ms(), 1_700_000_040_000);
    }

    #[test]
    fn sequence_order_and_lambda_semantics() {
        let f = fleet();
        assert_eq!(f.per_minute(), 50 * 4 * 5);
        let d = f.datapoint(f.per_minute() + 4 * 5 + 5 + 2);
        assert_eq!((d.account, d.function, d.metric), (1, 1, DURATION));
        assert_eq!(d.time_ms, f.start_ms() + 60_000);
        assert!(d.min <= d.sum / d.count && d.sum / d.count <= d.max);
        assert!(d.p99.is_some_and(|p| p <= d.max));
        for g in 0..f.per_minute() * 3 {
            let d = f.datapoint(g);
            assert!(d.count >= 1.0 && d.sum >= 0.0 && d.min <= d.max, "{d:?}");
            if d.metric == ERRORS {
                assert!(d.sum <= d.count);
                let injected = f.error_accounts[d.account];
                if injected {
                    assert_eq!(d.sum, (d.count * 0.5).floor(), "{d:?}");
                } else {
                    assert!(d.sum / d.count <= 0.02, "{d:?}");
                }
            }
        }
        assert_eq!(f.error_account_ids().len(), 2);
    }

    #[test]
    fn records_decode_in_fleetlake() {
        let f = fleet();
        let mut decoder =
            fleetlake_ingest::Decoder::new("t", fleetlake_ingest::Format::MetricsJson, None);
        decoder.push_record(&f.json_record(0..1_000), "r", 0);
        let mut otel = fleetlake_ingest::Decoder::new("t", fleetlake_ingest::Format::Otel1, None);
        otel.push_record(&f.otel_record(0..1_000), "r", 0);
        let mut logs = fleetlake_ingest::Decoder::new(
            "t",
            fleetlake_ingest::Format::CloudWatchLogs,
            Some("us-east-1"),
        );
        for payload in f.log_payloads(0..1_000, 3) {
            logs.push_record(&gzip(&payload), "r", 0);
        }
        let rows = |d: &mut fleetlake_ingest::Decoder| -> usize {
            d.finish()
                .iter()
                .filter(|(t, _)| *t != fleetlake_model::Table::DeadLetters)
                .map(|(_, b)| b.num_rows())
                .sum()
        };
        assert_eq!(rows(&mut decoder), 1_000);
        assert_eq!(rows(&mut otel), 1_000);
        assert_eq!(rows(&mut logs), 200 * 3);
    }
}
