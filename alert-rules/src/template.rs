//! Label and annotation templates: Go's text/template language (the `gtmpl` crate),
//! with the variables and functions Prometheus gives alert templates: `$labels`,
//! `$value`, `.Labels`, `.Value`, `humanize`, `humanizePercentage`,
//! `humanizeDuration`, `toUpper`, `toLower`, `title`, plus Go's `printf`, `if`, …;
//! and fleetlake's `$account` (`.Account`): the registry record of the alert's account.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use gtmpl::{Context, Func, FuncError, Value};

use crate::error::AlertError;
use crate::registry::Account;

/// Prometheus defines the first two before every alert template; `$account` is the
/// registry record of the alert's account (every field, empty if none).
const PRELUDE: &str = "{{$labels := .Labels}}{{$value := .Value}}{{$account := .Account}}";

/// A parsed template.
#[derive(Clone)]
pub struct Template {
    text: String,
    parsed: Option<Arc<gtmpl::Template>>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.text)
    }
}

fn number(args: &[Value], name: &str) -> Result<f64, FuncError> {
    match args {
        [Value::Number(n)] => n
            .as_f64()
            .or_else(|| n.as_i64().map(|i| i as f64))
            .or_else(|| n.as_u64().map(|u| u as f64))
            .ok_or_else(|| FuncError::Generic(format!("{name}: not a number"))),
        [Value::String(s)] => s
            .parse::<f64>()
            .map_err(|_| FuncError::Generic(format!("{name}: {s:?} is not a number"))),
        [other] => Err(FuncError::Generic(format!(
            "{name}: {other:?} is not a number"
        ))),
        _ => Err(FuncError::ExactlyXArgs(name.into(), 1)),
    }
}

fn string(args: &[Value], name: &str) -> Result<String, FuncError> {
    match args {
        [Value::String(s)] => Ok(s.clone()),
        [other] => Ok(other.to_string()),
        _ => Err(FuncError::ExactlyXArgs(name.into(), 1)),
    }
}

/// Formats like Go's `%.4g`.
fn g4(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.abs().log10().floor() as i32;
    if !(-4..4).contains(&exp) {
        let s = format!("{:.3e}", v);
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = trim_zeros(m);
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let decimals = (3 - exp).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Prometheus' `humanize`: SI prefixes.
fn humanize(args: &[Value]) -> Result<Value, FuncError> {
    let v = number(args, "humanize")?;
    if v == 0.0 || !v.is_finite() {
        return Ok(Value::from(g4(v)));
    }
    let (big, small) = (
        ["", "k", "M", "G", "T", "P", "E", "Z", "Y"],
        ["", "m", "u", "n", "p", "f", "a", "z", "y"],
    );
    let mut x = v;
    if v.abs() >= 1.0 {
        let mut i = 0;
        while x.abs() >= 1000.0 && i < big.len() - 1 {
            x /= 1000.0;
            i += 1;
        }
        return Ok(Value::from(format!("{}{}", g4(x), big[i])));
    }
    let mut i = 0;
    while x.abs() < 1.0 && i < small.len() - 1 {
        x *= 1000.0;
        i += 1;
    }
    Ok(Value::from(format!("{}{}", g4(x), small[i])))
}

fn humanize_percentage(args: &[Value]) -> Result<Value, FuncError> {
    let v = number(args, "humanizePercentage")?;
    Ok(Value::from(format!("{}%", g4(v * 100.0))))
}

fn humanize_duration(args: &[Value]) -> Result<Value, FuncError> {
    let v = number(args, "humanizeDuration")?;
    if !v.is_finite() {
        return Ok(Value::from(format!("{v}")));
    }
    if v.abs() < 1.0 {
        return humanize(&[Value::from(v)]).map(|s| Value::from(format!("{}s", s)));
    }
    let sign = if v < 0.0 { "-" } else { "" };
    let total = v.abs() as u64;
    let (d, h, m, s) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    let text = if d > 0 {
        format!("{sign}{d}d {h}h {m}m {s}s")
    } else if h > 0 {
        format!("{sign}{h}h {m}m {s}s")
    } else if m > 0 {
        format!("{sign}{m}m {s}s")
    } else {
        format!("{sign}{}s", g4(v.abs()))
    };
    Ok(Value::from(text))
}

fn to_upper(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(string(args, "toUpper")?.to_uppercase()))
}

fn to_lower(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(string(args, "toLower")?.to_lowercase()))
}

fn title(args: &[Value]) -> Result<Value, FuncError> {
    let s = string(args, "title")?;
    let mut out = String::with_capacity(s.len());
    let mut start = true;
    for c in s.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        start = !c.is_alphanumeric();
    }
    Ok(Value::from(out))
}

const FUNCS: [(&str, Func); 6] = [
    ("humanize", humanize),
    ("humanizePercentage", humanize_percentage),
    ("humanizeDuration", humanize_duration),
    ("toUpper", to_upper),
    ("toLower", to_lower),
    ("title", title),
];

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, AlertError> {
        if !text.contains("{{") {
            return Ok(Self {
                text: text.to_string(),
                parsed: None,
            });
        }
        // gtmpl's parser never returns from an action left open at the end of the text
        // after a space ("{{ $value "), so that error is found here.
        let last_open = text.rfind("{{").unwrap_or_default();
        if !text[last_open + 2..].contains("}}") {
            return Err(AlertError::Rule(format!(
                "unclosed action at byte {last_open}: no `}}}}` after `{{{{`"
            )));
        }
        let mut template = gtmpl::Template::default();
        template.add_funcs(&FUNCS);
        template
            .parse(format!("{PRELUDE}{text}"))
            .map_err(|e| AlertError::Rule(e.to_string()))?;
        Ok(Self {
            text: text.to_string(),
            parsed: Some(Arc::new(template)),
        })
    }

    /// Whether the template is plain text (no action): it expands to its text
    /// whatever the alert.
    pub fn is_static(&self) -> bool {
        self.parsed.is_none()
    }

    /// The template's source.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Expands the template for one alert instance, without an account record.
    pub fn render(
        &self,
        labels: &BTreeMap<String, String>,
        value: f64,
    ) -> Result<String, AlertError> {
        self.render_for(labels, value, None)
    }

    /// Expands the template for one alert instance about `account` (its registry
    /// record, as `$account` / `.Account`: numbers stay numbers, so
    /// `{{ $account.error_rate_threshold | humanizePercentage }}` works).
    pub fn render_for(
        &self,
        labels: &BTreeMap<String, String>,
        value: f64,
        account: Option<&Account>,
    ) -> Result<String, AlertError> {
        let Some(parsed) = &self.parsed else {
            return Ok(self.text.clone());
        };
        let mut record: HashMap<String, Value> = HashMap::new();
        if let Some(account) = account {
            record.insert(
                "account_id".into(),
                Value::from(account.account_id.as_str()),
            );
            for (name, v) in &account.fields {
                let v = match v {
                    serde_json::Value::Null => Value::Nil,
                    serde_json::Value::Bool(b) => Value::from(*b),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) => Value::from(i),
                        None => Value::from(n.as_f64().unwrap_or(f64::NAN)),
                    },
                    serde_json::Value::String(s) => Value::from(s.as_str()),
                    other => Value::from(other.to_string()),
                };
                record.insert(name.clone(), v);
            }
        }
        let labels: HashMap<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let mut data: HashMap<String, Value> = HashMap::new();
        data.insert("Labels".into(), Value::Map(labels));
        data.insert("Value".into(), Value::from(value));
        data.insert("Account".into(), Value::Map(record));
        parsed
            .render(&Context::from(data))
            .map_err(|e| AlertError::Rule(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accounts_record_is_there_with_its_types() {
        let account: Account = serde_json::from_str(
            r#"{"account_id":"123456789012","tier":"gold","error_rate_threshold":0.025,"max":3,"paging":true}"#,
        )
        .unwrap();
        let labels = BTreeMap::new();
        let render = |text: &str, account: Option<&Account>| {
            Template::parse(text)
                .unwrap()
                .render_for(&labels, 0.1, account)
                .unwrap()
        };
        assert_eq!(
            render(
                "{{ $account.tier | toUpper }} {{ $account.error_rate_threshold | humanizePercentage }} {{ .Account.account_id }}",
                Some(&account)
            ),
            "GOLD 2.5% 123456789012"
        );
        assert_eq!(
            render(
                "{{ if $account.paging }}{{ $account.max }}{{ end }}",
                Some(&account)
            ),
            "3"
        );
        // A field the record lacks, or no record at all, is Go's `<no value>`.
        assert_eq!(
            render("{{ $account.cost_centre }}", Some(&account)),
            "<no value>"
        );
        assert_eq!(render("{{ $account.tier }}", None), "<no value>");
    }

    fn render(text: &str, value: f64) -> String {
        let labels = BTreeMap::from([("account_id".to_string(), "123456789012".to_string())]);
        Template::parse(text)
            .unwrap()
            .render(&labels, value)
            .unwrap()
    }

    #[test]
    fn prometheus_variables_and_functions() {
        assert_eq!(render("plain", 1.0), "plain");
        assert_eq!(
            render("{{ $labels.account_id }} at {{ $value }}", 7.5),
            "123456789012 at 7.5"
        );
        assert_eq!(render("{{ .Labels.account_id }}", 0.0), "123456789012");
        assert_eq!(render("{{ printf \"%.2f\" $value }}", 0.12345), "0.12");
        assert_eq!(render("{{ $value | humanize }}", 1234567.0), "1.235M");
        assert_eq!(render("{{ $value | humanize }}", 0.0123), "12.3m");
        assert_eq!(render("{{ $value | humanizePercentage }}", 0.256), "25.6%");
        assert_eq!(
            render("{{ $value | humanizeDuration }}", 3725.0),
            "1h 2m 5s"
        );
        assert_eq!(render("{{ $value | humanizeDuration }}", 12.5), "12.5s");
        assert_eq!(
            render("{{ if gt $value 5.0 }}high{{ else }}low{{ end }}", 7.0),
            "high"
        );
        assert_eq!(
            render("{{ \"lambda errors\" | title }}", 0.0),
            "Lambda Errors"
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(Template::parse("{{ $labels.x ").is_err());
        assert!(Template::parse("{{ $value }} {{ x\t").is_err());
        assert!(Template::parse("{{ if 1 }} {{ end ").is_err());
        assert!(Template::parse("{{ if 1 }}x{{ end }}").is_ok());
        assert!(Template::parse("{{ nosuchfunc $value }}").is_err());
    }
}
