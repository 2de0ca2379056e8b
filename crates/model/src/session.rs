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
    /// The organisation the session acts in at that site (`org` of a `multisite` extension,
    /// else what the peer reported). Absent in sessions stored before it was kept.
    #[serde(default)]
    pub org: Option<String>,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("site", &self.site)
            .field("user", &self.user)
            .field("token", &"<redacted>")
            .field("org", &self.org)
            .finish()
    }
}

/// `POST /sessions/extend` body, in the original API's field names (`vcdUsername`,
/// `vcdPassword`); `vcdUser` (which a public client sends) and `username`/`password` are
/// accepted too.
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ExtendRequest {
    /// Log in at the peer with that peer's credentials.
    #[serde(rename_all = "camelCase")]
    Credentials {
        #[schema(min_length = 1)]
        site: String,
        #[serde(alias = "vcdUser", alias = "username")]
        vcd_username: String,
        #[serde(alias = "password")]
        vcd_password: String,
    },
    /// Ask the peer for a session for the same user name; granted only if the peer trusts this
    /// site to assert identities. `org` is the organisation to act in there.
    Multisite {
        #[schema(min_length = 1)]
        site: String,
        #[serde(default)]
        org: Option<String>,
    },
    /// The original's extension with a vCloud Director session cookie: recognised, so the
    /// answer can name what is supported (sitegate sites have no vCloud Director).
    Cookie(UnsupportedExtension),
    /// The original's extension with a vCloud Director access token: recognised, refused.
    VcdAccessToken(UnsupportedExtension),
}

/// The fields of an extension kind sitegate recognises but does not support, read and
/// dropped unseen (they hold a vCloud Director cookie or token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, utoipa::ToSchema)]
pub struct UnsupportedExtension;

impl<'de> Deserialize<'de> for UnsupportedExtension {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| UnsupportedExtension)
    }
}

impl ExtendRequest {
    /// The peer named, for the kinds sitegate supports.
    pub fn site(&self) -> Option<&str> {
        match self {
            ExtendRequest::Credentials { site, .. } | ExtendRequest::Multisite { site, .. } => {
                Some(site)
            }
            ExtendRequest::Cookie(_) | ExtendRequest::VcdAccessToken(_) => None,
        }
    }
}

impl std::fmt::Debug for ExtendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExtendRequest::Credentials {
                site, vcd_username, ..
            } => f
                .debug_struct("Credentials")
                .field("site", site)
                .field("vcd_username", vcd_username)
                .field("vcd_password", &"<redacted>")
                .finish(),
            ExtendRequest::Multisite { site, org } => f
                .debug_struct("Multisite")
                .field("site", site)
                .field("org", org)
                .finish(),
            ExtendRequest::Cookie(_) => f.write_str("Cookie(<redacted>)"),
            ExtendRequest::VcdAccessToken(_) => f.write_str("VcdAccessToken(<redacted>)"),
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
    /// The organisation the session acts in at that site, as the original names it.
    #[serde(default)]
    pub org: String,
}

/// The organisation of a user whose users-file entry names none: vCloud Director's name for
/// the provider organisation, which the original's appliance-local users act in.
pub const DEFAULT_ORG: &str = "System";

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
    /// The organisation the user acts in (session details' `org`); default [`DEFAULT_ORG`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
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
                org: "Org1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"user":"alice","roles":["user"],"authenticatedSites":[{"site":"site1","org":"Org1"}]})
        );
    }

    #[test]
    fn extend_bodies() {
        // The original's documented fields, the spelling a public client uses, and ours.
        for body in [
            r#"{"type":"credentials","site":"site2","vcdUsername":"a","vcdPassword":"secret"}"#,
            r#"{"type":"credentials","site":"site2","vcdUser":"a","vcdPassword":"secret"}"#,
            r#"{"type":"credentials","site":"site2","username":"a","password":"secret"}"#,
        ] {
            let c: ExtendRequest = serde_json::from_str(body).unwrap();
            assert_eq!(c.site(), Some("site2"));
            let ExtendRequest::Credentials {
                vcd_username,
                vcd_password,
                ..
            } = &c
            else {
                panic!("{body}: {c:?}");
            };
            assert_eq!(
                (vcd_username.as_str(), vcd_password.as_str()),
                ("a", "secret")
            );
            assert!(!format!("{c:?}").contains("secret"));
        }
        let m: ExtendRequest =
            serde_json::from_str(r#"{"type":"multisite","site":"site3","org":"Org1"}"#).unwrap();
        assert_eq!(m.site(), Some("site3"));
        assert!(matches!(m, ExtendRequest::Multisite { org: Some(ref o), .. } if o == "Org1"));
        let m: ExtendRequest =
            serde_json::from_str(r#"{"type":"multisite","site":"site3"}"#).unwrap();
        assert!(matches!(m, ExtendRequest::Multisite { org: None, .. }));
        // Recognised but unsupported kinds parse, so the gateway can say what is supported.
        for body in [
            r#"{"type":"cookie","site":"s","cookie":"abc"}"#,
            r#"{"type":"vcdAccessToken","site":"s","vcdAccessToken":"abc"}"#,
        ] {
            let e: ExtendRequest = serde_json::from_str(body).unwrap();
            assert_eq!(e.site(), None);
            assert!(!format!("{e:?}").contains("abc"));
        }
        assert!(serde_json::from_str::<ExtendRequest>(r#"{"type":"multisite"}"#).is_err());
        assert!(serde_json::from_str::<ExtendRequest>(r#"{"type":"x","site":"a"}"#).is_err());
        assert!(serde_json::from_str::<ExtendRequest>(
            r#"{"type":"credentials","site":"a","vcdUsername":"u","vcdPassword":"p","extra":1}"#
        )
        .is_err());
        let r = RemoteSession {
            site: "s".into(),
            user: "u".into(),
            token: "tok123".into(),
            org: None,
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
