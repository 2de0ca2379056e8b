//! Query strings: the `site` parameter every task endpoint takes, and the filters, sort and
//! paging of `GET /tasks`.

use uuid::Uuid;

use crate::error::echo;
use crate::task::{parse_task_id, TaskState};
use crate::{EpochMillis, ModelError};

/// `limit` when none is given, and the most it is clamped to.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
/// The most IDs the `ids` filter may name.
pub const MAX_IDS_FILTER: usize = 1000;
/// Longer query strings are refused before they are parsed.
pub const MAX_QUERY_LEN: usize = 64 * 1024;

/// The most ignored parameter names kept for the operator's log line.
pub const MAX_IGNORED_NAMES: usize = 8;

/// A query string split into decoded pairs of the names an endpoint knows, and the names it
/// ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryPairs {
    pub pairs: Vec<(String, String)>,
    /// Names the endpoint does not know, as the original API ignores them (a public client
    /// sends `operationID` as a query parameter); at most [`MAX_IGNORED_NAMES`], each cut
    /// for a log line. The gateway logs and counts them.
    pub ignored: Vec<String>,
}

/// Splits a raw query string into decoded pairs. Names not in `allowed` are ignored (and
/// reported in [`QueryPairs::ignored`]), as the original API does. A name in `lists` may be
/// given more than once: its values are joined with commas, as if sent as one comma list.
/// Any other name given twice is refused, since only one of its values could be used.
pub fn parse_pairs(
    raw: Option<&str>,
    allowed: &[&str],
    lists: &[&str],
) -> Result<QueryPairs, ModelError> {
    let raw = raw.unwrap_or("");
    if raw.len() > MAX_QUERY_LEN {
        return Err(ModelError::invalid("the query string is too long"));
    }
    let decoded: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|_| ModelError::invalid("the query string is not valid URL encoding"))?;
    let mut out = QueryPairs::default();
    for (name, value) in decoded {
        if !allowed.contains(&name.as_str()) {
            if out.ignored.len() < MAX_IGNORED_NAMES && !out.ignored.contains(&name) {
                out.ignored.push(echo(&name).chars().take(64).collect());
            }
            continue;
        }
        match out.pairs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, first)) if lists.contains(&name.as_str()) => {
                first.push(',');
                first.push_str(&value);
            }
            Some(_) => {
                return Err(ModelError::invalid(format!(
                    "query parameter '{}' is given more than once",
                    echo(&name)
                )))
            }
            None => out.pairs.push((name, value)),
        }
    }
    let pairs = &out.pairs;
    // serde_urlencoded decodes lossily (`%FF` becomes U+FFFD), so a value that is not UTF-8
    // once percent-decoded would be searched for as a different string; it is refused instead.
    // `site` is exempt: it is only compared with site names, so a value that names no site is
    // `SiteNotFound` whatever its bytes. The scan runs only when a replacement character shows.
    if pairs
        .iter()
        .any(|(name, value)| name != "site" && value.contains('\u{FFFD}'))
    {
        for segment in raw.split('&') {
            let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
            let name = percent_decode(name);
            let known = allowed.iter().any(|a| a.as_bytes() == name.as_slice());
            if known && name != b"site" && std::str::from_utf8(&percent_decode(value)).is_err() {
                return Err(ModelError::invalid(format!(
                    "query parameter '{}' is not UTF-8 once percent-decoded",
                    echo(&String::from_utf8_lossy(&name))
                )));
            }
        }
    }
    Ok(out)
}

/// One query-string component decoded as form encoding does (`+` is a space; a `%` without two
/// hex digits after it stays as it is), but to bytes, without the lossy step to UTF-8.
fn percent_decode(component: &str) -> Vec<u8> {
    let bytes = component.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|b| char::from(*b).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    out
}

/// The query of an endpoint that takes only `site` (`POST /tasks/poll`, the event stream).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteQuery {
    pub site: Option<String>,
    /// Parameter names the endpoint ignored (see [`QueryPairs::ignored`]).
    pub ignored: Vec<String>,
}

pub fn parse_site_only(raw: Option<&str>) -> Result<SiteQuery, ModelError> {
    let parsed = parse_pairs(raw, &["site"], &[])?;
    Ok(SiteQuery {
        site: parsed.pairs.into_iter().next().map(|(_, v)| v),
        ignored: parsed.ignored,
    })
}

/// A field `GET /tasks` can sort by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortField {
    StartTime,
    LastUpdated,
    EndTime,
    Progress,
    State,
    User,
    Id,
    Type,
    ResourceType,
    ResourceId,
    ResourceName,
    SourceOrg,
    DestinationOrg,
}

impl SortField {
    const NAMES: [(&'static str, SortField); 13] = [
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
        ("sourceOrg", SortField::SourceOrg),
        ("destinationOrg", SortField::DestinationOrg),
    ];

    fn parse(raw: &str) -> Result<Self, ModelError> {
        SortField::NAMES
            .iter()
            .find(|(name, _)| *name == raw)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = SortField::NAMES.iter().map(|(n, _)| *n).collect();
                ModelError::invalid(format!(
                    "cannot sort by '{}'; sortable fields: {}",
                    echo(raw),
                    known.join(", ")
                ))
            })
    }
}

/// One sort key: a field and its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SortKey {
    pub field: SortField,
    pub descending: bool,
}

/// Parses `sort`: a comma list of fields where a `-` before or after a field means descending
/// (`-startTime` and `startTime-` are the same key).
pub fn parse_sort(raw: &str) -> Result<Vec<SortKey>, ModelError> {
    let mut keys = Vec::new();
    for part in raw.split(',') {
        let part = part.trim();
        let (name, descending) = if let Some(n) = part.strip_prefix('-') {
            (n, true)
        } else if let Some(n) = part.strip_suffix('-') {
            (n, true)
        } else {
            (part, false)
        };
        let field = SortField::parse(name)?;
        if keys.iter().any(|k: &SortKey| k.field == field) {
            return Err(ModelError::invalid(format!("sort names '{name}' twice")));
        }
        keys.push(SortKey { field, descending });
    }
    Ok(keys)
}

/// `GET /tasks` parsed and validated. Visibility (who may see what) is not part of it: the
/// gateway adds the owner filter for non-admin callers.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskQuery {
    pub site: Option<String>,
    pub ids: Vec<Uuid>,
    pub user: Option<String>,
    pub states: Vec<TaskState>,
    pub workflow_type: Option<String>,
    /// Any of these (`resourceType` is a comma list in the original API); empty: any.
    pub resource_types: Vec<String>,
    pub resource_id: Option<String>,
    pub resource_name: Option<String>,
    pub start_time_before: Option<EpochMillis>,
    pub start_time_after: Option<EpochMillis>,
    pub end_time_before: Option<EpochMillis>,
    pub end_time_after: Option<EpochMillis>,
    /// The organisation at the task's source (case-sensitive, as the original).
    pub source_org: Option<String>,
    /// The organisation at the task's destination; administrators only, not with `user`.
    pub destination_org: Option<String>,
    pub sort: Vec<SortKey>,
    pub limit: u32,
    pub offset: u64,
    /// Parameter names ignored (see [`QueryPairs::ignored`]); never forwarded.
    pub ignored: Vec<String>,
}

impl Default for TaskQuery {
    fn default() -> Self {
        TaskQuery {
            site: None,
            ids: Vec::new(),
            user: None,
            states: Vec::new(),
            workflow_type: None,
            resource_types: Vec::new(),
            resource_id: None,
            resource_name: None,
            start_time_before: None,
            start_time_after: None,
            end_time_before: None,
            end_time_after: None,
            source_org: None,
            destination_org: None,
            sort: vec![SortKey {
                field: SortField::StartTime,
                descending: true,
            }],
            limit: DEFAULT_LIMIT,
            offset: 0,
            ignored: Vec::new(),
        }
    }
}

/// The parameters the original API documents as lists: a comma list, or the name repeated.
const LIST_PARAMS: [&str; 4] = ["ids", "state", "resourceType", "sort"];

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

impl TaskQuery {
    pub fn parse(raw: Option<&str>) -> Result<Self, ModelError> {
        let mut q = TaskQuery::default();
        let parsed = parse_pairs(raw, &QUERY_PARAMS, &LIST_PARAMS)?;
        q.ignored = parsed.ignored;
        for (name, value) in parsed.pairs {
            match name.as_str() {
                "site" => q.site = Some(value),
                "ids" => q.ids = parse_ids(&value)?,
                "user" => {
                    crate::session::validate_user_name(&value)?;
                    q.user = Some(value)
                }
                "state" => q.states = parse_states(&value)?,
                "type" => q.workflow_type = Some(text_filter(&name, value)?),
                "resourceType" => q.resource_types = parse_text_list(&name, &value)?,
                "resourceId" => q.resource_id = Some(text_filter(&name, value)?),
                "resourceName" => q.resource_name = Some(text_filter(&name, value)?),
                "startTimeBefore" => q.start_time_before = Some(parse_time(&name, &value)?),
                "startTimeAfter" => q.start_time_after = Some(parse_time(&name, &value)?),
                "endTimeBefore" => q.end_time_before = Some(parse_time(&name, &value)?),
                "endTimeAfter" => q.end_time_after = Some(parse_time(&name, &value)?),
                "sourceOrg" => q.source_org = Some(text_filter(&name, value)?),
                "destinationOrg" => q.destination_org = Some(text_filter(&name, value)?),
                "sort" => q.sort = parse_sort(&value)?,
                "limit" => q.limit = parse_limit(&value)?,
                "offset" => q.offset = parse_offset(&value)?,
                // parse_pairs admits only the names above.
                _ => {}
            }
        }
        Ok(q)
    }

    /// The query as a string again, for forwarding to a peer; `site` is left out because the
    /// peer answers for itself.
    pub fn to_query_string_without_site(&self) -> String {
        let mut s = form_urlencoded_pairs(self);
        s.retain(|(k, _)| k != "site");
        serde_urlencoded::to_string(&s).unwrap_or_default()
    }
}

fn form_urlencoded_pairs(q: &TaskQuery) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, v: String| out.push((k.to_owned(), v));
    if let Some(s) = &q.site {
        push("site", s.clone());
    }
    if !q.ids.is_empty() {
        push(
            "ids",
            q.ids
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if let Some(u) = &q.user {
        push("user", u.clone());
    }
    if !q.states.is_empty() {
        push(
            "state",
            q.states
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if !q.resource_types.is_empty() {
        push("resourceType", q.resource_types.join(","));
    }
    for (k, v) in [
        ("type", &q.workflow_type),
        ("resourceId", &q.resource_id),
        ("resourceName", &q.resource_name),
        ("sourceOrg", &q.source_org),
        ("destinationOrg", &q.destination_org),
    ] {
        if let Some(v) = v {
            push(k, v.clone());
        }
    }
    for (k, v) in [
        ("startTimeBefore", q.start_time_before),
        ("startTimeAfter", q.start_time_after),
        ("endTimeBefore", q.end_time_before),
        ("endTimeAfter", q.end_time_after),
    ] {
        if let Some(v) = v {
            push(k, v.to_string());
        }
    }
    let sort: Vec<String> = q
        .sort
        .iter()
        .map(|k| {
            let name = SortField::NAMES
                .iter()
                .find(|(_, f)| *f == k.field)
                .map(|(n, _)| *n)
                .unwrap_or("startTime");
            if k.descending {
                format!("-{name}")
            } else {
                name.to_owned()
            }
        })
        .collect();
    push("sort", sort.join(","));
    push("limit", q.limit.to_string());
    push("offset", q.offset.to_string());
    out
}

/// A filter on a stored text field: the same rules as when the field is written, so a value
/// that can never be stored (too long, control characters) is refused, not searched for.
fn text_filter(name: &str, value: String) -> Result<String, ModelError> {
    crate::task::validate_text(name, &value)?;
    Ok(value)
}

/// The most values a text list filter (`resourceType`) may hold.
pub const MAX_LIST_VALUES: usize = 100;

/// A comma list of text values (`resourceType=replication,vmReplication`), each checked as a
/// stored value is and kept once; empty entries are left out. Only spaces around a value are
/// dropped: `str::trim` would also drop a tab or a C1 control, and accept a value that the
/// same filter refuses on its own (`resourceType=%09a` as `a`).
fn parse_text_list(name: &str, raw: &str) -> Result<Vec<String>, ModelError> {
    let mut values: Vec<String> = Vec::new();
    for part in raw
        .split(',')
        .map(|p| p.trim_matches(' '))
        .filter(|p| !p.is_empty())
    {
        crate::task::validate_text(name, part)?;
        if !values.iter().any(|v| v == part) {
            if values.len() == MAX_LIST_VALUES {
                return Err(ModelError::invalid(format!(
                    "{name} may list at most {MAX_LIST_VALUES} values"
                )));
            }
            values.push(part.to_owned());
        }
    }
    if values.is_empty() {
        return Err(ModelError::invalid(format!(
            "{name} must name at least one value"
        )));
    }
    Ok(values)
}

/// A comma list of states, each kept once: there are only three, and a list repeating them
/// thousands of times (a long query string) must not become thousands of SQL parameters.
fn parse_states(raw: &str) -> Result<Vec<TaskState>, ModelError> {
    let mut states = Vec::new();
    for part in raw.split(',') {
        let state = TaskState::parse(part.trim())?;
        if !states.contains(&state) {
            states.push(state);
        }
    }
    Ok(states)
}

fn parse_ids(raw: &str) -> Result<Vec<Uuid>, ModelError> {
    let mut ids = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if ids.len() == MAX_IDS_FILTER {
            return Err(ModelError::invalid(format!(
                "ids may name at most {MAX_IDS_FILTER} tasks"
            )));
        }
        ids.push(parse_task_id(part)?);
    }
    Ok(ids)
}

fn parse_time(name: &str, raw: &str) -> Result<EpochMillis, ModelError> {
    raw.parse::<i64>().ok().filter(|t| *t >= 0).ok_or_else(|| {
        ModelError::invalid(format!(
            "{name} must be a time in epoch milliseconds (a non-negative integer), not '{}'",
            echo(raw)
        ))
    })
}

fn parse_limit(raw: &str) -> Result<u32, ModelError> {
    let n: u64 = raw.parse().map_err(|_| {
        ModelError::invalid(format!(
            "limit must be an integer from 0 to {MAX_LIMIT}, not '{}'",
            echo(raw)
        ))
    })?;
    // Larger limits are clamped rather than refused, as the original API does.
    Ok(n.min(u64::from(MAX_LIMIT)) as u32)
}

fn parse_offset(raw: &str) -> Result<u64, ModelError> {
    raw.parse::<u64>()
        .ok()
        .filter(|n| *n <= i64::MAX as u64)
        .ok_or_else(|| {
            ModelError::invalid(format!(
                "offset must be a non-negative integer, not '{}'",
                echo(raw)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let q = TaskQuery::parse(None).unwrap();
        assert_eq!(q.limit, 100);
        assert_eq!(q.offset, 0);
        assert_eq!(
            q.sort,
            vec![SortKey {
                field: SortField::StartTime,
                descending: true
            }]
        );
    }

    #[test]
    fn good_queries() {
        let q = TaskQuery::parse(Some(
            "state=RUNNING,FAILED&type=sync&resourceName=vm%201&limit=5000&offset=10&sort=user,startTime-&startTimeAfter=5",
        ))
        .unwrap();
        assert_eq!(q.states, vec![TaskState::Running, TaskState::Failed]);
        assert_eq!(q.workflow_type.as_deref(), Some("sync"));
        assert_eq!(q.resource_name.as_deref(), Some("vm 1"));
        assert_eq!(q.limit, MAX_LIMIT, "limit is clamped");
        assert_eq!(q.offset, 10);
        assert_eq!(
            q.sort,
            vec![
                SortKey {
                    field: SortField::User,
                    descending: false
                },
                SortKey {
                    field: SortField::StartTime,
                    descending: true
                }
            ]
        );
        assert_eq!(q.start_time_after, Some(5));
    }

    #[test]
    fn bad_queries() {
        for raw in [
            "limit=-1",
            "limit=abc",
            "limit=99999999999999999999999",
            "offset=-5",
            "offset=1.5",
            "state=DONE",
            "state=",
            "state=RUNNING,",
            "state=running",
            "sort=bogus",
            "sort=user,user",
            "sort=",
            "ids=not-a-uuid",
            "startTimeBefore=yesterday",
            "endTimeAfter=-3",
            "limit=1&limit=2",
            "resourceType=,",
            "resourceType=a%00,b",
            "user=bad%20name",
            "type=sync%00",
            "resourceName=a%0Ab",
            // A control character at the edge of a list value (found by the property tests).
            "resourceType=%09a",
            "resourceType=a,b%C2%85",
            // Not UTF-8 once percent-decoded (found by the property tests).
            "type=%80",
            "resourceId=a%C3",
            "resourceName=%ED%A0%80",
        ] {
            assert!(TaskQuery::parse(Some(raw)).is_err(), "{raw}");
        }
    }

    #[test]
    fn unknown_names_are_ignored_and_reported_but_known_values_stay_strict() {
        let q = TaskQuery::parse(Some("stat=RUNNING&operationID=Powershell__1&limit=5")).unwrap();
        assert_eq!(q.limit, 5);
        assert!(q.states.is_empty());
        assert_eq!(q.ignored, vec!["stat", "operationID"]);
        assert!(TaskQuery::parse(Some("operationID=x&limit=abc")).is_err());
        // The report is bounded however many names are sent.
        let many: Vec<String> = (0..100).map(|i| format!("p{i}=1")).collect();
        let q = TaskQuery::parse(Some(&many.join("&"))).unwrap();
        assert_eq!(q.ignored.len(), MAX_IGNORED_NAMES);
    }

    #[test]
    fn list_filters_take_comma_lists_and_repeated_names() {
        // What the PowerShell module sends: PowerShell's encoding of the commas.
        let q = TaskQuery::parse(Some(
            "offset=0&limit=100&resourceType=replication%2CvmReplication%2cvappReplication",
        ))
        .unwrap();
        assert_eq!(
            q.resource_types,
            vec!["replication", "vmReplication", "vappReplication"]
        );
        let q = TaskQuery::parse(Some(
            "resourceType=a&resourceType=b,a&state=RUNNING&state=FAILED",
        ))
        .unwrap();
        assert_eq!(q.resource_types, vec!["a", "b"]);
        assert_eq!(q.states, vec![TaskState::Running, TaskState::Failed]);
        let q = TaskQuery::parse(Some("sourceOrg=Org1&destinationOrg=Org%202")).unwrap();
        assert_eq!(q.source_org.as_deref(), Some("Org1"));
        assert_eq!(q.destination_org.as_deref(), Some("Org 2"));
        let q = TaskQuery::parse(Some("sort=sourceOrg,startTime-")).unwrap();
        assert_eq!(q.sort[0].field, SortField::SourceOrg);
    }

    #[test]
    fn repeated_states_are_kept_once() {
        let raw = format!("state={}", ["RUNNING", "FAILED"].repeat(3000).join(","));
        let q = TaskQuery::parse(Some(&raw)).unwrap();
        assert_eq!(q.states, vec![TaskState::Running, TaskState::Failed]);
    }

    #[test]
    fn forwarding_round_trips_without_site() {
        let q = TaskQuery::parse(Some("site=site2&state=RUNNING&limit=7&sort=-progress&ids=f61d60d2-698a-46dc-a266-88df27644956&resourceType=a,b&sourceOrg=o1&destinationOrg=o2")).unwrap();
        let s = q.to_query_string_without_site();
        assert!(!s.contains("site="));
        let mut back = TaskQuery::parse(Some(&s)).unwrap();
        back.site = q.site.clone();
        assert_eq!(back, q);
    }

    #[test]
    fn site_only() {
        assert_eq!(
            parse_site_only(Some("site=site1")).unwrap().site.as_deref(),
            Some("site1")
        );
        assert_eq!(parse_site_only(None).unwrap().site, None);
        let ignored = parse_site_only(Some("limit=1&operationID=x")).unwrap();
        assert_eq!(ignored.site, None);
        assert_eq!(ignored.ignored, vec!["limit", "operationID"]);
    }

    #[test]
    fn only_undecodable_bytes_are_refused() {
        // A real U+FFFD is a value like any other.
        let q = TaskQuery::parse(Some("type=%EF%BF%BD&resourceId=%2B+%25")).unwrap();
        assert_eq!(q.workflow_type.as_deref(), Some("\u{FFFD}"));
        assert_eq!(q.resource_id.as_deref(), Some("+ %"));
        // A `site` names no site whatever its bytes: the resolver answers SiteNotFound.
        assert!(parse_site_only(Some("site=%FF%FE")).is_ok());
    }
}
