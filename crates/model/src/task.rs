//! The task object and the task-writer API's request bodies.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{EpochMillis, ErrorEnvelope, ModelError};

/// A task's state; only `Running` is not final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        match raw {
            "RUNNING" => Ok(TaskState::Running),
            "SUCCEEDED" => Ok(TaskState::Succeeded),
            "FAILED" => Ok(TaskState::Failed),
            other => Err(ModelError::invalid(format!(
                "'{}' is not a task state: use RUNNING, SUCCEEDED or FAILED",
                crate::error::echo(other)
            ))),
        }
    }

    pub fn is_final(self) -> bool {
        self != TaskState::Running
    }
}

/// What a task works on. Only `type` is required when a task is created; the rest may be null.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowInfo {
    #[serde(rename = "type", default)]
    pub workflow_type: String,
    #[serde(default)]
    pub resource_type: Option<String>,
    #[serde(default)]
    pub resource_id: Option<String>,
    #[serde(default)]
    pub resource_name: Option<String>,
}

/// A long-running operation's record, exactly as the original API names its fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: Uuid,
    pub user: String,
    pub site: String,
    pub state: TaskState,
    #[schema(maximum = 100)]
    pub progress: u8,
    #[schema(value_type = i64)]
    pub start_time: EpochMillis,
    #[schema(value_type = i64)]
    pub last_updated: EpochMillis,
    /// `-1` while the task is running.
    #[schema(value_type = i64, minimum = -1)]
    pub end_time: EpochMillis,
    /// Set only when the task succeeded.
    #[serde(default)]
    pub result_type: Option<String>,
    /// Set only when the task succeeded; any JSON.
    #[serde(default)]
    pub result: Option<Value>,
    /// Set only when the task failed.
    #[serde(default)]
    pub error: Option<ErrorEnvelope>,
    #[serde(default)]
    pub warnings: Vec<ErrorEnvelope>,
    #[serde(default)]
    pub workflow_info: WorkflowInfo,
    /// The organisation the task concerns at its source, when its writer named one (the
    /// original's `sourceOrg` filter). Sent only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_org: Option<String>,
    /// The organisation at the task's destination (the `destinationOrg` filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_org: Option<String>,
}

/// The column order of `POST /tasks/poll` answers.
pub const POLL_PROPERTY_NAMES: [&str; 13] = [
    "id",
    "user",
    "site",
    "state",
    "progress",
    "startTime",
    "lastUpdated",
    "endTime",
    "resultType",
    "result",
    "error",
    "warnings",
    "workflowInfo",
];

impl Task {
    /// The task as one row of a poll answer, in [`POLL_PROPERTY_NAMES`] order.
    pub fn poll_row(&self) -> Vec<Value> {
        vec![
            Value::String(self.id.to_string()),
            Value::String(self.user.clone()),
            Value::String(self.site.clone()),
            Value::String(self.state.as_str().to_owned()),
            Value::from(self.progress),
            Value::from(self.start_time),
            Value::from(self.last_updated),
            Value::from(self.end_time),
            self.result_type.clone().map_or(Value::Null, Value::String),
            self.result.clone().unwrap_or(Value::Null),
            self.error
                .as_ref()
                .and_then(|e| serde_json::to_value(e).ok())
                .unwrap_or(Value::Null),
            serde_json::to_value(&self.warnings).unwrap_or(Value::Array(Vec::new())),
            serde_json::to_value(&self.workflow_info).unwrap_or(Value::Null),
        ]
    }
}

/// `GET /tasks` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskList {
    pub items: Vec<Task>,
    pub total: u64,
    /// The page asked for, echoed as the original API does (clients page with them).
    #[serde(default)]
    pub limit: u32,
    #[serde(default)]
    pub offset: u64,
}

/// `POST /tasks/poll` answer: columnar, one row per visible task in the order asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollResponse {
    pub property_names: Vec<String>,
    pub values: Vec<Vec<Value>>,
}

impl PollResponse {
    pub fn from_tasks<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> Self {
        PollResponse {
            property_names: POLL_PROPERTY_NAMES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            values: tasks.into_iter().map(Task::poll_row).collect(),
        }
    }
}

/// The most IDs one poll may ask for.
pub const MAX_POLL_IDS: usize = 1000;

/// Parses a `POST /tasks/poll` body into distinct task IDs, first occurrence first.
pub fn parse_poll_ids(raw: &[String]) -> Result<Vec<Uuid>, ModelError> {
    if raw.len() > MAX_POLL_IDS {
        return Err(ModelError::invalid(format!(
            "a poll may ask for at most {MAX_POLL_IDS} task IDs"
        )));
    }
    let mut ids = Vec::with_capacity(raw.len());
    for r in raw {
        let id = parse_task_id(r)?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Parses a task ID: a UUID in its hyphenated form.
pub fn parse_task_id(raw: &str) -> Result<Uuid, ModelError> {
    // Only the canonical 36-character form is accepted, so one task has one spelling in URLs,
    // logs and caches.
    if raw.len() != 36 {
        return Err(bad_uuid(raw));
    }
    Uuid::try_parse(raw).map_err(|_| bad_uuid(raw))
}

fn bad_uuid(raw: &str) -> ModelError {
    ModelError::invalid(format!(
        "'{}' is not a valid task ID: expected a UUID such as f61d60d2-698a-46dc-a266-88df27644956",
        crate::error::echo(raw)
    ))
}

/// The longest user name, workflow type or resource field accepted in a task write.
pub const MAX_FIELD_LEN: usize = 256;
/// The most warnings one patch may append, and the most a task may hold.
pub const MAX_WARNINGS_PER_PATCH: usize = 100;
pub const MAX_WARNINGS_PER_TASK: usize = 1000;
/// The most bytes a task may take as JSON (with its result and warnings): a write that would
/// make it larger is refused. Bounds what a page of tasks holds in memory.
pub const MAX_TASK_BYTES: usize = 256 * 1024;

/// A short text field of a task (workflow fields, `resultType`): at most [`MAX_FIELD_LEN`]
/// bytes and no control characters, so it is safe in every store, log line and header.
pub fn validate_text(name: &str, value: &str) -> Result<(), ModelError> {
    if value.len() > MAX_FIELD_LEN || value.chars().any(char::is_control) {
        return Err(ModelError::invalid(format!(
            "{name} must be at most {MAX_FIELD_LEN} bytes with no control characters"
        )));
    }
    Ok(())
}

/// `POST /tasks` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewTask {
    #[serde(default)]
    pub id: Option<Uuid>,
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub user: String,
    #[serde(deserialize_with = "strict::workflow_info")]
    #[schema(value_type = strict::StrictWorkflowInfo)]
    pub workflow_info: WorkflowInfo,
    /// The organisation the task concerns at its source (filter `sourceOrg`).
    #[serde(default)]
    #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub source_org: Option<String>,
    /// The organisation at the task's destination (filter `destinationOrg`, admins only).
    #[serde(default)]
    #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub destination_org: Option<String>,
}

impl NewTask {
    pub fn validate(&self) -> Result<(), ModelError> {
        crate::session::validate_user_name(&self.user)?;
        let wf = &self.workflow_info;
        if wf.workflow_type.is_empty() {
            return Err(ModelError::invalid("workflowInfo.type must not be empty"));
        }
        for (name, value) in [
            ("workflowInfo.type", Some(&wf.workflow_type)),
            ("workflowInfo.resourceType", wf.resource_type.as_ref()),
            ("workflowInfo.resourceId", wf.resource_id.as_ref()),
            ("workflowInfo.resourceName", wf.resource_name.as_ref()),
            ("sourceOrg", self.source_org.as_ref()),
            ("destinationOrg", self.destination_org.as_ref()),
        ] {
            if let Some(v) = value {
                validate_text(name, v)?;
            }
        }
        Ok(())
    }
}

/// `PATCH /tasks/{id}` body as sent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskPatch {
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub progress: Option<i64>,
    #[serde(default, deserialize_with = "strict::envelopes")]
    #[schema(value_type = Option<Vec<strict::StrictEnvelope>>, max_items = 100)]
    pub warnings: Option<Vec<ErrorEnvelope>>,
    #[serde(default)]
    pub state: Option<TaskState>,
    #[serde(default)]
    #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub result_type: Option<String>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default, deserialize_with = "strict::envelope")]
    #[schema(value_type = Option<strict::StrictEnvelope>)]
    pub error: Option<ErrorEnvelope>,
}

/// The nested objects of task writes, read as strictly as the bodies around them: a misspelt
/// field (`workflowInfo.resourceNmae`, `error.mgs`) is refused, not silently dropped (found by
/// the property tests). `WorkflowInfo` and `ErrorEnvelope` themselves stay lenient, because they
/// also read tasks and errors from peers, which may be newer.
mod strict {
    use serde::{Deserialize, Deserializer};

    use super::WorkflowInfo;
    use crate::ErrorEnvelope;

    #[derive(Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[schema(as = WorkflowInfoInput)]
    pub(super) struct StrictWorkflowInfo {
        #[serde(rename = "type", default)]
        #[schema(
            required = true,
            min_length = 1,
            max_length = 256,
            pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
        )]
        workflow_type: String,
        #[serde(default)]
        #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
        resource_type: Option<String>,
        #[serde(default)]
        #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
        resource_id: Option<String>,
        #[serde(default)]
        #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
        resource_name: Option<String>,
    }

    #[derive(Deserialize, utoipa::ToSchema)]
    #[serde(deny_unknown_fields)]
    #[schema(as = ErrorEnvelopeInput)]
    pub(super) struct StrictEnvelope {
        #[schema(min_length = 1)]
        code: String,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        stacktrace: String,
    }

    impl From<StrictEnvelope> for ErrorEnvelope {
        fn from(e: StrictEnvelope) -> Self {
            ErrorEnvelope {
                code: e.code,
                msg: e.msg,
                args: e.args,
                stacktrace: e.stacktrace,
            }
        }
    }

    pub fn workflow_info<'de, D: Deserializer<'de>>(d: D) -> Result<WorkflowInfo, D::Error> {
        let w = StrictWorkflowInfo::deserialize(d)?;
        Ok(WorkflowInfo {
            workflow_type: w.workflow_type,
            resource_type: w.resource_type,
            resource_id: w.resource_id,
            resource_name: w.resource_name,
        })
    }

    pub fn envelope<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ErrorEnvelope>, D::Error> {
        Ok(Option::<StrictEnvelope>::deserialize(d)?.map(ErrorEnvelope::from))
    }

    pub fn envelopes<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<ErrorEnvelope>>, D::Error> {
        Ok(Option::<Vec<StrictEnvelope>>::deserialize(d)?
            .map(|all| all.into_iter().map(ErrorEnvelope::from).collect()))
    }
}

/// How a valid patch ends the task, if it does.
#[derive(Clone, Debug, PartialEq)]
pub enum Completion {
    Succeeded {
        result_type: Option<String>,
        result: Option<Value>,
    },
    Failed {
        error: ErrorEnvelope,
    },
}

/// A patch that passed validation: what the store applies in one transaction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValidPatch {
    pub progress: Option<u8>,
    pub warnings: Vec<ErrorEnvelope>,
    pub completion: Option<Completion>,
}

impl TaskPatch {
    pub fn validate(self) -> Result<ValidPatch, ModelError> {
        let progress = match self.progress {
            None => None,
            Some(p @ 0..=100) => Some(p as u8),
            Some(_) => {
                return Err(ModelError::invalid(
                    "progress must be an integer from 0 to 100",
                ))
            }
        };
        let warnings = self.warnings.unwrap_or_default();
        if warnings.len() > MAX_WARNINGS_PER_PATCH {
            return Err(ModelError::invalid(format!(
                "a patch may append at most {MAX_WARNINGS_PER_PATCH} warnings"
            )));
        }
        if warnings.iter().any(|w| w.code.is_empty()) {
            return Err(ModelError::invalid("every warning needs a code"));
        }
        let completion = match self.state {
            None | Some(TaskState::Running) => {
                if self.result_type.is_some() || self.result.is_some() || self.error.is_some() {
                    return Err(ModelError::invalid(
                        "resultType, result and error are set only together with a final state",
                    ));
                }
                None
            }
            Some(TaskState::Succeeded) => {
                if self.error.is_some() {
                    return Err(ModelError::invalid("a SUCCEEDED task has no error"));
                }
                if let Some(rt) = &self.result_type {
                    validate_text("resultType", rt)?;
                }
                Some(Completion::Succeeded {
                    result_type: self.result_type,
                    result: self.result,
                })
            }
            Some(TaskState::Failed) => {
                if self.result_type.is_some() || self.result.is_some() {
                    return Err(ModelError::invalid("a FAILED task has no result"));
                }
                let error = self
                    .error
                    .ok_or_else(|| ModelError::invalid("a FAILED task needs an error"))?;
                if error.code.is_empty() {
                    return Err(ModelError::invalid("the error needs a code"));
                }
                Some(Completion::Failed { error })
            }
        };
        Ok(ValidPatch {
            progress,
            warnings,
            completion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Task {
        Task {
            id: Uuid::parse_str("f61d60d2-698a-46dc-a266-88df27644956").unwrap(),
            user: "root".into(),
            site: "site2".into(),
            state: TaskState::Running,
            progress: 42,
            start_time: 1499929548951,
            last_updated: 1499929558827,
            end_time: -1,
            result_type: None,
            result: None,
            error: None,
            warnings: vec![],
            workflow_info: WorkflowInfo {
                workflow_type: "sync".into(),
                resource_type: Some("vm".into()),
                resource_id: None,
                resource_name: None,
            },
            source_org: None,
            destination_org: None,
        }
    }

    #[test]
    fn task_field_names_match_the_original_api() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            v,
            json!({
                "id": "f61d60d2-698a-46dc-a266-88df27644956",
                "user": "root",
                "site": "site2",
                "state": "RUNNING",
                "progress": 42,
                "startTime": 1499929548951i64,
                "lastUpdated": 1499929558827i64,
                "endTime": -1,
                "resultType": null,
                "result": null,
                "error": null,
                "warnings": [],
                "workflowInfo": {"type":"sync","resourceType":"vm","resourceId":null,"resourceName":null}
            })
        );
    }

    #[test]
    fn parses_the_seed_page_example() {
        // The reference page's example, with a real state in place of its "string" placeholder.
        let seed = json!({
            "endTime": 1499929558827i64,
            "error": {"args": [], "code": "Forbidden", "msg": "Permission denied.",
                      "stacktrace": "com.vmware.h4.api.error.exceptions.PermissionDeniedException"},
            "id": "f61d60d2-698a-46dc-a266-88df27644956",
            "lastUpdated": 1499929558827i64,
            "progress": 100,
            "resultType": "string",
            "site": "site2",
            "startTime": 1499929548951i64,
            "state": "FAILED",
            "user": "root",
            "warnings": [],
            "workflowInfo": {}
        });
        let task: Task = serde_json::from_value(seed).unwrap();
        assert_eq!(task.state, TaskState::Failed);
        assert_eq!(task.error.unwrap().code, "Forbidden");
        assert_eq!(task.end_time, 1499929558827);
    }

    #[test]
    fn poll_rows_follow_property_names() {
        let t = sample();
        let poll = PollResponse::from_tasks([&t]);
        assert_eq!(poll.property_names.len(), poll.values[0].len());
        let as_object = serde_json::to_value(&t).unwrap();
        for (name, value) in poll.property_names.iter().zip(&poll.values[0]) {
            assert_eq!(&as_object[name], value, "{name}");
        }
    }

    #[test]
    fn task_ids() {
        assert!(parse_task_id("f61d60d2-698a-46dc-a266-88df27644956").is_ok());
        for bad in [
            "",
            "nope",
            "f61d60d2698a46dca26688df27644956",
            "{f61d60d2-698a-46dc-a266-88df27644956}",
            "f61d60d2-698a-46dc-a266-88df2764495g",
            "urn:uuid:f61d60d2-698a-46dc-a266-88df27644956",
        ] {
            assert!(parse_task_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn poll_ids_dedupe_and_bound() {
        let a = "f61d60d2-698a-46dc-a266-88df27644956".to_string();
        let b = "00000000-0000-4000-8000-000000000001".to_string();
        let ids = parse_poll_ids(&[a.clone(), b.clone(), a.clone()]).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].to_string(), a);
        assert!(parse_poll_ids(&vec![a; MAX_POLL_IDS + 1]).is_err());
    }

    #[test]
    fn patch_validation_table() {
        let err = || ErrorEnvelope::new(crate::ErrorCode::GeneralServerFailure, "boom", vec![]);
        let cases: Vec<(TaskPatch, bool)> = vec![
            (
                TaskPatch {
                    progress: Some(50),
                    ..Default::default()
                },
                true,
            ),
            (
                TaskPatch {
                    progress: Some(101),
                    ..Default::default()
                },
                false,
            ),
            (
                TaskPatch {
                    progress: Some(-1),
                    ..Default::default()
                },
                false,
            ),
            (
                TaskPatch {
                    state: Some(TaskState::Succeeded),
                    result_type: Some("s".into()),
                    result: Some(json!(1)),
                    ..Default::default()
                },
                true,
            ),
            (
                TaskPatch {
                    state: Some(TaskState::Succeeded),
                    error: Some(err()),
                    ..Default::default()
                },
                false,
            ),
            (
                TaskPatch {
                    state: Some(TaskState::Failed),
                    error: Some(err()),
                    ..Default::default()
                },
                true,
            ),
            (
                TaskPatch {
                    state: Some(TaskState::Failed),
                    ..Default::default()
                },
                false,
            ),
            (
                TaskPatch {
                    state: Some(TaskState::Failed),
                    error: Some(err()),
                    result: Some(json!(1)),
                    ..Default::default()
                },
                false,
            ),
            (
                TaskPatch {
                    result: Some(json!(1)),
                    ..Default::default()
                },
                false,
            ),
            (
                TaskPatch {
                    warnings: Some(vec![err()]),
                    ..Default::default()
                },
                true,
            ),
            (
                TaskPatch {
                    warnings: Some(vec![err(); 101]),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (patch, ok)) in cases.into_iter().enumerate() {
            assert_eq!(patch.validate().is_ok(), ok, "case {i}");
        }
    }

    #[test]
    fn result_types_are_short_text() {
        let patch = |rt: String| TaskPatch {
            state: Some(TaskState::Succeeded),
            result_type: Some(rt),
            ..Default::default()
        };
        assert!(patch("string".into()).validate().is_ok());
        assert!(patch("nul\0inside".into()).validate().is_err());
        assert!(patch("x".repeat(257)).validate().is_err());
    }

    #[test]
    fn patch_rejects_unknown_fields() {
        assert!(serde_json::from_str::<TaskPatch>(r#"{"progres":5}"#).is_err());
        assert!(serde_json::from_str::<NewTask>(
            r#"{"user":"a","workflowInfo":{"type":"t"},"x":1}"#
        )
        .is_err());
        // Nested objects too; the same objects in a task (a peer's answer) stay lenient.
        for nested in [
            r#"{"user":"a","workflowInfo":{"type":"t","resourceNmae":"vm"}}"#,
            r#"{"state":"FAILED","error":{"code":"E","mgs":"boom"}}"#,
            r#"{"warnings":[{"code":"W","x":1}]}"#,
        ] {
            assert!(
                serde_json::from_str::<NewTask>(nested).is_err()
                    && serde_json::from_str::<TaskPatch>(nested).is_err(),
                "{nested}"
            );
        }
        assert!(serde_json::from_str::<WorkflowInfo>(r#"{"type":"t","later":1}"#).is_ok());
        let patch: TaskPatch =
            serde_json::from_str(r#"{"warnings":null,"error":null,"state":"RUNNING"}"#).unwrap();
        assert_eq!(patch.warnings, None);
        assert_eq!(patch.error, None);
    }

    #[test]
    fn new_task_validation() {
        let mut t: NewTask =
            serde_json::from_value(json!({"user":"alice","workflowInfo":{"type":"sync"}})).unwrap();
        assert!(t.validate().is_ok());
        t.workflow_info.workflow_type = String::new();
        assert!(t.validate().is_err());
        t.workflow_info.workflow_type = "x".repeat(257);
        assert!(t.validate().is_err());
        t.workflow_info.workflow_type = "ok".into();
        t.user = "bad user".into();
        assert!(t.validate().is_err());
    }
}
