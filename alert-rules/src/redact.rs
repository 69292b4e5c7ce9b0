//! Secrets kept out of log lines and error messages: receiver URLs (whose query
//! string, user info or path may hold a token), PagerDuty routing keys, and the URL
//! that `reqwest` errors carry.

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// `url` as it may be shown: scheme, host and port only (no user info, path, query or
/// fragment, any of which may carry a token).
pub fn url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => match parsed.host_str() {
            Some(host) => match parsed.port() {
                Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
                None => format!("{}://{host}", parsed.scheme()),
            },
            None => format!("{}:{REDACTED}", parsed.scheme()),
        },
        Err(_) => REDACTED.to_string(),
    }
}

/// The parts of `url` that may be secrets (the whole URL, its user name and password,
/// path and query string), for [`scrub`].
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = vec![url.to_string()];
    if let Ok(parsed) = reqwest::Url::parse(url) {
        secrets.push(parsed.as_str().to_string());
        secrets.push(parsed.username().to_string());
        secrets.extend(parsed.password().map(str::to_string));
        if parsed.path().len() > 1 {
            secrets.push(parsed.path().to_string());
        }
        secrets.extend(parsed.query().map(str::to_string));
        secrets.extend(parsed.fragment().map(str::to_string));
    }
    secrets
}

/// `text` with every occurrence of each of `secrets` (empty ones ignored) replaced by
/// [`REDACTED`], longest first so that a secret containing another goes whole.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut text = text.to_string();
    for secret in secrets {
        if text.contains(secret) {
            text = text.replace(secret, REDACTED);
        }
    }
    text
}

/// A `reqwest` error as it may be shown: without the URL it was for, with its causes
/// (`error sending request: client error (Connect): tcp connect error: ...`).
pub fn reqwest_error(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_scheme_host_and_port_only() {
        assert_eq!(
            url("https://user:pw@hooks.example.com:8443/services/T0/B0/s3cr3t?token=abc#x"),
            "https://hooks.example.com:8443"
        );
        assert_eq!(
            url("http://127.0.0.1:9/hook?token=abc"),
            "http://127.0.0.1:9"
        );
        assert_eq!(
            url("https://events.pagerduty.com/v2/enqueue"),
            "https://events.pagerduty.com"
        );
        assert_eq!(url("not a url token=abc"), REDACTED);
    }

    #[test]
    fn scrub_removes_every_secret_part_of_a_url() {
        let hook = "https://bot:pa55word@hooks.example.com/services/T0/s3cr3t?token=abc123";
        let secrets = url_secrets(hook);
        for text in [
            format!("error for url ({hook})"),
            "echo: token=abc123".to_string(),
            "POST /services/T0/s3cr3t failed".to_string(),
            "auth pa55word refused".to_string(),
        ] {
            let scrubbed = scrub(&text, &secrets);
            for secret in ["abc123", "s3cr3t", "pa55word"] {
                assert!(!scrubbed.contains(secret), "{scrubbed}");
            }
            assert!(scrubbed.contains(REDACTED), "{scrubbed}");
        }
        assert_eq!(scrub("nothing here", &secrets), "nothing here");
        assert_eq!(scrub("x", &[String::new()]), "x");
    }

    #[tokio::test]
    async fn reqwest_errors_lose_their_url_but_keep_their_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Nothing listens there any more.
        let error = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/hook?token=tok-secret-1"))
            .send()
            .await
            .unwrap_err();
        assert!(error.to_string().contains("tok-secret-1"), "{error}");
        let text = reqwest_error(error);
        assert!(!text.contains("tok-secret-1"), "{text}");
        assert!(!text.contains("/hook"), "{text}");
        assert!(text.to_lowercase().contains("connect"), "{text}");
    }
}
