//! Rule files: Prometheus-shaped rule groups whose `expr` is SQL over fleetlake's
//! tables.
//!
//! ```yaml
//! groups:
//!   - name: lambda
//!     interval: 1m
//!     rules:
//!       - alert: LambdaErrorRate
//!         expr: |
//!           SELECT account_id, region, sum(...) / sum(...) AS value FROM metrics ...
//!         for: 5m
//!         keep_firing_for: 10m
//!         labels: { severity: critical }
//!         annotations:
//!           summary: "{{ $labels.account_id }}: error rate {{ $value | humanizePercentage }}"
//! ```
//!
//! Every row the SQL returns is one alert instance: its `value` column is the value,
//! every other column a label. Errors name the file, line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::error::AlertError;
use crate::template::Template;

/// The column of a rule's result that holds the alert's value.
pub const VALUE_COLUMN: &str = "value";
/// The label holding the rule's name, as in Prometheus.
pub const ALERTNAME: &str = "alertname";
/// Evaluation interval of a group that does not set one.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// A place in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem found in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// Where it is.
    pub position: Position,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.message)
    }
}

impl std::error::Error for RuleError {}

/// A group of rules evaluated together at one interval.
#[derive(Debug, Clone)]
pub struct RuleGroup {
    /// The group's name (unique over all files).
    pub name: String,
    /// How often its rules are evaluated.
    pub interval: Duration,
    /// Its rules, evaluated in order.
    pub rules: Vec<Rule>,
    /// The file it came from.
    pub file: PathBuf,
}

/// One alerting rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The alert's name (label `alertname`).
    pub alert: String,
    /// SQL over fleetlake's tables; one alert instance per row.
    pub expr: String,
    /// Where `expr` starts, for error messages.
    pub expr_position: Position,
    /// How long an instance must be returned before it fires.
    pub for_: Duration,
    /// How long a firing instance keeps firing after it is no longer returned.
    pub keep_firing_for: Duration,
    /// Labels added to every instance (templates; they override the SQL's columns).
    pub labels: BTreeMap<String, Template>,
    /// Annotations of every instance (templates).
    pub annotations: BTreeMap<String, Template>,
    /// Where each label and annotation is, keyed `label:NAME` / `annotation:NAME`.
    pub template_positions: BTreeMap<String, Position>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    groups: Vec<GroupDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupDoc {
    name: Spanned<String>,
    #[serde(default)]
    interval: Option<Spanned<String>>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    alert: Option<Spanned<String>>,
    record: Option<Spanned<String>>,
    expr: Option<Spanned<String>>,
    #[serde(rename = "for", default)]
    for_: Option<Spanned<String>>,
    #[serde(default)]
    keep_firing_for: Option<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    annotations: BTreeMap<String, Spanned<String>>,
}

/// Prometheus' label name syntax.
pub fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A duration as Prometheus writes them (`30s`, `5m`, `1h30m`, `1d`, `500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, AlertError> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || {
        AlertError::Invalid(format!(
            "invalid duration {text:?} (use e.g. 30s, 5m, 1h30m, 1d)"
        ))
    };
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "w" => Duration::from_secs(7 * 86_400),
            "y" => Duration::from_secs(365 * 86_400),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += unit
            .checked_mul(u32::try_from(number).map_err(|_| bad())?)
            .ok_or_else(bad)?;
    }
    Ok(total)
}

fn position(file: &Path, span: &serde_saphyr::Location) -> Position {
    Position {
        file: file.to_path_buf(),
        line: span.line(),
        column: span.column(),
    }
}

/// Parses one rule file's text. All problems found are returned, not only the first.
pub fn parse(file: &Path, text: &str) -> Result<Vec<RuleGroup>, Vec<RuleError>> {
    let doc: FileDoc = match serde_saphyr::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            // The library's message ends with a snippet of the file; the first line is
            // the message itself.
            let text = e.to_string();
            let message = text
                .lines()
                .next()
                .unwrap_or("invalid YAML")
                .trim_start_matches("error: ")
                .to_string();
            let message = message
                .split_once(": ")
                .filter(|(at, _)| at.starts_with("line "))
                .map(|(_, m)| m.to_string())
                .unwrap_or(message);
            return Err(vec![RuleError {
                position: Position {
                    file: file.to_path_buf(),
                    line,
                    column,
                },
                message,
            }]);
        }
    };
    let mut errors = Vec::new();
    let mut groups = Vec::new();
    for group in doc.groups {
        let at = |s: &serde_saphyr::Location| position(file, s);
        let mut err = |s: &serde_saphyr::Location, message: String| {
            errors.push(RuleError {
                position: at(s),
                message,
            })
        };
        if group.name.value.trim().is_empty() {
            err(&group.name.referenced, "group name is empty".into());
        }
        let interval = match &group.interval {
            None => DEFAULT_INTERVAL,
            Some(i) => match parse_duration(&i.value) {
                Ok(d) if d.is_zero() => {
                    err(&i.referenced, "interval must be more than 0".into());
                    DEFAULT_INTERVAL
                }
                Ok(d) => d,
                Err(e) => {
                    err(&i.referenced, e.to_string());
                    DEFAULT_INTERVAL
                }
            },
        };
        let mut names = BTreeSet::new();
        let mut rules = Vec::new();
        for rule in group.rules {
            if let Some(record) = &rule.record {
                err(
                    &record.referenced,
                    "recording rules are not supported: fleetlake's rules are alerts (`alert:`); \
                     a roll-up table or a view covers what a recording rule does"
                        .into(),
                );
                continue;
            }
            let (Some(alert), Some(expr)) = (&rule.alert, &rule.expr) else {
                let place = rule
                    .alert
                    .as_ref()
                    .or(rule.expr.as_ref())
                    .map(|s| s.referenced)
                    .unwrap_or(group.name.referenced);
                err(&place, "a rule needs both `alert` and `expr`".into());
                continue;
            };
            if alert.value.trim().is_empty() {
                err(&alert.referenced, "alert name is empty".into());
            }
            if !names.insert(alert.value.clone()) {
                err(
                    &alert.referenced,
                    format!(
                        "alert {:?} appears twice in group {:?}",
                        alert.value, group.name.value
                    ),
                );
            }
            if expr.value.trim().is_empty() {
                err(&expr.referenced, "expr is empty".into());
            }
            let mut duration = |d: &Option<Spanned<String>>| match d {
                None => Duration::ZERO,
                Some(d) => parse_duration(&d.value).unwrap_or_else(|e| {
                    err(&d.referenced, e.to_string());
                    Duration::ZERO
                }),
            };
            let for_ = duration(&rule.for_);
            let keep_firing_for = duration(&rule.keep_firing_for);
            let mut template_positions = BTreeMap::new();
            let mut templates = |map: &BTreeMap<String, Spanned<String>>, kind: &str| {
                let mut out = BTreeMap::new();
                for (key, value) in map {
                    template_positions.insert(format!("{kind}:{key}"), at(&value.referenced));
                    if kind == "label" && !is_label_name(key) {
                        err(&value.referenced, format!("invalid label name {key:?}"));
                    }
                    if kind == "label" && key == ALERTNAME {
                        err(
                            &value.referenced,
                            "the alertname label is the rule's name".into(),
                        );
                    }
                    match Template::parse(&value.value) {
                        Ok(t) => {
                            out.insert(key.clone(), t);
                        }
                        Err(e) => err(
                            &value.referenced,
                            format!("{kind} {key:?}: invalid template: {e}"),
                        ),
                    }
                }
                out
            };
            let labels = templates(&rule.labels, "label");
            let annotations = templates(&rule.annotations, "annotation");
            rules.push(Rule {
                alert: alert.value.clone(),
                expr: expr.value.clone(),
                expr_position: at(&expr.referenced),
                for_,
                keep_firing_for,
                labels,
                annotations,
                template_positions,
            });
        }
        groups.push(RuleGroup {
            name: group.name.value.clone(),
            interval,
            rules,
            file: file.to_path_buf(),
        });
    }
    if errors.is_empty() {
        Ok(groups)
    } else {
        Err(errors)
    }
}

/// Reads and parses rule files (paths or glob patterns), checking that group names
/// are unique over all of them.
pub fn load(patterns: &[PathBuf]) -> Result<Vec<RuleGroup>, Vec<RuleError>> {
    let mut errors = Vec::new();
    let mut groups: Vec<RuleGroup> = Vec::new();
    for file in expand(patterns).map_err(|e| vec![e])? {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(RuleError {
                    position: Position {
                        file: file.clone(),
                        line: 0,
                        column: 0,
                    },
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse(&file, &text) {
            Ok(parsed) => {
                for group in parsed {
                    if let Some(first) = groups.iter().find(|g| g.name == group.name) {
                        errors.push(RuleError {
                            position: Position {
                                file: file.clone(),
                                line: 1,
                                column: 1,
                            },
                            message: format!(
                                "group {:?} is already defined in {}",
                                group.name,
                                first.file.display()
                            ),
                        });
                    } else {
                        groups.push(group);
                    }
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(groups)
    } else {
        Err(errors)
    }
}

/// Expands `*` in the file-name part of each pattern; plain paths pass as they are.
fn expand(patterns: &[PathBuf]) -> Result<Vec<PathBuf>, RuleError> {
    let mut files = Vec::new();
    for pattern in patterns {
        let name = pattern
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains('*') {
            files.push(pattern.clone());
            continue;
        }
        let dir = pattern
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let (prefix, suffix) = name.split_once('*').unwrap_or((&name, ""));
        let entries = std::fs::read_dir(dir).map_err(|e| RuleError {
            position: Position {
                file: pattern.clone(),
                line: 0,
                column: 0,
            },
            message: format!("cannot list {}: {e}", dir.display()),
        })?;
        let mut matched: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
            })
            .collect();
        matched.sort();
        files.extend(matched);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_prometheus_writes_them() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "m", "5 m", "5min", "-1m", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rule_file_parses_with_positions() {
        let text = "groups:\n  - name: lambda\n    interval: 30s\n    rules:\n      - alert: Errors\n        expr: |\n          SELECT account_id, 1.0 AS value\n          FROM metrics\n        for: 2m\n        keep_firing_for: 5m\n        labels:\n          severity: page\n        annotations:\n          summary: '{{ $labels.account_id }} at {{ $value }}'\n";
        let groups = parse(Path::new("r.yml"), text).unwrap();
        assert_eq!(groups.len(), 1);
        let g = &groups[0];
        assert_eq!(
            (g.name.as_str(), g.interval),
            ("lambda", Duration::from_secs(30))
        );
        let r = &g.rules[0];
        assert_eq!(r.alert, "Errors");
        assert_eq!(r.for_, Duration::from_secs(120));
        assert_eq!(r.keep_firing_for, Duration::from_secs(300));
        assert_eq!(r.expr_position.line, 7);
        assert!(r.expr.starts_with("SELECT account_id"));
        assert_eq!(r.labels.len(), 1);
        assert_eq!(r.annotations.len(), 1);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let cases = [
            (
                "groups:\n  - name: a\n    rulez: []\n",
                3,
                "unknown field `rulez`",
            ),
            (
                "groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: SELECT 1 AS value\n        for: 5 minutes\n",
                6,
                "invalid duration",
            ),
            (
                "groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: SELECT 1 AS value\n        labels:\n          bad-name: x\n",
                7,
                "invalid label name",
            ),
            (
                "groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: SELECT 1 AS value\n        annotations:\n          summary: '{{ $labels.x '\n",
                7,
                "invalid template",
            ),
            (
                "groups:\n  - name: a\n    rules:\n      - record: x\n        expr: SELECT 1\n",
                4,
                "recording rules",
            ),
            (
                "groups:\n  - name: a\n    rules:\n      - alert: X\n",
                4,
                "both `alert` and `expr`",
            ),
            (
                "groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: SELECT 1 AS value\n      - alert: X\n        expr: SELECT 2 AS value\n",
                6,
                "appears twice",
            ),
            ("groups: [\n", 1, "unclosed"),
        ];
        for (text, line, message) in cases {
            let errors = parse(Path::new("rules/x.yml"), text).unwrap_err();
            let e = &errors[0];
            assert_eq!(e.position.line, line, "{e} for {text:?}");
            assert!(e.to_string().starts_with("rules/x.yml:"), "{e}");
            assert!(e.message.contains(message), "{e} for {text:?}");
        }
    }

    #[test]
    fn group_names_are_unique_over_files() {
        let dir = tempfile::tempdir().unwrap();
        let body = "groups:\n  - name: same\n    rules:\n      - alert: X\n        expr: SELECT 1 AS value\n";
        std::fs::write(dir.path().join("a.yml"), body).unwrap();
        std::fs::write(dir.path().join("b.yml"), body).unwrap();
        let errors = load(&[dir.path().join("*.yml")]).unwrap_err();
        assert!(errors[0].message.contains("already defined"), "{errors:?}");
        assert!(errors[0].position.file.ends_with("b.yml"));
    }
}
