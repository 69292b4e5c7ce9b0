//! Hardening of what is not SQL: the binary refuses to start with Firehose paths open
//! to other hosts, a limited credential sees only the silences about its accounts, and
//! a failing webhook's token never reaches a log line while the failure is still
//! logged and counted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, Uri};
use axum::routing::post;
use serde_json::{Value, json};

use crate::support::{
    FirehoseRequest, Server, account_id, client, datapoint, free_port, post_firehose, post_raw,
    wait_until,
};

/// `fleetlake serve --config FILE` with `args`, waited for (bounded): it must exit by
/// itself. Its exit status and stderr.
fn serve_must_exit(config: &Path, data_dir: &Path, args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("FLEETLAKE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fleetlake serve did not exit: it should have refused the configuration");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

const USERS: &str = "[[query.users]]\nname = \"grafana\"\ntoken = \"grafana-token\"\n";

#[test]
fn off_loopback_every_firehose_path_needs_an_access_key_or_the_binary_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("fleetlake.toml");
    let custom = "[sources.cw]\npath = \"/ingest/cw\"\nformat = \"json\"\n";

    // Users, but no Firehose key: the first open path is named. `0.0.0.0:0` is never
    // bound: the configuration is refused before any listener starts.
    std::fs::write(&config, USERS).unwrap();
    let (status, stderr) = serve_must_exit(&config, &data, &["--http-addr", "0.0.0.0:0"]);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("http_addr 0.0.0.0:0 is reachable from other hosts")
            && stderr
                .contains("the Firehose endpoint /firehose/logs (sources.logs) has no access key"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");

    // The built-in paths keyed one by one, the configured source still open: named.
    std::fs::write(
        &config,
        format!(
            "{custom}[sources.logs]\naccess_key = \"k1\"\n[sources.metrics]\naccess_key = \"k2\"\n\
             [sources.otel]\naccess_key = \"k3\"\n[sources.otel07]\naccess_key = \"k4\"\n{USERS}"
        ),
    )
    .unwrap();
    let (status, stderr) = serve_must_exit(&config, &data, &["--http-addr", "[::]:0"]);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("the Firehose endpoint /ingest/cw (sources.cw) has no access key"),
        "{stderr}"
    );
    assert!(!stderr.contains("k1") && !stderr.contains("k4"), "{stderr}");

    // Empty secrets are refused too.
    std::fs::write(
        &config,
        "[firehose]\naccess_key = \"fh\"\n[[query.users]]\nname = \"grafana\"\ntoken = \"\"\n",
    )
    .unwrap();
    let (status, stderr) = serve_must_exit(&config, &data, &[]);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("token is set but empty"), "{stderr}");

    // With `firehose.access_key` (on loopback here, so that nothing outside can reach
    // the test), every built-in path and the source refuse a request without it.
    std::fs::write(
        &config,
        format!("{custom}[firehose]\naccess_key = \"fleet-key\"\n{USERS}"),
    )
    .unwrap();
    let server = Server::start(&data, &[("FLEETLAKE_CONFIG", config.to_str().unwrap())]);
    let body = || {
        FirehoseRequest::new(
            "r",
            vec![datapoint(&account_id(0), "api", "Errors", 1, 1.0)],
        )
        .body()
    };
    for path in [
        "/firehose/metrics",
        "/firehose/otel",
        "/firehose/otel07",
        "/firehose/logs",
        "/ingest/cw",
    ] {
        let (status, answer) = post_raw(&server.url(path), "r", body(), false, None);
        assert_eq!(status, 401, "{path}: {answer}");
        let (status, answer) = post_raw(&server.url(path), "r", body(), false, Some("wrong"));
        assert_eq!(status, 401, "{path}: {answer}");
    }
    let (status, answer) = post_raw(
        &server.url("/firehose/metrics"),
        "r",
        body(),
        false,
        Some("fleet-key"),
    );
    assert_eq!(status, 200, "{answer}");
    server.stop();
}

/// GET /api/v1/silences with `token` (none: anonymous); status and body.
fn silences_as(server: &Server, token: Option<&str>) -> (u16, Value) {
    let mut request = client().get(server.url("/api/v1/silences"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().unwrap()).unwrap(),
    )
}

fn comments(silences: &Value) -> Vec<String> {
    let mut comments: Vec<String> = silences
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["comment"].as_str().unwrap().to_string())
        .collect();
    comments.sort();
    comments
}

#[test]
fn a_limited_credential_lists_only_the_silences_about_its_accounts() {
    let (a0, a1, a2) = (account_id(0), account_id(1), account_id(2));
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("accounts.jsonl");
    let records: Vec<String> = (0..3)
        .map(|i| {
            json!({"account_id": account_id(i), "account_name": format!("tenant-{i}"),
                   "owner_team": format!("team-{i}"), "lifecycle_state": "active"})
            .to_string()
        })
        .collect();
    std::fs::write(&registry, records.join("\n")).unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        format!(
            "[accounts]\nfile = {registry:?}\n\n\
             [[alerting.silences]]\nmatchers = [\"account_id=\\\"{a2}\\\"\"]\n\
             ends_at = \"2999-01-01T00:00:00Z\"\ncomment = \"config: a2\"\n\n\
             [[query.users]]\nname = \"ops\"\ntoken = \"ops-token\"\n\
             [[query.users]]\nname = \"t1\"\ntoken = \"t1-token\"\naccounts = [\"{a1}\"]\n\
             [[query.users]]\nname = \"t2\"\ntoken = \"t2-token\"\naccounts = [\"{a2}\"]\n\
             [[query.users]]\nname = \"team0\"\ntoken = \"team0-token\"\nowner_teams = [\"team-0\"]\n"
        ),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[("FLEETLAKE_CONFIG", config.to_str().unwrap())],
    );
    let silence = |matchers: Vec<&str>, comment: &str| {
        let response = client()
            .post(server.url("/api/v1/silences"))
            .bearer_auth("ops-token")
            .json(&json!({"matchers": matchers, "endsAt": "2999-01-01T00:00:00Z", "comment": comment}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200, "{comment}");
    };
    let eq = |account: &str| format!("account_id=\"{account}\"");
    silence(vec![&eq(&a0)], "a0");
    silence(vec![&eq(&a1), "alertname=\"ErrorsHigh\""], "a1");
    silence(vec![&format!("account_id=~\"{a1}\"")], "a1 regex");
    silence(vec![&eq(&a2)], "a2 private comment");
    silence(vec!["alertname=\"ErrorsHigh\""], "fleet-wide");
    silence(vec![&format!("account_id=~\"{a1}|{a2}\"")], "a1 or a2");
    silence(vec![&format!("account_id!=\"{a2}\"")], "all but a2");
    silence(
        vec![&eq(&a1), &format!("account_id!=\"{a2}\"")],
        "a1, naming a2",
    );
    silence(
        vec![&format!("account_id=~\"{}.*\"", &a1[..11])],
        "a1 by pattern",
    );

    let (status, all) = silences_as(&server, Some("ops-token"));
    assert_eq!(status, 200);
    assert_eq!(all.as_array().unwrap().len(), 10, "{all}");

    let (status, t1) = silences_as(&server, Some("t1-token"));
    assert_eq!(status, 200);
    assert_eq!(comments(&t1), ["a1", "a1 regex"], "{t1}");
    let text = t1.to_string();
    assert!(
        !text.contains(&a2) && !text.contains(&a0) && !text.contains("private"),
        "{text}"
    );

    let (_, t2) = silences_as(&server, Some("t2-token"));
    assert_eq!(comments(&t2), ["a2 private comment", "config: a2"], "{t2}");

    // An owner-team credential: its team's account, through the registry.
    let (_, team0) = silences_as(&server, Some("team0-token"));
    assert_eq!(comments(&team0), ["a0"], "{team0}");

    let (status, _) = silences_as(&server, None);
    assert_eq!(status, 401);
    let (status, _) = silences_as(&server, Some("wrong-token"));
    assert_eq!(status, 401);
    server.stop();
}

/// A webhook receiver answering 500 with the request's path and query echoed back.
struct FailingReceiver {
    port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl FailingReceiver {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = Router::new().route(
            "/hooks/{*rest}",
            post(|uri: Uri| async move {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot take {uri} right now"),
                )
            }),
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            port,
            _runtime: runtime,
        }
    }
}

/// `fleetlake serve` on loopback with every line it logs written to a file, so that
/// all of its output can be read afterwards.
struct LoggedServer {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl LoggedServer {
    fn start(dir: &Path, config: &Path, filter: &str) -> Self {
        let log = dir.join("fleetlake.log");
        let child = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
            .env("FLEETLAKE_LOG", filter)
            .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            addr: String::new(),
            log,
        };
        wait_until("the http listener", || {
            server.text().lines().any(|line| {
                line.contains("http listening")
                    && line
                        .split("addr=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .is_some()
            })
        });
        let text = server.text();
        let line = text.lines().find(|l| l.contains("http listening")).unwrap();
        server.addr = line
            .split("addr=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything logged so far (the process's stderr) and written to stdout.
    fn text(&self) -> String {
        let stdout = self.log.with_file_name("stdout.log");
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(stdout).unwrap_or_default()
    }

    /// SIGTERM and wait (the shutdown's lines are logged too); all of the output.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        assert!(self.child.wait().unwrap().success());
        self.text()
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fleetlake_notifications_total` of `receiver` with `result`, from /metrics.
fn notifications(metrics: &str, receiver: &str, result: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("fleetlake_notifications_total{")
                && l.contains(&format!("receiver=\"{receiver}\""))
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Secrets of the webhook URLs: the query string's token, a token in the path, the
/// user info's password.
const TOKEN: &str = "tok-SECRET-4711";
const PATH_TOKEN: &str = "path-SECRET-0815";
const PASSWORD: &str = "pw-SECRET-1234";

#[test]
fn a_failing_webhook_is_logged_and_counted_without_its_token() {
    let failing = FailingReceiver::start();
    let closed = free_port();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("test.rules.yml");
    std::fs::write(
        &rules,
        "groups:\n  - name: test\n    interval: 1s\n    rules:\n      - alert: ErrorsHigh\n        \
         expr: SELECT account_id, max(sum) AS value FROM metrics WHERE metric_name = 'Errors' \
         GROUP BY account_id HAVING max(sum) > 10\n",
    )
    .unwrap();
    let config = dir.path().join("fleetlake.toml");
    let mut file = std::fs::File::create(&config).unwrap();
    write!(
        file,
        "[alerting]\nrule_files = [{rules:?}]\nretry_initial = \"200ms\"\nretry_max = \"500ms\"\n\
         \n\
         [[alerting.receivers]]\nname = \"failing\"\ntype = \"webhook\"\n\
         url = \"http://hook:{PASSWORD}@127.0.0.1:{}/hooks/{PATH_TOKEN}?token={TOKEN}\"\n\n\
         [[alerting.receivers]]\nname = \"closed\"\ntype = \"webhook\"\n\
         url = \"http://127.0.0.1:{closed}/hooks/{PATH_TOKEN}?token={TOKEN}\"\n\n\
         [[alerting.routes]]\nreceiver = \"failing\"\ncontinue = true\n\
         [[alerting.routes]]\nreceiver = \"closed\"\n",
        failing.port
    )
    .unwrap();
    drop(file);

    // Debug level: what fleetlake and its HTTP client log in more detail is checked too.
    let server = LoggedServer::start(
        dir.path(),
        &config,
        "debug,buoyant_kernel=off,deltalake_core=warn",
    );
    let (status, body) = post_firehose(
        &server.url("/firehose/metrics"),
        &FirehoseRequest::new(
            "w1",
            vec![datapoint(&account_id(0), "api", "Errors", 1, 50.0)],
        ),
    );
    assert_eq!(status, 200, "{body}");

    // Both receivers fail, again and again: counted, and logged with their endpoint.
    wait_until("failed deliveries to both receivers", || {
        let metrics = get_text(&server, "/metrics");
        notifications(&metrics, "failing", "retried") >= 2.0
            && notifications(&metrics, "closed", "retried") >= 2.0
    });
    let metrics = get_text(&server, "/metrics");
    let alerts = get_text(&server, "/api/v1/alerts");
    let rules_api = get_text(&server, "/api/v1/rules");
    let log = server.stop();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("notification failed; will retry"))
        .collect();
    let failing_line = failures
        .iter()
        .find(|l| l.contains("receiver=failing"))
        .unwrap_or_else(|| panic!("no failure logged for the 500 receiver:\n{log}"));
    assert!(
        failing_line.contains("500 Internal Server Error")
            && failing_line.contains(&format!("endpoint=http://127.0.0.1:{}", failing.port)),
        "{failing_line}"
    );
    let closed_line = failures
        .iter()
        .find(|l| l.contains("receiver=closed"))
        .unwrap_or_else(|| panic!("no failure logged for the closed port:\n{log}"));
    assert!(
        closed_line.contains(&format!("endpoint=http://127.0.0.1:{closed}"))
            && closed_line.to_lowercase().contains("connect"),
        "{closed_line}"
    );
    for (what, text) in [
        ("the log", &log),
        ("/metrics", &metrics),
        ("/api/v1/alerts", &alerts),
        ("/api/v1/rules", &rules_api),
    ] {
        for secret in [TOKEN, PATH_TOKEN, PASSWORD] {
            let leaks: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                leaks.is_empty(),
                "{secret} in {what}:\n{}",
                leaks.join("\n")
            );
        }
    }
}

/// GET `path` of `server`: the body as text.
fn get_text(server: &LoggedServer, path: &str) -> String {
    client()
        .get(server.url(path))
        .send()
        .unwrap()
        .text()
        .unwrap()
}
