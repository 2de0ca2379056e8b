//! The API's error codes and the error envelope every response of status >= 400 carries.

use serde::{Deserialize, Serialize};

/// The error codes of the API (API.md, "Errors"), each with its HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadUserInput,
    NotAuthenticated,
    RemoteAuthenticationFailure,
    Forbidden,
    SiteNotFound,
    TaskNotFound,
    TaskAlreadyCompleted,
    RemoteSiteUnavailable,
    RemoteSiteTimeout,
    GeneralServerFailure,
    /// No such endpoint (a path the API does not have).
    NotFound,
    /// One caller holds as many requests as it may (held reads, streams); `Retry-After`.
    TooManyRequests,
    /// The site is at its limit of requests in progress; `Retry-After`.
    ServerBusy,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::BadUserInput,
        ErrorCode::NotAuthenticated,
        ErrorCode::RemoteAuthenticationFailure,
        ErrorCode::Forbidden,
        ErrorCode::SiteNotFound,
        ErrorCode::TaskNotFound,
        ErrorCode::TaskAlreadyCompleted,
        ErrorCode::RemoteSiteUnavailable,
        ErrorCode::RemoteSiteTimeout,
        ErrorCode::GeneralServerFailure,
        ErrorCode::NotFound,
        ErrorCode::TooManyRequests,
        ErrorCode::ServerBusy,
    ];

    /// The code as it appears in the envelope's `code` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadUserInput => "BadUserInput",
            ErrorCode::NotAuthenticated => "NotAuthenticated",
            ErrorCode::RemoteAuthenticationFailure => "RemoteAuthenticationFailure",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::SiteNotFound => "SiteNotFound",
            ErrorCode::TaskNotFound => "TaskNotFound",
            ErrorCode::TaskAlreadyCompleted => "TaskAlreadyCompleted",
            ErrorCode::RemoteSiteUnavailable => "RemoteSiteUnavailable",
            ErrorCode::RemoteSiteTimeout => "RemoteSiteTimeout",
            ErrorCode::GeneralServerFailure => "GeneralServerFailure",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::TooManyRequests => "TooManyRequests",
            ErrorCode::ServerBusy => "ServerBusy",
        }
    }

    /// The HTTP status the API answers with for this code, unless a more specific transport
    /// status (413, 405, ...) applies to a `BadUserInput`.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadUserInput => 400,
            ErrorCode::NotAuthenticated | ErrorCode::RemoteAuthenticationFailure => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::SiteNotFound | ErrorCode::TaskNotFound | ErrorCode::NotFound => 404,
            ErrorCode::TaskAlreadyCompleted => 409,
            ErrorCode::RemoteSiteUnavailable => 502,
            ErrorCode::RemoteSiteTimeout => 504,
            ErrorCode::GeneralServerFailure => 500,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::ServerBusy => 503,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"code","msg","args","stacktrace"}`: the body of every error response, and the shape of a
/// task's `error` and `warnings`. `code` is a free string because task errors and peers may
/// carry codes this gateway does not define.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub code: String,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Always present on the wire; never holds internals (empty unless debug detail is enabled).
    #[serde(default)]
    pub stacktrace: String,
}

impl ErrorEnvelope {
    pub fn new(code: ErrorCode, msg: impl Into<String>, args: Vec<String>) -> Self {
        ErrorEnvelope {
            code: code.as_str().to_owned(),
            msg: msg.into(),
            args,
            stacktrace: String::new(),
        }
    }
}

/// What is wrong with something a caller sent. Every variant is the caller's mistake and maps
/// to `BadUserInput`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        ModelError::Invalid(msg.into())
    }
}

/// Shortens a caller-supplied value before it is echoed in an error message, so that a
/// megabyte of input never becomes a megabyte of output.
pub fn echo(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        value.to_owned()
    } else {
        let mut short: String = value.chars().take(MAX).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_contract_table() {
        let table = [
            ("BadUserInput", 400),
            ("NotAuthenticated", 401),
            ("RemoteAuthenticationFailure", 401),
            ("Forbidden", 403),
            ("SiteNotFound", 404),
            ("TaskNotFound", 404),
            ("TaskAlreadyCompleted", 409),
            ("RemoteSiteUnavailable", 502),
            ("RemoteSiteTimeout", 504),
            ("GeneralServerFailure", 500),
            ("NotFound", 404),
            ("TooManyRequests", 429),
            ("ServerBusy", 503),
        ];
        for (code, (name, status)) in ErrorCode::ALL.iter().zip(table) {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.http_status(), status, "{name}");
        }
    }

    #[test]
    fn envelope_always_has_all_four_fields() {
        let env = ErrorEnvelope::new(ErrorCode::TaskNotFound, "no such task", vec!["x".into()]);
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code":"TaskNotFound","msg":"no such task","args":["x"],"stacktrace":""})
        );
    }

    #[test]
    fn envelope_parses_the_seed_example_and_sparse_forms() {
        let seed = r#"{"args":[],"code":"Forbidden","msg":"Permission denied.","stacktrace":"x"}"#;
        let env: ErrorEnvelope = serde_json::from_str(seed).unwrap();
        assert_eq!(env.code, "Forbidden");
        let sparse: ErrorEnvelope = serde_json::from_str(r#"{"code":"X"}"#).unwrap();
        assert_eq!(sparse.msg, "");
        assert!(sparse.args.is_empty());
    }

    #[test]
    fn echo_bounds_long_values() {
        assert_eq!(echo("site1"), "site1");
        let long = "a".repeat(5000);
        assert_eq!(echo(&long).chars().count(), 65);
    }
}
