//! Site names and the objects of `GET /sites`.

use serde::{Deserialize, Serialize};

use crate::{ErrorEnvelope, ModelError};

/// The longest site name; names travel in URLs, certificates (DNS SANs) and log lines.
pub const MAX_SITE_NAME_LEN: usize = 63;

/// A validated site name: a DNS label (1..=63 of `a-z`, `A-Z`, `0-9`, `-`, not starting or
/// ending with `-`), so it can be a certificate's DNS SAN and can never steer a request
/// anywhere but to a configured site.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SiteName(String);

impl SiteName {
    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        let valid_chars = raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if raw.is_empty()
            || raw.len() > MAX_SITE_NAME_LEN
            || !valid_chars
            || raw.starts_with('-')
            || raw.ends_with('-')
        {
            return Err(ModelError::invalid(format!(
                "'{}' is not a valid site name: use 1 to {MAX_SITE_NAME_LEN} letters, digits \
                 and inner hyphens",
                crate::error::echo(raw)
            )));
        }
        Ok(SiteName(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SiteName {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        SiteName::parse(&value)
    }
}

impl From<SiteName> for String {
    fn from(value: SiteName) -> Self {
        value.0
    }
}

impl std::fmt::Display for SiteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Link health as the original API reports it: `null` means healthy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteState {
    pub incoming_comm_error: Option<ErrorEnvelope>,
    pub outgoing_comm_error: Option<ErrorEnvelope>,
}

/// One entry of `GET /sites`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteInfo {
    pub site: String,
    pub description: String,
    pub is_local: bool,
    pub state: SiteState,
    /// What operators need to judge the link to a peer (absent for the local site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkInfo>,
    /// When this site's own peer-link certificate expires (local site only), epoch ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expiry: Option<i64>,
    /// What is wrong with this site's own certificate (local site only): a reload that was
    /// refused while the previous certificate stays in use, or a certificate in use that
    /// peers will refuse (it does not chain to the CA or is not valid now). Absent when fine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_error: Option<ErrorEnvelope>,
}

/// The state of the circuit breaker in front of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum CircuitState {
    /// Requests go to the peer.
    Closed,
    /// Requests fail fast with RemoteSiteUnavailable until a probe or trial succeeds.
    Open,
    /// The open period is over; the next request or probe decides.
    HalfOpen,
}

/// Health of the link to one peer, beside the original fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkInfo {
    pub url: String,
    pub circuit: CircuitState,
    pub consecutive_failures: u32,
    pub last_success: Option<i64>,
    pub last_failure: Option<i64>,
    pub round_trip_ms: Option<f64>,
    /// When the peer's certificate (as last seen on the link) expires, epoch ms.
    pub peer_certificate_expiry: Option<i64>,
    /// Last time the peer reached this site over the peer link, epoch ms.
    pub last_incoming: Option<i64>,
    /// The CA the peer's certificates must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_anchor: Option<TrustAnchor>,
}

/// The CA that vouches for a peer, shown so that operators can compare it with the peer's
/// operators out of band before trusting the link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustAnchor {
    pub source: AnchorSource,
    /// SHA-256 of the anchor's CA certificate (the first in its file), as
    /// `openssl x509 -noout -fingerprint -sha256` and `sitegate pki fingerprint` print it.
    pub sha256: String,
}

/// Where a peer's trust anchor comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum AnchorSource {
    /// This site's federation CA (`[tls] ca`).
    Federation,
    /// A CA recorded for this peer alone (`[[peer]] ca`).
    Peer,
}

/// The SHA-256 fingerprint of a DER certificate: upper-case hex pairs joined by colons.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_spelled_as_openssl_prints_them() {
        // `printf abc > f; openssl dgst -sha256 f`, in openssl's fingerprint spelling.
        assert_eq!(
            fingerprint_sha256(b"abc"),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:\
             B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
                .replace(' ', "")
        );
    }

    #[test]
    fn site_names() {
        let cases: &[(&str, bool)] = &[
            ("site1", true),
            ("local", true),
            ("eu-west-2", true),
            ("S", true),
            ("", false),
            ("-a", false),
            ("a-", false),
            ("a.b", false),
            ("../etc", false),
            ("a/b", false),
            ("a b", false),
            ("a\0", false),
            ("sïte", false),
            ("127.0.0.1:80", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(SiteName::parse(raw).is_ok(), *ok, "{raw:?}");
        }
        assert!(SiteName::parse(&"a".repeat(63)).is_ok());
        assert!(SiteName::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn site_info_wire_shape() {
        let info = SiteInfo {
            site: "site1".into(),
            description: String::new(),
            is_local: true,
            state: SiteState::default(),
            link: None,
            certificate_expiry: None,
            certificate_error: None,
        };
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            serde_json::json!({"site":"site1","description":"","isLocal":true,
                "state":{"incomingCommError":null,"outgoingCommError":null}})
        );
    }
}
