//! `GET /tasks?site=*` over a real three-site federation: the local site and every peer the
//! session is extended to, merged in the asked order, paged as if one store held them all,
//! and a site that is down named in `siteErrors` while the others still answer.

use std::collections::HashSet;

use serde_json::json;
use sitegate_testkit::site::*;

#[tokio::test]
async fn all_sites_merge_page_and_report_failures() {
    let fed = Federation::init(&["site1", "site2", "site3"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let mut site3 = fed.start("site3").await;
    let mut created: Vec<(String, String)> = Vec::new(); // (site, id)
    for (site, n) in [(&site1, 4), (&site2, 3), (&site3, 5)] {
        let svc = site.login("svc").await;
        for i in 0..n {
            let t = site
                .create_task(
                    &svc,
                    &new_task("alice", "Sync", "vm", &format!("vm-{i}"), &format!("r{i}")),
                )
                .await;
            created.push((site.name.clone(), id_of(&t)));
            // Distinct start times, so the expected order is unambiguous.
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        // Someone else's task on every site, which alice must never see.
        site.create_task(&svc, &new_task("bob", "Sync", "vm", "vm-b", "rb"))
            .await;
    }
    let alice = site1.login("alice").await;

    // Only the local site until the session is extended.
    let page = site1.get("/tasks?site=*", Some(&alice)).await;
    let body = page.expect(200, None);
    assert_eq!(body["total"], 4, "{body}");
    assert_eq!(body["siteErrors"], json!([]));

    for s in ["site2", "site3"] {
        site1.extend_multisite(&alice, s).await.expect(200, None);
    }
    let everything = site1
        .get("/tasks?site=*&sort=startTime&limit=100", Some(&alice))
        .await;
    let body = everything.expect(200, None).clone();
    assert_eq!(body["total"], 12, "{body}");
    let all = item_ids(&body);
    let expected: Vec<String> = created.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(all, expected, "merged in start-time order across sites");
    let sites: HashSet<&str> = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|t| t["site"].as_str())
        .collect();
    assert_eq!(sites.len(), 3);
    assert!(body["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|t| t["user"] == "alice"));

    // Pages of 5, newest first, put together, are the whole list reversed.
    let mut paged = Vec::new();
    for offset in [0, 5, 10] {
        let r = site1
            .get(
                &format!("/tasks?site=*&sort=-startTime&limit=5&offset={offset}"),
                Some(&alice),
            )
            .await;
        let b = r.expect(200, None);
        assert_eq!(b["total"], 12);
        paged.extend(item_ids(b));
    }
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(paged, reversed);

    // Filters go to every site.
    let r = site1
        .get("/tasks?site=*&resourceName=r0", Some(&alice))
        .await;
    assert_eq!(r.expect(200, None)["total"], 3);

    // Deeper than one site may answer: the caller's mistake, said clearly.
    site1
        .get("/tasks?site=*&limit=100&offset=950", Some(&alice))
        .await
        .expect(400, Some("BadUserInput"));

    // site3 down: its error is named, the others answer.
    site3.kill9();
    let r = site1.get("/tasks?site=*&limit=100", Some(&alice)).await;
    let b = r.expect(200, None);
    assert_eq!(b["total"], 7, "{b}");
    let errors = b["siteErrors"].as_array().expect("siteErrors");
    assert_eq!(errors.len(), 1, "{b}");
    assert_eq!(errors[0]["site"], "site3");
    assert_eq!(errors[0]["error"]["code"], "RemoteSiteUnavailable");
    assert_eq!(errors[0]["error"]["stacktrace"], "");

    // Another user, extended nowhere: only their own task at their own site.
    let bob = site2.login("bob").await;
    let r = site2.get("/tasks?site=*", Some(&bob)).await;
    let b = r.expect(200, None);
    assert_eq!(b["total"], 1, "bob sees his own task on site2 only: {b}");
}
