//! Checks every statement passes before it is planned, the same on HTTP and both
//! Postgres protocols, each decided on what was parsed, never on the text's spelling.
//!
//! - Size and depth ([`check_text`]): the statement's bytes, and a bound on the depth
//!   of its expression trees, found from its tokens before it is parsed (the tokenizer
//!   is a loop; the parser and planner recurse). A chain of 200,000 `+` is refused
//!   here, so no later stage ever holds a tree deep enough to exhaust a stack.
//! - Session settings ([`setting`]): the few a Postgres client may set. The query
//!   engine's own settings (`datafusion.*`: memory, spill directory, batch size) are
//!   fixed by the server, whatever the quoting, case or `LOCAL`/`SESSION` scope.
//! - `EXPLAIN` ([`check_plan`]): a credential limited to some accounts may see a plan,
//!   not `EXPLAIN VERBOSE` or `EXPLAIN ANALYZE`, whose statistics and row counts
//!   describe every account's data.

use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{ContextModifier, Expr, ObjectName, Reset, Set, Statement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use fleetlake_model::ErrorKind;

/// Bounds on a statement's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimits {
    /// Longest statement, in bytes.
    pub max_bytes: usize,
    /// Deepest expression (operators chained at one level plus levels of nesting).
    pub max_depth: usize,
}

impl Default for TextLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_depth: 1000,
        }
    }
}

/// Why a statement's text is refused (SQLSTATE 54001, HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("statement too complex: {0}")]
pub struct TooComplex(pub String);

/// One level of parentheses or brackets while scanning tokens.
#[derive(Debug, Default)]
struct Level {
    /// Operators since the last comma at this level.
    operators: usize,
    /// Most operators between two commas at this level.
    widest: usize,
    /// Deepest level nested in this one.
    nested: usize,
}

impl Level {
    fn depth(&self) -> usize {
        self.widest.max(self.operators) + self.nested + 1
    }
}

/// Whether `token` joins two expressions (or prefixes one): each adds a level to the
/// tree the parser builds.
fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(word) => matches!(
            word.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::XOR
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::BETWEEN
                | Keyword::IN
                | Keyword::UNION
                | Keyword::INTERSECT
                | Keyword::EXCEPT
                | Keyword::JOIN
                | Keyword::COLLATE
                | Keyword::AT
                | Keyword::OVERLAPS
        ),
        Token::Whitespace(_)
        | Token::Number(..)
        | Token::Char(_)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::NationalStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::Comma
        | Token::LParen
        | Token::RParen
        | Token::LBracket
        | Token::RBracket
        | Token::LBrace
        | Token::RBrace
        | Token::SemiColon
        | Token::Period
        | Token::Placeholder(_)
        | Token::EOF => false,
        _ => true,
    }
}

/// Refuses a statement longer than `limits.max_bytes` or whose expressions may be
/// deeper than `limits.max_depth`. Text that does not tokenize passes: the parser
/// reports it with its position.
pub fn check_text(sql: &str, limits: TextLimits) -> Result<(), TooComplex> {
    if sql.len() > limits.max_bytes {
        return Err(TooComplex(format!(
            "the statement is {} bytes, more than the {} allowed",
            sql.len(),
            limits.max_bytes
        )));
    }
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return Ok(());
    };
    let too_deep = || {
        Err(TooComplex(format!(
            "an expression nests or chains more than {} operators deep; \
             write long lists as IN (...)",
            limits.max_depth
        )))
    };
    // Each open level, with the depth its enclosing levels add (their operators and
    // one each) as they were when it opened: the tree under the innermost level is
    // at most that plus its own depth.
    let mut levels = vec![(Level::default(), 0usize)];
    for token in &tokens {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                let outer = levels
                    .last()
                    .map(|(l, above)| above + l.widest.max(l.operators) + 1)
                    .unwrap_or_default();
                levels.push((Level::default(), outer));
                if levels.len() > limits.max_depth {
                    return too_deep();
                }
            }
            Token::RParen | Token::RBracket | Token::RBrace if levels.len() > 1 => {
                let closed = levels.pop().map(|(l, _)| l.depth()).unwrap_or_default();
                if let Some((outer, _)) = levels.last_mut() {
                    outer.nested = outer.nested.max(closed);
                }
            }
            Token::Comma | Token::SemiColon => {
                if let Some((level, _)) = levels.last_mut() {
                    level.widest = level.widest.max(level.operators);
                    level.operators = 0;
                }
            }
            token if is_operator(token) => {
                if let Some((level, _)) = levels.last_mut() {
                    level.operators += 1;
                }
            }
            _ => {}
        }
        let depth = levels
            .last()
            .map(|(level, above)| above + level.depth())
            .unwrap_or_default();
        if depth > limits.max_depth {
            return too_deep();
        }
    }
    Ok(())
}

/// Session settings a Postgres client may change, and how.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// Handled by the Postgres front end's settings hook as this statement (scope
    /// removed: there are no transactions to scope to).
    Hook(Box<Statement>),
    /// Accepted and changes nothing (`SET TRANSACTION READ ONLY`, `SET NAMES 'UTF8'`,
    /// `client_encoding`): what the client asks is already so.
    Accepted,
    /// `RESET` of the named settings (lower case), all of them when `None`.
    Reset(Option<String>),
}

/// A refused statement: why, and the message.
pub type Refused = (ErrorKind, String);

/// Settings clients may change: display settings the Postgres front end keeps per
/// connection, and `statement_timeout`, which can only lower the server's timeout
/// (the smaller one applies).
pub const SESSION_SETTINGS: &[&str] = &[
    "statement_timeout",
    "datestyle",
    "bytea_output",
    "intervalstyle",
    "application_name",
    "extra_float_digits",
    "search_path",
];

/// Settings accepted as they are already in effect.
const ALREADY_SO: &[&str] = &[
    "client_encoding",
    "client_min_messages",
    "standard_conforming_strings",
];

fn setting_name(name: &ObjectName) -> String {
    name.0
        .iter()
        .map(|part| match part.as_ident() {
            Some(ident) => ident.value.to_lowercase(),
            None => part.to_string().to_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn refused(name: &str) -> Refused {
    if SESSION_SETTINGS.contains(&name) || ALREADY_SO.contains(&name) {
        return (
            ErrorKind::Syntax,
            format!("invalid value for parameter \"{name}\""),
        );
    }
    if name.starts_with("datafusion.") || name == "datafusion" {
        return (
            ErrorKind::Forbidden,
            format!(
                "permission denied to set parameter \"{name}\": the query engine's settings are \
                 fixed by the server"
            ),
        );
    }
    (
        ErrorKind::UndefinedObject,
        format!(
            "unrecognized configuration parameter \"{name}\" (settable: {})",
            SESSION_SETTINGS.join(", ")
        ),
    )
}

fn is_utf8(value: &Expr) -> bool {
    let text = value.to_string();
    let text = text
        .trim_matches(|c| c == '\'' || c == '"')
        .to_ascii_lowercase();
    matches!(text.as_str(), "utf8" | "utf-8" | "unicode" | "default")
}

/// What to do with `SET`/`RESET` statement `statement`, or `None` if it is neither.
pub fn setting(statement: &Statement) -> Option<Result<Setting, Refused>> {
    let set = match statement {
        Statement::Set(set) => set,
        Statement::Reset(reset) => {
            return Some(match &reset.reset {
                Reset::ALL => Ok(Setting::Reset(None)),
                Reset::ConfigurationParameter(name) => {
                    let name = setting_name(name);
                    if SESSION_SETTINGS.contains(&name.as_str())
                        || ALREADY_SO.contains(&name.as_str())
                    {
                        Ok(Setting::Reset(Some(name)))
                    } else {
                        Err(refused(&name))
                    }
                }
            });
        }
        _ => return None,
    };
    Some(match set {
        Set::SingleAssignment {
            scope,
            hivevar: false,
            variable,
            values,
        } if !matches!(scope, Some(ContextModifier::Global)) => {
            let name = setting_name(variable);
            if SESSION_SETTINGS.contains(&name.as_str()) && values.len() == 1 {
                Ok(Setting::Hook(Box::new(Statement::Set(
                    Set::SingleAssignment {
                        scope: None,
                        hivevar: false,
                        variable: ObjectName::from(vec![
                            datafusion::sql::sqlparser::ast::Ident::new(name),
                        ]),
                        values: values.clone(),
                    },
                ))))
            } else if ALREADY_SO.contains(&name.as_str())
                && (name != "client_encoding" || values.iter().all(is_utf8))
            {
                Ok(Setting::Accepted)
            } else {
                Err(refused(&name))
            }
        }
        Set::SingleAssignment { variable, .. } => Err(refused(&setting_name(variable))),
        Set::SetTimeZone { value, .. } => {
            Ok(Setting::Hook(Box::new(Statement::Set(Set::SetTimeZone {
                local: false,
                value: value.clone(),
            }))))
        }
        Set::SetNames { charset_name, .. } if is_utf8(&Expr::Identifier(charset_name.clone())) => {
            Ok(Setting::Accepted)
        }
        Set::SetNamesDefault {} => Ok(Setting::Accepted),
        Set::SetTransaction { .. } => Ok(Setting::Accepted),
        Set::SetNames { .. } => Err((ErrorKind::Unsupported, "only UTF8 is supported".into())),
        Set::ParenthesizedAssignments { variables, .. } => Err(refused(
            &variables.first().map(setting_name).unwrap_or_default(),
        )),
        Set::MultipleAssignments { assignments } => Err(refused(
            &assignments
                .first()
                .map(|a| setting_name(&a.name))
                .unwrap_or_default(),
        )),
        Set::SetRole { .. } | Set::SetSessionAuthorization(_) => Err((
            ErrorKind::Forbidden,
            "permission denied: the role is the one you logged in as".into(),
        )),
        _ => Err((
            ErrorKind::Forbidden,
            format!("permission denied: {statement}"),
        )),
    })
}

/// Why a limited credential may not run `plan`, if it may not: `EXPLAIN VERBOSE`
/// and `EXPLAIN ANALYZE` (statistics and row counts of every account's data).
pub fn check_plan(plan: &LogicalPlan, limited: bool) -> Result<(), Refused> {
    if !limited {
        return Ok(());
    }
    let shows_data = match plan {
        LogicalPlan::Explain(explain) => explain.verbose,
        LogicalPlan::Analyze(_) => true,
        _ => false,
    };
    if shows_data {
        return Err((
            ErrorKind::Forbidden,
            "permission denied: EXPLAIN VERBOSE and EXPLAIN ANALYZE show statistics of every \
             account's data; a credential limited to some accounts may use EXPLAIN alone"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::parser::Parser;

    fn parse(sql: &str) -> Statement {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0)
    }

    fn limits(depth: usize) -> TextLimits {
        TextLimits {
            max_bytes: 1 << 20,
            max_depth: depth,
        }
    }

    #[test]
    fn long_chains_and_deep_nesting_are_refused_before_parsing() {
        let sum = |terms: usize| format!("SELECT {}", vec!["1"; terms].join("+"));
        check_text(&sum(1000), limits(1000)).unwrap();
        let err = check_text(&sum(1002), limits(1000)).unwrap_err();
        assert!(err.0.contains("1000 operators deep"), "{err}");
        check_text(&sum(200_000), TextLimits::default()).unwrap_err();
        let nested = |n: usize| format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n));
        check_text(&nested(900), limits(1000)).unwrap();
        check_text(&nested(1001), limits(1000)).unwrap_err();
        // Operators inside nesting add up.
        let mixed = format!("SELECT ({})", vec!["1"; 600].join("+"));
        check_text(
            &format!("{mixed} + {}", vec!["1"; 500].join("+")),
            limits(1000),
        )
        .unwrap_err();
        // Wide is not deep: many short expressions side by side pass.
        let wide = format!("SELECT {}", vec!["a + b"; 5000].join(", "));
        check_text(&wide, limits(1000)).unwrap();
        let list = format!("SELECT 1 WHERE a IN ({})", vec!["'x'"; 50_000].join(","));
        check_text(&list, limits(1000)).unwrap();
        let chain = format!("SELECT 1 WHERE {}", vec!["a = 1"; 600].join(" OR "));
        check_text(&chain, limits(1000)).unwrap_err();
        let err = check_text(&"x".repeat(2 << 20), TextLimits::default()).unwrap_err();
        assert!(err.0.contains("bytes"), "{err}");
    }

    /// The deepest expressions the default limits let through are planned and run
    /// by DataFusion on a stack an eighth of the runtime's threads'
    /// ([`crate::WORKER_STACK_BYTES`]).
    #[test]
    fn the_deepest_statement_let_through_runs_on_an_eighth_of_the_worker_stack() {
        let limits = TextLimits::default();
        let chained = format!("SELECT {}", vec!["1"; limits.max_depth].join("+"));
        let cased = format!(
            "SELECT {}1{}",
            "CASE WHEN true THEN ".repeat(300),
            " END".repeat(300)
        );
        let not = format!("SELECT {}true", "NOT ".repeat(limits.max_depth - 1));
        for sql in [chained, cased, not] {
            check_text(&sql, limits).unwrap();
            let run = std::thread::Builder::new()
                .stack_size(crate::WORKER_STACK_BYTES / 8)
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap()
                        .block_on(async {
                            let ctx = datafusion::prelude::SessionContext::new();
                            match ctx.sql(&sql).await {
                                Ok(frame) => frame.collect().await.map(|b| b.len()),
                                Err(e) => Err(e),
                            }
                        })
                })
                .unwrap()
                .join();
            // A clean error (the parser's own recursion limit) is fine; a stack
            // overflow would abort the test process.
            assert!(run.is_ok());
        }
    }

    #[test]
    fn engine_settings_are_refused_however_spelled() {
        for sql in [
            "SET datafusion.execution.batch_size = 1",
            "SET \"datafusion\".runtime.memory_limit = '64G'",
            "SET DataFusion.Runtime.Memory_Limit = '64G'",
            "SET LOCAL datafusion.runtime.temp_directory = '/tmp/x'",
            "SET SESSION datafusion.runtime.max_temp_directory_size = '1T'",
            "SET \"datafusion.execution.batch_size\" = 100000000",
            "RESET datafusion.execution.batch_size",
            "SET GLOBAL statement_timeout = 0",
            "SET ROLE admin",
            "SET work_mem = '1GB'",
        ] {
            let decision = setting(&parse(sql)).unwrap();
            assert!(decision.is_err(), "{sql}: {decision:?}");
        }
        let (kind, _) = setting(&parse("SET \"datafusion\".runtime.memory_limit = '64G'"))
            .unwrap()
            .unwrap_err();
        assert_eq!(kind.sqlstate(), "42501");
    }

    #[test]
    fn session_settings_go_to_the_hook_without_scope() {
        for sql in [
            "SET statement_timeout = 1000",
            "SET LOCAL statement_timeout = '1s'",
            "SET SESSION Statement_Timeout TO 1000",
            "SET \"statement_timeout\" = 1000",
            "SET application_name = 'grafana'",
        ] {
            match setting(&parse(sql)).unwrap().unwrap() {
                Setting::Hook(statement) => {
                    let text = statement.to_string().to_lowercase();
                    assert!(
                        text.starts_with("set statement_timeout")
                            || text.starts_with("set application_name"),
                        "{text}"
                    );
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert_eq!(
            setting(&parse("RESET statement_timeout")).unwrap().unwrap(),
            Setting::Reset(Some("statement_timeout".into()))
        );
        assert_eq!(
            setting(&parse("RESET ALL")).unwrap().unwrap(),
            Setting::Reset(None)
        );
        assert_eq!(
            setting(&parse("SET client_encoding = 'UTF8'"))
                .unwrap()
                .unwrap(),
            Setting::Accepted
        );
        assert!(setting(&parse("SELECT 1")).is_none());
    }
}
