//! Where a request's `site` is answered.

use sitegate_model::site::{SiteInfo, SiteName, SiteState};

use crate::error::ApiError;

/// The decision for one request's `site`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This site's own store.
    Local,
}

/// Maps a `site` value to a [`Route`]. An unknown site is `SiteNotFound` and never falls back
/// to the local store: a typo must not return the wrong site's tasks.
#[derive(Debug, Clone)]
pub struct SiteResolver {
    local: SiteName,
    description: String,
}

impl SiteResolver {
    pub fn new(local: SiteName, description: String) -> Self {
        SiteResolver { local, description }
    }

    pub fn local_name(&self) -> &SiteName {
        &self.local
    }

    /// `None` or an empty value means the local site, as when the parameter is omitted.
    pub fn resolve(&self, site: Option<&str>) -> Result<Route, ApiError> {
        match site {
            None | Some("") => Ok(Route::Local),
            Some(name) if name == self.local.as_str() => Ok(Route::Local),
            // Valid or not, any other name is unknown: the message never depends on anything
            // but the caller's own input.
            Some(other) => Err(ApiError::SiteNotFound(other.to_owned())),
        }
    }

    /// Every site this one knows, local first.
    pub fn sites(&self) -> Vec<SiteInfo> {
        vec![SiteInfo {
            site: self.local.to_string(),
            description: self.description.clone(),
            is_local: true,
            state: SiteState::default(),
        }]
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
        let r = SiteResolver::new(SiteName::parse("site1").unwrap(), String::new());
        let cases: &[(Option<&str>, Result<Route, &str>)] = &[
            (None, Ok(Route::Local)),
            (Some(""), Ok(Route::Local)),
            (Some("site1"), Ok(Route::Local)),
            (Some("SITE1"), Err("SiteNotFound")),
            (Some("site2"), Err("SiteNotFound")),
            (Some("../site1"), Err("SiteNotFound")),
            (Some("site1\0"), Err("SiteNotFound")),
        ];
        for (input, want) in cases {
            let got = r.resolve(*input).map_err(|e| e.envelope().code);
            match want {
                Ok(route) => assert_eq!(got.as_ref().ok(), Some(route), "{input:?}"),
                Err(code) => assert_eq!(got.err().as_deref(), Some(*code), "{input:?}"),
            }
        }
    }
}
