//! TLS from `[tls]` on both listeners: Firehose delivers over HTTPS (the only scheme it
//! delivers to), SQL and `/health` answer over HTTPS, plain HTTP gets no answer; psql
//! verifies the certificate (`sslmode=verify-full`) and a client that does not ask for
//! TLS is refused with SQLSTATE 28000. A wrong key file stops the start with a message.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key, in `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            // rustls refuses a CA certificate as a server's (req -x509 makes CAs).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn psql(server: &Server, sslmode: &str, root: &Path, sql: &str) -> (bool, String, String) {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=analyst dbname=fleetlake sslmode={sslmode} sslrootcert={}",
        server.pg_port(),
        root.display()
    );
    let out = Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "20")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn https_and_postgres_over_tls_with_the_configured_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("FLEETLAKE_TLS__CERT_FILE", cert.to_str().unwrap()),
        ("FLEETLAKE_TLS__KEY_FILE", key.to_str().unwrap()),
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "200ms"),
    ];
    let server = Server::start(dir.path(), &env);
    let https = reqwest::blocking::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap()])
        .build()
        .unwrap();
    let url = |path: &str| format!("https://{}{path}", server.addr);

    let health = https.get(url("/health")).send().unwrap();
    assert_eq!(health.status(), 200);

    let request = FirehoseRequest::new(
        "tls-1",
        vec![datapoint(&account_id(7), "f", "Errors", 3, 5.0)],
    );
    let response = https
        .post(url("/firehose/metrics"))
        .header("Content-Type", "application/json")
        .header("X-Amz-Firehose-Request-Id", "tls-1")
        .body(request.body())
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(body["requestId"], "tls-1");

    let rows: serde_json::Value = https
        .post(url("/api/v1/sql?format=json"))
        .body("SELECT count(*) AS n, sum(sum) AS s FROM metrics")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(rows, serde_json::json!([{"n": 1, "s": 5.0}]));

    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(
        client()
            .get(format!("http://{}/health", server.addr))
            .send()
            .is_err_and(|e| !e.is_status())
    );
    // Nor does a client that does not trust the certificate.
    assert!(
        reqwest::blocking::Client::new()
            .get(url("/health"))
            .send()
            .is_err()
    );

    let (ok, out, err) = psql(
        &server,
        "verify-full",
        &cert,
        "SELECT count(*) FROM metrics",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1");
    let (ok, _, err) = psql(&server, "disable", &cert, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("accepts TLS connections only"), "{err}");
    let metrics = https.get(url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("fleetlake_pg_connections_total{result=\"tls_required\"} 1"));
    assert!(metrics.contains("fleetlake_tls_handshake_failures_total"));
    server.stop();

    // A key that does not belong to anything readable: the start fails, saying why.
    let junk = certs.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
        .env("FLEETLAKE_TLS__CERT_FILE", &cert)
        .env("FLEETLAKE_TLS__KEY_FILE", &junk)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loading the TLS certificate and key")
            && stderr.contains(junk.to_str().unwrap()),
        "{stderr}"
    );
}
