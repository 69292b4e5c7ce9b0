//! `fleetlake rules check`: rule files validated against the real schema.
//!
//! Beyond what parsing finds, each rule's SQL is planned against fleetlake's tables
//! (a syntax error points at its line in the file), its result must have a numeric
//! `value` column and scalar label columns, and its templates may only use labels the
//! rule's instances will have.

use std::collections::BTreeSet;

use crate::engine::{SqlSource, check_label_column};
use crate::error::AlertError;
use crate::registry::{Account, LABEL_FIELDS};
use crate::rules::{ALERTNAME, Position, RuleError, RuleGroup, VALUE_COLUMN};

/// Where in the file a position inside the SQL text is (`Line: L, Column: C` in
/// DataFusion's parser errors).
fn sql_position(start: &Position, message: &str) -> Position {
    let grab = |key: &str| -> Option<u64> {
        let at = message.find(key)? + key.len();
        let digits: String = message[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    match (grab("Line: "), grab("Column: ")) {
        (Some(line), Some(column)) if line >= 1 => Position {
            file: start.file.clone(),
            line: start.line + line - 1,
            column: if line == 1 {
                start.column + column - 1
            } else {
                start.column - 1 + column
            },
        },
        _ => start.clone(),
    }
}

/// Labels a template refers to (`$labels.x`, `.Labels.x`).
fn referenced_labels(template: &str) -> BTreeSet<String> {
    referenced(template, &["$labels.", ".Labels."])
}

/// Fields of the account record a template refers to (`$account.x`, `.Account.x`).
fn referenced_account_fields(template: &str) -> BTreeSet<String> {
    referenced(template, &["$account.", ".Account."])
}

/// Names a template refers to after one of `prefixes`.
fn referenced(template: &str, prefixes: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in prefixes {
        let mut rest = template;
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
    }
    out
}

/// Checks every rule of `groups` against `sql`'s schema; the problems found. Fails
/// (with [`AlertError::Unavailable`]) when the query engine cannot plan at all: that
/// is no rule's fault.
pub async fn check(
    groups: &[RuleGroup],
    sql: &dyn SqlSource,
) -> Result<Vec<RuleError>, AlertError> {
    let mut errors = Vec::new();
    for group in groups {
        for rule in &group.rules {
            let at = &rule.expr_position;
            let mut err = |position: Position, message: String| {
                errors.push(RuleError {
                    position,
                    message: format!("alert {}: {message}", rule.alert),
                })
            };
            let schema = match sql.plan(&rule.expr).await {
                Ok(schema) => schema,
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    let message = e.to_string();
                    err(sql_position(at, &message), message);
                    continue;
                }
            };
            let mut labels: BTreeSet<String> = BTreeSet::from([ALERTNAME.to_string()]);
            match schema.field_with_name(VALUE_COLUMN) {
                Err(_) => err(
                    at.clone(),
                    format!(
                        "the query returns no `{VALUE_COLUMN}` column (columns: {})",
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Ok(field) if !field.data_type().is_numeric() => err(
                    at.clone(),
                    format!("`{VALUE_COLUMN}` is {}, not a number", field.data_type()),
                ),
                Ok(_) => {}
            }
            let mut names = BTreeSet::new();
            for field in schema.fields() {
                if !names.insert(field.name().clone()) {
                    err(at.clone(), format!("column {} appears twice", field.name()));
                }
                if field.name() == VALUE_COLUMN {
                    continue;
                }
                if let Err(e) = check_label_column(field.name(), field.data_type()) {
                    err(at.clone(), e.to_string());
                }
                labels.insert(field.name().clone());
            }
            if labels.contains("account_id") {
                labels.extend(LABEL_FIELDS.iter().map(|s| s.to_string()));
            }
            labels.extend(rule.labels.keys().cloned());
            for (kind, map) in [("label", &rule.labels), ("annotation", &rule.annotations)] {
                for (name, template) in map {
                    for used in referenced_labels(template.text()) {
                        if !labels.contains(&used) {
                            let place = rule
                                .template_positions
                                .get(&format!("{kind}:{name}"))
                                .unwrap_or(at);
                            err(
                                place.clone(),
                                format!(
                                    "{kind} {name} uses $labels.{used}, which this rule's alerts do not have (they have: {})",
                                    labels.iter().cloned().collect::<Vec<_>>().join(", ")
                                ),
                            );
                        }
                    }
                    let sample = labels
                        .iter()
                        .map(|l| (l.clone(), "x".to_string()))
                        .collect();
                    // An account whose fields the template reads are numbers, which
                    // both text and number functions take.
                    let account = Account {
                        account_id: "x".into(),
                        fields: referenced_account_fields(template.text())
                            .into_iter()
                            .map(|f| (f, serde_json::json!(1)))
                            .collect(),
                    };
                    if let Err(e) = template.render_for(&sample, 1.0, Some(&account)) {
                        err(at.clone(), format!("{kind} {name}: {e}"));
                    }
                }
            }
        }
    }
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_errors_point_into_the_file() {
        let start = Position {
            file: "r.yml".into(),
            line: 10,
            column: 11,
        };
        let p = sql_position(
            &start,
            "sql parser error: Expected: end of statement, found: x at Line: 2, Column: 5",
        );
        assert_eq!((p.line, p.column), (11, 15));
        let p = sql_position(&start, "... at Line: 1, Column: 3");
        assert_eq!((p.line, p.column), (10, 13));
        assert_eq!(sql_position(&start, "table not found"), start);
    }

    #[test]
    fn template_label_references_are_found() {
        let used = referenced_labels("{{ $labels.account_id }} {{ .Labels.region }} {{ $value }}");
        assert_eq!(
            used,
            BTreeSet::from(["account_id".to_string(), "region".to_string()])
        );
    }
}
