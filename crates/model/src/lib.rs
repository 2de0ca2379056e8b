//! `sitegate-model` is the wire boundary of sitegate: every type that is serialized to or from
//! JSON (tasks, sessions, sites, the error envelope), the configuration file's shape, and the
//! pure parsing and validation of what callers send (task IDs, site names, operation IDs, the
//! task query string, task writes).
//!
//! It is not a place for I/O: nothing here opens a file, a socket or a database, so every rule
//! in it can be tested as a table of inputs and outputs. The store and the gateway depend on it;
//! it depends on neither.
//!
//! Modules:
//! - [`error`]: the error codes of the API, their HTTP status, and the `{code,msg,args,stacktrace}`
//!   envelope; [`ModelError`], the one error type of this crate (always a caller's mistake).
//! - [`task`]: the task object, task writes (`NewTask`, `TaskPatch`) and their validation.
//! - [`query`]: the `GET /tasks` query string parsed into a [`query::TaskQuery`].
//! - [`watch`]: the blocking-read query of `GET /tasks/{id}` (`waitForChange`, `timeout`,
//!   `lastUpdated`).
//! - [`fanout`]: all-sites queries (`site=*`): the per-site query and the merge of pages.
//! - [`session`]: login, session details, roles, users file entries.
//! - [`site`]: validated [`site::SiteName`], the `/sites` objects.
//! - [`operation`]: the validated [`operation::OperationId`].
//! - [`config`]: the TOML configuration of one site, with defaults and validation.
//! - [`diagnostics`]: the `/diagnostics/about` and `/diagnostics/health` answers.

pub mod config;
pub mod diagnostics;
pub mod error;
pub mod fanout;
pub mod operation;
pub mod query;
pub mod session;
pub mod site;
pub mod task;
pub mod watch;

pub use error::{ErrorCode, ErrorEnvelope, ModelError};

/// Milliseconds since the Unix epoch, the API's only time unit; `-1` means "not yet".
pub type EpochMillis = i64;

/// The `endTime` of a task that has not finished.
pub const NOT_YET: EpochMillis = -1;
