//! Micro-benchmarks of the wire boundary's per-request work: turning a task and an error
//! envelope into JSON bytes, reading a task back from JSON (what a remote read does with a
//! peer's answer), parsing the `GET /tasks` query string, and the operation ID work every
//! request does (parse or generate, then derive its trace ID).
//!
//! Each of these runs at least once on every request, so a regression here is paid on the whole
//! API; the figures are a floor under what the HTTP benchmarks of `sitegate-bench` can reach.
//! Run with `cargo bench -p sitegate-model --bench model`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use sitegate_model::operation::{derive_trace_id, OperationId};
use sitegate_model::query::TaskQuery;
use sitegate_model::task::{Task, TaskState, WorkflowInfo};
use sitegate_model::{ErrorCode, ErrorEnvelope, NOT_YET};
use uuid::Uuid;

const TASK_ID: &str = "f61d60d2-698a-46dc-a266-88df27644956";

/// A deployment halfway through, as `GET /tasks/{id}` returns it while it runs.
fn running_task() -> Task {
    Task {
        id: Uuid::parse_str(TASK_ID).expect("the constant is a UUID"),
        user: "alice".to_owned(),
        site: "site1".to_owned(),
        state: TaskState::Running,
        progress: 42,
        start_time: 1_767_225_600_000,
        last_updated: 1_767_225_645_123,
        end_time: NOT_YET,
        result_type: None,
        result: None,
        error: None,
        warnings: Vec::new(),
        workflow_info: WorkflowInfo {
            workflow_type: "vm.deploy".to_owned(),
            resource_type: Some("VirtualMachine".to_owned()),
            resource_id: Some("vm-4711".to_owned()),
            resource_name: Some("web-frontend-03".to_owned()),
        },
        source_org: None,
        destination_org: None,
    }
}

/// The same deployment finished: a result describing the machine and one warning, which is
/// the largest shape a task commonly takes and the one finished-task caches hold.
fn succeeded_task() -> Task {
    Task {
        state: TaskState::Succeeded,
        progress: 100,
        last_updated: 1_767_225_712_456,
        end_time: 1_767_225_712_456,
        result_type: Some("VirtualMachine".to_owned()),
        result: Some(json!({
            "id": "vm-4711",
            "name": "web-frontend-03",
            "description": "Frontend web server for the customer portal, deployed from the \
                            hardened Debian 12 template with the standard monitoring agents.",
            "cpuCount": 4,
            "memoryMiB": 8192,
            "disks": [
                {"label": "root", "capacityGiB": 40, "datastore": "ds-ssd-01"},
                {"label": "data", "capacityGiB": 200, "datastore": "ds-hdd-02"}
            ],
            "networks": [
                {"name": "frontend", "ipAddress": "10.20.30.43", "mac": "00:50:56:9a:3c:1f"}
            ],
            "powerState": "poweredOn",
            "tags": ["portal", "production", "team-web"]
        })),
        warnings: vec![ErrorEnvelope::new(
            ErrorCode::GeneralServerFailure,
            "The guest tools did not report within 60 seconds; the IP address was read from DHCP.",
            vec!["vm-4711".to_owned()],
        )],
        ..running_task()
    }
}

fn task_json(c: &mut Criterion) {
    let running = running_task();
    let succeeded = succeeded_task();
    let succeeded_bytes = serde_json::to_vec(&succeeded).expect("a task serializes");

    let mut group = c.benchmark_group("task_json");
    let running_len = serde_json::to_vec(&running)
        .expect("a task serializes")
        .len();
    group.throughput(Throughput::Bytes(running_len as u64));
    group.bench_function("serialize_running", |b| {
        b.iter(|| serde_json::to_vec(black_box(&running)).expect("a task serializes"))
    });
    group.throughput(Throughput::Bytes(succeeded_bytes.len() as u64));
    group.bench_function("serialize_succeeded", |b| {
        b.iter(|| serde_json::to_vec(black_box(&succeeded)).expect("a task serializes"))
    });
    group.bench_function("deserialize_succeeded", |b| {
        b.iter(|| {
            serde_json::from_slice::<Task>(black_box(&succeeded_bytes))
                .expect("the bytes are a task")
        })
    });
    group.finish();
}

/// Built and serialized together, as the gateway does for every error response.
fn error_envelope_json(c: &mut Criterion) {
    let mut group = c.benchmark_group("error_envelope_json");
    group.bench_function("task_not_found", |b| {
        b.iter(|| {
            let envelope = ErrorEnvelope::new(
                ErrorCode::TaskNotFound,
                format!("task {} was not found", black_box(TASK_ID)),
                vec![black_box(TASK_ID).to_owned()],
            );
            serde_json::to_vec(&envelope).expect("an envelope serializes")
        })
    });
    group.bench_function("site_not_found", |b| {
        b.iter(|| {
            let site = black_box("site9");
            let envelope = ErrorEnvelope::new(
                ErrorCode::SiteNotFound,
                format!("Site '{site}' is not known here."),
                vec![site.to_owned()],
            );
            serde_json::to_vec(&envelope).expect("an envelope serializes")
        })
    });
    group.finish();
}

fn task_query(c: &mut Criterion) {
    let mut group = c.benchmark_group("task_query_parse");
    // What most list calls send: the site only.
    group.bench_function("site_only", |b| {
        b.iter(|| TaskQuery::parse(black_box(Some("site=site1"))).expect("a valid query"))
    });
    // A console's filtered, sorted, paged list view.
    let typical = "site=site1&state=RUNNING,FAILED&type=vm.deploy&resourceType=VirtualMachine\
                   &startTimeAfter=1767225600000&sort=-startTime,id&limit=50&offset=100";
    group.bench_function("typical_filtered", |b| {
        b.iter(|| TaskQuery::parse(black_box(Some(typical))).expect("a valid query"))
    });
    group.finish();
}

fn operation_ids(c: &mut Criterion) {
    let mut group = c.benchmark_group("operation_id");
    group.bench_function("parse_uuid", |b| {
        b.iter(|| OperationId::parse(black_box(TASK_ID)).expect("a valid operation ID"))
    });
    group.bench_function("generate", |b| b.iter(OperationId::generate));
    group.finish();

    // The three paths of the derivation: a UUID and 32 hex digits are taken as they are, any
    // other ID is hashed.
    let mut group = c.benchmark_group("derive_trace_id");
    group.bench_function("uuid", |b| b.iter(|| derive_trace_id(black_box(TASK_ID))));
    group.bench_function("hex32", |b| {
        b.iter(|| derive_trace_id(black_box("4bf92f3577b34da6a3ce929d0e0e4736")))
    });
    group.bench_function("hashed_custom", |b| {
        b.iter(|| derive_trace_id(black_box("portal-deploy-web-frontend-03-attempt-2")))
    });
    // What the operation ID layer does for a request that came without one.
    group.bench_function("generate_then_derive", |b| {
        b.iter(|| derive_trace_id(OperationId::generate().as_str()))
    });
    group.finish();
}

criterion_group!(
    benches,
    task_json,
    error_envelope_json,
    task_query,
    operation_ids
);
criterion_main!(benches);
