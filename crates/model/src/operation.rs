//! The `operationID` header: one ID that correlates a request's logs and traces everywhere.

use crate::ModelError;

/// The longest operation ID accepted; longer ones are refused rather than cut, so that the ID
/// an operator searches for is exactly the one the caller sent.
pub const MAX_OPERATION_ID_LEN: usize = 128;

/// A validated operation ID: 1..=128 visible ASCII characters, so it can be echoed in a header
/// and written to a log line without escaping.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OperationId(String);

impl OperationId {
    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        if raw.is_empty() {
            return Err(ModelError::invalid("operationID must not be empty"));
        }
        if raw.len() > MAX_OPERATION_ID_LEN {
            return Err(ModelError::invalid(format!(
                "operationID must be at most {MAX_OPERATION_ID_LEN} characters"
            )));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ModelError::invalid(
                "operationID may hold only visible ASCII characters",
            ));
        }
        Ok(OperationId(raw.to_owned()))
    }

    /// A fresh ID for a request that came without one.
    pub fn generate() -> Self {
        OperationId(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for OperationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        let cases: &[(&str, bool)] = &[
            ("f61d60d2-698a-46dc-a266-88df27644956", true),
            ("op-1", true),
            ("a:b/c.d_e", true),
            ("", false),
            ("has space", false),
            ("tab\there", false),
            ("nul\0", false),
            ("bell\x07", false),
            ("ünïcode", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(OperationId::parse(raw).is_ok(), *ok, "{raw:?}");
        }
        assert!(OperationId::parse(&"a".repeat(128)).is_ok());
        assert!(OperationId::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = OperationId::generate();
        let b = OperationId::generate();
        assert_ne!(a, b);
        assert!(OperationId::parse(a.as_str()).is_ok());
    }
}
