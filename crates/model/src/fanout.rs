//! All-sites queries: `GET /tasks?site=*` asks the local site and every peer the session is
//! extended to, then merges their pages here. The merge must order exactly as each store
//! does (`ORDER BY` with the sort keys, then `id`; NULLs first ascending and last descending;
//! text by bytes), or a merged page would disagree with the pages it was made from.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::query::{SortField, SortKey, TaskQuery, MAX_LIMIT};
use crate::task::Task;
use crate::{ErrorEnvelope, ModelError};

/// The `site` value that means every site.
pub const ALL_SITES: &str = "*";

/// `GET /tasks?site=*` answer: the usual page and total, plus the sites that could not answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FanOutList {
    pub items: Vec<Task>,
    /// The sum of the totals of the sites that answered.
    pub total: u64,
    /// The page asked for, as in a single site's answer.
    pub limit: u32,
    pub offset: u64,
    pub site_errors: Vec<SiteError>,
}

/// One site's failure inside an all-sites answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SiteError {
    pub site: String,
    pub error: ErrorEnvelope,
}

/// The query each site is asked: the same filters and sort, from the first row, as many rows
/// as the merged page can need (`offset + limit`). Refused when that is more than one site may
/// return, since the merged page could then be wrong.
pub fn per_site_query(q: &TaskQuery) -> Result<TaskQuery, ModelError> {
    let needed = q.offset.saturating_add(u64::from(q.limit));
    if needed > u64::from(MAX_LIMIT) {
        return Err(ModelError::invalid(format!(
            "with site=*, offset + limit may be at most {MAX_LIMIT} (each site is asked for \
             that many rows to merge a page); narrow the filters instead"
        )));
    }
    Ok(TaskQuery {
        site: None,
        offset: 0,
        // `needed` fits: it is at most MAX_LIMIT.
        limit: u32::try_from(needed).unwrap_or(MAX_LIMIT),
        ..q.clone()
    })
}

/// Merges the sites' pages (each already sorted by `q.sort`) into the page `q` asks for.
pub fn merge(q: &TaskQuery, pages: Vec<Vec<Task>>) -> Vec<Task> {
    let mut all: Vec<Task> = pages.into_iter().flatten().collect();
    all.sort_by(|a, b| compare(&q.sort, a, b));
    all.into_iter()
        .skip(usize::try_from(q.offset).unwrap_or(usize::MAX))
        .take(q.limit as usize)
        .collect()
}

/// The stores' order: the keys in turn, then `id` ascending unless a key was `id`.
pub fn compare(sort: &[SortKey], a: &Task, b: &Task) -> Ordering {
    for key in sort {
        let ord = compare_field(key.field, a, b);
        let ord = if key.descending { ord.reverse() } else { ord };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    if sort.iter().any(|k| k.field == SortField::Id) {
        Ordering::Equal
    } else {
        id_text(a).cmp(&id_text(b))
    }
}

/// Ids are stored and compared as their hyphenated lower-case text.
fn id_text(t: &Task) -> String {
    t.id.hyphenated().to_string()
}

/// Ascending order of one field; `None` (SQL NULL) first, text by bytes (the "C" collation).
fn compare_field(field: SortField, a: &Task, b: &Task) -> Ordering {
    let text = |x: &Option<String>, y: &Option<String>| match (x, y) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(x), Some(y)) => x.as_bytes().cmp(y.as_bytes()),
    };
    let (wa, wb) = (&a.workflow_info, &b.workflow_info);
    match field {
        SortField::StartTime => a.start_time.cmp(&b.start_time),
        SortField::LastUpdated => a.last_updated.cmp(&b.last_updated),
        SortField::EndTime => a.end_time.cmp(&b.end_time),
        SortField::Progress => a.progress.cmp(&b.progress),
        SortField::State => a.state.as_str().cmp(b.state.as_str()),
        SortField::User => a.user.as_bytes().cmp(b.user.as_bytes()),
        SortField::Id => id_text(a).cmp(&id_text(b)),
        SortField::Type => wa.workflow_type.as_bytes().cmp(wb.workflow_type.as_bytes()),
        SortField::ResourceType => text(&wa.resource_type, &wb.resource_type),
        SortField::ResourceId => text(&wa.resource_id, &wb.resource_id),
        SortField::ResourceName => text(&wa.resource_name, &wb.resource_name),
        SortField::SourceOrg => text(&a.source_org, &b.source_org),
        SortField::DestinationOrg => text(&a.destination_org, &b.destination_org),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{TaskState, WorkflowInfo};
    use uuid::Uuid;

    fn task(n: u128, start: i64, name: Option<&str>) -> Task {
        Task {
            id: Uuid::from_u128(n),
            user: "alice".into(),
            site: "s".into(),
            state: TaskState::Running,
            progress: 0,
            start_time: start,
            last_updated: start,
            end_time: -1,
            result_type: None,
            result: None,
            error: None,
            warnings: Vec::new(),
            workflow_info: WorkflowInfo {
                workflow_type: "Sync".into(),
                resource_type: None,
                resource_id: None,
                resource_name: name.map(str::to_owned),
            },
            source_org: None,
            destination_org: None,
        }
    }

    #[test]
    fn merges_sorted_pages_into_the_asked_page() {
        let q = TaskQuery::parse(Some("sort=-startTime&limit=2&offset=1")).expect("query");
        let site1 = vec![task(1, 50, None), task(2, 30, None), task(3, 10, None)];
        let site2 = vec![task(4, 40, None), task(5, 20, None)];
        let page = merge(&q, vec![site1, site2]);
        let starts: Vec<i64> = page.iter().map(|t| t.start_time).collect();
        assert_eq!(starts, vec![40, 30]);
    }

    #[test]
    fn nulls_first_ascending_and_last_descending_then_id() {
        let (a, b, c) = (
            task(9, 1, None),
            task(2, 1, Some("B")),
            task(1, 1, Some("a")),
        );
        let asc = TaskQuery::parse(Some("sort=resourceName")).expect("q").sort;
        let mut v = vec![c.clone(), b.clone(), a.clone()];
        v.sort_by(|x, y| compare(&asc, x, y));
        // NULL first; "B" < "a" by bytes.
        assert_eq!(v, vec![a.clone(), b.clone(), c.clone()]);
        let desc = TaskQuery::parse(Some("sort=-resourceName"))
            .expect("q")
            .sort;
        v.sort_by(|x, y| compare(&desc, x, y));
        assert_eq!(v, vec![c, b, a]);
        // Equal keys: id ascending.
        let mut same = [task(7, 5, None), task(3, 5, None)];
        same.sort_by(|x, y| compare(&[], x, y));
        assert_eq!(same[0].id, Uuid::from_u128(3));
    }

    #[test]
    fn per_site_queries_start_at_zero_and_are_bounded() {
        let q = TaskQuery::parse(Some("site=*&limit=100&offset=50&state=RUNNING")).expect("q");
        let each = per_site_query(&q).expect("fits");
        assert_eq!((each.offset, each.limit, each.site.clone()), (0, 150, None));
        assert_eq!(each.states, q.states);
        let too_deep = TaskQuery::parse(Some("site=*&limit=100&offset=950")).expect("q");
        assert!(per_site_query(&too_deep).is_err());
    }
}
