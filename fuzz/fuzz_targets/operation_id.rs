//! The `operationID` header and the trace ID derived from it. `OperationId::parse` must accept
//! exactly 1..=128 visible ASCII characters and keep them as sent; `derive_trace_id` must be
//! deterministic, never all zero (W3C forbids that trace ID), use a UUID or 32 hex digits as the
//! trace ID itself and hash anything else (SHA-256, first 16 bytes). The rules are written out
//! here independently, as the oracle.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::Digest;
use sitegate_model::operation::{derive_trace_id, OperationId, MAX_OPERATION_ID_LEN};
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);

    let valid = (1..=MAX_OPERATION_ID_LEN).contains(&raw.len())
        && raw.bytes().all(|b| (0x21..=0x7e).contains(&b));
    match OperationId::parse(&raw) {
        Ok(id) => {
            assert!(valid, "accepted {raw:?}");
            assert_eq!(id.as_str(), raw);
        }
        Err(_) => assert!(!valid, "refused {raw:?}"),
    }

    let trace = derive_trace_id(&raw);
    assert_eq!(trace, derive_trace_id(&raw), "not deterministic");
    assert_ne!(trace, [0; 16], "all-zero trace ID for {raw:?}");

    let direct = match raw.len() {
        36 => Uuid::try_parse(&raw).ok().map(|u| *u.as_bytes()),
        32 if raw.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Uuid::try_parse(&raw).ok().map(|u| *u.as_bytes())
        }
        _ => None,
    };
    match direct {
        Some(bytes) if bytes != [0; 16] => assert_eq!(trace, bytes, "{raw:?}"),
        _ => {
            let digest = sha2::Sha256::digest(raw.as_bytes());
            assert_eq!(trace[..], digest[..16], "{raw:?} is not hashed");
        }
    }
});
