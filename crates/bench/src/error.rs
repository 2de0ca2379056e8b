//! [`BenchError`], the one error type of the benchmark tool.

/// What stopped a benchmark run, or one request of it.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The topology could not be set up: a process did not start, a login failed, a tool is
    /// missing.
    #[error("{0}")]
    Setup(String),
    /// A request failed in transport (connect, write, read); the load generator counts these.
    #[error("{0}")]
    Transport(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("seeding the store: {0}")]
    Store(#[from] sitegate_store::StoreError),
}

impl BenchError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let context = context.into();
        move |source| BenchError::Io { context, source }
    }
}
