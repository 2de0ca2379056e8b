//! The federation: where a request's `site` is answered, and everything that crosses the
//! peer link.
//!
//! Handlers ask [`Federation::resolve`] (one site) or [`Federation::resolve_list`] (one site or
//! `site=*`) and get a [`Route`]: the local store, or a [`PeerHandle`], which is a peer *and*
//! the client that reaches it, so a route to a peer can always be sent. They then call typed
//! methods on the handle ([`PeerHandle::read`] with a [`PeerRead`], `task`, `list`,
//! `obtain_session`, `end_session`); how long a read may take and whether identical reads
//! share one answer follow from the typed read, never from a path string. Resolving has no
//! side effects: the site a request was answered for reaches the access log as a
//! [`TargetSite`] response extension, which the handler attaches.
//!
//! Private parts, each with its own tests:
//! - `client`: the peer client (kept-alive HTTP/1.1 or multiplexed HTTP/2 connections over
//!   mutual TLS, deadlines, the link's health and metrics);
//! - `breaker`: the circuit breaker's rules, as pure state;
//! - `cache`: remote Get One answers shared between callers (final tasks kept, single flight);
//! - `probe`: the background probe that closes a circuit as soon as the peer is back;
//! - `remote`: [`PeerHandle`], [`PeerRead`] and sessions at peers;
//! - `error`: [`PeerError`], how a request to a peer fails;
//! - `io`: the stream wrapper that tells an accepting peer from a refusing one.
//!
//! Not here: who may see what (handlers pass the caller, whose held session the peer checks),
//! and the mapping of a [`PeerError`] to a status (`crate::error`).

mod breaker;
mod cache;
mod client;
mod error;
mod io;
mod probe;
mod remote;

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use sitegate_model::config::SiteConfig;
use sitegate_model::fanout::ALL_SITES;
use sitegate_model::site::{SiteInfo, SiteName, SiteState};

use crate::auth::Caller;
use crate::error::{ApiError, GatewayError};
use crate::tls::PeerTls;

pub(crate) use client::DEADLINE_HEADER;
pub(crate) use error::PeerError;
pub(crate) use remote::{PeerHandle, PeerRead, SessionAsk};

/// Where one request is answered.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// This site's own store.
    Local,
    /// A configured peer, over the peer link.
    Peer(PeerHandle),
}

/// Where a list is answered: one site, or every site the caller's session reaches.
#[derive(Debug, Clone)]
pub(crate) enum ListRoute {
    One(Route),
    /// `site=*`: the local site and these peers (those the caller's session is extended to).
    All(Vec<PeerHandle>),
}

/// The site a request was answered for, as a response extension: the access log and the
/// request metrics read it, so resolving a site records nothing as a side effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TargetSite(pub(crate) Arc<str>);

impl TargetSite {
    /// `result` as a response that names this target.
    pub(crate) fn answer(self, result: Result<impl IntoResponse, ApiError>) -> Response {
        let mut response = result.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// This site, its peers and the client that reaches them.
pub(crate) struct Federation {
    local: SiteName,
    local_target: TargetSite,
    description: String,
    link: Option<Link>,
}

/// The peer link's outgoing half: present when peers are configured.
struct Link {
    client: Arc<client::PeerClient>,
    /// Every peer as a handle, in configuration order.
    peers: Vec<PeerHandle>,
}

impl Federation {
    /// The federation `config` describes. Loads the peer link's certificates when peers are
    /// configured (`tls` and at least one `[[peer]]`).
    pub(crate) fn from_config(config: &SiteConfig) -> Result<Self, GatewayError> {
        let link = match (&config.tls, config.peers.is_empty()) {
            (Some(tls), false) => {
                let peers = Arc::new(
                    client::PeerSet::new(&config.peers, &config.peering)
                        .map_err(GatewayError::PeerLink)?,
                );
                let tls = PeerTls::load(
                    tls.clone(),
                    config.site.name.clone(),
                    peers.anchors(),
                    peers.clone(),
                )
                .map_err(|e| GatewayError::PeerLink(e.to_string()))?;
                let client = Arc::new(client::PeerClient::new(
                    peers.clone(),
                    Arc::new(tls),
                    config.peering.clone(),
                ));
                let handles = peers
                    .all()
                    .iter()
                    .map(|peer| PeerHandle::new(peer.clone(), client.clone()))
                    .collect();
                Some(Link {
                    client,
                    peers: handles,
                })
            }
            _ => None,
        };
        Ok(Federation::new(
            config.site.name.clone(),
            config.site.description.clone(),
            link,
        ))
    }

    fn new(local: SiteName, description: String, link: Option<Link>) -> Self {
        Federation {
            local_target: TargetSite(Arc::from(local.as_str())),
            local,
            description,
            link,
        }
    }

    pub(crate) fn local_name(&self) -> &SiteName {
        &self.local
    }

    /// The peer link's certificates, when there is a peer link.
    pub(crate) fn peer_tls(&self) -> Option<Arc<PeerTls>> {
        self.link.as_ref().map(|l| l.client.tls().clone())
    }

    /// Probes every peer each interval, forever (pending forever without peers).
    pub(crate) async fn probe_forever(&self) {
        match &self.link {
            Some(link) => link.client.clone().probe_forever().await,
            None => std::future::pending().await,
        }
    }

    /// The configured peer called `name`. A plain lookup: it routes nothing.
    pub(crate) fn peer(&self, name: &str) -> Option<&PeerHandle> {
        self.link
            .as_ref()
            .and_then(|l| l.peers.iter().find(|p| p.name().as_str() == name))
    }

    /// Where a request naming `site` is answered. `None` or an empty value means the local
    /// site, as when the parameter is omitted. An unknown site is `SiteNotFound` and never
    /// falls back to the local store: a typo must not return the wrong site's tasks. A
    /// request that arrived over the peer link (`from_peer`) is only ever answered locally
    /// (the loop guard). `*` is unknown here: only lists fan out ([`Self::resolve_list`]).
    pub(crate) fn resolve(
        &self,
        site: Option<&str>,
        from_peer: Option<&SiteName>,
    ) -> Result<Route, ApiError> {
        match site {
            None | Some("") => Ok(Route::Local),
            Some(name) if name == self.local.as_str() => Ok(Route::Local),
            // A peer request is never forwarded again, so no request can loop between sites.
            Some(other) if from_peer.is_some() => Err(ApiError::SiteNotFound(other.to_owned())),
            Some(other) => self
                .peer(other)
                .map(|peer| Route::Peer(peer.clone()))
                // Valid or not, any other name is unknown: the answer never depends on
                // anything but the caller's own input and the configuration.
                .ok_or_else(|| ApiError::SiteNotFound(other.to_owned())),
        }
    }

    /// Where a list naming `site` is answered: as [`Self::resolve`], and `*` for the local
    /// site and every peer the caller's session is extended to. A request from a peer gets
    /// `SiteNotFound` for `*`, as for any other site: it is never fanned out again.
    pub(crate) fn resolve_list(
        &self,
        site: Option<&str>,
        from_peer: Option<&SiteName>,
        caller: &Caller,
    ) -> Result<ListRoute, ApiError> {
        if site != Some(ALL_SITES) {
            return self.resolve(site, from_peer).map(ListRoute::One);
        }
        if from_peer.is_some() {
            return Err(ApiError::SiteNotFound(ALL_SITES.to_owned()));
        }
        let peers = self
            .link
            .iter()
            .flat_map(|l| l.peers.iter())
            .filter(|p| caller.remote_session(p.name().as_str()).is_some())
            .cloned()
            .collect();
        Ok(ListRoute::All(peers))
    }

    /// The [`TargetSite`] of a route.
    pub(crate) fn target(&self, route: &Route) -> TargetSite {
        match route {
            Route::Local => self.local_target.clone(),
            Route::Peer(peer) => TargetSite(Arc::from(peer.name().as_str())),
        }
    }

    /// The [`TargetSite`] of a list route.
    pub(crate) fn list_target(&self, route: &ListRoute) -> TargetSite {
        match route {
            ListRoute::One(route) => self.target(route),
            ListRoute::All(_) => TargetSite(Arc::from(ALL_SITES)),
        }
    }

    /// Every site this one knows, local first, with link health for peers.
    pub(crate) fn sites(&self) -> Vec<SiteInfo> {
        let tls = self.link.as_ref().map(|l| l.client.tls());
        let mut sites = vec![SiteInfo {
            site: self.local.to_string(),
            description: self.description.clone(),
            is_local: true,
            state: SiteState::default(),
            link: None,
            certificate_expiry: tls.and_then(|t| t.own_certificate_expiry()),
            certificate_error: tls.and_then(|t| t.certificate_problem()).map(|(at, why)| {
                sitegate_model::ErrorEnvelope::new(
                    sitegate_model::ErrorCode::GeneralServerFailure,
                    why,
                    vec![at.to_string()],
                )
            }),
        }];
        if let Some(link) = &self.link {
            sites.extend(link.peers.iter().map(|p| p.site_info()));
        }
        sites
    }

    pub(crate) fn site(&self, name: &str) -> Result<SiteInfo, ApiError> {
        self.sites()
            .into_iter()
            .find(|s| s.site == name)
            .ok_or_else(|| ApiError::SiteNotFound(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_table() {
        let r = Federation::new(SiteName::parse("site1").unwrap(), String::new(), None);
        let from = SiteName::parse("site2").unwrap();
        // (site parameter, arrived from peer, expected: Ok = local, Err = error code)
        type Case<'a> = (Option<&'a str>, Option<&'a SiteName>, Result<(), &'a str>);
        let cases: &[Case] = &[
            (None, None, Ok(())),
            (Some(""), None, Ok(())),
            (Some("site1"), None, Ok(())),
            (Some("site1"), Some(&from), Ok(())),
            (Some("site3"), Some(&from), Err("SiteNotFound")),
            (Some("SITE1"), None, Err("SiteNotFound")),
            (Some("site2"), None, Err("SiteNotFound")),
            (Some("*"), None, Err("SiteNotFound")),
            (Some("../site1"), None, Err("SiteNotFound")),
            (Some("site1\0"), None, Err("SiteNotFound")),
        ];
        for (input, origin, want) in cases {
            let got = r
                .resolve(*input, *origin)
                .map(|route| assert!(matches!(route, Route::Local)))
                .map_err(|e| e.envelope().code);
            assert_eq!(
                got.map_err(|c| c.to_string()),
                want.map_err(str::to_string),
                "{input:?}"
            );
        }
        assert_eq!(r.target(&Route::Local), TargetSite(Arc::from("site1")));
        assert!(r.peer("site1").is_none(), "the local site is not a peer");
    }

    #[test]
    fn the_target_travels_on_the_response_whatever_the_outcome() {
        let target = TargetSite(Arc::from("site2"));
        let ok = target.clone().answer(Ok::<_, ApiError>("fine"));
        assert_eq!(ok.extensions().get::<TargetSite>(), Some(&target));
        let failed = target
            .clone()
            .answer(Err::<(), _>(ApiError::TaskNotFound(uuid::Uuid::nil())));
        assert_eq!(failed.status(), 404);
        assert_eq!(failed.extensions().get::<TargetSite>(), Some(&target));
    }
}
