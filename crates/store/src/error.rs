//! The store's one error type.

use uuid::Uuid;

/// Why a store call failed. `Clone`, because one failed group commit fails every write in it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("task {0} does not exist")]
    TaskNotFound(Uuid),
    #[error("task {0} is in a final state and cannot change")]
    TaskAlreadyFinal(Uuid),
    /// The write contradicts stored data (an existing ID with another body, too many warnings).
    #[error("{0}")]
    Rejected(String),
    /// The database failed: I/O, a full disk, a lock that did not clear.
    #[error("database error: {0}")]
    Database(String),
    /// Stored data could not be read back (a bug or a damaged file).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// The store's threads have stopped (shutdown).
    #[error("the store is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}
