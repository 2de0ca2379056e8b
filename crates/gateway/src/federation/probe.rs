//! The background probe that finds a peer link's health without waiting for a caller.
//!
//! Each interval, every peer gets `GET /healthz` over the link; a success closes an open
//! circuit at once, so callers stop failing fast as soon as the peer is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::client::{Forward, Peer, PeerClient};
use super::error::PeerError;

impl PeerClient {
    /// One probe of `peer`, open circuit or not (a caller's request would fail fast): returns
    /// whether it closed an open circuit. Probes are housekeeping, not operations: they have
    /// no trace of their own.
    pub(super) async fn probe_once(
        &self,
        peer: &Peer,
        deadline: Instant,
    ) -> Result<bool, PeerError> {
        let probe = Forward {
            route: "GET /healthz",
            method: Method::GET,
            path_and_query: "/healthz".into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            held: Duration::ZERO,
        };
        let was_open = peer.circuit_wait().is_some();
        self.exchange_in(peer, probe, Some(deadline)).await?;
        Ok(was_open)
    }

    /// Probes every peer each interval, forever; run as a background task.
    pub(crate) async fn probe_forever(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.probe_interval_ms);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for peer in self.peers.all() {
                let client = self.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + interval.max(Duration::from_millis(500));
                    if let Ok(true) = client.probe_once(&peer, deadline).await {
                        tracing::info!(peer = %peer.name(), "peer link is back: circuit closed");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use sitegate_model::config::{PeerTransport, PeeringConfig};
    use sitegate_model::site::{CircuitState, SiteName};

    use super::super::client::{Forward, PeerClient, PeerSet};
    use super::super::error::PeerError;
    use crate::tls::PeerTls;

    /// A client of one peer, `site2`, at a loopback port nothing listens on.
    fn client_of_an_absent_peer(dir: &std::path::Path, threshold: u32) -> Arc<PeerClient> {
        client_of_an_absent_peer_over(dir, threshold, PeerTransport::Http2)
    }

    fn client_of_an_absent_peer_over(
        dir: &std::path::Path,
        threshold: u32,
        transport: PeerTransport,
    ) -> Arc<PeerClient> {
        let config = PeeringConfig {
            transport,
            failure_threshold: threshold,
            circuit_open_secs: 60,
            connect_timeout_ms: 500,
            connections_per_peer: 2,
            ..PeeringConfig::default()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let peers = Arc::new(PeerSet::site2_at(
            format!("https://127.0.0.1:{port}"),
            &config,
        ));
        let tls = PeerTls::load(
            crate::test_certificates::write(dir, "site1"),
            SiteName::parse("site1").unwrap(),
            peers.anchors(),
            peers.clone(),
        )
        .unwrap();
        Arc::new(PeerClient::new(peers, Arc::new(tls), config))
    }

    fn healthz() -> Forward {
        Forward {
            route: "GET /healthz",
            method: http::Method::GET,
            path_and_query: "/healthz".into(),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
            held: Duration::ZERO,
        }
    }

    /// Probes of an absent peer open its circuit like any failure; then callers fail fast
    /// (`CircuitOpen`, no connection attempt) while the probe still tries the network, which
    /// is how it finds the peer again.
    #[tokio::test]
    async fn probes_open_the_circuit_and_keep_trying_while_callers_fail_fast() {
        let dir = tempfile::tempdir().unwrap();
        let client = client_of_an_absent_peer(dir.path(), 2);
        let peer = client.peers.get("site2").unwrap().clone();
        let deadline = || Instant::now() + Duration::from_secs(2);
        for _ in 0..2 {
            match client.probe_once(&peer, deadline()).await {
                Err(PeerError::Unreachable { site, .. }) => assert_eq!(site, "site2"),
                other => panic!("expected Unreachable, got {other:?}"),
            }
        }
        let info = peer.site_info();
        let link = info.link.unwrap();
        assert_eq!(link.circuit, CircuitState::Open);
        assert_eq!(link.consecutive_failures, 2);
        assert!(info.state.outgoing_comm_error.is_some());

        let started = Instant::now();
        match client.send(&peer, healthz(), Some(deadline())).await {
            Err(PeerError::CircuitOpen { retry_after, .. }) => {
                assert!(retry_after > Duration::from_secs(50), "{retry_after:?}")
            }
            other => panic!("expected CircuitOpen, got {:?}", other.err()),
        }
        assert!(started.elapsed() < Duration::from_millis(50), "no network");
        match client.probe_once(&peer, deadline()).await {
            Err(PeerError::Unreachable { .. }) => {}
            other => panic!("the probe goes to the network: {other:?}"),
        }
    }

    /// Requests are spread over the peer's connections, and a failed connection is not kept:
    /// every slot fails on its own and is retried on its next use.
    #[tokio::test]
    async fn requests_round_robin_over_the_pool_and_failures_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let client = client_of_an_absent_peer(dir.path(), 100);
        let peer = client.peers.get("site2").unwrap().clone();
        for _ in 0..4 {
            let r = client
                .send(
                    &peer,
                    healthz(),
                    Some(Instant::now() + Duration::from_secs(2)),
                )
                .await;
            assert!(
                matches!(r, Err(PeerError::Unreachable { .. })),
                "{:?}",
                r.err()
            );
        }
        assert_eq!(peer.slots_used(), 4, "four requests took four turns");
        assert_eq!(
            peer.open_connections().await,
            0,
            "no broken connection is kept"
        );
        assert_eq!(
            peer.site_info().link.unwrap().consecutive_failures,
            4,
            "below the threshold the circuit stays closed and every failure counts"
        );
    }
}
