//! SQL over HTTP and from the command line.

use crate::support::*;

#[test]
fn sql_formats_errors_and_the_cli_against_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (status, _) = server.post(&FirehoseRequest::new("q-1", fleet_records(3, 0..2, 10)));
    assert_eq!(status, 200);

    let csv = client()
        .post(server.url("/api/v1/sql?format=csv"))
        .body("SELECT account_id, count(*) AS n, sum(sum) AS s FROM metrics GROUP BY 1 ORDER BY 1")
        .send()
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert_eq!(
        csv.text().unwrap(),
        "account_id,n,s\n100000000000,8,4.0\n100000000001,8,12.0\n100000000002,8,20.0\n"
    );

    for (sql, needle) in [
        ("SELEC 1", "SQL error"),
        ("SELECT nope FROM metrics", "nope"),
        ("CREATE TABLE t AS SELECT 1", "not supported"),
        ("INSERT INTO metrics SELECT * FROM metrics", "not supported"),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "not supported"),
    ] {
        let response = client()
            .post(server.url("/api/v1/sql"))
            .body(sql)
            .send()
            .unwrap();
        assert_eq!(response.status(), 400, "{sql}");
        let body: serde_json::Value = serde_json::from_str(&response.text().unwrap()).unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(&needle.to_lowercase()),
            "{sql}: {message}"
        );
    }
    let response = client()
        .post(server.url("/api/v1/sql?format=xml"))
        .body("SELECT 1")
        .send()
        .unwrap();
    assert_eq!(response.status(), 400);

    // The CLI asks the server, which also sees data not yet in the lake.
    let server_url = format!("http://{}", server.addr);
    let (ok, out, err) = cli(&[
        "query",
        "--server",
        &server_url,
        "SELECT account_id, dimensions['FunctionName'] AS f, sum(sum) AS s FROM metrics \
         WHERE metric_name = 'Errors' AND account_id = '100000000001' GROUP BY 1, 2 ORDER BY 2",
    ]);
    assert!(ok, "{err}");
    let expected = "\
+--------------+--------+-----+
| account_id   | f      | s   |
+--------------+--------+-----+
| 100000000001 | api    | 3.0 |
| 100000000001 | worker | 3.0 |
+--------------+--------+-----+
";
    assert_eq!(out, expected);
    let (ok, _, err) = cli(&["query", "--server", &server_url, "SELECT * FROM nowhere"]);
    assert!(!ok);
    assert!(err.contains("400") && err.contains("nowhere"), "{err}");
}

#[test]
fn config_file_env_and_flags_layer() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        "http_addr = \"127.0.0.1:1\"\n[firehose]\naccess_key = \"from-file\"\n[sources.cw]\npath = \"/ingest/cw\"\nformat = \"json\"\n",
    )
    .unwrap();
    // The file sets path and key; the environment overrides the key; the flag the address.
    let server = Server::start_with_args(
        &dir.path().join("data"),
        &[("FLEETLAKE_FIREHOSE__ACCESS_KEY", "from-env")],
        &["--config", config.to_str().unwrap()],
    );
    let mut request = FirehoseRequest::new("cfg-1", fleet_records(1, 0..1, 10));
    request.access_key = Some("from-env".into());
    let (status, _) = post_firehose(&server.url("/ingest/cw"), &request);
    assert_eq!(status, 200);
    request.access_key = Some("from-file".into());
    assert_eq!(post_firehose(&server.url("/ingest/cw"), &request).0, 401);

    std::fs::write(&config, "[buffer]\nflush_interval = \"soon\"\n").unwrap();
    let (ok, _, err) = cli(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("fleetlake.toml") && err.contains("buffer.flush_interval"),
        "{err}"
    );
    let (ok, _, err) = cli(&[
        "query",
        "--data-dir",
        dir.path().join("none").to_str().unwrap(),
        "SELECT 1",
    ]);
    assert!(!ok);
    assert!(err.contains("no lake table"), "{err}");
}
