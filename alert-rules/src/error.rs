//! What can go wrong in alerting, by whose fault: the service (the query engine or the
//! lake cannot answer now), the rule, a receiver, the state file, or the
//! configuration. The engine decides by the variant, never by an error's message: a
//! rule whose SQL does not plan is counted and logged as the rule's failure, an outage
//! of the query engine is not.

use std::path::PathBuf;

/// An alerting error.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The query engine, the lake or its store cannot serve now (unreachable,
    /// overloaded, a disk failing): the service's fault, not the rule's; worth a
    /// retry.
    #[error("{0}")]
    Unavailable(String),
    /// The rule is wrong: its SQL does not plan or fails on its own terms, its result
    /// lacks a `value` or has columns that cannot be labels, a template fails.
    #[error("{0}")]
    Rule(String),
    /// A notification was not accepted by its receiver.
    #[error("{receiver}: {message}")]
    Notify {
        /// The receiver's name.
        receiver: String,
        /// What happened (scrubbed of the receiver's secrets).
        message: String,
        /// Whether sending it again later may succeed (429, 408, 5xx, network).
        retryable: bool,
    },
    /// The alert state file could not be read or written.
    #[error("alert state {}: {source}", path.display())]
    State {
        /// The state file (or its directory).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `[alerting]` section is invalid.
    #[error("{at}: {message}")]
    Config {
        /// Which key (`alerting.receivers[0] (pd)`).
        at: String,
        /// What is wrong.
        message: String,
    },
    /// The account registry file cannot be read or parsed.
    #[error("account registry {}{}: {message}", file.display(), line.map(|l| format!(": line {l}")).unwrap_or_default())]
    Registry {
        /// The file.
        file: PathBuf,
        /// The line at fault, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// An input is invalid: a matcher, a time, a duration, a silence.
    #[error("{0}")]
    Invalid(String),
}

impl AlertError {
    /// Whether the service, not the rule or the input, is at fault (an outage).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::State { .. } => true,
            Self::Notify { retryable, .. } => *retryable,
            Self::Rule(_) | Self::Config { .. } | Self::Registry { .. } | Self::Invalid(_) => false,
        }
    }

    /// The variant, as a metric label or log field.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Rule(_) => "rule",
            Self::Notify { .. } => "notify",
            Self::State { .. } => "state",
            Self::Config { .. } => "config",
            Self::Registry { .. } => "registry",
            Self::Invalid(_) => "invalid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_context() {
        let e = AlertError::Registry {
            file: "accounts.jsonl".into(),
            line: Some(3),
            message: "expected value".into(),
        };
        assert_eq!(
            e.to_string(),
            "account registry accounts.jsonl: line 3: expected value"
        );
        let e = AlertError::Config {
            at: "alerting.routes[0]".into(),
            message: "no receiver named \"x\"".into(),
        };
        assert_eq!(e.to_string(), "alerting.routes[0]: no receiver named \"x\"");
        let e = AlertError::Notify {
            receiver: "pd".into(),
            message: "503 Service Unavailable".into(),
            retryable: true,
        };
        assert!(e.is_retryable() && !e.is_unavailable());
        assert!(AlertError::Unavailable("lake".into()).is_unavailable());
        assert!(!AlertError::Rule("no value".into()).is_retryable());
    }
}
