//! "A write that the server acknowledged is durable (survives kill -9)": writers hammer a site,
//! the process is killed with SIGKILL while writes are in flight, and after a restart every
//! acknowledged write must be there. The writers, the kill and the check are
//! `sitegate_testkit::acked_writes`, shared with the same test on PostgreSQL in `faults.rs`.

use std::sync::Arc;

use sitegate_testkit::acked_writes::{self, Ledger, KILL_ROUNDS};
use sitegate_testkit::site::Federation;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let fed = Federation::init(&["site1"]);
    let mut site = fed.start("site1").await;
    let token = site.login("svc").await;
    let ledger = Arc::new(Ledger::default());

    for round in 1..=KILL_ROUNDS {
        let (acked, _) = acked_writes::write_until_killed(&mut site, &token, &ledger, round).await;
        site.start().await;
        // The session was acknowledged too, so it survived; it reads everything svc wrote.
        let checked = acked_writes::verify(&site, &token, &ledger).await;
        eprintln!("round {round}: {acked} acknowledged writes; {checked} tasks verified");
    }
}
