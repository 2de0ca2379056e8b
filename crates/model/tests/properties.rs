//! Property tests of the model's parsers: the `GET /tasks` query string, the JSON request bodies,
//! operation IDs and the trace IDs derived from them. The table tests beside each parser pin
//! known cases; these generate many inputs to check that the rules hold for all of them:
//! nothing a caller sends makes a parser panic, what is accepted survives re-serialization
//! unchanged (a forwarded query, a stored patch), and what is invalid is refused with a
//! `ModelError`, which the gateway answers as `BadUserInput`.
//!
//! The fuzz targets in `fuzz/` check the same invariants coverage-guided; an input either finds
//! belongs in a table test beside the parser as a regression case.
//!
//! `PROPTEST_CASES=10000 cargo test -p sitegate-model --test properties` runs a longer search.

use std::collections::HashSet;

use proptest::collection::{hash_set, vec};
use proptest::option;
use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::Digest;
use uuid::Uuid;

use sitegate_model::error::ErrorEnvelope;
use sitegate_model::operation::{derive_trace_id, OperationId, MAX_OPERATION_ID_LEN};
use sitegate_model::query::{
    parse_site_only, SiteQuery, SortField, SortKey, TaskQuery, DEFAULT_LIMIT, MAX_IDS_FILTER,
    MAX_LIMIT, MAX_QUERY_LEN,
};
use sitegate_model::session::{ExtendRequest, LoginRequest, MultisiteSessionRequest};
use sitegate_model::task::{
    parse_poll_ids, Completion, NewTask, TaskPatch, TaskState, ValidPatch, WorkflowInfo,
    MAX_FIELD_LEN, MAX_POLL_IDS, MAX_WARNINGS_PER_PATCH,
};
use sitegate_model::ModelError;

fn config() -> ProptestConfig {
    ProptestConfig {
        // A failure prints its shrunk input, which then becomes a table case beside the parser;
        // no regression files are written into the source tree behind the developer's back.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every refusal is a `ModelError` whose message stays short however long the input was: the
/// parsers echo at most a bounded prefix of what they were sent.
fn assert_refused<T: std::fmt::Debug>(
    outcome: Result<T, ModelError>,
    input: &str,
) -> Result<(), TestCaseError> {
    match outcome {
        Ok(v) => Err(TestCaseError::fail(format!("accepted {input:?} as {v:?}"))),
        Err(ModelError::Invalid(msg)) => {
            prop_assert!(!msg.is_empty(), "an empty message for {input:?}");
            prop_assert!(
                msg.chars().count() <= 512,
                "a {}-character message for {input:?}",
                msg.chars().count()
            );
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators shared by several properties.

const QUERY_PARAMS: [&str; 17] = [
    "site",
    "ids",
    "user",
    "state",
    "type",
    "resourceType",
    "resourceId",
    "resourceName",
    "startTimeBefore",
    "startTimeAfter",
    "endTimeBefore",
    "endTimeAfter",
    "sourceOrg",
    "destinationOrg",
    "sort",
    "limit",
    "offset",
];
/// The parameters that may repeat (their values join as one comma list).
const LIST_PARAMS: [&str; 4] = ["ids", "state", "resourceType", "sort"];

const SORT_FIELDS: [(&str, SortField); 11] = [
    ("startTime", SortField::StartTime),
    ("lastUpdated", SortField::LastUpdated),
    ("endTime", SortField::EndTime),
    ("progress", SortField::Progress),
    ("state", SortField::State),
    ("user", SortField::User),
    ("id", SortField::Id),
    ("type", SortField::Type),
    ("resourceType", SortField::ResourceType),
    ("resourceId", SortField::ResourceId),
    ("resourceName", SortField::ResourceName),
];

const STATES: [TaskState; 3] = [TaskState::Running, TaskState::Succeeded, TaskState::Failed];

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid::from_bytes)
}

/// A task ID as a caller may spell it: the canonical hyphenated form, in either case.
fn task_id_spelling() -> impl Strategy<Value = (Uuid, String)> {
    (uuid(), any::<bool>()).prop_map(|(id, upper)| {
        let s = id.hyphenated().to_string();
        (id, if upper { s.to_uppercase() } else { s })
    })
}

fn user_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._@-]{1,64}"
}

/// A value a task's text field may hold: no control characters, at most 256 bytes. Printable
/// ASCII is weighted in because it holds the characters URL encoding must escape (`&=+%#`).
fn text_value() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,40}", "\\PC{0,64}"].prop_filter("fits a text field", |s| {
        s.len() <= MAX_FIELD_LEN && !s.chars().any(char::is_control)
    })
}

fn state() -> impl Strategy<Value = TaskState> {
    prop::sample::select(STATES.to_vec())
}

/// Any JSON value, bounded in size; numbers include floats, so a result that went through the
/// store or a peer is known to come back exactly.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((".{0,10}", inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// JSON values equal as they should survive a trip through the store or a peer: exactly, except
/// that a float may come back one unit in the last place off. serde_json parses floats with
/// best-effort precision unless its `float_roundtrip` feature is on, and the workspace does not
/// enable it, so a task `result` of -1.9732376212714147e-19 reads back as
/// -1.973237621271415e-19. With the feature on in the root Cargo.toml, `a == b` holds and should
/// replace this function.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y
                        || (x.is_sign_negative() == y.is_sign_negative()
                            && x.to_bits().abs_diff(y.to_bits()) <= 1)
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn envelope() -> impl Strategy<Value = ErrorEnvelope> {
    (".{1,20}", ".{0,40}", vec(".{0,10}", 0..3), ".{0,20}").prop_map(
        |(code, msg, args, stacktrace)| ErrorEnvelope {
            code,
            msg,
            args,
            stacktrace,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The query string.

/// How one query-string component is written: form encoding as a browser or `serde_urlencoded`
/// would, or every byte percent-encoded, which a decoder must read the same way.
fn encode_component(value: &str, every_byte: bool) -> String {
    if every_byte {
        value.bytes().map(|b| format!("%{b:02X}")).collect()
    } else {
        serde_urlencoded::to_string([("", value)])
            .expect("a string pair always encodes")
            .trim_start_matches('=')
            .to_owned()
    }
}

/// A valid `GET /tasks` query: the decoded pairs to send and the `TaskQuery` they must parse to.
#[derive(Clone, Debug)]
struct ValidQuery {
    pairs: Vec<(String, String)>,
    expected: TaskQuery,
}

fn sort_spec() -> impl Strategy<Value = (String, Vec<SortKey>)> {
    (
        Just(SORT_FIELDS.to_vec()).prop_shuffle(),
        1..=SORT_FIELDS.len(),
        vec((0u8..3, any::<bool>()), SORT_FIELDS.len()),
    )
        .prop_map(|(fields, n, spellings)| {
            let mut parts = Vec::new();
            let mut keys = Vec::new();
            for ((name, field), (direction, padded)) in fields.into_iter().take(n).zip(spellings) {
                // `-name` and `name-` both mean descending; blanks around a key are ignored.
                let (spelled, descending) = match direction {
                    0 => (name.to_owned(), false),
                    1 => (format!("-{name}"), true),
                    _ => (format!("{name}-"), true),
                };
                parts.push(if padded {
                    format!(" {spelled} ")
                } else {
                    spelled
                });
                keys.push(SortKey { field, descending });
            }
            (parts.join(","), keys)
        })
}

fn ids_spec() -> impl Strategy<Value = (String, Vec<Uuid>)> {
    vec((task_id_spelling(), any::<bool>()), 0..12).prop_map(|ids| {
        let spelled: Vec<String> = ids
            .iter()
            .map(|((_, s), padded)| if *padded { format!(" {s}") } else { s.clone() })
            .collect();
        (
            spelled.join(","),
            ids.into_iter().map(|((id, _), _)| id).collect(),
        )
    })
}

fn states_spec() -> impl Strategy<Value = (String, Vec<TaskState>)> {
    vec(state(), 1..8).prop_map(|states| {
        let spelled: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        // Each state is kept once, in the order first named.
        let mut kept: Vec<TaskState> = Vec::new();
        for s in states {
            if !kept.contains(&s) {
                kept.push(s);
            }
        }
        (spelled.join(","), kept)
    })
}

/// A time filter: a non-negative epoch-milliseconds integer, sometimes with a `+` or leading
/// zeros, which Rust's integer parsing (and so the API) accepts.
fn time_spec() -> impl Strategy<Value = (String, i64)> {
    (0..=i64::MAX, 0u8..3).prop_map(|(t, style)| {
        let spelled = match style {
            0 => t.to_string(),
            1 => format!("+{t}"),
            _ => format!("00{t}"),
        };
        (spelled, t)
    })
}

fn valid_query() -> impl Strategy<Value = ValidQuery> {
    let filters = (
        option::of(".{0,20}"),
        option::of(ids_spec()),
        option::of(user_name()),
        option::of(states_spec()),
        option::of(text_value()),
        // One resource type: a list entry is trimmed and split at commas.
        option::of(text_value().prop_filter("one list entry", |v| {
            !v.is_empty() && !v.contains(',') && v.trim() == v
        })),
        option::of(text_value()),
        option::of(text_value()),
    );
    let ranges = (
        option::of(time_spec()),
        option::of(time_spec()),
        option::of(time_spec()),
        option::of(time_spec()),
        option::of(sort_spec()),
        option::of(any::<u64>()),
        option::of(0..=i64::MAX as u64),
    );
    (filters, ranges).prop_flat_map(
        |(
            (site, ids, user, states, wf_type, res_type, res_id, res_name),
            (stb, sta, etb, eta, sort, limit, offset),
        )| {
            let mut expected = TaskQuery::default();
            let mut pairs: Vec<(String, String)> = Vec::new();
            let mut add = |name: &str, value: String| pairs.push((name.to_owned(), value));
            if let Some(s) = site {
                add("site", s.clone());
                expected.site = Some(s);
            }
            if let Some((spelled, ids)) = ids {
                add("ids", spelled);
                expected.ids = ids;
            }
            if let Some(u) = user {
                add("user", u.clone());
                expected.user = Some(u);
            }
            if let Some((spelled, states)) = states {
                add("state", spelled);
                expected.states = states;
            }
            if let Some(v) = res_type {
                add("resourceType", v.clone());
                expected.resource_types = vec![v];
            }
            for (name, value, slot) in [
                ("type", wf_type, &mut expected.workflow_type),
                ("resourceId", res_id, &mut expected.resource_id),
                ("resourceName", res_name, &mut expected.resource_name),
            ] {
                if let Some(v) = value {
                    add(name, v.clone());
                    *slot = Some(v);
                }
            }
            for (name, value, slot) in [
                ("startTimeBefore", stb, &mut expected.start_time_before),
                ("startTimeAfter", sta, &mut expected.start_time_after),
                ("endTimeBefore", etb, &mut expected.end_time_before),
                ("endTimeAfter", eta, &mut expected.end_time_after),
            ] {
                if let Some((spelled, t)) = value {
                    add(name, spelled);
                    *slot = Some(t);
                }
            }
            if let Some((spelled, keys)) = sort {
                add("sort", spelled);
                expected.sort = keys;
            }
            if let Some(n) = limit {
                add("limit", n.to_string());
                // Larger limits are clamped, not refused.
                expected.limit = n.min(u64::from(MAX_LIMIT)) as u32;
            }
            if let Some(n) = offset {
                add("offset", n.to_string());
                expected.offset = n;
            }
            Just(pairs)
                .prop_shuffle()
                .prop_map(move |pairs| ValidQuery {
                    pairs,
                    expected: expected.clone(),
                })
        },
    )
}

/// Joins decoded pairs into a raw query string, each component encoded one way or the other,
/// sometimes with the empty segments (`&&`) a decoder skips.
fn raw_query(pairs: &[(String, String)], every_byte: &[bool], stray_ampersands: bool) -> String {
    let mut parts: Vec<String> = pairs
        .iter()
        .enumerate()
        .map(|(i, (name, value))| {
            let every = every_byte.get(i).copied().unwrap_or(false);
            format!(
                "{}={}",
                encode_component(name, every),
                encode_component(value, every)
            )
        })
        .collect();
    if stray_ampersands {
        parts.insert(0, String::new());
        parts.push(String::new());
    }
    parts.join("&")
}

/// A value the query parser must refuse, and the parameter it is sent as.
fn invalid_pair() -> impl Strategy<Value = (String, String)> {
    fn not_an_unsigned() -> impl Strategy<Value = String> {
        prop_oneof![
            "-[0-9]{1,6}",
            "[0-9]{0,4}[a-zA-Z. _,][0-9]{0,4}",
            Just(String::new()),
            // 21 digits or more are beyond u64.
            "[1-9][0-9]{20,30}",
        ]
    }
    let not_a_time = prop_oneof![
        "-[1-9][0-9]{0,17}",
        "[0-9]{0,4}[a-zA-Z. _,][0-9]{0,4}",
        Just(String::new()),
        // 20 digits or more are beyond i64.
        "[1-9][0-9]{19,30}",
    ];
    let bad_state = prop_oneof![
        "[a-z]{0,10}",
        Just("DONE".to_owned()),
        Just("RUNNING_".to_owned())
    ];
    let bad_sort = prop_oneof![
        "[a-zA-Z]{1,14}".prop_filter("not a sortable field", |s| {
            !SORT_FIELDS.iter().any(|(name, _)| name == s)
        }),
        Just(String::new()),
        Just("-".to_owned()),
        Just("--startTime".to_owned()),
        Just("startTime--".to_owned()),
        Just("-startTime-".to_owned()),
        prop::sample::select(SORT_FIELDS.to_vec()).prop_map(|(n, _)| format!("{n},-{n}")),
    ];
    let bad_id = prop_oneof![
        uuid().prop_map(|u| u.simple().to_string()),
        uuid().prop_map(|u| u.braced().to_string()),
        uuid().prop_map(|u| u.urn().to_string()),
        uuid().prop_map(|u| u.hyphenated().to_string().replacen('-', "g", 1)),
        uuid().prop_map(|u| u.hyphenated().to_string()[..35].to_owned()),
        "[a-z]{1,10}",
    ];
    let bad_user = prop_oneof![
        "[A-Za-z0-9._@-]{0,10}[^A-Za-z0-9._@-][A-Za-z0-9._@-]{0,10}",
        Just(String::new()),
        "[a-z]{65,80}",
    ];
    let bad_text = prop_oneof![
        // C0, DEL and C1 controls are all refused (`char::is_control`).
        "[a-z]{0,10}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,10}",
        "[a-z]{257,300}",
    ];
    let time_names = prop::sample::select(vec![
        "startTimeBefore",
        "startTimeAfter",
        "endTimeBefore",
        "endTimeAfter",
    ]);
    let text_names =
        prop::sample::select(vec!["type", "resourceType", "resourceId", "resourceName"]);
    prop_oneof![
        not_an_unsigned().prop_map(|v| ("limit".to_owned(), v)),
        prop_oneof![
            not_an_unsigned(),
            (i64::MAX as u64 + 1..=u64::MAX).prop_map(|n| n.to_string())
        ]
        .prop_map(|v| ("offset".to_owned(), v)),
        (time_names, not_a_time).prop_map(|(n, v)| (n.to_owned(), v)),
        (vec(state(), 0..3), bad_state, vec(state(), 0..3)).prop_map(|(before, bad, after)| {
            let mut parts: Vec<String> = before.iter().map(|s| s.as_str().to_owned()).collect();
            parts.push(bad);
            parts.extend(after.iter().map(|s| s.as_str().to_owned()));
            ("state".to_owned(), parts.join(","))
        }),
        bad_sort.prop_map(|v| ("sort".to_owned(), v)),
        (vec(uuid(), 0..3), bad_id).prop_map(|(good, bad)| {
            let mut parts: Vec<String> = good.iter().map(Uuid::to_string).collect();
            parts.push(bad);
            ("ids".to_owned(), parts.join(","))
        }),
        Just((
            "ids".to_owned(),
            vec![Uuid::nil().to_string(); MAX_IDS_FILTER + 1].join(",")
        )),
        bad_user.prop_map(|v| ("user".to_owned(), v)),
        (text_names, bad_text).prop_map(|(n, v)| (n.to_owned(), v)),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn query_parsers_never_panic_on_any_string(raw in any::<String>()) {
        let _ = TaskQuery::parse(Some(&raw));
        let _ = parse_site_only(Some(&raw));
    }

    #[test]
    fn query_parsers_never_panic_on_any_bytes(raw in vec(any::<u8>(), 0..256)) {
        // The gateway hands over the request target's query as text; invalid UTF-8 cannot
        // reach the parser except as replacement characters.
        let raw = String::from_utf8_lossy(&raw);
        let _ = TaskQuery::parse(Some(&raw));
        let _ = parse_site_only(Some(&raw));
    }

    /// Pairs of known names with values from a mix of valid and arbitrary ones, so a good share
    /// parse: any that do must round-trip, any that do not must be a bounded `ModelError`.
    #[test]
    fn near_valid_queries_parse_or_are_refused(
        pairs in vec(
            (
                prop_oneof![
                    4 => prop::sample::select(QUERY_PARAMS.to_vec()).prop_map(str::to_owned),
                    1 => "[a-zA-Z]{0,12}",
                ],
                prop_oneof![
                    "[0-9]{0,20}",
                    "-?[a-zA-Z]{0,14}-?(,-?[a-zA-Z]{0,14}-?){0,3}",
                    "(RUNNING|FAILED|SUCCEEDED|running| )(,(RUNNING|FAILED|SUCCEEDED|))*",
                    uuid().prop_map(|u| u.to_string()),
                    ".{0,30}",
                ],
            ),
            0..6,
        ),
        every_byte in vec(any::<bool>(), 6),
    ) {
        let raw = raw_query(&pairs, &every_byte, false);
        match TaskQuery::parse(Some(&raw)) {
            Ok(q) => {
                let forwarded = q.to_query_string_without_site();
                let again = TaskQuery::parse(Some(&forwarded));
                // Ignored names are not forwarded: the peer sees only what this site used.
                prop_assert_eq!(
                    again,
                    Ok(TaskQuery { site: None, ignored: Vec::new(), ..q }),
                    "via {:?}",
                    forwarded
                );
            }
            Err(e) => assert_refused::<()>(Err(e), &raw)?,
        }
    }

    #[test]
    fn valid_queries_parse_to_what_they_say(
        query in valid_query(),
        every_byte in vec(any::<bool>(), QUERY_PARAMS.len()),
        stray_ampersands in any::<bool>(),
    ) {
        let raw = raw_query(&query.pairs, &every_byte, stray_ampersands);
        let parsed = TaskQuery::parse(Some(&raw));
        prop_assert_eq!(&parsed, &Ok(query.expected.clone()), "from {:?}", raw);
    }

    /// What a site forwards to a peer is the same query, minus `site`: the peer must answer
    /// exactly what the caller asked.
    #[test]
    fn forwarded_queries_round_trip(query in valid_query()) {
        let raw = raw_query(&query.pairs, &[], false);
        let q = TaskQuery::parse(Some(&raw)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let forwarded = q.to_query_string_without_site();
        prop_assert!(forwarded.len() <= MAX_QUERY_LEN);
        let names: Vec<(String, String)> =
            serde_urlencoded::from_str(&forwarded).expect("our own encoding decodes");
        prop_assert!(names.iter().all(|(n, _)| n != "site"), "{}", forwarded);
        let again = TaskQuery::parse(Some(&forwarded));
        prop_assert_eq!(again, Ok(TaskQuery { site: None, ..q }), "via {:?}", forwarded);
    }

    #[test]
    fn invalid_values_are_refused(
        query in valid_query(),
        (name, value) in invalid_pair(),
        position in any::<prop::sample::Index>(),
        every_byte in vec(any::<bool>(), QUERY_PARAMS.len() + 1),
    ) {
        let mut pairs: Vec<(String, String)> =
            query.pairs.into_iter().filter(|(n, _)| *n != name).collect();
        pairs.insert(position.index(pairs.len() + 1), (name, value));
        let raw = raw_query(&pairs, &every_byte, false);
        assert_refused(TaskQuery::parse(Some(&raw)), &raw)?;
    }

    #[test]
    fn unknown_names_are_ignored_and_repeated_single_names_refused(
        query in valid_query().prop_filter("has a pair", |q| !q.pairs.is_empty()),
        unknown in "[a-zA-Z]{1,12}".prop_filter("not a parameter", |n| !QUERY_PARAMS.contains(&n.as_str())),
        position in any::<prop::sample::Index>(),
        repeated in any::<prop::sample::Index>(),
        value in ".{0,10}",
    ) {
        // As the original API: an unknown name changes nothing, and is reported.
        let mut with_unknown = query.pairs.clone();
        with_unknown.insert(position.index(with_unknown.len() + 1), (unknown.clone(), value.clone()));
        let raw = raw_query(&with_unknown, &[], false);
        let parsed = TaskQuery::parse(Some(&raw));
        prop_assert!(parsed.is_ok(), "{raw}: {parsed:?}");
        let mut parsed = parsed.unwrap();
        prop_assert_eq!(&parsed.ignored, &vec![unknown.clone()]);
        parsed.ignored.clear();
        prop_assert_eq!(parsed, query.expected.clone());

        // A single-valued parameter given twice is refused even when both values are valid
        // (or equal): only one of them could be used.
        let singles: Vec<(String, String)> = query
            .pairs
            .iter()
            .filter(|(n, _)| !LIST_PARAMS.contains(&n.as_str()))
            .cloned()
            .collect();
        if !singles.is_empty() {
            let mut twice = query.pairs.clone();
            twice.push(repeated.get(&singles).clone());
            let raw = raw_query(&twice, &[], false);
            assert_refused(TaskQuery::parse(Some(&raw)), &raw)?;
        }
    }

    /// A value whose percent-encoding does not decode to UTF-8 is not a filter anyone can mean:
    /// it must not be turned silently into replacement characters and searched for.
    #[test]
    fn undecodable_filter_values_are_refused(
        name in prop::sample::select(vec!["type", "resourceType", "resourceId", "resourceName"]),
        before in "[a-z]{0,5}",
        bad in prop_oneof![
            // A lone continuation byte, a lead byte with no continuation, or a byte UTF-8 never uses.
            (0x80u8..=0xbf).prop_map(|b| vec![b]),
            (0xc2u8..=0xf4).prop_map(|b| vec![b]),
            (0xf5u8..=0xff).prop_map(|b| vec![b]),
            Just(vec![0xc0, 0x80]),
            Just(vec![0xed, 0xa0, 0x80]),
        ],
        after in "[a-z]{0,5}",
    ) {
        let encoded: String = bad.iter().map(|b| format!("%{b:02X}")).collect();
        let raw = format!("{name}={before}{encoded}{after}");
        assert_refused(TaskQuery::parse(Some(&raw)), &raw)?;
    }

    #[test]
    fn site_only_takes_exactly_site(
        site in any::<String>(),
        every_byte in any::<bool>(),
        other in prop::sample::select(QUERY_PARAMS[1..].to_vec()),
    ) {
        let raw = format!("site={}", encode_component(&site, every_byte));
        prop_assert_eq!(parse_site_only(Some(&raw)).map(|q| q.site), Ok(Some(site.clone())));
        // Another endpoint's parameter is ignored here, as the original ignores unknown names.
        let raw = format!("{raw}&{other}=1");
        let parsed = parse_site_only(Some(&raw));
        prop_assert_eq!(parsed.clone().map(|q| q.site), Ok(Some(site.clone())), "{}", raw);
        prop_assert_eq!(parsed.map(|q| q.ignored), Ok(vec![other.to_owned()]));
    }
}

#[test]
fn absent_and_empty_queries_are_the_defaults() {
    for raw in [None, Some(""), Some("&"), Some("&&&")] {
        let q = TaskQuery::parse(raw).expect("an empty query is valid");
        assert_eq!(q, TaskQuery::default(), "{raw:?}");
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(parse_site_only(raw), Ok(SiteQuery::default()), "{raw:?}");
    }
}

#[test]
fn overlong_query_strings_are_refused_before_parsing() {
    let raw = format!("type={}", "a".repeat(MAX_QUERY_LEN));
    assert!(TaskQuery::parse(Some(&raw)).is_err());
    assert!(parse_site_only(Some(&raw)).is_err());
}

#[test]
fn the_longest_valid_query_forwards_within_the_length_limit() {
    // Every filter at its largest: the forwarded string re-encodes commas and non-ASCII text,
    // so it can be longer than what the caller sent, but it must still be accepted by the peer.
    let ids = vec![Uuid::max().to_string(); MAX_IDS_FILTER].join(",");
    let text = "\u{10FFFF}".repeat(MAX_FIELD_LEN / 4);
    let sort: Vec<String> = SORT_FIELDS.iter().map(|(n, _)| format!("-{n}")).collect();
    let pairs = [
        ("ids", ids),
        ("user", "u".repeat(64)),
        ("state", "RUNNING,SUCCEEDED,FAILED".to_owned()),
        ("type", text.clone()),
        ("resourceType", text.clone()),
        ("resourceId", text.clone()),
        ("resourceName", text),
        ("startTimeBefore", i64::MAX.to_string()),
        ("startTimeAfter", i64::MAX.to_string()),
        ("endTimeBefore", i64::MAX.to_string()),
        ("endTimeAfter", i64::MAX.to_string()),
        ("sort", sort.join(",")),
        ("limit", u64::MAX.to_string()),
        ("offset", i64::MAX.to_string()),
    ];
    let raw = serde_urlencoded::to_string(pairs).expect("pairs encode");
    let q = TaskQuery::parse(Some(&raw)).expect("the longest valid query");
    let forwarded = q.to_query_string_without_site();
    assert!(forwarded.len() <= MAX_QUERY_LEN, "{}", forwarded.len());
    assert_eq!(TaskQuery::parse(Some(&forwarded)), Ok(q));
}

// ---------------------------------------------------------------------------------------------
// JSON bodies.

fn new_task() -> impl Strategy<Value = NewTask> {
    (
        option::of(uuid()),
        user_name(),
        text_value().prop_filter("type is required", |t| !t.is_empty()),
        option::of(text_value()),
        option::of(text_value()),
        option::of(text_value()),
    )
        .prop_map(
            |(id, user, workflow_type, resource_type, resource_id, resource_name)| NewTask {
                id,
                user,
                workflow_info: WorkflowInfo {
                    workflow_type,
                    resource_type,
                    resource_id,
                    resource_name,
                },
                source_org: None,
                destination_org: None,
            },
        )
}

/// How a valid patch may end a task: not at all, or with a result, or with an error.
#[derive(Clone, Debug)]
enum Ending {
    None,
    StillRunning,
    Succeeded(Option<String>, Option<Value>),
    Failed(ErrorEnvelope),
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        Just(Ending::None),
        Just(Ending::StillRunning),
        (
            option::of(text_value()),
            // `"result": null` and no `result` are the same on the wire.
            option::of(json_value().prop_filter("not null", |v| !v.is_null())),
        )
            .prop_map(|(rt, r)| Ending::Succeeded(rt, r)),
        envelope().prop_map(Ending::Failed),
    ]
}

/// A valid patch and the `ValidPatch` it must validate into.
fn valid_patch() -> impl Strategy<Value = (TaskPatch, ValidPatch)> {
    (
        option::of(0i64..=100),
        option::of(prop_oneof![
            8 => vec(envelope(), 0..4),
            1 => vec(envelope(), MAX_WARNINGS_PER_PATCH),
        ]),
        ending(),
    )
        .prop_map(|(progress, warnings, ending)| {
            let mut patch = TaskPatch {
                progress,
                warnings: warnings.clone(),
                ..TaskPatch::default()
            };
            let completion = match ending {
                Ending::None => None,
                Ending::StillRunning => {
                    patch.state = Some(TaskState::Running);
                    None
                }
                Ending::Succeeded(result_type, result) => {
                    patch.state = Some(TaskState::Succeeded);
                    patch.result_type = result_type.clone();
                    patch.result = result.clone();
                    Some(Completion::Succeeded {
                        result_type,
                        result,
                    })
                }
                Ending::Failed(error) => {
                    patch.state = Some(TaskState::Failed);
                    patch.error = Some(error.clone());
                    Some(Completion::Failed { error })
                }
            };
            let valid = ValidPatch {
                progress: progress.map(|p| p as u8),
                warnings: warnings.unwrap_or_default(),
                completion,
            };
            (patch, valid)
        })
}

/// A patch breaking exactly one rule of `TaskPatch::validate`.
fn invalid_patch() -> impl Strategy<Value = TaskPatch> {
    let bad_text = prop_oneof![
        "[a-z]{0,10}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,10}",
        "[a-z]{257,300}",
    ];
    // `"result": null` is no result at all on the wire, so it breaks no rule.
    let result = json_value().prop_filter("not null", |v| !v.is_null());
    (
        valid_patch(),
        0u8..9,
        any::<i64>(),
        bad_text,
        envelope(),
        result,
    )
        .prop_map(|((mut patch, _), rule, n, text, env, value)| {
            match rule {
                0 => {
                    patch.progress = Some(if (0..=100).contains(&n) { n - 101 } else { n });
                }
                1 => patch.warnings = Some(vec![env; MAX_WARNINGS_PER_PATCH + 1]),
                2 => {
                    let mut warnings = patch.warnings.unwrap_or_default();
                    warnings.push(ErrorEnvelope {
                        code: String::new(),
                        ..env
                    });
                    patch.warnings = Some(warnings);
                }
                3 => {
                    // A result or error without a final state.
                    patch.state = None;
                    patch.result_type = None;
                    patch.result = None;
                    patch.error = None;
                    match n.rem_euclid(3) {
                        0 => patch.result_type = Some(text),
                        1 => patch.result = Some(value),
                        _ => patch.error = Some(env),
                    }
                }
                4 => {
                    patch.state = Some(TaskState::Succeeded);
                    patch.error = Some(env);
                }
                5 => {
                    patch.state = Some(TaskState::Failed);
                    patch.error = Some(env);
                    if n % 2 == 0 {
                        patch.result_type = Some(text);
                    } else {
                        patch.result = Some(value);
                    }
                }
                6 => {
                    patch.state = Some(TaskState::Failed);
                    patch.result_type = None;
                    patch.result = None;
                    patch.error = None;
                }
                7 => {
                    patch.state = Some(TaskState::Failed);
                    patch.result_type = None;
                    patch.result = None;
                    patch.error = Some(ErrorEnvelope {
                        code: String::new(),
                        ..env
                    });
                }
                _ => {
                    patch.state = Some(TaskState::Succeeded);
                    patch.error = None;
                    patch.result_type = Some(text);
                }
            }
            patch
        })
}

/// JSON values shaped like the bodies, with fields of the right names but any types and any
/// extra fields, so the derived deserializers are driven past their first check.
fn body_shaped_json() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(vec![
        "type",
        "id",
        "user",
        "workflowInfo",
        "resourceType",
        "progress",
        "warnings",
        "state",
        "resultType",
        "result",
        "error",
        "code",
        "localUser",
        "localPassword",
        "site",
        "username",
        "password",
    ]);
    let tags = prop::sample::select(vec!["localUser", "credentials", "multisite", "RUNNING"]);
    prop_oneof![
        vec(
            (
                names,
                prop_oneof![json_value(), tags.prop_map(|t| json!(t))]
            ),
            0..6
        )
        .prop_map(|fields| Value::Object(
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
        )),
        json_value(),
    ]
}

fn all_body_parsers_on(bytes: &[u8]) {
    if let Ok(t) = serde_json::from_slice::<NewTask>(bytes) {
        let _ = t.validate();
    }
    if let Ok(p) = serde_json::from_slice::<TaskPatch>(bytes) {
        let _ = p.validate();
    }
    let _ = serde_json::from_slice::<LoginRequest>(bytes);
    if let Ok(e) = serde_json::from_slice::<ExtendRequest>(bytes) {
        let _ = e.site();
    }
    let _ = serde_json::from_slice::<MultisiteSessionRequest>(bytes);
    if let Ok(ids) = serde_json::from_slice::<Vec<String>>(bytes) {
        let _ = parse_poll_ids(&ids);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn body_parsers_never_panic_on_any_bytes(bytes in vec(any::<u8>(), 0..512)) {
        all_body_parsers_on(&bytes);
    }

    #[test]
    fn body_parsers_never_panic_on_body_shaped_json(value in body_shaped_json()) {
        let bytes = serde_json::to_vec(&value).expect("a Value serializes");
        all_body_parsers_on(&bytes);
    }

    /// Nesting deeper than serde_json's recursion limit is an error, not a stack overflow.
    #[test]
    fn deeply_nested_bodies_are_refused(depth in 100usize..20_000, open in prop::sample::select(vec!["[", "{\"a\":"])) {
        let body = format!(r#"{{"state":"SUCCEEDED","result":{}"#, open.repeat(depth));
        all_body_parsers_on(body.as_bytes());
        prop_assert!(serde_json::from_slice::<TaskPatch>(body.as_bytes()).is_err());
    }

    #[test]
    fn new_tasks_round_trip_and_validate(task in new_task()) {
        let bytes = serde_json::to_vec(&task).expect("a NewTask serializes");
        let back: NewTask = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&bytes))))?;
        prop_assert_eq!(&back, &task);
        prop_assert_eq!(back.validate(), Ok(()));
    }

    #[test]
    fn invalid_new_tasks_are_refused(
        task in new_task(),
        field in 0u8..5,
        bad_user in prop_oneof![
            "[A-Za-z0-9._@-]{0,10}[^A-Za-z0-9._@-][A-Za-z0-9._@-]{0,10}",
            Just(String::new()),
            "[a-z]{65,80}",
        ],
        bad_text in prop_oneof![
            "[a-z]{0,10}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,10}",
            "[a-z]{257,300}",
        ],
    ) {
        let mut task = task;
        let wf = &mut task.workflow_info;
        match field {
            0 => task.user = bad_user,
            1 => wf.workflow_type = if bad_text.len() % 2 == 0 { bad_text } else { String::new() },
            2 => wf.resource_type = Some(bad_text),
            3 => wf.resource_id = Some(bad_text),
            _ => wf.resource_name = Some(bad_text),
        }
        // Through the wire form, as the gateway sees it.
        let bytes = serde_json::to_vec(&task).expect("a NewTask serializes");
        let back: NewTask = serde_json::from_slice(&bytes).expect("still well-formed JSON");
        assert_refused(back.validate(), &String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn patches_round_trip_and_validate((patch, valid) in valid_patch()) {
        let bytes = serde_json::to_vec(&patch).expect("a TaskPatch serializes");
        let back: TaskPatch = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&bytes))))?;
        let (sent, read) = (
            serde_json::to_value(&patch).expect("serializes"),
            serde_json::to_value(&back).expect("serializes"),
        );
        prop_assert!(same_json(&sent, &read), "sent {}, read back {}", sent, read);
        prop_assert_eq!(patch.validate(), Ok(valid));
    }

    #[test]
    fn invalid_patches_are_refused(patch in invalid_patch()) {
        let bytes = serde_json::to_vec(&patch).expect("a TaskPatch serializes");
        let back: TaskPatch = serde_json::from_slice(&bytes).expect("still well-formed JSON");
        assert_refused(back.validate(), &String::from_utf8_lossy(&bytes))?;
    }

    /// Progress is an integer on the wire; a float, a string or a number beyond i64 is a body
    /// error, never truncated or wrapped into range.
    #[test]
    fn non_integer_progress_is_a_body_error(
        progress in prop_oneof![
            any::<f64>().prop_filter("finite, not integral", |f| f.is_finite() && f.fract() != 0.0).prop_map(|f| json!(f)),
            (i64::MAX as u64 + 1..=u64::MAX).prop_map(|n| json!(n)),
            "[0-9]{1,3}".prop_map(|s| json!(s)),
            Just(json!(50.0)),
            Just(json!(true)),
        ],
    ) {
        let body = json!({ "progress": progress });
        prop_assert!(serde_json::from_value::<TaskPatch>(body).is_err());
    }

    /// Every body refuses a field it does not know, so a misspelt field is an error and not a
    /// silently dropped value.
    #[test]
    fn unknown_body_fields_are_refused(
        task in new_task(),
        (patch, _) in valid_patch(),
        user in ".{0,20}",
        password in ".{0,20}",
        site in ".{0,20}",
        extra in "[a-zA-Z]{1,14}",
        extra_value in json_value(),
    ) {
        let with_extra = |mut body: Value, known: &[&str]| -> Option<Value> {
            if known.contains(&extra.as_str()) {
                return None;
            }
            body.as_object_mut()?.insert(extra.clone(), extra_value.clone());
            Some(body)
        };
        let task_json = serde_json::to_value(&task).expect("a NewTask serializes");
        if let Some(body) = with_extra(task_json.clone(), &["id", "user", "workflowInfo"]) {
            prop_assert!(serde_json::from_value::<NewTask>(body).is_err());
        }
        let workflow_fields = ["type", "resourceType", "resourceId", "resourceName"];
        if let Some(info) = with_extra(task_json["workflowInfo"].clone(), &workflow_fields) {
            let mut body = task_json.clone();
            body["workflowInfo"] = info;
            prop_assert!(serde_json::from_value::<NewTask>(body.clone()).is_err(), "{}", body);
        }
        let envelope_fields = ["code", "msg", "args", "stacktrace"];
        let envelope_json = json!({"code": "E", "msg": user});
        if let Some(error) = with_extra(envelope_json, &envelope_fields) {
            let body = json!({"state": "FAILED", "error": error.clone()});
            prop_assert!(serde_json::from_value::<TaskPatch>(body).is_err());
            let body = json!({"warnings": [error]});
            prop_assert!(serde_json::from_value::<TaskPatch>(body).is_err());
        }
        let patch_fields = ["progress", "warnings", "state", "resultType", "result", "error"];
        let patch_json = serde_json::to_value(&patch).expect("a TaskPatch serializes");
        if let Some(body) = with_extra(patch_json, &patch_fields) {
            prop_assert!(serde_json::from_value::<TaskPatch>(body).is_err());
        }
        let login = json!({"type": "localUser", "localUser": user, "localPassword": password});
        if let Some(body) = with_extra(login, &["type", "localUser", "localPassword"]) {
            prop_assert!(serde_json::from_value::<LoginRequest>(body).is_err());
        }
        let extend = json!({"type": "credentials", "site": site, "username": user, "password": password});
        if let Some(body) = with_extra(extend, &["type", "site", "username", "password"]) {
            prop_assert!(serde_json::from_value::<ExtendRequest>(body).is_err());
        }
        let extend = json!({"type": "multisite", "site": site});
        if let Some(body) = with_extra(extend, &["type", "site"]) {
            prop_assert!(serde_json::from_value::<ExtendRequest>(body).is_err());
        }
        if let Some(body) = with_extra(json!({"user": user}), &["user"]) {
            prop_assert!(serde_json::from_value::<MultisiteSessionRequest>(body).is_err());
        }
    }

    #[test]
    fn login_bodies_parse_and_never_show_the_password(
        user in ".{0,40}",
        secret in "[a-z0-9]{16}",
        // A password may be any string; the Debug check uses a distinctive one.
        any_password in ".{0,40}",
    ) {
        let password = format!("pw-{secret}");
        let body = json!({"type": "localUser", "localUser": user, "localPassword": password});
        let login: LoginRequest = serde_json::from_value(body)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let LoginRequest::LocalUser { local_user, local_password } = &login;
        prop_assert_eq!(local_user, &user);
        prop_assert_eq!(local_password, &password);
        let shown = format!("{login:?}");
        prop_assert!(!shown.contains(&password), "{}", shown);

        let bytes = serde_json::to_vec(
            &json!({"type": "localUser", "localUser": user, "localPassword": any_password}),
        ).expect("serializes");
        let login: LoginRequest = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let LoginRequest::LocalUser { local_password, .. } = login;
        prop_assert_eq!(local_password, any_password);
    }

    #[test]
    fn extend_bodies_parse_and_never_show_the_password(
        site in ".{0,40}",
        user in ".{0,40}",
        secret in "[a-z0-9]{16}",
    ) {
        let password = format!("pw-{secret}");
        // The original's field names and the aliases parse alike.
        for (user_field, password_field) in
            [("vcdUsername", "vcdPassword"), ("vcdUser", "vcdPassword"), ("username", "password")]
        {
            let body = json!({"type": "credentials", "site": site, user_field: user, password_field: password});
            let extend: ExtendRequest = serde_json::from_value(body)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(extend.site(), Some(site.as_str()));
            let shown = format!("{extend:?}");
            prop_assert!(!shown.contains(&password), "{}", shown);
            match &extend {
                ExtendRequest::Credentials { vcd_username, vcd_password, .. } => {
                    prop_assert_eq!(vcd_username, &user);
                    prop_assert_eq!(vcd_password, &password);
                }
                other => prop_assert!(false, "parsed as {:?}", other),
            }
        }

        let extend: ExtendRequest = serde_json::from_value(json!({"type": "multisite", "site": site}))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let is_multisite = matches!(&extend, ExtendRequest::Multisite { .. });
        prop_assert!(is_multisite);
        prop_assert_eq!(extend.site(), Some(site.as_str()));

        let multisite = MultisiteSessionRequest { user: user.clone() };
        let bytes = serde_json::to_vec(&multisite).expect("serializes");
        prop_assert_eq!(serde_json::from_slice::<MultisiteSessionRequest>(&bytes).ok(), Some(multisite));
    }

    /// A poll body is a list of task IDs: the answer names each distinct ID once, in the order
    /// first asked.
    #[test]
    fn poll_bodies_round_trip(ids in vec(task_id_spelling(), 0..40), repeats in vec(any::<prop::sample::Index>(), 0..10)) {
        let mut spelled: Vec<String> = ids.iter().map(|(_, s)| s.clone()).collect();
        if !spelled.is_empty() {
            for r in &repeats {
                spelled.push(r.get(&spelled).clone());
            }
        }
        let bytes = serde_json::to_vec(&spelled).expect("serializes");
        let body: Vec<String> = serde_json::from_slice(&bytes).expect("parses");
        let parsed = parse_poll_ids(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut expected: Vec<Uuid> = Vec::new();
        for (id, _) in &ids {
            if !expected.contains(id) {
                expected.push(*id);
            }
        }
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn poll_bodies_with_a_bad_id_are_refused(
        good in vec(uuid(), 0..5),
        bad in prop_oneof![
            uuid().prop_map(|u| u.simple().to_string()),
            uuid().prop_map(|u| u.braced().to_string()),
            uuid().prop_map(|u| u.urn().to_string()),
            uuid().prop_map(|u| format!(" {u}")),
            ".{0,40}".prop_filter("not a task ID", |s| Uuid::try_parse(s).is_err()),
        ],
        position in any::<prop::sample::Index>(),
    ) {
        let mut ids: Vec<String> = good.iter().map(Uuid::to_string).collect();
        ids.insert(position.index(ids.len() + 1), bad);
        assert_refused(parse_poll_ids(&ids), &format!("{ids:?}"))?;
    }
}

#[test]
fn polls_are_bounded() {
    let many = vec![Uuid::nil().to_string(); MAX_POLL_IDS];
    assert_eq!(parse_poll_ids(&many), Ok(vec![Uuid::nil()]));
    let too_many = vec![Uuid::nil().to_string(); MAX_POLL_IDS + 1];
    assert!(parse_poll_ids(&too_many).is_err());
}

// ---------------------------------------------------------------------------------------------
// Operation IDs and trace IDs.

/// The documented rule, written independently of the parser: 1..=128 visible ASCII characters.
fn is_valid_operation_id(raw: &str) -> bool {
    (1..=MAX_OPERATION_ID_LEN).contains(&raw.len())
        && raw.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Strings near the boundary of the rule: mostly visible ASCII, lengths around 128, now and then
/// a space, control, DEL or non-ASCII character.
fn operation_id_candidate() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]{0,140}",
        "[!-~]{120,130}",
        "[!-~]{0,20}[ \\x00-\\x20\\x7f\\u{80}-\\u{10FFFF}][!-~]{0,20}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn operation_ids_accept_exactly_the_documented_alphabet(raw in operation_id_candidate()) {
        match OperationId::parse(&raw) {
            Ok(id) => {
                prop_assert!(is_valid_operation_id(&raw), "accepted {:?}", raw);
                // Kept exactly as sent: the ID an operator searches for is the caller's.
                prop_assert_eq!(id.as_str(), raw.as_str());
                prop_assert_eq!(id.to_string(), raw);
            }
            Err(e) => {
                prop_assert!(!is_valid_operation_id(&raw), "refused {:?}", raw);
                assert_refused::<()>(Err(e), &raw)?;
            }
        }
    }

    #[test]
    fn trace_ids_are_deterministic_and_never_zero(raw in any::<String>()) {
        let id = derive_trace_id(&raw);
        prop_assert_eq!(id, derive_trace_id(&raw));
        prop_assert!(id.iter().any(|b| *b != 0), "all-zero trace ID for {:?}", raw);
    }

    #[test]
    fn trace_ids_of_operation_ids_are_never_zero(raw in operation_id_candidate()) {
        prop_assert!(derive_trace_id(&raw).iter().any(|b| *b != 0));
    }

    /// A UUID or 32 hex digits is the trace ID itself, in any case, so an operator can go from
    /// either ID to the other by hand; the nil UUID (an invalid trace ID) is hashed instead.
    #[test]
    fn uuid_and_hex_operation_ids_are_their_own_trace_ids(id in uuid(), upper in any::<bool>()) {
        let case = |s: String| if upper { s.to_uppercase() } else { s };
        let hyphenated = case(id.hyphenated().to_string());
        let simple = case(id.simple().to_string());
        let expected = *id.as_bytes();
        if id.is_nil() {
            prop_assert_ne!(derive_trace_id(&hyphenated), [0; 16]);
            prop_assert_ne!(derive_trace_id(&simple), [0; 16]);
        } else {
            prop_assert_eq!(derive_trace_id(&hyphenated), expected);
            prop_assert_eq!(derive_trace_id(&simple), expected);
        }
        // Other spellings of a UUID are just strings: hashed.
        for other in [id.braced().to_string(), id.urn().to_string(), format!(" {hyphenated}")] {
            let digest = sha2::Sha256::digest(other.as_bytes());
            prop_assert_eq!(&derive_trace_id(&other)[..], &digest[..16], "{}", other);
        }
    }

    #[test]
    fn other_operation_ids_are_hashed(
        raw in any::<String>().prop_filter("neither a UUID nor 32 hex digits", |s| {
            let hex = s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
            let uuid = s.len() == 36 && Uuid::try_parse(s).is_ok();
            !hex && !uuid
        }),
    ) {
        let digest = sha2::Sha256::digest(raw.as_bytes());
        prop_assert_eq!(&derive_trace_id(&raw)[..], &digest[..16]);
    }

    /// Different operations get different traces: canonical (lower-case) spellings of distinct
    /// operation IDs never share a trace ID in a large sample.
    #[test]
    fn distinct_operation_ids_get_distinct_trace_ids(
        ids in hash_set(
            prop_oneof![
                "[!-~]{1,40}",
                uuid().prop_map(|u| u.to_string()),
                uuid().prop_map(|u| u.simple().to_string()),
            ],
            1..200,
        ),
    ) {
        // Case variants of one UUID are one operation on purpose; compare one spelling each.
        let canonical: HashSet<String> = ids
            .iter()
            .map(|s| match Uuid::try_parse(s) {
                Ok(u) if s.len() == 36 || s.len() == 32 => u.simple().to_string(),
                _ => s.clone(),
            })
            .collect();
        let traces: HashSet<[u8; 16]> = canonical.iter().map(|s| derive_trace_id(s)).collect();
        prop_assert_eq!(traces.len(), canonical.len());
    }
}

#[test]
fn generated_operation_ids_are_valid_uuids_and_their_own_trace_ids() {
    let mut seen = HashSet::new();
    for _ in 0..1000 {
        let id = OperationId::generate();
        assert!(is_valid_operation_id(id.as_str()), "{id}");
        assert_eq!(OperationId::parse(id.as_str()).as_ref(), Ok(&id));
        let uuid = Uuid::try_parse(id.as_str()).expect("a generated ID is a UUID");
        assert_eq!(derive_trace_id(id.as_str()), *uuid.as_bytes());
        assert!(seen.insert(id), "a generated ID repeated");
    }
}
