//! Users, logins and sessions.
//!
//! A session token is 256 random bits, handed to the caller once; the store keeps only its
//! SHA-256, looked up by that hash, so neither a database copy nor a timing side channel on
//! the comparison reveals a usable token. Passwords are checked with argon2 on the blocking
//! pool, a few at a time, so logins cannot starve request handling of CPU or memory.

use std::collections::HashMap;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sitegate_model::session::{RemoteSession, Role, UserEntry, UsersFile};
use sitegate_store::{now_millis, SessionRecord, Store, StoreError, TokenHash};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::error::{ApiError, GatewayError};
use crate::throttle::AddressKey;
use crate::throttle::LoginThrottle;

/// The header that carries the session token, as the original API names it.
pub const AUTH_HEADER: &str = "X-VCAV-Auth";

/// `last_seen` is written at most this often per session (or every half idle timeout, if that
/// is shorter): idle expiry stays accurate and reads do not turn into writes.
const TOUCH_INTERVAL_MS: i64 = 60_000;

/// Hashes a password for a users file (argon2id, default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A PHC string shaped like `hash_password`'s (argon2id, default parameters, random salt) whose
/// hash is random bytes, so no password matches it and checking one against it costs a real
/// check. It is built without running argon2, whose ~19 MiB the allocator keeps until later
/// allocations purge it: an idle site's peak RSS was 42.6 MiB with a hashed decoy, 23.5 without.
fn decoy_hash() -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let hash = argon2::password_hash::Output::new(&bytes).map_err(|e| e.to_string())?;
    let params = argon2::Params::default();
    Ok(format!(
        "$argon2id$v=19$m={},t={},p={}${}${hash}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        salt.as_str(),
    ))
}

/// The users of this site, loaded once at start.
pub(crate) struct Users {
    by_name: HashMap<String, UserEntry>,
    /// Checked against when the user is unknown, so an unknown name costs the same time as a
    /// wrong password and names cannot be probed by timing.
    decoy_hash: String,
}

impl Users {
    pub(crate) fn from_file(file: UsersFile) -> Result<Self, String> {
        file.validate().map_err(|e| e.to_string())?;
        if file.users.is_empty() {
            return Err(
                "it names no users, so nobody could log in; add [[user]] tables \
                 (`sitegate init` writes a users file)"
                    .into(),
            );
        }
        for u in &file.users {
            let parsed = PasswordHash::new(&u.password_hash)
                .map_err(|e| format!("user '{}': bad password_hash: {e}", u.name))?;
            // A PHC string can parse without a salt or a hash, and then no password matches.
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(format!(
                    "user '{}': password_hash has no salt or no hash",
                    u.name
                ));
            }
        }
        let decoy_hash = decoy_hash()?;
        Ok(Users {
            by_name: file
                .users
                .into_iter()
                .map(|u| (u.name.clone(), u))
                .collect(),
            decoy_hash,
        })
    }

    pub(crate) fn load(path: &Path) -> Result<Self, GatewayError> {
        let err = |reason: String| GatewayError::Users {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        warn_if_readable_by_others(path, "users file (password hashes)", 0o007);
        let file: UsersFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        Users::from_file(file).map_err(err)
    }

    /// How many users the file names.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

/// Logs a warning when a file holding secrets has permission bits in `too_open` set (0o007:
/// anyone may read it; 0o077: its group too). It is not refused: mounted secrets are often
/// 0644, and the operator may know why; but it is said at every start and reload.
pub(crate) fn warn_if_readable_by_others(path: &Path, what: &str, too_open: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & too_open != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:04o}"),
                    "the {what} can be read by other users of this machine; chmod 600 it"
                );
            }
        }
    }
}

/// Who is calling, once their token has been checked.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub user: String,
    pub roles: Vec<Role>,
    pub token_hash: TokenHash,
    /// Sessions held at peers for this caller.
    pub extensions: Vec<RemoteSession>,
}

impl Caller {
    pub(crate) fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    pub(crate) fn can_write_tasks(&self) -> bool {
        self.is_admin() || self.roles.contains(&Role::Writer)
    }

    /// The session held at `site`, if the session is extended there.
    pub(crate) fn remote_session(&self, site: &str) -> Option<&RemoteSession> {
        self.extensions.iter().find(|e| e.site == site)
    }

    /// The owner filter for reads: admins see every task, everyone else their own.
    pub(crate) fn visibility(&self) -> Option<&str> {
        if self.is_admin() {
            None
        } else {
            Some(&self.user)
        }
    }
}

/// The outcome of the auth layer, left in the request's extensions for the [`Caller`] extractor.
#[derive(Clone)]
enum AuthOutcome {
    Authenticated(Caller),
    Refused(&'static str),
    StoreFailed(StoreError),
}

/// Logs users in and out and checks tokens.
pub(crate) struct SessionManager {
    store: Arc<dyn Store>,
    /// The users file as last loaded; reloaded when it changes or on SIGHUP, and consulted on
    /// every request, so a removed user or role stops working at once.
    users: arc_swap::ArcSwap<Users>,
    idle_timeout_ms: i64,
    max_age_ms: i64,
    /// Bounds concurrent argon2 checks (each takes ~19 MiB and a core for tens of ms).
    password_checks: Semaphore,
    /// Failed logins per user name and per address; consulted before the password check.
    throttle: LoginThrottle,
}

impl SessionManager {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        users: Users,
        idle: Duration,
        max_age: Duration,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        SessionManager {
            store,
            users: arc_swap::ArcSwap::from_pointee(users),
            idle_timeout_ms: idle.as_millis() as i64,
            max_age_ms: max_age.as_millis() as i64,
            password_checks: Semaphore::new(cores),
            throttle: LoginThrottle::off(),
        }
    }

    /// Throttles failed logins; without this, logins are not throttled at all.
    pub(crate) fn with_login_throttle(mut self, throttle: LoginThrottle) -> Self {
        self.throttle = throttle;
        self
    }

    /// Checks a user's password; on success stores a new session and returns its token.
    /// `address` is the client's, when the attempt should also count against it. A name or
    /// address locked by too many failures is refused before its password is checked, so a
    /// locked name cannot be guessed at, nor the CPU spent on argon2 for it.
    pub(crate) async fn login(
        &self,
        user: &str,
        password: &str,
        address: Option<AddressKey>,
    ) -> Result<(String, Caller), ApiError> {
        self.throttle
            .check(user, address.as_ref(), Instant::now())
            .map_err(|locked| ApiError::TooManyAttempts {
                retry_after: locked.retry_after,
            })?;
        let users = self.users.load_full();
        let entry = users.by_name.get(user);
        let hash = entry.map_or(users.decoy_hash.clone(), |u| u.password_hash.clone());
        let password = password.to_owned();
        let ok = {
            let _slot = self
                .password_checks
                .acquire()
                .await
                .map_err(|_| ApiError::Internal("password check pool closed".into()))?;
            tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash)
                    .map(|parsed| {
                        Argon2::default()
                            .verify_password(password.as_bytes(), &parsed)
                            .is_ok()
                    })
                    .unwrap_or(false)
            })
            .await
            .map_err(|e| ApiError::Internal(format!("password check failed: {e}")))?
        };
        match (ok, entry) {
            (true, Some(entry)) => {
                self.throttle.record_success(user);
                self.issue(entry, entry.roles.clone(), None).await
            }
            _ => match self
                .throttle
                .record_failure(user, address.as_ref(), Instant::now())
            {
                // The failure that reaches the limit already says when to come back.
                Some(locked) => Err(ApiError::TooManyAttempts {
                    retry_after: locked.retry_after,
                }),
                None => Err(ApiError::NotAuthenticated("Wrong user name or password.")),
            },
        }
    }

    /// The organisation `user` acts in here (session details' `org`).
    pub(crate) fn org_of(&self, user: &str) -> String {
        self.users
            .load()
            .by_name
            .get(user)
            .and_then(|u| u.org.clone())
            .unwrap_or_else(|| sitegate_model::session::DEFAULT_ORG.to_owned())
    }

    /// Puts a newly loaded users file in force; sessions follow it from the next request.
    pub(crate) fn replace_users(&self, users: Users) {
        self.users.store(Arc::new(users));
    }

    /// A session for a user of this site without a password, for a peer this site trusts to
    /// vouch for its users (`multisite`), usable only by that peer over the peer link. A
    /// peer vouches for an identity, not for a privilege: the session is at most role
    /// `user` (an administrator's too), `admin` only where `admin_trusted`
    /// (`trust_multisite_admin`), and never `writer` (the site's own services write tasks
    /// here, not another site). Unknown users, and users with no role a peer may assert, get
    /// none.
    pub(crate) async fn issue_for_trusted_peer(
        &self,
        user: &str,
        peer: &sitegate_model::site::SiteName,
        admin_trusted: bool,
    ) -> Result<(String, Caller), ApiError> {
        let users = self.users.load_full();
        let Some(entry) = users.by_name.get(user) else {
            return Err(ApiError::NotAuthenticated("No such user at this site."));
        };
        let mut roles = Vec::new();
        for role in &entry.roles {
            let granted = match role {
                Role::Admin if admin_trusted => Some(Role::Admin),
                Role::Admin | Role::User => Some(Role::User),
                Role::Writer => None,
            };
            if let Some(r) = granted.filter(|r| !roles.contains(r)) {
                roles.push(r);
            }
        }
        if roles.is_empty() {
            return Err(ApiError::Forbidden(
                "A peer may obtain sessions only for users with role user or admin.",
            ));
        }
        self.issue(entry, roles, Some(peer.to_string())).await
    }

    async fn issue(
        &self,
        entry: &UserEntry,
        roles: Vec<Role>,
        bound_peer: Option<String>,
    ) -> Result<(String, Caller), ApiError> {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = now_millis();
        let record = SessionRecord {
            token_hash: token_hash(&token),
            user: entry.name.clone(),
            roles,
            created: now,
            last_seen: now,
            extensions: Vec::new(),
            bound_peer,
        };
        let caller = Caller {
            user: record.user.clone(),
            roles: record.roles.clone(),
            token_hash: record.token_hash,
            extensions: Vec::new(),
        };
        self.store.create_session(record).await?;
        Ok((token, caller))
    }

    /// Resolves a token to its caller, ending the session if it has expired. `origin` is the
    /// peer site a request came from over the peer link, if it did.
    async fn authenticate(
        &self,
        token: &str,
        origin: Option<&sitegate_model::site::SiteName>,
    ) -> Result<Caller, AuthOutcome> {
        // A real token is 43 URL-safe characters; anything else cannot match and is not
        // worth a store lookup.
        if token.len() != 43 {
            return Err(AuthOutcome::Refused("The session token is not valid."));
        }
        let hash = token_hash(token);
        let record = match self.store.get_session(hash).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(AuthOutcome::Refused(
                    "The session has ended or never existed.",
                ))
            }
            Err(e) => return Err(AuthOutcome::StoreFailed(e)),
        };
        if !bool::from(record.token_hash.ct_eq(&hash)) {
            return Err(AuthOutcome::Refused(
                "The session has ended or never existed.",
            ));
        }
        // A session issued to a peer works only for that peer, over the peer link: its token
        // alone, from that site's database or anywhere else, opens nothing here.
        if let Some(bound) = &record.bound_peer {
            if origin.map(|o| o.as_str()) != Some(bound.as_str()) {
                tracing::warn!(peer = %bound, from_peer = ?origin.map(|o| o.as_str()), "a peer's session was presented by someone else");
                return Err(AuthOutcome::Refused(
                    "This session belongs to a peer site and is valid only on its peer link.",
                ));
            }
        }
        let now = now_millis();
        if self.lapsed(&record, now) {
            if let Err(e) = self.store.delete_session(hash).await {
                tracing::warn!(error = %e, "could not delete an expired session");
            }
            return Err(AuthOutcome::Refused(
                "The session has expired; log in again.",
            ));
        }
        if now - record.last_seen > TOUCH_INTERVAL_MS.min(self.idle_timeout_ms / 2) {
            // Off the request path: a lost touch only shortens the session's idle window.
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.touch_session(hash, now).await {
                    tracing::warn!(error = %e, "could not record session use");
                }
            });
        }
        // The users file decides, now: a user removed from it has no session left, and a
        // session has at most the roles the user has now (and at most those it was issued).
        let users = self.users.load();
        let Some(entry) = users.by_name.get(&record.user) else {
            if let Err(e) = self.store.delete_session(hash).await {
                tracing::warn!(error = %e, "could not delete the session of a removed user");
            }
            return Err(AuthOutcome::Refused(
                "The user is no longer known at this site.",
            ));
        };
        let roles = record
            .roles
            .into_iter()
            .filter(|r| {
                entry.roles.contains(r) || (*r == Role::User && entry.roles.contains(&Role::Admin))
            })
            .collect();
        Ok(Caller {
            user: record.user,
            roles,
            token_hash: hash,
            extensions: record.extensions,
        })
    }

    /// Whether `user` may try a credentials extension to `site` now (429 when locked).
    pub(crate) fn check_extension(&self, user: &str, site: &str) -> Result<(), ApiError> {
        self.throttle
            .check_extension(user, site, Instant::now())
            .map_err(|l| ApiError::TooManyAttempts {
                retry_after: l.retry_after,
            })
    }

    /// A credentials extension was refused by the peer; 429 once that locks the pair.
    pub(crate) fn extension_failed(&self, user: &str, site: &str) -> Result<(), ApiError> {
        match self
            .throttle
            .record_extension_failure(user, site, Instant::now())
        {
            Some(l) => Err(ApiError::TooManyAttempts {
                retry_after: l.retry_after,
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn extension_succeeded(&self, user: &str, site: &str) {
        self.throttle.record_extension_success(user, site);
    }

    /// Whether the caller's session still stands: not logged out, not expired, its user still
    /// in the users file. Held requests ask this as they wait, so a logout or an expiry ends
    /// them, not only the next request.
    pub(crate) async fn is_alive(&self, caller: &Caller) -> bool {
        let Ok(Some(record)) = self.store.get_session(caller.token_hash).await else {
            return false;
        };
        !self.lapsed(&record, now_millis()) && self.users.load().by_name.contains_key(&record.user)
    }

    /// Whether a session has ended by time: idle too long, or older than the maximum age.
    fn lapsed(&self, record: &SessionRecord, now: i64) -> bool {
        now - record.last_seen > self.idle_timeout_ms || now - record.created > self.max_age_ms
    }

    /// Keeps `remote` in the caller's session; every replica and a restart see it.
    pub(crate) async fn add_extension(
        &self,
        caller: &mut Caller,
        remote: RemoteSession,
    ) -> Result<(), ApiError> {
        if !self
            .store
            .put_extension(caller.token_hash, remote.clone())
            .await?
        {
            return Err(ApiError::SessionRequired("The session has ended."));
        }
        caller.extensions.retain(|e| e.site != remote.site);
        caller.extensions.push(remote);
        Ok(())
    }

    /// Drops the session held at `site`; returns it so it can be logged out there.
    pub(crate) async fn remove_extension(
        &self,
        caller: &mut Caller,
        site: &str,
    ) -> Result<Option<RemoteSession>, ApiError> {
        let removed = self.store.remove_extension(caller.token_hash, site).await?;
        caller.extensions.retain(|e| e.site != site);
        Ok(removed)
    }

    pub(crate) async fn logout(&self, caller: &Caller) -> Result<(), ApiError> {
        self.store.delete_session(caller.token_hash).await?;
        Ok(())
    }

    /// Deletes expired sessions; run periodically so the table does not grow without bound.
    pub(crate) async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now_millis();
        self.store
            .purge_sessions(now - self.idle_timeout_ms, now - self.max_age_ms)
            .await
    }
}

pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The auth layer: resolves the `X-VCAV-Auth` token, when there is one, before routing. Handlers
/// that need a caller take the [`Caller`] extractor, which turns a missing or refused token
/// into `NotAuthenticated`; the operations endpoints and login do not, so they never fail here.
pub(crate) async fn authenticate(
    State(sessions): State<Arc<SessionManager>>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(AUTH_HEADER)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if let Some(token) = token {
        let origin = req
            .extensions()
            .get::<crate::layers::PeerOrigin>()
            .map(|o| o.0.clone());
        let outcome = match sessions.authenticate(&token, origin.as_ref()).await {
            Ok(caller) => AuthOutcome::Authenticated(caller),
            Err(outcome) => outcome,
        };
        req.extensions_mut().insert(outcome);
    }
    next.run(req).await
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<AuthOutcome>() {
            Some(AuthOutcome::Authenticated(caller)) => Ok(caller.clone()),
            Some(AuthOutcome::Refused(why)) => Err(ApiError::SessionRequired(why)),
            Some(AuthOutcome::StoreFailed(e)) => Err(ApiError::Store(e.clone())),
            None => Err(ApiError::SessionRequired(
                "Log in first: POST /sessions, then send the token in the X-VCAV-Auth header.",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hashes_verify_and_differ() {
        let a = hash_password("pw").unwrap();
        let b = hash_password("pw").unwrap();
        assert_ne!(a, b, "salted");
        let parsed = PasswordHash::new(&a).unwrap();
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"px", &parsed).is_err());
    }

    #[test]
    fn the_decoy_is_shaped_like_a_real_hash_and_matches_nothing() {
        let real_text = hash_password("pw").unwrap();
        let real = PasswordHash::new(&real_text).unwrap();
        let decoy_text = decoy_hash().unwrap();
        let decoy = PasswordHash::new(&decoy_text).unwrap();
        assert_ne!(decoy_text, decoy_hash().unwrap(), "random each time");
        // Same algorithm, version, parameters and lengths: checking against it costs what
        // checking a real user's password costs.
        assert_eq!(decoy.algorithm, real.algorithm);
        assert_eq!(decoy.version, real.version);
        assert_eq!(decoy.params, real.params);
        assert_eq!(decoy.salt.map(|s| s.len()), real.salt.map(|s| s.len()));
        assert_eq!(decoy.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
        for guess in ["", "pw", "password"] {
            assert!(Argon2::default()
                .verify_password(guess.as_bytes(), &decoy)
                .is_err());
        }
    }

    #[test]
    fn users_file_is_validated() {
        let good = UsersFile {
            users: vec![UserEntry {
                name: "alice".into(),
                roles: vec![Role::User],
                password_hash: hash_password("pw").unwrap(),
                org: None,
            }],
        };
        assert!(Users::from_file(good.clone()).is_ok());
        let mut bad = good;
        bad.users[0].password_hash = "$argon2id$garbage".into();
        assert!(Users::from_file(bad).is_err());
    }

    #[test]
    fn token_hash_is_sha256() {
        assert_eq!(
            hex(&token_hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
