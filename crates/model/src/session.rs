//! Logins, sessions and users.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// What a user may do. `Admin` sees every task and may filter by user; `Writer` is a site's own
/// service that creates and updates tasks; `User` reads its own tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
    Writer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Writer => "writer",
        }
    }
}

/// The longest user name accepted.
pub const MAX_USER_NAME_LEN: usize = 64;

/// User names are 1..=64 of letters, digits and `._@-`, so they are safe in logs and URLs.
pub fn validate_user_name(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_USER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ModelError::invalid(format!(
            "'{}' is not a valid user name: use 1 to {MAX_USER_NAME_LEN} letters, digits and . _ @ -",
            crate::error::echo(name)
        )))
    }
}

/// `POST /sessions` body.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum LoginRequest {
    #[serde(rename_all = "camelCase")]
    LocalUser {
        local_user: String,
        local_password: String,
    },
}

impl std::fmt::Debug for LoginRequest {
    // Passwords are never logged, not even by a stray `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginRequest::LocalUser { local_user, .. } => f
                .debug_struct("LocalUser")
                .field("local_user", local_user)
                .field("local_password", &"<redacted>")
                .finish(),
        }
    }
}

/// A session this site holds at a peer on a user's behalf (`POST /sessions/extend`). The token
/// is the peer's; it is sent only to that peer, over the peer link.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSession {
    pub site: String,
    pub user: String,
    pub token: String,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("site", &self.site)
            .field("user", &self.user)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// `POST /sessions/extend` body.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ExtendRequest {
    /// Log in at the peer with that peer's credentials.
    Credentials {
        #[schema(min_length = 1)]
        site: String,
        username: String,
        password: String,
    },
    /// Ask the peer for a session for the same user name; granted only if the peer trusts this
    /// site to assert identities.
    Multisite {
        #[schema(min_length = 1)]
        site: String,
    },
}

impl ExtendRequest {
    pub fn site(&self) -> &str {
        match self {
            ExtendRequest::Credentials { site, .. } | ExtendRequest::Multisite { site } => site,
        }
    }
}

impl std::fmt::Debug for ExtendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExtendRequest::Credentials { site, username, .. } => f
                .debug_struct("Credentials")
                .field("site", site)
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            ExtendRequest::Multisite { site } => {
                f.debug_struct("Multisite").field("site", site).finish()
            }
        }
    }
}

/// The body a site sends to a peer's `POST /peer/sessions` to ask for a `multisite` session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultisiteSessionRequest {
    pub user: String,
}

/// One site this session may act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuthenticatedSite {
    pub site: String,
}

/// Session details, the body of `POST /sessions` and `GET /sessions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDetails {
    pub user: String,
    pub roles: Vec<Role>,
    pub authenticated_sites: Vec<AuthenticatedSite>,
}

/// One user in a site's users file. Only the argon2 PHC hash of the password is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub roles: Vec<Role>,
    pub password_hash: String,
}

/// The users file: `[[user]]` tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default, rename = "user")]
    pub users: Vec<UserEntry>,
}

impl UsersFile {
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            validate_user_name(&u.name)?;
            if !seen.insert(u.name.as_str()) {
                return Err(ModelError::invalid(format!(
                    "user '{}' is listed twice",
                    u.name
                )));
            }
            if u.roles.is_empty() {
                return Err(ModelError::invalid(format!(
                    "user '{}' has no role",
                    u.name
                )));
            }
            if !u.password_hash.starts_with("$argon2") {
                return Err(ModelError::invalid(format!(
                    "user '{}' needs an argon2 password_hash (PHC string)",
                    u.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_body() {
        let ok: LoginRequest = serde_json::from_str(
            r#"{"type":"localUser","localUser":"alice","localPassword":"pw"}"#,
        )
        .unwrap();
        assert!(format!("{ok:?}").contains("redacted"));
        assert!(!format!("{ok:?}").contains("pw\""));
        for bad in [
            r#"{"type":"ldap","localUser":"a","localPassword":"b"}"#,
            r#"{"localUser":"a","localPassword":"b"}"#,
            r#"{"type":"localUser","localUser":"a"}"#,
        ] {
            assert!(serde_json::from_str::<LoginRequest>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_details_shape() {
        let d = SessionDetails {
            user: "alice".into(),
            roles: vec![Role::User],
            authenticated_sites: vec![AuthenticatedSite {
                site: "site1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"user":"alice","roles":["user"],"authenticatedSites":[{"site":"site1"}]})
        );
    }

    #[test]
    fn extend_bodies() {
        let c: ExtendRequest = serde_json::from_str(
            r#"{"type":"credentials","site":"site2","username":"a","password":"secret"}"#,
        )
        .unwrap();
        assert_eq!(c.site(), "site2");
        assert!(!format!("{c:?}").contains("secret"));
        let m: ExtendRequest =
            serde_json::from_str(r#"{"type":"multisite","site":"site3"}"#).unwrap();
        assert_eq!(m.site(), "site3");
        assert!(serde_json::from_str::<ExtendRequest>(r#"{"type":"multisite"}"#).is_err());
        assert!(serde_json::from_str::<ExtendRequest>(r#"{"type":"x","site":"a"}"#).is_err());
        let r = RemoteSession {
            site: "s".into(),
            user: "u".into(),
            token: "tok123".into(),
        };
        assert!(!format!("{r:?}").contains("tok123"));
    }

    #[test]
    fn user_names() {
        for ok in ["alice", "svc-1", "a.b@c_d"] {
            assert!(validate_user_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(validate_user_name(bad).is_err(), "{bad}");
        }
    }
}
