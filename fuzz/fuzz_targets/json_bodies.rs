//! The JSON request bodies: `POST /tasks` (`NewTask`), `PATCH /tasks/{id}` (`TaskPatch` and its
//! validation into `ValidPatch`), `POST /sessions` (`LoginRequest`), `POST /sessions/extend`
//! (`ExtendRequest`), `POST /peer/sessions` (`MultisiteSessionRequest`) and `POST /tasks/poll`
//! (a list of task IDs). Every input is tried as each of them. Nothing may panic; what parses
//! must survive serialization and parsing again (as it does through the store or a peer); a
//! poll answers each distinct ID once, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sitegate_model::session::{ExtendRequest, LoginRequest, MultisiteSessionRequest};
use sitegate_model::task::{parse_poll_ids, NewTask, TaskPatch, MAX_POLL_IDS};

/// JSON values equal as they should survive a trip through the store or a peer: exactly, except
/// that a float may come back one unit in the last place off, because serde_json parses floats
/// with best-effort precision unless its `float_roundtrip` feature is on (the workspace does not
/// enable it). With the feature on, this can become `a == b`.
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

fuzz_target!(|data: &[u8]| {
    if let Ok(task) = serde_json::from_slice::<NewTask>(data) {
        let _ = task.validate();
        let bytes = serde_json::to_vec(&task).expect("a NewTask serializes");
        let again: NewTask = serde_json::from_slice(&bytes).expect("a NewTask parses again");
        assert_eq!(again, task);
    }

    if let Ok(patch) = serde_json::from_slice::<TaskPatch>(data) {
        // Through text, as a patch goes to the store and a task to a peer and back.
        let bytes = serde_json::to_vec(&patch).expect("a TaskPatch serializes");
        let again: TaskPatch = serde_json::from_slice(&bytes).expect("a TaskPatch parses again");
        let sent = serde_json::to_value(&patch).expect("a TaskPatch serializes");
        let read = serde_json::to_value(&again).expect("a TaskPatch serializes");
        assert!(same_json(&sent, &read), "sent {sent}, read back {read}");
        if let Ok(valid) = patch.validate() {
            assert!(valid.progress.is_none_or(|p| p <= 100));
        }
    }

    if let Ok(login) = serde_json::from_slice::<LoginRequest>(data) {
        let LoginRequest::LocalUser {
            local_user,
            local_password,
        } = &login;
        let shown = format!("{login:?}");
        // A distinctive password (long, and not part of the user name) is never shown.
        if local_password.len() >= 12 && !local_user.contains(local_password.as_str()) {
            assert!(!shown.contains(local_password.as_str()), "{shown}");
        }
    }

    if let Ok(extend) = serde_json::from_slice::<ExtendRequest>(data) {
        let _ = extend.site();
        if let ExtendRequest::Credentials {
            site,
            vcd_username,
            vcd_password,
        } = &extend
        {
            let distinctive = vcd_password.len() >= 12
                && !site.contains(vcd_password.as_str())
                && !vcd_username.contains(vcd_password.as_str());
            if distinctive {
                assert!(!format!("{extend:?}").contains(vcd_password.as_str()));
            }
        }
    }

    if let Ok(request) = serde_json::from_slice::<MultisiteSessionRequest>(data) {
        let bytes = serde_json::to_vec(&request).expect("serializes");
        let again: MultisiteSessionRequest = serde_json::from_slice(&bytes).expect("parses");
        assert_eq!(again, request);
    }

    if let Ok(asked) = serde_json::from_slice::<Vec<String>>(data) {
        if let Ok(ids) = parse_poll_ids(&asked) {
            assert!(asked.len() <= MAX_POLL_IDS);
            // Each distinct ID once, in the order first asked.
            let mut expected = Vec::new();
            for raw in &asked {
                let id = uuid::Uuid::try_parse(raw).expect("an accepted ID is a UUID");
                if !expected.contains(&id) {
                    expected.push(id);
                }
            }
            assert_eq!(ids, expected);
        }
    }
});
