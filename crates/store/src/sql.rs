//! The `GET /tasks` query as SQL, for either backend. Every value is a bound parameter; only
//! column names chosen from fixed tables are spliced into the text.

use sitegate_model::query::{SortField, TaskQuery};
use uuid::Uuid;

/// The SQL spoken by a backend: how parameters are written and what the owner column is
/// called (`user` is reserved in PostgreSQL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    pub fn user_column(self) -> &'static str {
        match self {
            Dialect::Sqlite => "user",
            Dialect::Postgres => "user_name",
        }
    }

    /// The columns every task read selects, in the order the backends read them.
    pub fn task_columns(self) -> String {
        format!(
            "id, {}, site, state, progress, start_time, last_updated, end_time, wf_type, \
             resource_type, resource_id, resource_name, result_type, result, error, warnings, \
             source_org, destination_org",
            self.user_column()
        )
    }
}

/// A bound parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlValue {
    Text(String),
    Int(i64),
    Uuid(Uuid),
}

fn sort_column(field: SortField, dialect: Dialect) -> &'static str {
    match field {
        SortField::StartTime => "start_time",
        SortField::LastUpdated => "last_updated",
        SortField::EndTime => "end_time",
        SortField::Progress => "progress",
        SortField::State => "state",
        SortField::User => dialect.user_column(),
        SortField::Id => "id",
        SortField::Type => "wf_type",
        SortField::ResourceType => "resource_type",
        SortField::ResourceId => "resource_id",
        SortField::ResourceName => "resource_name",
        SortField::SourceOrg => "source_org",
        SortField::DestinationOrg => "destination_org",
    }
}

/// A built query: the WHERE clause (possibly empty) and its parameters.
pub struct Filter {
    pub where_sql: String,
    pub params: Vec<SqlValue>,
}

pub fn filter(q: &TaskQuery, owner: Option<&str>, dialect: Dialect) -> Filter {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<SqlValue> = Vec::new();
    let bind = |value: SqlValue, params: &mut Vec<SqlValue>| {
        params.push(value);
        dialect.placeholder(params.len())
    };
    let user = dialect.user_column();
    if let Some(owner) = owner {
        let p = bind(SqlValue::Text(owner.to_owned()), &mut params);
        clauses.push(format!("{user} = {p}"));
    }
    if let Some(u) = &q.user {
        let p = bind(SqlValue::Text(u.clone()), &mut params);
        clauses.push(format!("{user} = {p}"));
    }
    for (column, value) in [
        ("wf_type", &q.workflow_type),
        ("resource_id", &q.resource_id),
        ("resource_name", &q.resource_name),
        ("source_org", &q.source_org),
        ("destination_org", &q.destination_org),
    ] {
        if let Some(v) = value {
            let p = bind(SqlValue::Text(v.clone()), &mut params);
            clauses.push(format!("{column} = {p}"));
        }
    }
    // A list filter matches any of its values: exactly the union of one query per value.
    if !q.resource_types.is_empty() {
        let marks: Vec<String> = q
            .resource_types
            .iter()
            .map(|t| bind(SqlValue::Text(t.clone()), &mut params))
            .collect();
        clauses.push(format!("resource_type IN ({})", marks.join(",")));
    }
    if !q.ids.is_empty() {
        let marks: Vec<String> = q
            .ids
            .iter()
            .map(|id| {
                let value = match dialect {
                    Dialect::Sqlite => SqlValue::Text(id.to_string()),
                    Dialect::Postgres => SqlValue::Uuid(*id),
                };
                bind(value, &mut params)
            })
            .collect();
        clauses.push(format!("id IN ({})", marks.join(",")));
    }
    if !q.states.is_empty() {
        let marks: Vec<String> = q
            .states
            .iter()
            .map(|s| bind(SqlValue::Text(s.as_str().to_owned()), &mut params))
            .collect();
        clauses.push(format!("state IN ({})", marks.join(",")));
    }
    for (template, value) in [
        ("start_time < {}", q.start_time_before),
        ("start_time > {}", q.start_time_after),
        // A running task's endTime is -1: it has not ended before or after anything.
        ("(end_time >= 0 AND end_time < {})", q.end_time_before),
        ("end_time > {}", q.end_time_after),
    ] {
        if let Some(v) = value {
            let p = bind(SqlValue::Int(v), &mut params);
            clauses.push(template.replace("{}", &p));
        }
    }
    let where_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    Filter { where_sql, params }
}

/// `ORDER BY`, always ending in the task ID so pages are stable.
pub fn order_by(q: &TaskQuery, dialect: Dialect) -> String {
    let mut keys: Vec<String> = q
        .sort
        .iter()
        .map(|k| {
            // NULLs sort first ascending in both backends, so pages agree across them.
            let nulls = match (dialect, k.descending) {
                (Dialect::Postgres, false) => " NULLS FIRST",
                (Dialect::Postgres, true) => " NULLS LAST",
                (Dialect::Sqlite, _) => "",
            };
            format!(
                "{} {}{nulls}",
                sort_column(k.field, dialect),
                if k.descending { "DESC" } else { "ASC" }
            )
        })
        .collect();
    if !q.sort.iter().any(|k| k.field == SortField::Id) {
        keys.push("id ASC".to_owned());
    }
    format!("ORDER BY {}", keys.join(", "))
}

/// A whole `GET /tasks` query for one backend: the page's `SELECT` with its parameters (the
/// filter's, then limit and offset), and the `COUNT` for `total`, which takes the first
/// `count_params` of them.
pub struct ListQuery {
    pub select: String,
    pub count: String,
    pub params: Vec<SqlValue>,
    pub count_params: usize,
}

pub fn list_query(q: &TaskQuery, owner: Option<&str>, dialect: Dialect) -> ListQuery {
    let filter = filter(q, owner, dialect);
    let select = format!(
        "SELECT {} FROM tasks {} {} {}",
        dialect.task_columns(),
        filter.where_sql,
        order_by(q, dialect),
        paging(&filter, dialect)
    );
    let count = format!("SELECT COUNT(*) FROM tasks {}", filter.where_sql);
    let count_params = filter.params.len();
    let mut params = filter.params;
    params.push(SqlValue::Int(i64::from(q.limit)));
    params.push(SqlValue::Int(q.offset as i64));
    ListQuery {
        select,
        count,
        params,
        count_params,
    }
}

/// `LIMIT`/`OFFSET` placeholders following a filter's parameters.
pub fn paging(filter: &Filter, dialect: Dialect) -> String {
    let n = filter.params.len();
    format!(
        "LIMIT {} OFFSET {}",
        dialect.placeholder(n + 1),
        dialect.placeholder(n + 2)
    )
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
        let f = filter(&q, Some("alice"), Dialect::Sqlite);
        assert_eq!(
            f.where_sql,
            "WHERE user = ?1 AND wf_type = ?2 AND state IN (?3,?4) AND (end_time >= 0 AND end_time < ?5)"
        );
        assert_eq!(f.params.len(), 5);
        assert!(!f.where_sql.contains("DROP"));
        assert_eq!(
            order_by(&q, Dialect::Sqlite),
            "ORDER BY progress DESC, id ASC"
        );
        assert_eq!(paging(&f, Dialect::Sqlite), "LIMIT ?6 OFFSET ?7");

        let f = filter(&q, Some("alice"), Dialect::Postgres);
        assert_eq!(
            f.where_sql,
            "WHERE user_name = $1 AND wf_type = $2 AND state IN ($3,$4) AND (end_time >= 0 AND end_time < $5)"
        );
        assert_eq!(
            order_by(&q, Dialect::Postgres),
            "ORDER BY progress DESC NULLS LAST, id ASC"
        );
    }

    #[test]
    fn ids_bind_as_the_backend_stores_them() {
        let id = Uuid::new_v4();
        let q = TaskQuery::parse(Some(&format!("ids={id}"))).unwrap();
        assert_eq!(
            filter(&q, None, Dialect::Sqlite).params,
            vec![SqlValue::Text(id.to_string())]
        );
        assert_eq!(
            filter(&q, None, Dialect::Postgres).params,
            vec![SqlValue::Uuid(id)]
        );
    }

    #[test]
    fn list_query_puts_paging_after_the_filter() {
        let q = TaskQuery::parse(Some("state=RUNNING&limit=7&offset=3")).unwrap();
        let list = list_query(&q, Some("alice"), Dialect::Postgres);
        assert_eq!(
            list.count,
            "SELECT COUNT(*) FROM tasks WHERE user_name = $1 AND state IN ($2)"
        );
        assert!(
            list.select.ends_with("LIMIT $3 OFFSET $4"),
            "{}",
            list.select
        );
        assert_eq!(list.count_params, 2);
        assert_eq!(&list.params[2..], &[SqlValue::Int(7), SqlValue::Int(3)]);
    }

    #[test]
    fn empty_query_has_no_where() {
        let q = TaskQuery::default();
        assert_eq!(filter(&q, None, Dialect::Sqlite).where_sql, "");
        assert_eq!(
            order_by(&q, Dialect::Sqlite),
            "ORDER BY start_time DESC, id ASC"
        );
    }
}
