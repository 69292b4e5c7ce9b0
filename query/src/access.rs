//! Who may query, and which accounts' rows each credential sees.
//!
//! Users are configured with a password (Postgres wire protocol, SCRAM-SHA-256, and
//! HTTP basic auth) and/or a token (HTTP `Authorization: Bearer`). A user limited to a
//! set of accounts reads every table through a filter on `account_id`, applied where
//! the table is scanned, so joins, subqueries and views cannot get around it; tables
//! without an account column (`dead_letters`) are not visible to such a user at all.
//!
//! With no users configured, access is open (every client is an unrestricted user),
//! which suits the default loopback-only listeners.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// One configured user (`[[query.users]]`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name (the Postgres user name; the HTTP basic-auth user).
    pub name: String,
    /// Password for the Postgres protocol and HTTP basic auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Token for HTTP `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The only accounts whose rows this user sees; every account when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<Vec<String>>,
    /// Owner teams (the account registry's `owner_team`) whose accounts this user
    /// sees, besides `accounts`; resolved against the registry as it is when the user
    /// authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_teams: Option<Vec<String>>,
}

/// Passwords and tokens are secrets: never printed.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("accounts", &self.accounts)
            .field("owner_teams", &self.owner_teams)
            .finish()
    }
}

/// An authenticated caller: its name and the accounts it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's name.
    pub name: String,
    /// `Some`: only these accounts' rows are visible. `None`: every row.
    pub accounts: Option<Arc<BTreeSet<String>>>,
}

impl Principal {
    /// A caller that sees everything.
    pub fn unrestricted(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            accounts: None,
        }
    }

    /// A caller limited to `accounts`.
    pub fn limited_to(name: impl Into<String>, accounts: impl IntoIterator<Item = String>) -> Self {
        Self {
            name: name.into(),
            accounts: Some(Arc::new(accounts.into_iter().collect())),
        }
    }
}

/// The accounts of the given owner teams, from the account registry.
pub type TeamAccounts = Arc<dyn Fn(&[String]) -> Vec<String> + Send + Sync>;

/// The configured users.
#[derive(Clone, Default)]
pub struct Access {
    users: Vec<User>,
    teams: Option<TeamAccounts>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("users", &self.users.len())
            .field("teams", &self.teams.is_some())
            .finish()
    }
}

/// Why a configuration of users is refused.
#[derive(Debug, thiserror::Error)]
#[error("query.users[{index}]: {message}")]
pub struct AccessConfigError {
    index: usize,
    message: String,
}

impl Access {
    /// Checks `users`: unique names and tokens, a credential each, account ids of 12
    /// digits.
    pub fn new(users: Vec<User>) -> Result<Self, AccessConfigError> {
        let mut names = BTreeSet::new();
        let mut tokens = BTreeSet::new();
        for (index, user) in users.iter().enumerate() {
            let fail = |message: String| Err(AccessConfigError { index, message });
            if user.name.is_empty() {
                return fail("name must not be empty".into());
            }
            if !names.insert(user.name.as_str()) {
                return fail(format!("user {:?} is configured twice", user.name));
            }
            if user.password.is_none() && user.token.is_none() {
                return fail(format!("user {:?} needs a password or a token", user.name));
            }
            if let Some(token) = &user.token
                && !tokens.insert(token.as_str())
            {
                return fail(format!(
                    "user {:?} shares its token with another user",
                    user.name
                ));
            }
            for account in user.accounts.iter().flatten() {
                if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
                    return fail(format!(
                        "user {:?}: account {account:?} is not a 12-digit AWS account id",
                        user.name
                    ));
                }
            }
        }
        Ok(Self { users, teams: None })
    }

    /// The same users, with owner teams resolved by `teams` (the account registry).
    /// Without it, a user's `owner_teams` adds no account.
    pub fn with_teams(mut self, teams: TeamAccounts) -> Self {
        self.teams = Some(teams);
        self
    }

    fn principal_of(&self, user: &User) -> Principal {
        if user.accounts.is_none() && user.owner_teams.is_none() {
            return Principal::unrestricted(&user.name);
        }
        let mut accounts: Vec<String> = user.accounts.clone().unwrap_or_default();
        if let (Some(teams), Some(resolve)) = (&user.owner_teams, &self.teams) {
            accounts.extend(resolve(teams));
        }
        Principal::limited_to(&user.name, accounts)
    }

    /// No users configured: every client gets in, unrestricted.
    pub fn is_open(&self) -> bool {
        self.users.is_empty()
    }

    /// The user named `name`, if configured.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Names of the configured users.
    pub fn user_names(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|u| u.name.as_str())
    }

    /// The principal of user `name` (open access: an unrestricted one).
    pub fn principal(&self, name: &str) -> Option<Principal> {
        if self.is_open() {
            return Some(Principal::unrestricted(name));
        }
        self.user(name).map(|u| self.principal_of(u))
    }

    /// The principal whose password is `password`, or `None`.
    pub fn by_password(&self, name: &str, password: &str) -> Option<Principal> {
        let user = self.user(name)?;
        let expected = user.password.as_deref()?;
        bool::from(expected.as_bytes().ct_eq(password.as_bytes())).then(|| self.principal_of(user))
    }

    /// The principal holding `token`, or `None`.
    pub fn by_token(&self, token: &str) -> Option<Principal> {
        self.users
            .iter()
            .filter(|u| {
                u.token
                    .as_deref()
                    .is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.as_bytes())))
            })
            .map(|u| self.principal_of(u))
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, password: Option<&str>, token: Option<&str>, accounts: &[&str]) -> User {
        User {
            name: name.into(),
            password: password.map(Into::into),
            token: token.map(Into::into),
            accounts: (!accounts.is_empty())
                .then(|| accounts.iter().map(|a| a.to_string()).collect()),
            owner_teams: None,
        }
    }

    #[test]
    fn credentials_find_their_user_and_scope() {
        let access = Access::new(vec![
            user("ops", Some("secret"), Some("tok-ops"), &[]),
            user("tenant", Some("pw"), Some("tok-t"), &["111122223333"]),
        ])
        .unwrap();
        assert!(!access.is_open());
        assert_eq!(access.by_password("ops", "secret").unwrap().accounts, None);
        assert!(access.by_password("ops", "wrong").is_none());
        assert!(access.by_password("nobody", "secret").is_none());
        let tenant = access.by_token("tok-t").unwrap();
        assert_eq!(tenant.name, "tenant");
        assert!(tenant.accounts.unwrap().contains("111122223333"));
        assert!(access.by_token("tok-x").is_none());
    }

    #[test]
    fn bad_user_lists_are_refused_with_the_entry() {
        let err = Access::new(vec![user("a", None, None, &[])]).unwrap_err();
        assert!(err.to_string().contains("query.users[0]"), "{err}");
        let err = Access::new(vec![
            user("a", Some("x"), None, &[]),
            user("a", Some("y"), None, &[]),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = Access::new(vec![user("a", Some("x"), None, &["12"])]).unwrap_err();
        assert!(err.to_string().contains("12-digit"), "{err}");
    }

    #[test]
    fn open_access_lets_anyone_in_unrestricted() {
        let access = Access::default();
        assert!(access.is_open());
        assert_eq!(access.principal("anyone").unwrap().accounts, None);
    }

    #[test]
    fn owner_teams_resolve_through_the_registry_at_each_login() {
        let mut team = user("payments", Some("pw"), None, &["999999999999"]);
        team.owner_teams = Some(vec!["payments".into()]);
        let registry = Arc::new(std::sync::Mutex::new(vec!["111122223333".to_string()]));
        let live = Arc::clone(&registry);
        let access =
            Access::new(vec![team])
                .unwrap()
                .with_teams(Arc::new(move |teams: &[String]| {
                    assert_eq!(teams, ["payments".to_string()]);
                    live.lock().unwrap().clone()
                }));
        let seen = access
            .by_password("payments", "pw")
            .unwrap()
            .accounts
            .unwrap();
        assert_eq!(
            seen.iter().cloned().collect::<Vec<_>>(),
            ["111122223333", "999999999999"]
        );
        registry.lock().unwrap().push("444455556666".into());
        let seen = access
            .by_password("payments", "pw")
            .unwrap()
            .accounts
            .unwrap();
        assert_eq!(seen.len(), 3, "the registry as it is now");
        // A team with no account in the registry sees nothing, not everything.
        let mut empty = user("ghosts", Some("pw"), None, &[]);
        empty.owner_teams = Some(vec!["nobody".into()]);
        let access = Access::new(vec![empty])
            .unwrap()
            .with_teams(Arc::new(|_: &[String]| Vec::new()));
        assert_eq!(
            access
                .by_password("ghosts", "pw")
                .unwrap()
                .accounts
                .unwrap()
                .len(),
            0
        );
    }
}
