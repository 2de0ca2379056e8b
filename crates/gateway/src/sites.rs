//! Where a request's `site` is answered.

use std::sync::Arc;

use sitegate_model::site::{SiteInfo, SiteName, SiteState};

use crate::error::ApiError;
use crate::peer::{Peer, PeerClient};

/// The decision for one request's `site`.
#[derive(Debug, Clone)]
pub enum Route {
    /// This site's own store.
    Local,
    /// A configured peer, over the peer link.
    Peer(Arc<Peer>),
}

/// Maps a `site` value to a [`Route`]. An unknown site is `SiteNotFound` and never falls back
/// to the local store: a typo must not return the wrong site's tasks. A request that arrived
/// over the peer link is only ever answered locally (the loop guard).
pub struct SiteResolver {
    local: SiteName,
    description: String,
    peers: Option<Arc<PeerClient>>,
}

impl SiteResolver {
    pub fn new(local: SiteName, description: String, peers: Option<Arc<PeerClient>>) -> Self {
        SiteResolver {
            local,
            description,
            peers,
        }
    }

    pub fn local_name(&self) -> &SiteName {
        &self.local
    }

    pub fn peer_client(&self) -> Option<&Arc<PeerClient>> {
        self.peers.as_ref()
    }

    /// `None` or an empty value means the local site, as when the parameter is omitted.
    /// `from_peer` is the site a request came from over the peer link, if it did.
    pub fn resolve(
        &self,
        site: Option<&str>,
        from_peer: Option<&SiteName>,
    ) -> Result<Route, ApiError> {
        let route = self.decide(site, from_peer)?;
        crate::telemetry::note_target_site(match &route {
            Route::Local => self.local.as_str(),
            Route::Peer(peer) => peer.name().as_str(),
        });
        Ok(route)
    }

    fn decide(&self, site: Option<&str>, from_peer: Option<&SiteName>) -> Result<Route, ApiError> {
        match site {
            None | Some("") => Ok(Route::Local),
            Some(name) if name == self.local.as_str() => Ok(Route::Local),
            // A peer request is never forwarded again, so no request can loop between sites.
            Some(other) if from_peer.is_some() => Err(ApiError::SiteNotFound(other.to_owned())),
            Some(other) => self
                .peers
                .as_ref()
                .and_then(|client| client.peers.get(other))
                .map(|peer| Route::Peer(peer.clone()))
                // Valid or not, any other name is unknown: the answer never depends on anything
                // but the caller's own input and the configuration.
                .ok_or_else(|| ApiError::SiteNotFound(other.to_owned())),
        }
    }

    /// The routes of `site=*` for a caller: the local site and each peer `extended_to` says
    /// the caller's session reaches. A request from a peer gets `SiteNotFound`, as for any
    /// other site: it is never fanned out again.
    pub fn fan_out(
        &self,
        from_peer: Option<&SiteName>,
        extended_to: impl Fn(&str) -> bool,
    ) -> Result<Vec<Route>, ApiError> {
        if from_peer.is_some() {
            return Err(ApiError::SiteNotFound(
                sitegate_model::fanout::ALL_SITES.to_owned(),
            ));
        }
        crate::telemetry::note_target_site(sitegate_model::fanout::ALL_SITES);
        let mut routes = vec![Route::Local];
        if let Some(client) = &self.peers {
            for name in client.peers.names() {
                if let Some(peer) = client.peers.get(name.as_str()) {
                    if extended_to(name.as_str()) {
                        routes.push(Route::Peer(peer.clone()));
                    }
                }
            }
        }
        Ok(routes)
    }

    /// Every site this one knows, local first, with link health for peers.
    pub fn sites(&self) -> Vec<SiteInfo> {
        let mut sites = vec![SiteInfo {
            site: self.local.to_string(),
            description: self.description.clone(),
            is_local: true,
            state: SiteState::default(),
            link: None,
            certificate_expiry: self
                .peers
                .as_ref()
                .and_then(|c| c.tls().own_certificate_expiry()),
            certificate_error: self
                .peers
                .as_ref()
                .and_then(|c| c.tls().certificate_problem())
                .map(|(at, why)| {
                    sitegate_model::ErrorEnvelope::new(
                        sitegate_model::ErrorCode::GeneralServerFailure,
                        why,
                        vec![at.to_string()],
                    )
                }),
        }];
        if let Some(client) = &self.peers {
            sites.extend(client.peers.all().iter().map(|p| p.site_info()));
        }
        sites
    }

    pub fn site(&self, name: &str) -> Result<SiteInfo, ApiError> {
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
        let r = SiteResolver::new(SiteName::parse("site1").unwrap(), String::new(), None);
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
    }
}
