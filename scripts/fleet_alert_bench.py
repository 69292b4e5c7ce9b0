"""Fleet alerting under ingest, end to end with the release binaries (issue 26).

    scripts/fleet-alert-bench.sh [WORK_DIR]     (builds the binaries, then runs this)

Three measurements, each against a fresh `fleetlake serve` on 127.0.0.1:0 fed by
`fleetlake-loadgen` (Firehose, Metric Streams JSON) on the same two cores:

1. Ingest with and without rules: loadgen at full rate for SUSTAIN_S seconds (requests
   made before its clock starts) against a server with no rules, then against one with
   RULES fleet rules of the shipped kinds (scripts/fleet_rules.py) in one group
   evaluated every INTERVAL, alternated over ROUNDS rounds (no-rules first in odd
   rounds, rules first in even ones): acknowledged datapoints/s of each, and their ratio.
2. Time to page: a server with the same rules plus one probe rule (a maximum over
   10 minutes per account and `Probe` dimension, evaluated every second) routed to a
   fake PagerDuty (checks the Events API v2 payload as PagerDuty does, answers 202).
   The fleet's last PRELOAD_MINUTES minutes (ending at the current one) are sent
   first at full rate, so that the fleet is reporting; then a second fleet (the next
   seed: other accounts, the same functions and metrics) at half the no-rules rate for
   PROBE_S seconds, its data ending at the current minute; every second one breaching
   datapoint of a new Probe value is posted: the time from its 200 to the fake
   PagerDuty's receipt of that probe's trigger, p50/p99/max.
3. Meanwhile (2.), the RULES rules' round time (`fleetlake_rule_group_duration_seconds`
   of their group, from the server's /metrics) and the rounds per evaluation path.

Prints a Markdown table on standard output; logs and reports stay in WORK_DIR.

Environment: FLEETLAKE, LOADGEN (the binaries), BASELINE (another build's `fleetlake`:
its probe run (2., 3.) too, in the same run, and the ratios), ACCOUNTS (6000), FUNCTIONS (4; 34 makes
1.02 M series), RULES (1000), INTERVAL (5s), SUSTAIN_S (30), SUSTAIN_MINUTES (fleet-
minutes made for the full-rate runs: 150), ROUNDS (2; 0 skips 1., then HALF must be set),
PROBE_S (60), PRELOAD_MINUTES (20), SEED (1), HALF (the probe run's rate in dp/s, instead
of half the no-rules rate), PERF_S (profile each probe server for this many seconds with
`perf record`, into WORK_DIR/logs/probe-*.perf), INGEST_PERF_S (the same for the
full-rate servers with rules, into WORK_DIR/logs/ingest-rules-*.perf), ALT_ENV (e.g.
`MIMALLOC_PURGE_DELAY=1000`: space-separated NAME=VALUE settings of a third full-rate
server with rules in each round of 1., in turn with the other two, for a same-run A/B
of a runtime setting), PROBE_S=0 (skips 2. and 3.), TWO=1 (2. and 3. with two
instances sharing the lake and a DynamoDB lease table in moto, whose moto_server is
beside PYTHON's interpreter: each evaluates the rule groups it holds, the probes go to
them in turn, half of them to the instance that does not evaluate the probe rule, and
each flushes at its default interval; the background load is split between them;
with ROUNDS > 0, 1. is two instances of this build and of BASELINE in turn, each
instance fed at full rate by its own loadgen: acknowledged dp/s of both, their CPU per
million datapoints, and the rows they published and mirrored).
"""

import base64
import gzip
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleet_rules  # noqa: E402

ENV = os.environ
FLEETLAKE = ENV["FLEETLAKE"]
LOADGEN = ENV["LOADGEN"]
BASELINE = ENV.get("BASELINE")
WORK = os.path.abspath(sys.argv[1])
ACCOUNTS = int(ENV.get("ACCOUNTS", "6000"))
FUNCTIONS = int(ENV.get("FUNCTIONS", "4"))
RULES = int(ENV.get("RULES", "1000"))
INTERVAL = ENV.get("INTERVAL", "5s")
SUSTAIN_S = int(ENV.get("SUSTAIN_S", "30"))
SUSTAIN_MINUTES = int(ENV.get("SUSTAIN_MINUTES", "150"))
ROUNDS = int(ENV.get("ROUNDS", "2"))
PROBE_S = int(ENV.get("PROBE_S", "60"))
PRELOAD_MINUTES = int(ENV.get("PRELOAD_MINUTES", "20"))
SEED = ENV.get("SEED", "1")
ROUTING_KEY = "0123456789abcdef0123456789abcdef"
PROBE_ACCOUNT = "999999999999"
os.makedirs(f"{WORK}/logs", exist_ok=True)


def say(*args):
    print("fleet-alert-bench:", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# The fake PagerDuty: Events API v2 as PagerDuty checks it; receipt times by probe.
# ---------------------------------------------------------------------------------
class PagerDuty:
    def __init__(self):
        self.lock = threading.Lock()
        self.triggers = {}  # probe -> receipt time (time.monotonic())
        self.rejected = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                received = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                problem = None
                try:
                    event = json.loads(body)
                    problem = owner.check(event)
                except ValueError as e:
                    problem = f"invalid JSON: {e}"
                if problem:
                    with owner.lock:
                        owner.rejected.append(problem)
                    self.reply(400, {"status": "invalid event", "message": "Event object is invalid",
                                     "errors": [problem]})
                    return
                if event["event_action"] == "trigger":
                    probe = event["payload"]["custom_details"]["labels"].get("probe")
                    if probe is not None:
                        with owner.lock:
                            owner.triggers.setdefault(probe, received)
                self.reply(202, {"status": "success", "message": "Event processed",
                                 "dedup_key": event["dedup_key"]})

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"

    @staticmethod
    def check(event):
        if not isinstance(event, dict):
            return "event must be an object"
        if event.get("routing_key") != ROUTING_KEY:
            return "routing_key is missing or wrong"
        action = event.get("event_action")
        if action not in ("trigger", "acknowledge", "resolve"):
            return f"event_action {action!r} is not trigger, acknowledge or resolve"
        key = event.get("dedup_key")
        if action != "trigger" and not key:
            return "dedup_key is required to acknowledge or resolve"
        if key is not None and (not isinstance(key, str) or len(key) > 255):
            return "dedup_key must be a string of at most 255 characters"
        if action == "trigger":
            payload = event.get("payload")
            if not isinstance(payload, dict):
                return "payload is required"
            for field in ("summary", "source", "severity"):
                if not isinstance(payload.get(field), str) or not payload[field]:
                    return f"payload.{field} is required"
            if len(payload["summary"]) > 1024:
                return "payload.summary is longer than 1024 characters"
            if payload["severity"] not in ("critical", "error", "warning", "info"):
                return f"payload.severity {payload['severity']!r} is not valid"
        return None


# ---------------------------------------------------------------------------------
# Servers and loadgen.
# ---------------------------------------------------------------------------------
def write_config(name, rules_file, pagerduty_url, extra=""):
    path = f"{WORK}/{name}.toml"
    text = extra + f'[accounts]\nfile = "{REGISTRY}"\n\n'
    if rules_file:
        text += f'[alerting]\nrule_files = ["{rules_file}"]\n'
        if pagerduty_url:
            text += (f'\n[[alerting.receivers]]\nname = "pd"\ntype = "pagerduty"\nurl = "{pagerduty_url}"\n'
                     f'routing_key = "{ROUTING_KEY}"\nrate_limit_per_minute = 100000\n'
                     '\n[[alerting.routes]]\nmatchers = [\'alertname="BreachProbe"\']\nreceiver = "pd"\n')
    open(path, "w").write(text)
    return path


ALT_ENV = dict(kv.split("=", 1) for kv in ENV.get("ALT_ENV", "").split())
TWO = ENV.get("TWO") == "1"
# Credentials for moto (TWO=1); no instance metadata, no profile files.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_REGION": "us-east-1"}


class Server:
    def __init__(self, name, config, binary=None, extra_env=None):
        self.name = name
        self.dir = f"{WORK}/{name}"
        subprocess.run(["rm", "-rf", self.dir], check=True)
        self.log_path = f"{WORK}/logs/{name}.serve.log"
        env = dict(ENV, FLEETLAKE_LOG="info", FLEETLAKE_RETENTION__METRICS="0s", **AWS_ENV,
                   **(extra_env or {}))
        self.proc = subprocess.Popen(
            [binary or FLEETLAKE, "serve", "--config", config, "--data-dir", self.dir,
             "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"],
            stderr=open(self.log_path, "w"), stdout=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while True:
            log = open(self.log_path).read()
            m = re.search(r"http listening.*?addr=([0-9.]+:[0-9]+)", log)
            if m:
                self.addr = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server {name} did not start; its log:\n{log[-3000:]}")
            time.sleep(0.1)
        say(f"server {name}: pid {self.proc.pid}, http {self.addr}")

    def metrics(self):
        with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=30) as r:
            return r.read().decode()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            sys.exit(f"server {self.name} still running 600 s after SIGTERM")
        if status != 0:
            sys.exit(f"server {self.name} exited with status {status} (log: {self.log_path})")


def loadgen(name, server, *args, timeout, seed=SEED):
    """Runs loadgen to completion; its JSON report."""
    out = f"{WORK}/logs/{name}.loadgen.out"
    err = f"{WORK}/logs/{name}.loadgen.err"
    cmd = [LOADGEN, "--seed", seed, "--accounts", str(ACCOUNTS), "--functions", str(FUNCTIONS),
           "--to", "firehose", "--report", "json", "--url", f"http://{server.addr}", *args]
    subprocess.run(cmd, stdout=open(out, "w"), stderr=open(err, "w"), timeout=timeout)
    raw = open(out).read()
    start = raw.rfind("\n{")
    try:
        return json.loads(raw if raw.lstrip().startswith("{") else raw[start + 1:])
    except ValueError:
        sys.exit(f"loadgen {name}: no JSON report ({out}, {err})")


def summary(metrics, name, group):
    """Quantiles, sum and count of a Prometheus summary with label group=GROUP."""
    out = {}
    for line in metrics.splitlines():
        if not line.startswith(name) or f'group="{group}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        q = re.search(r'quantile="([0-9.]+)"', line)
        if q:
            out[float(q.group(1))] = value
        elif line.startswith(f"{name}_sum"):
            out["sum"] = value
        elif line.startswith(f"{name}_count"):
            out["count"] = value
    return out


def counters(metrics, name):
    """label set -> value of a counter."""
    return {line[len(name):].rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith(name + "{")}


# ---------------------------------------------------------------------------------
# The rules.
# ---------------------------------------------------------------------------------
PROBE_SQL = ("SELECT account_id, dimensions['Probe'] AS probe, max(max) AS value FROM metrics"
             " WHERE namespace = 'fleetlake/bench' AND metric_name = 'BreachProbe'"
             " AND time > now() - INTERVAL '10 minutes'"
             " GROUP BY account_id, dimensions['Probe'] HAVING max(max) > 0")
rules_file = f"{WORK}/rules.yml"
with open(rules_file, "w") as f:
    f.write("groups:\n")
    f.write(fleet_rules.group_yaml("fleet", INTERVAL, fleet_rules.rules(RULES)))
probe_rules = f"{WORK}/rules-probe.yml"
with open(probe_rules, "w") as f:
    f.write("groups:\n")
    f.write(fleet_rules.group_yaml("fleet", INTERVAL, fleet_rules.rules(RULES)))
    f.write(fleet_rules.group_yaml("probe", "1s", [("BreachProbe", PROBE_SQL)], for_="0s"))
# The fleet's accounts as the registry (for the rules that join `accounts`).
REGISTRY = f"{WORK}/accounts.jsonl"
subprocess.run([LOADGEN, "--seed", SEED, "--accounts", str(ACCOUNTS), "--registry", REGISTRY], check=True)
none_config = write_config("none", None, None)
rules_config = write_config("rules", rules_file, None)
check = subprocess.run([FLEETLAKE, "rules", "check", "--config", rules_config, probe_rules],
                       capture_output=True, text=True)
if check.returncode != 0:
    sys.exit(f"rules check failed:\n{check.stdout}\n{check.stderr}")
open(f"{WORK}/logs/rules-check.txt", "w").write(check.stdout + check.stderr)

# Moto (TWO=1): the lease table (and Kinesis streams the configs name) of both servers.
PROBING = ENV.get("PROBE_S") != "0"
MOTO = None
moto = None
if TWO and (PROBING or ROUNDS > 0):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        moto_port = sock.getsockname()[1]
    moto_bin = os.path.join(os.path.dirname(ENV.get("PYTHON", sys.executable)), "moto_server")
    moto = subprocess.Popen([moto_bin, "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    MOTO = f"http://127.0.0.1:{moto_port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(MOTO + "/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.2)


def cpu_seconds(pid):
    """User + system CPU seconds process `pid` has used."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def two_full_rate(binary, tag):
    """TWO=1, 1.: two servers of `binary` with the rules on one lake and one lease
    table, each fed by its own loadgen at full rate (another seed each: other
    accounts): acknowledged dp/s of both together, the servers' CPU seconds, and
    what they published and mirrored of each other's rows."""
    import boto3  # in PYTHON's venv with moto

    client = boto3.client("kinesis", endpoint_url=MOTO, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    client.create_stream(StreamName=f"ingest-{tag}", ShardCount=1)
    extra = (f'[lake]\ndir = "{WORK}/lake-{tag}"\n\n'
             f'[[kinesis]]\nstream = "ingest-{tag}"\nregion = "us-east-1"\nendpoint_url = "{MOTO}"\n'
             f'lease_table = "leases-{tag}"\nlease_endpoint_url = "{MOTO}"\nlease_duration = "10s"\n\n')
    subprocess.run(["rm", "-rf", f"{WORK}/lake-{tag}"], check=True)
    config = write_config(f"ingest-{tag}", rules_file, None, extra)
    servers = [Server(f"ingest-{tag}-{i}", config, binary) for i in (1, 2)]
    reports = [None, None]

    def run(i):
        reports[i] = loadgen(f"ingest-{tag}-{i}", servers[i], "--pregenerate", "--minutes",
                             str(SUSTAIN_MINUTES), "--duration", f"{SUSTAIN_S}s",
                             seed=str(int(SEED) + i), timeout=SUSTAIN_S + 900)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    metrics = [s.metrics() for s in servers]
    cpu = sum(cpu_seconds(s.proc.pid) for s in servers)
    for s in servers:
        s.stop()
    for i, report in enumerate(reports):
        if report.get("datapoints_rejected"):
            sys.exit(f"{report['datapoints_rejected']} datapoints rejected ({tag}, server {i + 1})")

    def total(name):
        return sum(v for m in metrics for v in counters(m, name).values())

    acked = sum(r["datapoints_acknowledged"] for r in reports)
    return {"rate": sum(r["datapoints_acknowledged"] / r["elapsed_s"] for r in reports),
            "cpu_per_m": cpu / (acked / 1e6), "published": total("fleetlake_peer_published_rows_total"),
            "mirrored": total("fleetlake_peer_mirrored_rows_total")}


# ---------------------------------------------------------------------------------
# 1. Ingest at full rate, without and with the rules.
# ---------------------------------------------------------------------------------
modes = ["none", "rules"] + (["rules-alt"] if ALT_ENV else [])
rates = {mode: [] for mode in modes}
rounds_during = []
two_full = {"baseline": [], "new": []}
for k in range(1, ROUNDS + 1 if TWO else 0):
    # TWO=1: two instances with the rules at full rate, this build and BASELINE in turn.
    builds = [("new", FLEETLAKE)] + ([("baseline", BASELINE)] if BASELINE else [])
    for tag, binary in builds if k % 2 else builds[::-1]:
        say(f"round {k}: two instances of {tag} with {RULES} rules, each at full rate for {SUSTAIN_S}s")
        two_full[tag].append(two_full_rate(binary, f"{tag}-{k}"))
        say(f"round {k} {tag}: {two_full[tag][-1]}")
for k in range(1, 0 if TWO else ROUNDS + 1):
    # Each round in another order: the machine's drift spreads over every mode.
    for mode in modes[(k - 1) % len(modes):] + modes[:(k - 1) % len(modes)]:
        say(f"round {k}: full rate for {SUSTAIN_S}s, {'no rules' if mode == 'none' else f'{RULES} rules'}"
            + (f", {ENV['ALT_ENV']}" if mode == "rules-alt" else ""))
        server = Server(f"ingest-{mode}-{k}", none_config if mode == "none" else rules_config,
                        extra_env=ALT_ENV if mode == "rules-alt" else None)
        perf = None
        if ENV.get("INGEST_PERF_S") and mode == "rules":
            # A profile of the server with rules at full rate (loadgen's pregeneration
            # included: the server is idle then, and idle time makes no samples).
            perf = subprocess.Popen(
                ["perf", "record", "-F", "199", "-g", "-p", str(server.proc.pid),
                 "-o", f"{WORK}/logs/ingest-rules-{k}.perf", "--", "sleep", ENV["INGEST_PERF_S"]],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = loadgen(f"ingest-{mode}-{k}", server, "--pregenerate", "--minutes", str(SUSTAIN_MINUTES),
                         "--duration", f"{SUSTAIN_S}s", timeout=SUSTAIN_S + 900)
        if mode == "rules":
            rounds_during.append(summary(server.metrics(), "fleetlake_rule_group_duration_seconds", "fleet"))
        if perf is not None:
            perf.wait()
        server.stop()
        if report.get("datapoints_rejected"):
            sys.exit(f"{report['datapoints_rejected']} datapoints rejected ({mode}, round {k})")
        rates[mode].append(report["datapoints_acknowledged"] / report["elapsed_s"])
        say(f"round {k} {mode}: {rates[mode][-1]:,.0f} dp/s acknowledged")

# ---------------------------------------------------------------------------------
# 2. and 3. Time to page, and rounds, with ingest at half the no-rules rate.
# ---------------------------------------------------------------------------------
half = int(ENV["HALF"]) if ENV.get("HALF") else (
    int(statistics.median(rates["none"]) / 2) if rates["none"] else 0)


def probe_phase(binary, tag):
    """One server of `binary` with the rules and the probe; what it measured."""
    pd = PagerDuty()
    server = Server(f"probe-{tag}", write_config(f"probe-{tag}", probe_rules, pd.url), binary)
    # The fleet reporting: its last PRELOAD_MINUTES minutes, ending at the current one.
    say(f"{tag}: preload, the fleet's last {PRELOAD_MINUTES} minutes at full rate")
    loadgen(f"preload-{tag}", server, "--pregenerate", "--minutes", str(PRELOAD_MINUTES), timeout=900)
    # Then a second fleet (the next seed: other accounts, not in the registry, the same
    # functions and metrics, so the rules' aggregates read its rows too) at half rate,
    # its data ending at the current minute when the run ends.
    say(f"{tag}: probes for {PROBE_S}s with loadgen at {half:,} dp/s")
    background = threading.Thread(target=lambda: loadgen(
        f"probe-{tag}", server, "--rate", str(half), "--duration", f"{PROBE_S + 10}s",
        seed=str(int(SEED) + 1), timeout=PROBE_S + 900))
    background.start()
    time.sleep(5)  # loadgen under way
    before = server.metrics()
    perf = None
    if ENV.get("PERF_S"):
        # A profile of the server under the probe run (perf report -i ...).
        perf = subprocess.Popen(
            ["perf", "record", "-F", "199", "-g", "-p", str(server.proc.pid),
             "-o", f"{WORK}/logs/probe-{tag}.perf", "--", "sleep", ENV["PERF_S"]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acked = send_probes([server])
    after = server.metrics()
    latencies = wait_for_pages(pd, acked, tag)
    background.join()
    if perf:
        perf.wait()
    server.stop()
    pd.server.shutdown()
    s0 = summary(before, "fleetlake_rule_group_duration_seconds", "fleet")
    s1 = summary(after, "fleetlake_rule_group_duration_seconds", "fleet")
    rounds = s1.get("count", 0) - s0.get("count", 0)
    saves = {}
    for line in after.splitlines():
        m = re.match(r'fleetlake_alert_state_save_seconds(?:\{quantile="([0-9.]+)"\}|_(sum|count)) (\S+)', line)
        if m:
            saves[m.group(1) or m.group(2)] = float(m.group(3))
    return {
        "rounds": rounds,
        "mean": (s1.get("sum", 0) - s0.get("sum", 0)) / rounds if rounds else float("nan"),
        "latencies": latencies,
        "paths": counters(after, "fleetlake_rule_evaluations_total"),
        "instances": counters(after, "fleetlake_alerts"),
        "saves": saves,
    }


def send_probes(servers):
    """One breaching datapoint of a new Probe value a second for PROBE_S seconds, to
    `servers` in turn: probe -> (monotonic time of its 200, index of the server)."""
    acked = {}
    run = int(time.time())
    for seq in range(PROBE_S):
        tick = time.monotonic()
        probe = f"{run}-{seq}"
        target = seq % len(servers)
        now_ms = int(time.time() * 1000)
        record = json.dumps({
            "metric_stream_name": "bench", "account_id": PROBE_ACCOUNT, "region": "us-east-1",
            "namespace": "fleetlake/bench", "metric_name": "BreachProbe", "dimensions": {"Probe": probe},
            "timestamp": now_ms - now_ms % 60_000,
            "value": {"count": 1.0, "sum": 1.0, "max": 1.0, "min": 1.0}, "unit": "Count"}) + "\n"
        request_id = f"probe-{probe}"
        body = json.dumps({"requestId": request_id, "timestamp": now_ms,
                           "records": [{"data": base64.b64encode(record.encode()).decode()}]}).encode()
        request = urllib.request.Request(
            f"http://{servers[target].addr}/firehose/metrics", data=gzip.compress(body), method="POST",
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                     "X-Amz-Firehose-Protocol-Version": "1.0", "X-Amz-Firehose-Request-Id": request_id})
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status == 200:
                acked[probe] = (time.monotonic(), target)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    return acked


def wait_for_pages(pd, acked, tag):
    """Waits up to 60 s for every acknowledged probe's page; per server index, the
    sorted times from 200 to the fake PagerDuty's receipt (all servers under None)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with pd.lock:
            if all(p in pd.triggers for p in acked):
                break
        time.sleep(0.1)
    with pd.lock:
        missing = [p for p in acked if p not in pd.triggers]
        rejected = list(pd.rejected)
        latencies = {}
        for p, (at, target) in acked.items():
            if p in pd.triggers:
                for key in (None, target):
                    latencies.setdefault(key, []).append(pd.triggers[p] - at)
    if rejected:
        sys.exit(f"{tag}: the fake PagerDuty rejected events: {rejected[:5]}")
    if missing:
        sys.exit(f"{tag}: {len(missing)} of {len(acked)} probes never paged within 60 s: {missing[:5]}")
    return {k: sorted(v) for k, v in latencies.items()}


def two_probe_phase(binary, tag):
    """TWO=1: two servers of `binary` on one lake and one lease table (in moto), with
    the rules and the probe; the probes to each in turn. What they measured."""
    import boto3  # in PYTHON's venv with moto

    client = boto3.client("kinesis", endpoint_url=MOTO, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    client.create_stream(StreamName=f"bench-{tag}", ShardCount=1)
    pd = PagerDuty()
    extra = (f'[lake]\ndir = "{WORK}/lake-two-{tag}"\n\n'
             f'[[kinesis]]\nstream = "bench-{tag}"\nregion = "us-east-1"\nendpoint_url = "{MOTO}"\n'
             f'lease_table = "leases-{tag}"\nlease_endpoint_url = "{MOTO}"\nlease_duration = "10s"\n\n')
    config = write_config(f"probe-two-{tag}", probe_rules, pd.url, extra)
    servers = [Server(f"probe-{tag}-{i}", config, binary) for i in (1, 2)]

    def held():
        return sum(float(line.rsplit(" ", 1)[1]) for s in servers for line in s.metrics().splitlines()
                   if re.match(r"fleetlake_alert_groups_held[ {]", line))

    deadline = time.monotonic() + 120
    while held() < 2:
        if time.monotonic() > deadline:
            sys.exit(f"{tag}: the two rule groups were not held within 120 s")
        time.sleep(0.5)
    say(f"{tag}: preload, the fleet's last {PRELOAD_MINUTES} minutes at full rate (to the first)")
    loadgen(f"preload-{tag}", servers[0], "--pregenerate", "--minutes", str(PRELOAD_MINUTES), timeout=900)
    say(f"{tag}: probes for {PROBE_S}s to both in turn, loadgen at {half:,} dp/s split between them")
    background = [threading.Thread(target=lambda i=i, s=s: loadgen(
        f"probe-{tag}-{i}", s, "--rate", str(half // 2), "--duration", f"{PROBE_S + 10}s",
        seed=str(int(SEED) + 1 + i), timeout=PROBE_S + 900)) for i, s in enumerate(servers)]
    for b in background:
        b.start()
    time.sleep(5)
    before = [s.metrics() for s in servers]
    acked = send_probes(servers)
    after = [s.metrics() for s in servers]
    latencies = wait_for_pages(pd, acked, tag)
    for b in background:
        b.join()
    for s in servers:
        s.stop()
    pd.server.shutdown()
    rounds = total = 0.0
    for b, a in zip(before, after):
        s0 = summary(b, "fleetlake_rule_group_duration_seconds", "fleet")
        s1 = summary(a, "fleetlake_rule_group_duration_seconds", "fleet")
        rounds += s1.get("count", 0) - s0.get("count", 0)
        total += s1.get("sum", 0) - s0.get("sum", 0)
    return {"rounds": rounds, "mean": total / rounds if rounds else float("nan"),
            "latencies": latencies}


def two_rows(m):
    out = [(f"{RULES:,}-rule round, two instances, ingest at half rate: mean over the probe run's rounds",
            f"{m['mean'] * 1000:.0f} ms ({m['rounds']:.0f} rounds)", m["mean"])]
    for key, label in ((None, "all probes"), (0, "probes to the first"), (1, "probes to the second")):
        lat = m["latencies"].get(key, [])
        if lat:
            out.append((f"breach → page, two instances, {label} ({len(lat)}): p50 / p99 / max",
                        f"{q(lat, 0.5) * 1000:.0f} ms / {q(lat, 0.99) * 1000:.0f} ms / {lat[-1] * 1000:.0f} ms",
                        q(lat, 0.99)))
    return out


# The build before a change, in the same run (BASELINE=/path/to/fleetlake), then this one.
phase = two_probe_phase if TWO else probe_phase
baseline = phase(BASELINE, "baseline") if BASELINE and PROBING else None
measured = phase(FLEETLAKE, "new") if PROBING else None
if moto:
    moto.terminate()


def q(values, p):
    return values[min(len(values) - 1, int(round(p * (len(values) - 1))))]


series = ACCOUNTS * FUNCTIONS * 5
nan = float("nan")
none_rate = statistics.median(rates["none"]) if rates["none"] else nan
rules_rate = statistics.median(rates["rules"]) if rates["rules"] else nan
print(f"{ACCOUNTS:,} accounts × {FUNCTIONS} functions × 5 metrics ({series:,} series), "
      f"{RULES:,} rules in one group every {INTERVAL}; `nproc` = {os.cpu_count()}\n")
print("| measure | value |")
print("|---|---|")
if rates["none"]:
    print(f"| ingest at full rate, no rules (median of {ROUNDS}) | {none_rate / 1e3:,.0f} k dp/s |")
    print(f"| ingest at full rate, {RULES:,} rules loaded (median of {ROUNDS}) | {rules_rate / 1e3:,.0f} k dp/s |")
    print(f"| with rules / without | {rules_rate / none_rate:.2f} |")
if ALT_ENV:
    alt_rate = statistics.median(rates["rules-alt"])
    print(f"| ingest at full rate, {RULES:,} rules loaded, `{ENV['ALT_ENV']}` (median of {ROUNDS}) | "
          f"{alt_rate / 1e3:,.0f} k dp/s |")
    print(f"| with rules and `{ENV['ALT_ENV']}` / without | {alt_rate / none_rate:.2f} |")
if two_full["new"]:
    print(f"\nTwo instances with the rules, each fed at full rate, {ROUNDS} rounds, the builds in turn"
          + (f" (baseline `{BASELINE}`)" if BASELINE else "") + ":\n")
    print("| measure | " + ("baseline | this build | this / baseline |" if BASELINE else "this build |"))
    print("|---|---|" + ("---|---|" if BASELINE else ""))
    for key, label, fmt in (("rate", "acknowledged, both together (median)", lambda v: f"{v / 1e3:,.0f} k dp/s"),
                            ("cpu_per_m", "servers' CPU per million acknowledged (median)", lambda v: f"{v:.2f} s"),
                            ("published", "rows published for the other (median)", lambda v: f"{v:,.0f}"),
                            ("mirrored", "rows mirrored from the other (median)", lambda v: f"{v:,.0f}")):
        new_v = statistics.median(r[key] for r in two_full["new"])
        if BASELINE:
            old_v = statistics.median(r[key] for r in two_full["baseline"])
            ratio = f"{new_v / old_v:.2f}" if old_v else ""
            print(f"| {label} | {fmt(old_v)} | {fmt(new_v)} | {ratio} |")
        else:
            print(f"| {label} | {fmt(new_v)} |")
during = [d for d in rounds_during if d.get("count")]
if during:
    print(f"| {RULES:,}-rule round during full-rate ingest: p50 / max | "
          f"{statistics.median(d.get(0.5, float('nan')) for d in during) * 1000:.0f} ms / "
          f"{max(d.get(1.0, float('nan')) for d in during) * 1000:.0f} ms |")


def probe_rows(m):
    if TWO:
        return two_rows(m)
    lat = m["latencies"][None]
    saves = m["saves"]
    return [
        (f"{RULES:,}-rule round, ingest at half rate ({half / 1e3:,.0f} k dp/s): mean over the probe run's rounds",
         f"{m['mean'] * 1000:.0f} ms ({m['rounds']:.0f} rounds)", m["mean"]),
        (f"breach → page ({len(lat)} probes, 200 → fake PagerDuty's receipt): p50 / p99 / max",
         f"{q(lat, 0.5) * 1000:.0f} ms / {q(lat, 0.99) * 1000:.0f} ms / {lat[-1] * 1000:.0f} ms", q(lat, 0.99)),
        ("alert instances at the end (the rules' thresholds against this data)",
         ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(m["instances"].items())), None),
        ("alert state saves during the probe server's life: count, p50 / max",
         f"{saves.get('count', 0):.0f}, {saves.get('0.5', float('nan')) * 1000:.0f} ms / "
         f"{saves.get('1', float('nan')) * 1000:.0f} ms", None),
        ("rounds per path (rule evaluations)",
         ", ".join(f"{k}: {v:.0f}" for k, v in sorted(m["paths"].items())), None),
    ]


if measured is None:
    pass
elif baseline:
    print(f"\nThe probe run for both builds, one after the other in this run (baseline `{BASELINE}`):\n")
    print("| measure | baseline | this build | this / baseline |")
    print("|---|---|---|---|")
    for (name, old, old_v), (_, new, new_v) in zip(probe_rows(baseline), probe_rows(measured)):
        ratio = f"{new_v / old_v:.2f}" if old_v and new_v is not None else ""
        print(f"| {name} | {old} | {new} | {ratio} |")
else:
    for name, value, _ in probe_rows(measured):
        print(f"| {name} | {value} |")
