//! `fleetlake backfill cloudwatch`: history (or a hole) of CloudWatch metrics from
//! GetMetricData into the lake.
//!
//! For each account (a list, else the active accounts of the registry, else the current
//! account) and region, a CloudWatch client with the account's credentials (the role
//! `--role-name` assumed through STS, or the default chain for the current account)
//! goes to [`fleetlake_ingest::cloudwatch::backfill_account`], several accounts at once.
//! Rows are written through the aggregate stage (write-ahead log, hot buffer, lake) like
//! `replay`; progress is kept under `<data_dir>/backfill/<job id>/`, so running the same
//! command again resumes, and the lake's de-duplication makes overlaps harmless.

use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use aws_sdk_cloudwatch::config::{
    SharedCredentialsProvider, retry::RetryConfig, timeout::TimeoutConfig,
};
use fleetlake_ingest::cloudwatch::{self as cw, Checkpoint, Counters, Limits, Plan, Target};
use fleetlake_model::Clock;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::Config;

/// Flags of `fleetlake backfill cloudwatch`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Accounts to backfill (12-digit ids, repeated or comma-separated). Default: the
    /// active accounts of the account registry, or else the current account.
    #[arg(long = "account", value_name = "ID", value_delimiter = ',')]
    accounts: Vec<String>,
    /// Role to assume in each account (arn:aws:iam::<account>:role/<name>) through
    /// STS. Without it the default credential chain is used, which reads only the
    /// account it belongs to.
    #[arg(long, value_name = "NAME")]
    role_name: Option<String>,
    /// Regions (repeated or comma-separated). Default: the AWS configuration's region.
    #[arg(long = "region", value_name = "REGION", value_delimiter = ',')]
    regions: Vec<String>,
    /// Namespaces to backfill (repeated or comma-separated). Default: every namespace
    /// ListMetrics finds.
    #[arg(long = "namespace", value_name = "NS", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Metric names to backfill (repeated or comma-separated). Default: every metric.
    #[arg(long = "metric-name", value_name = "NAME", value_delimiter = ',')]
    metric_names: Vec<String>,
    /// Start of the range: an RFC 3339 time (2026-11-01T00:00:00Z) or how long ago
    /// (14d). Aligned down to the period.
    #[arg(long, value_name = "TIME")]
    start: String,
    /// End of the range (exclusive): an RFC 3339 time, how long ago, or `now`.
    #[arg(long, default_value = "now", value_name = "TIME")]
    end: String,
    /// Period of the datapoints. CloudWatch keeps 1-minute data 15 days, 5-minute data
    /// 63 days and hourly data 455 days.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    period: Duration,
    /// Percentiles to fetch besides Sum, SampleCount, Minimum and Maximum (p99, p99.9;
    /// repeated or comma-separated).
    #[arg(long = "percentile", value_name = "pNN", value_delimiter = ',')]
    percentiles: Vec<String>,
    /// Accounts (account-regions) fetched at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// CloudWatch calls per second and account-region (the quota, 50, is shared with
    /// the account's own dashboards and alarms).
    #[arg(long, default_value_t = 10.0)]
    max_calls_per_second: f64,
    /// Datapoints requested per second and account-region (the quota is 396,000 for
    /// data older than 3 hours, 180,000 for newer).
    #[arg(long, default_value_t = 150_000.0)]
    max_datapoints_per_second: f64,
    /// Attempts per call on throttling, server errors and timeouts.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// First wait after a throttled or failed call (doubled each time, up to 20 s).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    initial_backoff: Duration,
    /// CloudWatch and STS endpoint override (VPC endpoints, tests).
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Forget the progress of an earlier run of the same job and fetch everything again.
    #[arg(long)]
    fresh: bool,
}

pub(crate) fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    crate::serve::init_tracing("warn,buoyant_kernel=off,deltalake_core=warn");
    let now_ms = fleetlake_model::clock::SystemClock.now_ms();
    let start = parse_time(&args.start, now_ms).context("--start")?;
    let end = parse_time(&args.end, now_ms).context("--end")?;
    let period = u32::try_from(args.period.as_secs())
        .ok()
        .filter(|_| args.period.subsec_nanos() == 0)
        .context("--period must be whole seconds")?;
    let plan = Plan::new(
        start,
        end,
        period,
        args.namespaces.clone(),
        args.metric_names.clone(),
        args.percentiles.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    config.prepare_dirs()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (summary, failures) = runtime.block_on(backfill(config, &args, &plan))?;
    println!("{summary}");
    if failures > 0 {
        bail!(
            "{failures} account-region(s) failed (see above); run the same command again to resume"
        );
    }
    Ok(())
}

/// Epoch ms as RFC 3339 to the second (`2026-11-01T00:00:00Z`).
pub(crate) fn rfc3339(ms: i64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

/// `now`, an RFC 3339 time, or a duration meaning that long ago.
fn parse_time(text: &str, now_ms: i64) -> anyhow::Result<i64> {
    if text == "now" {
        return Ok(now_ms);
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')) {
        let ms = time
            .duration_since(UNIX_EPOCH)
            .context("a time before 1970")?
            .as_millis();
        return Ok(ms as i64);
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(now_ms - ago.as_millis() as i64),
        Err(_) => bail!(
            "{text:?}: expected an RFC 3339 time (2026-11-01T00:00:00Z), a duration ago (14d) or now"
        ),
    }
}

/// The AWS partition of a region, for role ARNs.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The default AWS configuration, with `region` and `endpoint` if given.
pub(crate) async fn base_config(
    region: Option<&str>,
    endpoint: Option<&str>,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// A CloudWatch client for `account` in `region`: through the role `role_name` assumed
/// in that account, or the base credentials. Retries are the backfill's own (which
/// counts throttling), so the SDK makes one attempt per call.
pub(crate) async fn cloudwatch_client(
    base: &aws_config::SdkConfig,
    account: &str,
    region: &str,
    role_name: Option<&str>,
) -> aws_sdk_cloudwatch::Client {
    let regional = base
        .clone()
        .into_builder()
        .region(aws_config::Region::new(region.to_owned()))
        .build();
    let config = match role_name {
        Some(role) => {
            let arn = format!("arn:{}:iam::{account}:role/{role}", partition(region));
            let provider = aws_config::sts::AssumeRoleProvider::builder(arn)
                .session_name("fleetlake-backfill")
                .configure(&regional)
                .build()
                .await;
            regional
                .into_builder()
                .credentials_provider(SharedCredentialsProvider::new(provider))
                .build()
        }
        None => regional,
    };
    let cw = aws_sdk_cloudwatch::config::Builder::from(&config)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    aws_sdk_cloudwatch::Client::from_conf(cw)
}

/// The account the base credentials belong to (STS GetCallerIdentity).
async fn current_account(base: &aws_config::SdkConfig) -> anyhow::Result<String> {
    let identity = aws_sdk_sts::Client::new(base)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sts::error::DisplayErrorContext(e)))
        .context("finding the current account (sts:GetCallerIdentity)")?;
    identity
        .account()
        .map(str::to_owned)
        .context("sts:GetCallerIdentity returned no account")
}

/// The accounts to backfill, checked.
async fn accounts(
    config: &Config,
    args: &Args,
    base: &aws_config::SdkConfig,
) -> anyhow::Result<Vec<String>> {
    let mut accounts = args.accounts.clone();
    if accounts.is_empty() {
        let registry = crate::alerting::registry(config)?;
        accounts = registry
            .snapshot()
            .accounts()
            .filter(|a| a.is_active())
            .map(|a| a.account_id.clone())
            .collect();
    }
    for account in &accounts {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            bail!("account {account:?}: an AWS account id has 12 digits");
        }
    }
    if args.role_name.is_none() {
        let current = current_account(base).await?;
        if accounts.is_empty() {
            accounts.push(current.clone());
        }
        if let Some(other) = accounts.iter().find(|a| **a != current) {
            bail!(
                "account {other}: without --role-name only the current account ({current}) can be read"
            );
        }
    }
    if accounts.is_empty() {
        bail!("no accounts: give --account, or an account registry ([accounts] file)");
    }
    accounts.sort();
    accounts.dedup();
    Ok(accounts)
}

async fn backfill(config: &Config, args: &Args, plan: &Plan) -> anyhow::Result<(String, usize)> {
    let base = base_config(
        args.regions.first().map(String::as_str),
        args.endpoint_url.as_deref(),
    )
    .await;
    let regions = if args.regions.is_empty() {
        vec![
            base.region()
                .map(|r| r.to_string())
                .context("no region: give --region or set AWS_REGION")?,
        ]
    } else {
        args.regions.clone()
    };
    let accounts = accounts(config, args, &base).await?;
    let checkpoint = Checkpoint::new(config.data_dir.join("backfill").join(plan.id()));
    if args.fresh && checkpoint.dir().exists() {
        std::fs::remove_dir_all(checkpoint.dir())
            .with_context(|| format!("removing {}", checkpoint.dir().display()))?;
    }
    std::fs::create_dir_all(checkpoint.dir())
        .with_context(|| format!("creating {}", checkpoint.dir().display()))?;
    std::fs::write(
        checkpoint.dir().join("job.json"),
        serde_json::to_vec_pretty(plan)?,
    )
    .with_context(|| format!("writing to {}", checkpoint.dir().display()))?;

    let aggregator = crate::replay::open_for_batch(config).await?;

    let limits = Limits {
        calls_per_second: args.max_calls_per_second,
        datapoints_per_second: args.max_datapoints_per_second,
        max_attempts: args.max_attempts,
        initial_backoff: args.initial_backoff,
    };
    let targets: Vec<(String, String)> = accounts
        .iter()
        .flat_map(|a| regions.iter().map(move |r| (a.clone(), r.clone())))
        .collect();
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(targets.len() as u64));
    overall.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {pos}/{len} account-regions {msg}",
        )
        .expect("valid template"),
    );
    let account_style = ProgressStyle::with_template("  {prefix} {bar:30} {pos}/{len} calls {msg}")
        .expect("valid template");
    let counters = Counters::default();
    let started = Instant::now();
    let sink: &dyn fleetlake_model::RowSink = &aggregator;
    let checkpoint = &checkpoint;
    let failed: Vec<bool> = futures::stream::iter(targets.iter().cloned())
        .map(|(account, region)| {
            let (base, limits, counters) = (&base, &limits, &counters);
            let (bars, overall, style) = (&bars, &overall, account_style.clone());
            async move {
                let bar = bars.add(ProgressBar::new(0));
                bar.set_style(style);
                bar.set_prefix(format!("{account} {region}"));
                let target = Target {
                    client: cloudwatch_client(base, &account, &region, args.role_name.as_deref())
                        .await,
                    account_id: account.clone(),
                    region: region.clone(),
                };
                let totals = || {
                    format!(
                        "{} datapoints, {} rows",
                        Counters::get(&counters.datapoints),
                        Counters::get(&counters.rows)
                    )
                };
                let progress = |done: usize, total: usize| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                    overall.set_message(totals());
                };
                let outcome = cw::backfill_account(
                    &target,
                    plan,
                    limits,
                    Some(checkpoint),
                    sink,
                    counters,
                    &progress,
                )
                .await;
                if let Err(error) = &outcome {
                    bars.suspend(|| eprintln!("account {account} {region}: {error}"));
                }
                bar.finish_and_clear();
                bars.remove(&bar);
                overall.inc(1);
                overall.set_message(totals());
                outcome.is_err()
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    overall.set_message("committing to the lake");
    aggregator
        .flush()
        .await
        .context("committing to the lake (the write-ahead log keeps the data)")?;
    overall.finish_and_clear();

    let failures = failed.iter().filter(|f| **f).count();
    let secs = started.elapsed().as_secs_f64();
    let c = &counters;
    let get = Counters::get(&c.get_calls);
    let list = Counters::get(&c.list_calls);
    let points = Counters::get(&c.datapoints);
    let days = (plan.end_ms - plan.start_ms) as f64 / 86_400_000.0;
    let per_target = (get + list) as f64 / targets.len() as f64;
    let per_account_day = (get + list) as f64 / (targets.len() as f64 * days).max(1e-9);
    let units = Counters::get(&c.units);
    let resumed = Counters::get(&c.units_resumed);
    let summary = format!(
        "backfilled {} of {} account-region(s) ({failures} failed), {} to {} at {}s (job {}): \
         {} metrics, {units} units of work ({resumed} already done by an earlier run), \
         {get} GetMetricData + {list} ListMetrics calls ({} retried, {} throttled), \
         {points} datapoints, {} rows written in {secs:.2}s ({:.0} datapoints/s, \
         {per_target:.1} calls per account-region, {per_account_day:.1} per account-day)",
        targets.len() - failures,
        targets.len(),
        rfc3339(plan.start_ms),
        rfc3339(plan.end_ms),
        plan.period_s,
        plan.id(),
        Counters::get(&c.metrics),
        Counters::get(&c.retries),
        Counters::get(&c.throttled),
        Counters::get(&c.rows),
        points as f64 / secs.max(1e-9),
    );
    Ok((summary, failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_durations_ago_or_now() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(
            parse_time("2026-01-01T00:00:00Z", now).unwrap(),
            1_767_225_600_000
        );
        assert_eq!(
            parse_time("2026-01-01T00:01:00", now).unwrap(),
            1_767_225_660_000
        );
        let err = parse_time("yesterday", now).unwrap_err().to_string();
        assert!(err.contains("yesterday"), "{err}");
    }

    #[test]
    fn role_arns_use_the_region_partition() {
        assert_eq!(partition("us-east-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
    }
}
