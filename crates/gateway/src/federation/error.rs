//! How a request to a peer fails, told apart by the step that failed.

use std::time::Duration;

use sitegate_model::ErrorCode;

use crate::tls::{handshake_refusal, HandshakeRefusal};

/// Why a request to a peer failed. The messages name the site and the step, never internals;
/// `detail` is for the log only.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("site '{site}' could not be reached")]
    Unreachable { site: String, detail: String },
    #[error("the link to site '{site}' is marked down; retry later")]
    CircuitOpen { site: String, retry_after: Duration },
    #[error("site '{site}' did not answer in time")]
    Timeout { site: String },
    #[error("site '{site}' refused this site's certificate during the TLS handshake")]
    RefusedOurCertificate { site: String, detail: String },
    #[error(
        "this site could not verify site '{site}''s certificate during the TLS handshake \
         (it must be issued by the federation CA and name the site)"
    )]
    UntrustedPeerCertificate { site: String, detail: String },
    #[error("site '{site}' sent an answer that could not be read")]
    BadAnswer { site: String, detail: String },
}

impl PeerError {
    /// Only failures of the link itself count towards opening the circuit; a refused
    /// certificate is a configuration problem that retrying faster or slower does not change.
    pub(super) fn counts_for_circuit(&self) -> bool {
        matches!(
            self,
            PeerError::Unreachable { .. } | PeerError::Timeout { .. } | PeerError::BadAnswer { .. }
        )
    }

    /// The API code a caller sees for this failure.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            PeerError::Unreachable { .. }
            | PeerError::CircuitOpen { .. }
            | PeerError::BadAnswer { .. } => ErrorCode::RemoteSiteUnavailable,
            PeerError::Timeout { .. } => ErrorCode::RemoteSiteTimeout,
            PeerError::RefusedOurCertificate { .. }
            | PeerError::UntrustedPeerCertificate { .. } => ErrorCode::RemoteAuthenticationFailure,
        }
    }

    /// The message a caller (and `/sites`) sees: a sentence naming the site and the step.
    pub(crate) fn message(&self) -> String {
        let text = self.to_string();
        let mut chars = text.chars();
        match chars.next() {
            Some(first) => format!("{}{}.", first.to_uppercase(), chars.as_str()),
            None => text,
        }
    }

    /// What the log gets beyond the message.
    pub(crate) fn detail(&self) -> &str {
        match self {
            PeerError::Unreachable { detail, .. }
            | PeerError::RefusedOurCertificate { detail, .. }
            | PeerError::UntrustedPeerCertificate { detail, .. }
            | PeerError::BadAnswer { detail, .. } => detail,
            PeerError::CircuitOpen { .. } | PeerError::Timeout { .. } => "",
        }
    }
}

pub(super) fn transport_error(site: &str, e: &(dyn std::error::Error + 'static)) -> PeerError {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    match handshake_refusal(e) {
        Some(refusal) => refused(refusal, site.to_owned(), detail),
        None => PeerError::Unreachable {
            site: site.to_owned(),
            detail,
        },
    }
}

pub(super) fn refused(refusal: HandshakeRefusal, site: String, detail: String) -> PeerError {
    match refusal {
        HandshakeRefusal::PeerRefusedUs => PeerError::RefusedOurCertificate { site, detail },
        HandshakeRefusal::WeRefusedPeer => PeerError::UntrustedPeerCertificate { site, detail },
    }
}
