//! Label matchers as Alertmanager writes them (`owner_team="payments"`,
//! `severity=~"critical|page"`, `environment!="dev"`, `region!~"cn-.*"`), used by
//! routes and silences.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::AlertError;

/// How a matcher compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `=~` (anchored regular expression)
    Regex,
    /// `!~`
    NotRegex,
}

/// One label matcher. A missing label matches as the empty string, as in Alertmanager.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// Label name.
    pub name: String,
    /// Comparison.
    pub op: Op,
    /// Value or pattern.
    pub value: String,
    regex: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.op == other.op && self.value == other.value
    }
}

impl Matcher {
    /// A matcher from its parts.
    pub fn new(name: &str, op: Op, value: &str) -> Result<Self, AlertError> {
        if !crate::rules::is_label_name(name) {
            return Err(AlertError::Invalid(format!("invalid label name {name:?}")));
        }
        let regex = match op {
            Op::Regex | Op::NotRegex => {
                Some(Regex::new(&format!("^(?:{value})$")).map_err(|e| {
                    AlertError::Invalid(format!("invalid regular expression {value:?}: {e}"))
                })?)
            }
            _ => None,
        };
        Ok(Self {
            name: name.to_string(),
            op,
            value: value.to_string(),
            regex,
        })
    }

    /// Parses `name OP "value"` (quotes optional for simple values).
    pub fn parse(text: &str) -> Result<Self, AlertError> {
        let text = text.trim();
        let bad =
            |why: &dyn std::fmt::Display| AlertError::Invalid(format!("matcher {text:?}: {why}"));
        let at = text
            .find(['=', '!'])
            .ok_or_else(|| bad(&"expected name=\"value\""))?;
        let name = text[..at].trim();
        let rest = &text[at..];
        let (op, value) = if let Some(v) = rest.strip_prefix("=~") {
            (Op::Regex, v)
        } else if let Some(v) = rest.strip_prefix("!~") {
            (Op::NotRegex, v)
        } else if let Some(v) = rest.strip_prefix("!=") {
            (Op::NotEqual, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            (Op::Equal, v)
        } else {
            return Err(bad(&"expected =, !=, =~ or !~"));
        };
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('"') {
            let inner = inner
                .strip_suffix('"')
                .ok_or_else(|| bad(&"unclosed quote"))?;
            serde_json::from_str::<String>(&format!("\"{inner}\"")).map_err(|e| bad(&e))?
        } else {
            value.to_string()
        };
        Self::new(name, op, &value).map_err(|e| bad(&e))
    }

    /// Every value this matcher accepts, when that is a short list decided safely: an
    /// equality (`="X"`), or a regular expression that is an alternation of plain words
    /// (`=~"X|Y"`, letters, digits, `_` and `-` only). `None` for anything else
    /// (negations, other regular expressions): it may accept any value.
    pub fn exact_values(&self) -> Option<Vec<&str>> {
        match self.op {
            Op::Equal => Some(vec![self.value.as_str()]),
            Op::Regex => {
                let words: Vec<&str> = self.value.split('|').collect();
                words
                    .iter()
                    .all(|w| {
                        !w.is_empty()
                            && w.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    })
                    .then_some(words)
            }
            Op::NotEqual | Op::NotRegex => None,
        }
    }

    /// Whether `labels` match.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.name).map(String::as_str).unwrap_or("");
        match self.op {
            Op::Equal => value == self.value,
            Op::NotEqual => value != self.value,
            Op::Regex => self.regex.as_ref().is_some_and(|r| r.is_match(value)),
            Op::NotRegex => !self.regex.as_ref().is_some_and(|r| r.is_match(value)),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Equal => "=",
            Op::NotEqual => "!=",
            Op::Regex => "=~",
            Op::NotRegex => "!~",
        };
        write!(
            f,
            "{}{}{}",
            self.name,
            op,
            serde_json::Value::from(self.value.as_str())
        )
    }
}

impl Serialize for Matcher {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Matcher {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            // Alertmanager's API form.
            Api {
                name: String,
                value: String,
                #[serde(rename = "isRegex", default)]
                is_regex: bool,
                #[serde(rename = "isEqual", default = "yes")]
                is_equal: bool,
            },
        }
        fn yes() -> bool {
            true
        }
        match Form::deserialize(d)? {
            Form::Text(text) => Matcher::parse(&text).map_err(serde::de::Error::custom),
            Form::Api {
                name,
                value,
                is_regex,
                is_equal,
            } => {
                let op = match (is_regex, is_equal) {
                    (false, true) => Op::Equal,
                    (false, false) => Op::NotEqual,
                    (true, true) => Op::Regex,
                    (true, false) => Op::NotRegex,
                };
                Matcher::new(&name, op, &value).map_err(serde::de::Error::custom)
            }
        }
    }
}

/// Whether every matcher matches `labels`.
pub fn all_match(matchers: &[Matcher], labels: &BTreeMap<String, String>) -> bool {
    matchers.iter().all(|m| m.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_parse_and_match_as_alertmanager_does() {
        let labels = BTreeMap::from([
            ("owner_team".to_string(), "payments".to_string()),
            ("severity".to_string(), "critical".to_string()),
        ]);
        let yes = [
            "owner_team=\"payments\"",
            "owner_team = payments",
            "severity=~\"critical|page\"",
            "environment!=\"prod\"",
            "environment=\"\"",
            "region!~\"cn-.*\"",
        ];
        for m in yes {
            assert!(Matcher::parse(m).unwrap().matches(&labels), "{m}");
        }
        let no = [
            "owner_team=\"search\"",
            "severity=~\"crit\"",
            "owner_team!=payments",
        ];
        for m in no {
            assert!(!Matcher::parse(m).unwrap().matches(&labels), "{m}");
        }
        for bad in ["owner_team", "bad-name=\"x\"", "a=~\"(\"", "a=\"x"] {
            assert!(Matcher::parse(bad).is_err(), "{bad}");
        }
        let m: Matcher = serde_json::from_value(serde_json::json!(
            {"name": "severity", "value": "crit.*", "isRegex": true, "isEqual": true}
        ))
        .unwrap();
        assert!(m.matches(&labels));
        assert_eq!(m.to_string(), "severity=~\"crit.*\"");
    }

    #[test]
    fn exact_values_are_decided_only_when_safe() {
        let values = |text: &str| {
            Matcher::parse(text)
                .unwrap()
                .exact_values()
                .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(values("account_id=\"111\"").unwrap(), ["111"]);
        assert_eq!(values("account_id=\"\"").unwrap(), [""]);
        assert_eq!(values("account_id=~\"111|222\"").unwrap(), ["111", "222"]);
        for unknown in [
            "account_id!=\"111\"",
            "account_id!~\"111\"",
            "account_id=~\"11.\"",
            "account_id=~\"111|\"",
            "account_id=~\"(?i)abc\"",
            "account_id=~\"111|2[0-9]2\"",
            "account_id=~\".*\"",
        ] {
            assert_eq!(values(unknown), None, "{unknown}");
        }
    }
}
