//! The OpenAPI 3.1 document of the client API, served at `GET /openapi.json`.
//!
//! It is generated, not written: the schemas come from the wire types of `sitegate-model`
//! (`ToSchema` derives beside their serde attributes) and each operation from the
//! `#[utoipa::path]` annotation on its handler, so a changed type or route changes the
//! document with it. What a derive cannot say is built here, next to the reason:
//! rules that tie several fields or query parameters together (a patch's final state, a
//! blocking read, sort keys named once), and what every operation shares because the layers
//! in `app::client_api` answer it (the `operationID` header, 400/408/414/431/500). The few
//! JSON Schema keywords utoipa does not model (`not`, `contains`, a header's `required`) are
//! added as raw keywords through its extensions map.
//!
//! The internal `/peer/sessions` route (peer link only) is deliberately absent.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use sitegate_model::fanout::FanOutList;
use sitegate_model::task::{Task, TaskList, TaskPatch, TaskState};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Ref,
    Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Required, ResponseBuilder};
use utoipa::openapi::{KnownFormat, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::auth::AUTH_HEADER;
use crate::error::ApiError;
use crate::handlers::{diagnostics, ops, sessions, sites, tasks, AppState};
use crate::layers::OPERATION_ID_HEADER;

/// The security scheme of the `X-VCAV-Auth` session token; operations that need a session
/// name it (`security(("session" = []))`).
pub(crate) const SESSION_SCHEME: &str = "session";

/// The client API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sitegate client API",
        description = "A multi-site task federation gateway. Every response carries the \
            `operationID` header; every response of status 400 or more carries the error \
            envelope. JSON answers use `application/json`, or the vendor type \
            `application/vnd.vmware.h4-v<version>+json` when the request's `Accept` asks \
            for it. A `site` parameter names where a request is answered: omitted, empty or \
            the local site's name is the local site; a configured peer is asked over the \
            peer link (the session must be extended to it, `POST /sessions/extend`); any \
            other name is `SiteNotFound`."
    ),
    paths(
        sessions::login,
        sessions::get,
        sessions::logout,
        sessions::extend,
        sessions::drop_extension,
        tasks::query,
        tasks::create,
        tasks::poll,
        tasks::get_one,
        tasks::patch,
        tasks::events,
        sites::list,
        sites::get,
        diagnostics::about,
        diagnostics::health,
        diagnostics::health_task,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        openapi_json,
    ),
    modifiers(&SessionSecurity, &SharedByEveryOperation, &ClosedTaggedBodies),
    tags(
        (name = "sessions", description = "Log in, the session, and its extension to peers."),
        (name = "tasks", description = "Reading tasks (every user, their own; admins all) and writing them (the site's services: role `writer` or `admin`)."),
        (name = "sites", description = "The local site and its peers, with link health."),
        (name = "diagnostics", description = "What this site is and how it is, in the original API's shapes."),
        (name = "operations", description = "For load balancers and orchestrators; no session needed."),
    )
)]
pub(crate) struct ApiDoc;

/// The document before [`LocalSite`] names the site serving it, built once.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

/// `GET /openapi.json`: this document, as this site serves it.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of the client API.",
            body = Object, content_type = "application/json"),
    )
)]
pub(crate) async fn openapi_json(State(state): State<AppState>) -> Result<Response, ApiError> {
    // Built per request (a few milliseconds unoptimised): it is not a hot path, and one
    // process may serve several sites (`sitegate demo`).
    let mut doc = DOCUMENT.clone();
    LocalSite(state.federation.local_name().as_str()).modify(&mut doc);
    let body = serde_json::to_vec(&doc)
        .map_err(|e| ApiError::Internal(format!("serializing the OpenAPI document: {e}")))?;
    Ok((
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        Bytes::from(body),
    )
        .into_response())
}

/// What depends on the site serving the document: the requests its name makes invalid.
/// Tasks are written only at the local site (a peer's name is `BadUserInput`, any other
/// `SiteNotFound`), and the local site can be neither extended to nor dropped from a session.
pub(crate) struct LocalSite<'a>(pub &'a str);

impl LocalSite<'_> {
    /// `not: {const: <local>}`, a keyword utoipa's schema objects do not model.
    fn not_local(&self) -> Extensions {
        Extensions::from_iter([("not", json!({"const": self.0}))])
    }
}

impl Modify for LocalSite<'_> {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let local = self.0;
        for (path, item) in openapi.paths.paths.iter_mut() {
            let writes = [
                item.post.as_mut().filter(|_| path == "/tasks"),
                item.patch.as_mut().filter(|_| path == "/tasks/{task_id}"),
            ];
            for op in writes.into_iter().flatten() {
                for param in op.parameters.iter_mut().flatten() {
                    if let RefOr::T(param) = param {
                        if param.name == "site" && param.parameter_in == ParameterIn::Query {
                            param.schema = Some(string_enum(&["", local]).into());
                        }
                    }
                }
            }
            if path == "/sessions/{site}" {
                for param in item
                    .delete
                    .as_mut()
                    .and_then(|op| op.parameters.as_mut())
                    .into_iter()
                    .flatten()
                {
                    if let RefOr::T(param) = param {
                        if param.name == "site" {
                            param.schema = Some(
                                ObjectBuilder::new()
                                    .schema_type(Type::String)
                                    .extensions(Some(self.not_local()))
                                    .into(),
                            );
                        }
                    }
                }
            }
        }
        let extend = openapi
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut("ExtendRequest"));
        if let Some(RefOr::T(Schema::OneOf(one_of))) = extend {
            // The kinds serde recognises only to refuse them clearly (the original's `cookie`
            // and `vcdAccessToken` extensions) are not part of the documented API.
            one_of
                .items
                .retain(|variant| matches!(variant, RefOr::T(Schema::Object(_))));
            for variant in one_of.items.iter_mut() {
                if let RefOr::T(Schema::Object(variant)) = variant {
                    if let Some(RefOr::T(Schema::Object(site))) = variant.properties.get_mut("site")
                    {
                        site.extensions = Some(self.not_local());
                    }
                }
            }
        }
    }
}

/// The `X-VCAV-Auth` session token, as an API key in a header.
struct SessionSecurity;

impl Modify for SessionSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SESSION_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                AUTH_HEADER,
                "The token `POST /sessions` answers in its `X-VCAV-Auth` header.",
            ))),
        );
    }
}

/// The tagged request bodies (`LoginRequest`, `ExtendRequest`) refuse unknown fields
/// (`serde(deny_unknown_fields)`), which utoipa reflects for structs but not for the variants
/// of an internally tagged enum.
struct ClosedTaggedBodies;

impl ClosedTaggedBodies {
    const NAMES: [&'static str; 2] = ["LoginRequest", "ExtendRequest"];
}

impl Modify for ClosedTaggedBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for name in Self::NAMES {
            let Some(RefOr::T(Schema::OneOf(one_of))) = components.schemas.get_mut(name) else {
                continue;
            };
            // The kinds serde recognises only to refuse them clearly (the original's `cookie`
            // and `vcdAccessToken` extensions) are not part of the documented API.
            one_of
                .items
                .retain(|variant| matches!(variant, RefOr::T(Schema::Object(_))));
            for variant in one_of.items.iter_mut() {
                if let RefOr::T(Schema::Object(variant)) = variant {
                    variant.additional_properties =
                        Some(Box::new(AdditionalProperties::FreeForm(false)));
                }
            }
        }
    }
}

/// What the layers of `app::client_api` add to every operation: the optional `operationID`
/// request header, the required `operationID` response header, `Retry-After` where the
/// gateway sets it, and the statuses any request can meet before or around its handler.
struct SharedByEveryOperation;

impl SharedByEveryOperation {
    const SHARED: [(&'static str, &'static str); 5] = [
        (
            "400",
            "BadUserInput: the request is malformed (for instance its `operationID` header).",
        ),
        (
            "408",
            "BadUserInput: the request's head or body did not arrive in time; the connection \
             is closed.",
        ),
        (
            "414",
            "BadUserInput: the request's URI is longer than the site reads (64 KiB).",
        ),
        (
            "431",
            "BadUserInput: the request's headers are larger than the site allows.",
        ),
        (
            "500",
            "GeneralServerFailure: an internal failure, or the request did not complete within \
             the site's deadline. The details are logged under the response's operationID.",
        ),
    ];

    fn operation(op: &mut Operation) {
        let parameters = op.parameters.get_or_insert_with(Vec::new);
        parameters.push(RefOr::T(
            ParameterBuilder::new()
                .name(OPERATION_ID_HEADER)
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "Correlates the logs and traces of one operation across sites: 1 to 128 \
                     visible ASCII characters. A new one is made when none is sent; a \
                     malformed one is refused (400).",
                ))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[!-~]{1,128}$")),
                ))
                .build(),
        ));
        for (status, description) in Self::SHARED {
            if !op.responses.responses.contains_key(status) {
                op.responses
                    .responses
                    .insert(status.to_owned(), error_response(description).into());
            }
        }
        for (status, response) in op.responses.responses.iter_mut() {
            let RefOr::T(response) = response else {
                continue;
            };
            response.headers.insert(
                OPERATION_ID_HEADER.to_owned(),
                RefOr::T(
                    HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .pattern(Some("^[!-~]{1,128}$")),
                        ))
                        .description(Some(
                            "The request's operation ID, or a new UUID when it sent none (or \
                             a malformed one).",
                        ))
                        // `required` is a fixed field of the Header Object that utoipa does
                        // not model; every response of the API carries this header.
                        .extensions(Some(Extensions::from_iter([("required", true)])))
                        .build(),
                ),
            );
            if matches!(status.as_str(), "429" | "502") {
                response.headers.insert(
                    "Retry-After".to_owned(),
                    RefOr::T(
                        HeaderBuilder::new()
                            .schema(Some(
                                ObjectBuilder::new()
                                    .schema_type(Type::Integer)
                                    .minimum(Some(1)),
                            ))
                            .description(Some("Seconds to wait before trying again."))
                            .build(),
                    ),
                );
            }
        }
    }
}

impl Modify for SharedByEveryOperation {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ]
            .into_iter()
            .flatten()
            {
                Self::operation(op);
            }
        }
    }
}

/// A response carrying the error envelope.
fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                .build(),
        )
        .build()
}

fn null_schema() -> RefOr<Schema> {
    Object::with_type(Type::Null).into()
}

fn string_enum(values: &[&str]) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
}

/// The body of `PATCH /tasks/{taskId}`: `TaskPatch`'s fields in one of three shapes, because
/// `TaskPatch::validate` ties them together. Progress and warnings alone (state absent or
/// `RUNNING`); or `SUCCEEDED` with an optional `resultType`/`result` and no error; or `FAILED`
/// with an error and no result. A `null` field counts as absent, as serde reads it.
pub(crate) struct TaskPatchRequest;

impl PartialSchema for TaskPatchRequest {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(fields)) = TaskPatch::schema() else {
            // Unreachable while `TaskPatch` derives `ToSchema` as a struct; the document's
            // tests would show the loss.
            return RefOr::T(Schema::default());
        };
        let state = |values: &[&str]| -> RefOr<Schema> {
            string_enum(values)
                .title(Some(TaskState::name()))
                .build()
                .into()
        };
        let mut running = fields.clone();
        running.title = Some("progress and warnings".into());
        running.properties.insert(
            "state".into(),
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .enum_values(Some([json!("RUNNING"), Value::Null]))
                .build()
                .into(),
        );
        for field in ["resultType", "result", "error"] {
            running.properties.insert(field.into(), null_schema());
        }
        let mut succeeded = fields.clone();
        succeeded.title = Some("succeeded".into());
        succeeded
            .properties
            .insert("state".into(), state(&["SUCCEEDED"]));
        succeeded.properties.insert("error".into(), null_schema());
        succeeded.required = vec!["state".into()];
        let mut failed = fields;
        failed.title = Some("failed".into());
        failed.properties.insert("state".into(), state(&["FAILED"]));
        for field in ["resultType", "result"] {
            failed.properties.insert(field.into(), null_schema());
        }
        failed.properties.insert(
            "error".into(),
            Ref::from_schema_name("ErrorEnvelopeInput").into(),
        );
        failed.required = vec!["state".into(), "error".into()];
        RefOr::T(Schema::OneOf(
            OneOfBuilder::new()
                .item(Schema::Object(running))
                .item(Schema::Object(succeeded))
                .item(Schema::Object(failed))
                .build(),
        ))
    }
}

impl ToSchema for TaskPatchRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <TaskPatch as ToSchema>::schemas(schemas);
    }
}

/// The answer of `GET /tasks`: a page, or with `site=*` a merged page that also names the
/// sites that could not answer.
pub(crate) struct TaskListAnswer;

impl PartialSchema for TaskListAnswer {
    fn schema() -> RefOr<Schema> {
        RefOr::T(Schema::AnyOf(
            AnyOfBuilder::new()
                .item(Ref::from_schema_name(TaskList::name()))
                .item(Ref::from_schema_name(FanOutList::name()))
                .build(),
        ))
    }
}

impl ToSchema for TaskListAnswer {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        for (name, schema) in [
            (TaskList::name(), TaskList::schema()),
            (FanOutList::name(), FanOutList::schema()),
        ] {
            schemas.push((name.into_owned(), schema));
        }
        <TaskList as ToSchema>::schemas(schemas);
        <FanOutList as ToSchema>::schemas(schemas);
    }
}

/// The body of `POST /tasks/poll`: task IDs, at most
/// [`sitegate_model::task::MAX_POLL_IDS`].
pub(crate) struct PollRequest;

impl PartialSchema for PollRequest {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))),
            )
            .max_items(Some(sitegate_model::task::MAX_POLL_IDS))
            .build()
            .into()
    }
}

impl ToSchema for PollRequest {}

/// The `resourceType` filter of `GET /tasks`: a comma list of resource types, at most
/// [`sitegate_model::query::MAX_LIST_VALUES`]; each entry is trimmed and empty ones skipped,
/// so an entry holds no comma and no control character.
pub(crate) struct ResourceTypes;

impl PartialSchema for ResourceTypes {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(256))
                    .pattern(Some("^[^,\\s\\x00-\\x1f\\x7f-\\x9f]+$")),
            )
            .min_items(Some(1))
            .max_items(Some(sitegate_model::query::MAX_LIST_VALUES))
            .build()
            .into()
    }
}

impl ToSchema for ResourceTypes {}

/// The `ids` filter of `GET /tasks`: task IDs, at most
/// [`sitegate_model::query::MAX_IDS_FILTER`]. Empty entries (`ids=a,,b`, or `ids=`) are
/// skipped, as `sitegate_model::query` reads them.
pub(crate) struct TaskIds;

impl PartialSchema for TaskIds {
    fn schema() -> RefOr<Schema> {
        let uuid = ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)));
        let empty = ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(0));
        ArrayBuilder::new()
            .items(RefOr::T(Schema::OneOf(
                OneOfBuilder::new().item(uuid).item(empty).build(),
            )))
            .max_items(Some(sitegate_model::query::MAX_IDS_FILTER))
            .build()
            .into()
    }
}

impl ToSchema for TaskIds {}

/// The blocking-read parameters of `GET /tasks/{taskId}`, as one exploded query object because
/// they go together (`sitegate_model::watch::GetOneQuery`): `waitForChange=true` needs
/// `lastUpdated` and may take `timeout`; without it neither may be sent.
pub(crate) struct BlockingRead;

impl PartialSchema for BlockingRead {
    fn schema() -> RefOr<Schema> {
        let plain = ObjectBuilder::new()
            .title(Some("a plain read"))
            .property(
                "waitForChange",
                ObjectBuilder::new()
                    .schema_type(Type::Boolean)
                    .enum_values(Some([false])),
            )
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
        let blocking = ObjectBuilder::new()
            .title(Some("a blocking read"))
            .property(
                "waitForChange",
                ObjectBuilder::new()
                    .schema_type(Type::Boolean)
                    .enum_values(Some([true])),
            )
            .required("waitForChange")
            .property(
                "lastUpdated",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .description(Some(
                        "The task's `lastUpdated` as the caller last saw it (epoch ms): the \
                         answer comes once the task changed after it, or is final.",
                    )),
            )
            .required("lastUpdated")
            .property(
                "timeout",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[0-9]{1,9}(ms|s|m)?$"))
                    .description(Some(
                        "How long to wait: `30s`, `500ms`, `1m` or plain seconds; default 30s, \
                         at most 60s (longer is clamped).",
                    )),
            )
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
        RefOr::T(Schema::OneOf(
            OneOfBuilder::new().item(plain).item(blocking).build(),
        ))
    }
}

impl ToSchema for BlockingRead {}

/// The `sort` parameter of `GET /tasks`: fields, each at most once, `-` before or after one
/// for descending (`sitegate_model::query::parse_sort`).
pub(crate) struct SortKeys;

/// The fields `GET /tasks` sorts by, as `sitegate_model::query` names them.
const SORT_FIELDS: [&str; 13] = [
    "startTime",
    "lastUpdated",
    "endTime",
    "progress",
    "state",
    "user",
    "id",
    "type",
    "resourceType",
    "resourceId",
    "resourceName",
    "sourceOrg",
    "destinationOrg",
];

impl PartialSchema for SortKeys {
    fn schema() -> RefOr<Schema> {
        // The documented spellings are `field` and `-field`; the server also reads `field-`.
        let all: Vec<String> = SORT_FIELDS
            .iter()
            .flat_map(|f| [(*f).to_owned(), format!("-{f}")])
            .collect();
        // "Each field at most once": no spelling twice (`uniqueItems`), and for each field not
        // both directions (`not` + `contains`, which utoipa's array schema does not model).
        // Said as a `not` so that a schema-driven fuzzer negating it gets a repeated field,
        // which the server refuses.
        let once_each: Vec<Value> = SORT_FIELDS
            .iter()
            .map(|f| json!({"not": {"allOf": [{"contains": {"const": f}}, {"contains": {"const": format!("-{f}")}}]}}))
            .collect();
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(all)),
            )
            .min_items(Some(1))
            .unique_items(true)
            .extensions(Some(Extensions::from_iter([(
                "allOf",
                Value::Array(once_each),
            )])))
            .build()
            .into()
    }
}

impl ToSchema for SortKeys {}

/// One event of `GET /tasks/{taskId}/events`, as OpenAPI 3.1 describes a Server-Sent Event:
/// its `event` name and its `data`, here a task as JSON.
pub(crate) struct TaskEvent;

impl PartialSchema for TaskEvent {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property("event", string_enum(&["task"]))
            .required("event")
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/json")
                    .content_schema(Some(Ref::from_schema_name(Task::name()))),
            )
            .required("data")
            .into()
    }
}

impl ToSchema for TaskEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Task::name().into_owned(), Task::schema()));
        <Task as ToSchema>::schemas(schemas);
    }
}

/// `{"status": "..."}`, the body of `/healthz` and `/readyz`.
#[derive(ToSchema)]
#[allow(dead_code)] // Only its schema is used: the handlers answer with `json!`.
pub(crate) struct ProbeStatus {
    /// `ok` from `/healthz`, `ready` from `/readyz`.
    status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("the document serializes")
    }

    /// Every `$ref` names a schema the document holds.
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r.clone());
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn is_openapi_3_1_with_every_client_route() {
        let doc = document();
        assert!(doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")));
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        for path in [
            "/sessions",
            "/sessions/extend",
            "/sessions/{site}",
            "/tasks",
            "/tasks/poll",
            "/tasks/{task_id}",
            "/tasks/{task_id}/events",
            "/sites",
            "/sites/{site}",
            "/diagnostics/about",
            "/diagnostics/health",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(paths.contains(&path), "{path} missing from {paths:?}");
        }
        assert!(!paths.iter().any(|p| p.starts_with("/peer")), "{paths:?}");
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {r}"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} does not resolve"
            );
        }
    }

    #[test]
    fn every_response_names_the_operation_id_header_and_errors_carry_the_envelope() {
        let doc = document();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                let responses = op["responses"].as_object().expect("responses");
                for status in ["400", "408", "414", "431", "500"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
                for (status, response) in responses {
                    assert_eq!(
                        response["headers"][OPERATION_ID_HEADER]["required"],
                        json!(true),
                        "{method} {path} {status}"
                    );
                    if status.as_str() >= "400" {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            json!("#/components/schemas/ErrorEnvelope"),
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_local_site_is_named_where_it_makes_a_request_invalid() {
        let mut doc = ApiDoc::openapi();
        LocalSite("site1").modify(&mut doc);
        let doc = serde_json::to_value(doc).expect("the document serializes");
        let site_param = |method: &str, path: &str| {
            doc["paths"][path][method]["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == "site"))
                .map(|p| p["schema"].clone())
                .unwrap_or_else(|| panic!("{method} {path} takes site"))
        };
        for (method, path) in [("post", "/tasks"), ("patch", "/tasks/{task_id}")] {
            assert_eq!(site_param(method, path)["enum"], json!(["", "site1"]));
        }
        let not_local = json!({"const": "site1"});
        assert_eq!(site_param("delete", "/sessions/{site}")["not"], not_local);
        assert_eq!(site_param("get", "/tasks")["not"], Value::Null);
        for variant in doc["components"]["schemas"]["ExtendRequest"]["oneOf"]
            .as_array()
            .expect("variants")
        {
            assert_eq!(variant["properties"]["site"]["not"], not_local);
        }
    }

    #[test]
    fn operation_ids_are_unique() {
        let doc = document();
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .values()
            .flat_map(|item| item.as_object().expect("path item").values())
            .map(|op| op["operationId"].as_str().expect("operationId"))
            .collect();
        let all = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all, "{ids:?}");
    }

    #[test]
    fn tagged_bodies_are_closed_as_serde_reads_them() {
        use sitegate_model::session::{ExtendRequest, LoginRequest};
        let login = json!({"type": "localUser", "localUser": "a", "localPassword": "b", "x": 1});
        assert!(serde_json::from_value::<LoginRequest>(login).is_err());
        let extend = json!({"type": "multisite", "site": "s", "x": 1});
        assert!(serde_json::from_value::<ExtendRequest>(extend).is_err());
        let doc = document();
        for name in ClosedTaggedBodies::NAMES {
            let variants = doc["components"]["schemas"][name]["oneOf"]
                .as_array()
                .unwrap_or_else(|| panic!("{name} is a oneOf"));
            for v in variants {
                assert_eq!(v["additionalProperties"], json!(false), "{name}");
            }
        }
    }

    #[test]
    fn every_sort_spelling_parses() {
        for field in SORT_FIELDS {
            for spelling in [field.to_owned(), format!("-{field}"), format!("{field}-")] {
                assert!(
                    sitegate_model::query::parse_sort(&spelling).is_ok(),
                    "{spelling}"
                );
            }
        }
    }

    #[test]
    fn patch_shapes_keep_the_derived_fields() {
        let RefOr::T(Schema::OneOf(one_of)) = TaskPatchRequest::schema() else {
            panic!("a oneOf");
        };
        assert_eq!(one_of.items.len(), 3);
        for item in one_of.items {
            let RefOr::T(Schema::Object(o)) = item else {
                panic!("an object");
            };
            for field in [
                "progress",
                "warnings",
                "state",
                "resultType",
                "result",
                "error",
            ] {
                assert!(o.properties.contains_key(field), "{field}");
            }
            assert!(matches!(
                o.additional_properties.as_deref(),
                Some(AdditionalProperties::FreeForm(false))
            ));
        }
    }
}
