//! The query strings of the task endpoints: `TaskQuery::parse` (`GET /tasks`) and
//! `parse_site_only` (`GET /tasks/{id}`, `POST /tasks/poll`). Neither may panic; a query
//! `TaskQuery::parse` accepts must survive being forwarded to a peer (re-serialized without
//! `site` and parsed again) unchanged; a refusal is a `ModelError` with a bounded message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sitegate_model::query::{parse_site_only, TaskQuery, MAX_QUERY_LEN};
use sitegate_model::ModelError;

/// The longest refusal message: the parsers echo at most a short prefix of what they were sent.
const MAX_MESSAGE_CHARS: usize = 512;

fn check_refusal(outcome: Result<(), ModelError>) {
    if let Err(ModelError::Invalid(msg)) = outcome {
        assert!(!msg.is_empty());
        assert!(msg.chars().count() <= MAX_MESSAGE_CHARS, "{msg}");
    }
}

fuzz_target!(|data: &[u8]| {
    // The gateway hands over the request target's query as text; bytes that are not UTF-8
    // reach the parser only as replacement characters.
    let raw = String::from_utf8_lossy(data);

    check_refusal(parse_site_only(Some(&raw)).map(|_| ()));

    match TaskQuery::parse(Some(&raw)) {
        Ok(q) => {
            let forwarded = q.to_query_string_without_site();
            assert!(forwarded.len() <= MAX_QUERY_LEN, "{}", forwarded.len());
            let again = TaskQuery::parse(Some(&forwarded))
                .unwrap_or_else(|e| panic!("forwarded {forwarded:?} does not parse: {e}"));
            // Ignored (unknown) names are not forwarded: the peer sees what this site used.
            assert_eq!(
                again,
                TaskQuery {
                    site: None,
                    ignored: Vec::new(),
                    ..q
                },
                "via {forwarded:?}"
            );
        }
        Err(e) => check_refusal(Err(e)),
    }
});
