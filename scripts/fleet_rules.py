"""Fleet alert rules of the shipped examples' kinds, for the benchmarks.

    python3 scripts/fleet_rules.py OUT.yml N [--group-size G] [--interval 1m] [--for 5m]

Writes N rules (error rate, throttles, p99 duration, concurrency, accounts that stopped
reporting; each over the fleet's last 5 or 15 minutes, thresholds varied so that a rule
finds a few instances, as real fleet rules do: tens to a few hundred functions of
`fleetlake-loadgen`'s fleet of 24,000) as a rule file, G rules per group.
Used by scripts/alert-bench.sh and scripts/fleet_alert_bench.py.
"""

import argparse

LAMBDA_WHERE = ("namespace = 'AWS/Lambda' AND cardinality(dimensions) = 1 "
                "AND dimensions['FunctionName'] IS NOT NULL AND time > now() - INTERVAL '{w} minutes'")

KINDS = [
    ("ErrorRate", "SELECT account_id, region, function, errors / invocations AS value FROM ("
     " SELECT account_id, region, dimensions['FunctionName'] AS function,"
     " sum(CASE WHEN metric_name = 'Errors' THEN sum END) AS errors,"
     " sum(CASE WHEN metric_name = 'Invocations' THEN sum END) AS invocations"
     " FROM metrics WHERE metric_name IN ('Errors', 'Invocations') AND " + LAMBDA_WHERE +
     " GROUP BY account_id, region, dimensions['FunctionName'])"
     " WHERE invocations >= 20 AND errors / invocations > {t}", lambda i: 0.012 + (i % 50) / 50000),
    ("Throttles", "SELECT account_id, region, dimensions['FunctionName'] AS function, sum(sum) AS value"
     " FROM metrics WHERE metric_name = 'Throttles' AND " + LAMBDA_WHERE +
     " GROUP BY account_id, region, dimensions['FunctionName'] HAVING sum(sum) > {t}", lambda i: 300 + 10 * (i % 50)),
    ("DurationP99", "SELECT account_id, region, dimensions['FunctionName'] AS function, max(stats['p99']) AS value"
     " FROM metrics WHERE metric_name = 'Duration' AND " + LAMBDA_WHERE +
     " GROUP BY account_id, region, dimensions['FunctionName'] HAVING max(stats['p99']) > {t}", lambda i: 9000 + 100 * (i % 5)),
    ("Concurrency", "SELECT account_id, region, dimensions['FunctionName'] AS function, max(max) AS value"
     " FROM metrics WHERE metric_name = 'ConcurrentExecutions' AND " + LAMBDA_WHERE +
     " GROUP BY account_id, region, dimensions['FunctionName'] HAVING max(max) > {t}", lambda i: 150 + 5 * (i % 2)),
    ("StoppedReporting", "SELECT a.account_id, coalesce(extract(epoch FROM now()) - extract(epoch FROM s.last_seen), 86400.0) AS value"
     " FROM accounts a LEFT JOIN (SELECT account_id, max(time) AS last_seen FROM metrics"
     " WHERE time > now() - INTERVAL '1 day' GROUP BY account_id) s ON s.account_id = a.account_id"
     " WHERE a.lifecycle_state = 'active' AND (s.last_seen IS NULL OR s.last_seen < now() - INTERVAL '{t} minutes')", lambda i: 15 + i % 10),
]


def rules(n):
    """(alert name, SQL) of the first n rules."""
    out = []
    for i in range(n):
        name, sql, threshold = KINDS[i % len(KINDS)]
        window = 5 if i % 3 else 15
        out.append((f"{name}{i:04d}", sql.format(w=window, t=threshold(i))))
    return out


def group_yaml(name, interval, rule_list, for_="5m"):
    """One group of rule_list's (alert, SQL) in rule-file YAML (no leading `groups:`)."""
    text = f"  - name: {name}\n    interval: {interval}\n    rules:\n"
    for alert, sql in rule_list:
        text += (f"      - alert: {alert}\n        expr: \"{sql}\"\n"
                 f"        for: {for_}\n        annotations:\n"
                 "          summary: \"{{ $labels.account_id }} at {{ $value }}\"\n")
    return text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("n", type=int)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--interval", default="1m")
    p.add_argument("--for", dest="for_", default="5m")
    a = p.parse_args()
    all_rules = rules(a.n)
    with open(a.out, "w") as f:
        f.write("groups:\n")
        for g in range(0, a.n, a.group_size):
            f.write(group_yaml(f"bench-{g // a.group_size:03d}", a.interval,
                               all_rules[g:g + a.group_size], a.for_))


if __name__ == "__main__":
    main()
