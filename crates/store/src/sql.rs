//! The `GET /tasks` query as SQL. Every value is a bound parameter; only column names chosen
//! from fixed tables are spliced into the text.

use rusqlite::types::Value;
use sitegate_model::query::{SortField, TaskQuery};

/// The columns every task read selects, in the order `embedded::task_from_row` reads them.
pub const TASK_COLUMNS: &str = "id, user, site, state, progress, start_time, last_updated, \
     end_time, wf_type, resource_type, resource_id, resource_name, result_type, result, error, warnings";

fn sort_column(field: SortField) -> &'static str {
    match field {
        SortField::StartTime => "start_time",
        SortField::LastUpdated => "last_updated",
        SortField::EndTime => "end_time",
        SortField::Progress => "progress",
        SortField::State => "state",
        SortField::User => "user",
        SortField::Id => "id",
        SortField::Type => "wf_type",
        SortField::ResourceType => "resource_type",
        SortField::ResourceId => "resource_id",
        SortField::ResourceName => "resource_name",
    }
}

/// A built query: the WHERE clause (possibly empty) and its parameters.
pub struct Filter {
    pub where_sql: String,
    pub params: Vec<Value>,
}

pub fn filter(q: &TaskQuery, owner: Option<&str>) -> Filter {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    let mut eq = |column: &str, value: &str, clauses: &mut Vec<String>| {
        params.push(Value::Text(value.to_owned()));
        clauses.push(format!("{column} = ?{}", params.len()));
    };
    if let Some(owner) = owner {
        eq("user", owner, &mut clauses);
    }
    if let Some(user) = &q.user {
        eq("user", user, &mut clauses);
    }
    for (column, value) in [
        ("wf_type", &q.workflow_type),
        ("resource_type", &q.resource_type),
        ("resource_id", &q.resource_id),
        ("resource_name", &q.resource_name),
    ] {
        if let Some(v) = value {
            eq(column, v, &mut clauses);
        }
    }
    let mut in_list = |column: &str, values: Vec<String>, clauses: &mut Vec<String>| {
        let mut marks = Vec::with_capacity(values.len());
        for v in values {
            params.push(Value::Text(v));
            marks.push(format!("?{}", params.len()));
        }
        clauses.push(format!("{column} IN ({})", marks.join(",")));
    };
    if !q.ids.is_empty() {
        in_list(
            "id",
            q.ids.iter().map(|i| i.to_string()).collect(),
            &mut clauses,
        );
    }
    if !q.states.is_empty() {
        in_list(
            "state",
            q.states.iter().map(|s| s.as_str().to_owned()).collect(),
            &mut clauses,
        );
    }
    let mut cmp = |sql: &str, value: Option<i64>, clauses: &mut Vec<String>| {
        if let Some(v) = value {
            params.push(Value::Integer(v));
            clauses.push(sql.replace('?', &format!("?{}", params.len())));
        }
    };
    cmp("start_time < ?", q.start_time_before, &mut clauses);
    cmp("start_time > ?", q.start_time_after, &mut clauses);
    // A running task's endTime is -1: it has not ended before or after anything.
    cmp(
        "(end_time >= 0 AND end_time < ?)",
        q.end_time_before,
        &mut clauses,
    );
    cmp("end_time > ?", q.end_time_after, &mut clauses);
    let where_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    Filter { where_sql, params }
}

/// `ORDER BY`, always ending in the task ID so pages are stable.
pub fn order_by(q: &TaskQuery) -> String {
    let mut keys: Vec<String> = q
        .sort
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                sort_column(k.field),
                if k.descending { "DESC" } else { "ASC" }
            )
        })
        .collect();
    if !q.sort.iter().any(|k| k.field == SortField::Id) {
        keys.push("id ASC".to_owned());
    }
    format!("ORDER BY {}", keys.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_parameterised_sql() {
        let q = TaskQuery::parse(Some(
            "state=RUNNING,FAILED&type=x'; DROP TABLE tasks;--&endTimeBefore=9&sort=progress-",
        ))
        .unwrap();
        let f = filter(&q, Some("alice"));
        assert_eq!(
            f.where_sql,
            "WHERE user = ?1 AND wf_type = ?2 AND state IN (?3,?4) AND (end_time >= 0 AND end_time < ?5)"
        );
        assert_eq!(f.params.len(), 5);
        assert!(!f.where_sql.contains("DROP"));
        assert_eq!(order_by(&q), "ORDER BY progress DESC, id ASC");
    }

    #[test]
    fn empty_query_has_no_where() {
        let q = TaskQuery::default();
        assert_eq!(filter(&q, None).where_sql, "");
        assert_eq!(order_by(&q), "ORDER BY start_time DESC, id ASC");
    }
}
