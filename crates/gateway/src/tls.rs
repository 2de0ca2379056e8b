//! Everything rustls: the peer link's server and client configurations, built from PEM files
//! and swapped atomically when the files change, and the rules that tie a certificate to a
//! site. This is the only module that touches rustls.
//!
//! A site's identity is a DNS SAN equal to its site name, issued by the federation CA or, for
//! a peer run by another organisation, by that peer's own CA (its trust anchor, `[[peer]] ca`).
//! The peer listener requires a client certificate, finds the configured peer it names, and
//! accepts it only if it chains to *that* peer's anchor, so one organisation's CA cannot vouch
//! for another's sites. The peer client connects with the peer's *site name* as the TLS server
//! name, whatever host its URL points at, and checks the answer against the same anchor, so a
//! certificate for another site is refused even at the right address.
//!
//! The client API may also serve HTTPS ([`ClientApiTls`]): an ordinary server certificate,
//! no client certificates, TLS 1.2 and 1.3.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use sitegate_model::config::{PeerTransport, TlsConfig};
use sitegate_model::site::{fingerprint_sha256, AnchorSource, SiteName, TrustAnchor};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Told about every client certificate the peer listener checks, so link health can report
/// incoming failures per peer.
pub(crate) trait HandshakeObserver: Send + Sync + std::fmt::Debug {
    fn incoming_handshake(&self, site: &SiteName, outcome: Result<(), String>);
}

/// A peer and the CA file its certificates chain to.
#[derive(Clone, Debug)]
pub(crate) struct PeerAnchor {
    pub(crate) site: SiteName,
    /// `None`: the federation CA (`[tls] ca`).
    pub(crate) ca: Option<PathBuf>,
}

impl PeerAnchor {
    /// A peer whose certificates chain to the federation CA.
    #[cfg(test)]
    pub(crate) fn federation(site: SiteName) -> Self {
        PeerAnchor { site, ca: None }
    }
}

/// Client configurations for one set of trusted roots, one per protocol offered by ALPN.
#[derive(Clone)]
struct Clients {
    http2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
}

impl Clients {
    fn for_transport(&self, transport: PeerTransport) -> Arc<ClientConfig> {
        match transport {
            PeerTransport::Http1 => self.http1.clone(),
            PeerTransport::Http2 => self.http2.clone(),
        }
    }
}

/// The current configurations and what they were built from.
#[derive(Clone)]
struct Loaded {
    server: Arc<ServerConfig>,
    /// For peers under the federation CA.
    clients: Clients,
    /// For peers with a trust anchor of their own.
    anchored: HashMap<SiteName, Clients>,
    /// The federation CA, as `/sites` shows it.
    federation_anchor: TrustAnchor,
    /// The anchors of peers with their own, as `/sites` shows them.
    anchors: HashMap<SiteName, TrustAnchor>,
    own_cert_expiry: Option<i64>,
    stamp: Vec<Option<SystemTime>>,
}

/// The peer link's TLS, reloadable without a restart. New connections use the newest
/// certificates; established ones keep theirs until they close.
pub(crate) struct PeerTls {
    files: TlsConfig,
    local: SiteName,
    peers: Vec<PeerAnchor>,
    observer: Arc<dyn HandshakeObserver>,
    current: ArcSwap<Loaded>,
    /// Serialises reloads (SIGHUP and the file watcher may race).
    reloading: Mutex<()>,
    /// What is wrong with the certificate (epoch ms, reason) until a reload succeeds: a
    /// refused reload, or one in use that peers will refuse. `/sites` and
    /// `/diagnostics/health` show it, so neither goes unnoticed.
    refused: Mutex<Option<(i64, String)>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Read {
            path: path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    crate::auth::warn_if_readable_by_others(path, "private key", 0o077);
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The modification times of every file the configurations are built from, the peers'
/// anchors included, so changing any of them reloads.
fn stamp(files: &TlsConfig, peers: &[PeerAnchor]) -> Vec<Option<SystemTime>> {
    [&files.ca, &files.cert, &files.key]
        .into_iter()
        .chain(peers.iter().filter_map(|p| p.ca.as_ref()))
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// The CA certificates in `path` as roots, and the fingerprint of the first. `what` names
/// the file in errors (a peer's anchor says which peer's).
fn roots_from(path: &Path, what: &str) -> Result<(Arc<RootCertStore>, String), TlsError> {
    let certs = read_certs(path).map_err(|e| TlsError::Invalid(format!("{what}: {e}")))?;
    let fingerprint = fingerprint_sha256(certs[0].as_ref());
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| TlsError::Invalid(format!("{what} {}: {e}", path.display())))?;
    }
    Ok((Arc::new(roots), fingerprint))
}

fn client_configs(
    roots: Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Clients, TlsError> {
    let mut http2 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain.to_vec(), key.clone_key())
        .map_err(|e| TlsError::Invalid(format!("site certificate and key: {e}")))?;
    // The client offers only the protocol it will speak: the server picks by ALPN.
    let mut http1 = http2.clone();
    http2.alpn_protocols = vec![b"h2".to_vec()];
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Clients {
        http2: Arc::new(http2),
        http1: Arc::new(http1),
    })
}

fn client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))
}

/// The site a certificate names, among `candidates` (its DNS SANs are compared, not its CN).
pub(crate) fn identify<'a>(
    cert: &CertificateDer<'_>,
    candidates: impl IntoIterator<Item = &'a SiteName>,
) -> Option<SiteName> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    candidates
        .into_iter()
        .find(|name| {
            ServerName::try_from(name.as_str())
                .map(|sn| parsed.verify_is_valid_for_subject_name(&sn).is_ok())
                .unwrap_or(false)
        })
        .cloned()
}

/// A certificate's `notAfter`, in epoch milliseconds.
pub(crate) fn not_after_millis(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp() * 1000)
}

/// Whether `chain` is what peers will accept: it chains to `roots` and is valid now.
fn verify_own(
    files: &TlsConfig,
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
) -> Result<(), TlsError> {
    let end_entity = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.cert.display())))?;
    end_entity
        .verify_for_usage(
            provider().signature_verification_algorithms.all,
            &roots.roots,
            &chain[1..],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| {
            TlsError::Invalid(format!(
                "{} is not valid now under the federation CA {}: {e:?}",
                files.cert.display(),
                files.ca.display()
            ))
        })
}

/// Builds the configurations from the files. `strict` (a reload, with working certificates
/// to keep) refuses a certificate peers would refuse; at start it is built anyway, so the
/// site serves its own users, and the problem is returned beside it to be reported.
fn build(
    files: &TlsConfig,
    local: &SiteName,
    peers: &[PeerAnchor],
    observer: Arc<dyn HandshakeObserver>,
    strict: bool,
) -> Result<(Loaded, Option<TlsError>), TlsError> {
    let stamp = stamp(files, peers);
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let (roots, federation_sha256) = roots_from(&files.ca, "CA certificate")?;
    if identify(&chain[0], [local]).is_none() {
        return Err(TlsError::Invalid(format!(
            "{} does not name this site ('{local}') as a DNS subject alternative name",
            files.cert.display()
        )));
    }
    // What the peers will check: the certificate must chain to the federation CA and be
    // valid now (a self-signed certificate naming the site, or one that expired, would make
    // every peer refuse this site).
    let problem = match verify_own(files, &chain, &roots) {
        Ok(()) => None,
        Err(e) if strict => return Err(e),
        Err(e) => Some(e),
    };
    let own_cert_expiry = not_after_millis(&chain[0]);

    let federation = client_verifier(roots.clone())?;
    let mut hints = federation.root_hint_subjects().to_vec();
    let mut by_peer = HashMap::new();
    let mut anchored = HashMap::new();
    let mut anchors = HashMap::new();
    for peer in peers {
        let Some(ca) = &peer.ca else { continue };
        let (anchor, sha256) = roots_from(ca, &format!("peer '{}': trust anchor", peer.site))?;
        anchors.insert(
            peer.site.clone(),
            TrustAnchor {
                source: AnchorSource::Peer,
                sha256,
            },
        );
        let verifier = client_verifier(anchor.clone())?;
        for subject in verifier.root_hint_subjects() {
            if !hints.iter().any(|h| h.as_ref() == subject.as_ref()) {
                hints.push(subject.clone());
            }
        }
        by_peer.insert(peer.site.clone(), verifier);
        anchored.insert(peer.site.clone(), client_configs(anchor, &chain, &key)?);
    }
    let verifier = Arc::new(PeerSiteVerifier {
        federation,
        by_peer,
        hints,
        peers: peers.iter().map(|p| p.site.clone()).collect(),
        observer,
    });
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Invalid(format!("site certificate and key: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let clients = client_configs(roots, &chain, &key)?;

    Ok((
        Loaded {
            server: Arc::new(server),
            clients,
            anchored,
            federation_anchor: TrustAnchor {
                source: AnchorSource::Federation,
                sha256: federation_sha256,
            },
            anchors,
            own_cert_expiry,
            stamp,
        },
        problem,
    ))
}

impl PeerTls {
    pub(crate) fn load(
        files: TlsConfig,
        local: SiteName,
        peers: Vec<PeerAnchor>,
        observer: Arc<dyn HandshakeObserver>,
    ) -> Result<Self, TlsError> {
        let (loaded, problem) = build(&files, &local, &peers, observer.clone(), false)?;
        let refused = problem.map(|e| {
            tracing::error!(error = %e, "this site's peer-link certificate will be refused by its peers");
            (
                sitegate_store::now_millis(),
                format!("The certificate in use will be refused by peers: {e}"),
            )
        });
        Ok(PeerTls {
            files,
            local,
            peers,
            observer,
            current: ArcSwap::from_pointee(loaded),
            reloading: Mutex::new(()),
            refused: Mutex::new(refused),
        })
    }

    /// Re-reads the files; on failure the old configuration stays in force.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let _guard = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let built = build(
            &self.files,
            &self.local,
            &self.peers,
            self.observer.clone(),
            true,
        )
        .map(|(loaded, _)| loaded);
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match built {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                *refused = None;
                Ok(())
            }
            Err(e) => {
                // The stamp of the refused files is taken as seen, so the watcher does not
                // retry (and log) every tick; a new change or SIGHUP tries again.
                let mut seen = (**self.current.load()).clone();
                seen.stamp = stamp(&self.files, &self.peers);
                self.current.store(Arc::new(seen));
                *refused = Some((
                    sitegate_store::now_millis(),
                    format!("New certificates were refused; the previous ones stay in use: {e}"),
                ));
                Err(e)
            }
        }
    }

    /// What is wrong with this site's certificate, if anything: a refused reload (the
    /// previous certificates stay in use) or, from the start, one peers will refuse:
    /// (epoch ms, reason).
    pub(crate) fn certificate_problem(&self) -> Option<(i64, String)> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads when any of the files' modification times changed; returns whether it did.
    pub(crate) fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if stamp(&self.files, &self.peers) == self.current.load().stamp {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().server.clone())
    }

    /// A connector to `peer` that trusts only that peer's anchor and offers (by ALPN) the
    /// protocol `transport` speaks.
    pub(crate) fn connector(&self, peer: &SiteName, transport: PeerTransport) -> TlsConnector {
        let loaded = self.current.load();
        let clients = loaded.anchored.get(peer).unwrap_or(&loaded.clients);
        TlsConnector::from(clients.for_transport(transport))
    }

    /// The CA `peer`'s certificates must chain to.
    pub(crate) fn trust_anchor(&self, peer: &SiteName) -> TrustAnchor {
        let loaded = self.current.load();
        loaded
            .anchors
            .get(peer)
            .unwrap_or(&loaded.federation_anchor)
            .clone()
    }

    pub(crate) fn own_certificate_expiry(&self) -> Option<i64> {
        self.current.load().own_cert_expiry
    }

    /// The peer a verified client certificate names.
    pub(crate) fn identify_peer(&self, cert: &CertificateDer<'_>) -> Option<SiteName> {
        identify(cert, self.peers.iter().map(|p| &p.site))
    }
}

/// Certificates that can be re-read while serving: SIGHUP forces a reload, the file watcher
/// reloads on a changed modification time.
pub(crate) trait ReloadableCertificates: Send + Sync {
    /// Re-reads the files; on failure the old configuration stays in force.
    fn reload(&self) -> Result<(), TlsError>;
    /// Reloads when a file's modification time changed; returns whether it did.
    fn reload_if_changed(&self) -> Result<bool, TlsError>;
}

impl ReloadableCertificates for PeerTls {
    fn reload(&self) -> Result<(), TlsError> {
        PeerTls::reload(self)
    }

    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        PeerTls::reload_if_changed(self)
    }
}

/// The client API's HTTPS, when an operator configures it (`listen.tls_cert`/`tls_key`):
/// server authentication only, TLS 1.3 and 1.2 (never older: rustls has nothing older, and the
/// versions are named here so no future default widens them), ALPN http/1.1.
/// Reloadable like the peer link's, so a certificate can be renewed without a restart.
pub(crate) struct ClientApiTls {
    /// The certificate chain file (`listen.tls_cert`), re-read on reload.
    cert: PathBuf,
    /// Its private key file (`listen.tls_key`).
    key: PathBuf,
    /// The configuration new connections get, and the files' modification times it was
    /// built from.
    current: ArcSwap<(Arc<ServerConfig>, Vec<Option<SystemTime>>)>,
    /// Serialises reloads (SIGHUP and the file watcher may race).
    reloading: Mutex<()>,
}

/// The protocol versions the client API accepts, newest first.
pub(crate) static CLIENT_API_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn build_client_api(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ServerConfig>, Vec<Option<SystemTime>>), TlsError> {
    let stamp = [cert, key]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect();
    let chain = read_certs(cert)?;
    let key = read_key(key)?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(CLIENT_API_VERSIONS)
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid(format!("client API certificate and key: {e}")))?;
    // HTTP/1.1 only: curl and browsers take HTTP/2 whenever it is offered, and then every
    // header name arrives in lower case, which breaks the original API's scripts
    // (`curl -i ... | grep X-VCAV-Auth`). A client that wants HTTP/2 can still speak it with
    // prior knowledge over plain TCP behind a terminating balancer.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(server), stamp))
}

impl ClientApiTls {
    pub(crate) fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let loaded = build_client_api(&cert, &key)?;
        Ok(ClientApiTls {
            cert,
            key,
            current: ArcSwap::from_pointee(loaded),
            reloading: Mutex::new(()),
        })
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().0.clone())
    }
}

impl ReloadableCertificates for ClientApiTls {
    fn reload(&self) -> Result<(), TlsError> {
        let _guard = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = build_client_api(&self.cert, &self.key)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now: Vec<_> = [&self.cert, &self.key]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect();
        if now == self.current.load().1 {
            return Ok(false);
        }
        ReloadableCertificates::reload(self).map(|()| true)
    }
}

/// Accepts a client certificate only if it names a configured peer *and* chains to that
/// peer's anchor (its own CA, or the federation CA), so an unknown site is refused during the
/// handshake, and a CA trusted for one peer cannot vouch for another.
#[derive(Debug)]
struct PeerSiteVerifier {
    federation: Arc<dyn ClientCertVerifier>,
    /// Peers with a trust anchor of their own.
    by_peer: HashMap<SiteName, Arc<dyn ClientCertVerifier>>,
    /// Every anchor's subject, so a client can pick its certificate.
    hints: Vec<DistinguishedName>,
    peers: Vec<SiteName>,
    observer: Arc<dyn HandshakeObserver>,
}

impl ClientCertVerifier for PeerSiteVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // `identify_peer` names the connection's origin with the same rule, so the peer whose
        // anchor verified the certificate is the peer the requests are taken from.
        let claimed = identify(end_entity, &self.peers);
        let anchor = claimed
            .as_ref()
            .and_then(|site| self.by_peer.get(site))
            .unwrap_or(&self.federation);
        let verified = anchor.verify_client_cert(end_entity, intermediates, now);
        match (&claimed, &verified) {
            (Some(site), Ok(_)) => self.observer.incoming_handshake(site, Ok(())),
            (Some(site), Err(e)) => self.observer.incoming_handshake(site, Err(e.to_string())),
            (None, _) => {}
        }
        let verified = verified?;
        if claimed.is_none() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Signature checks depend on the key and algorithm only, not on the anchor.
        self.federation.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.federation.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.federation.supported_verify_schemes()
    }
}

/// Which side of a failed handshake refused the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeRefusal {
    /// The peer refused this site's certificate (it sent a certificate alert).
    PeerRefusedUs,
    /// This site could not verify the peer's certificate (wrong CA, wrong name, expired).
    WeRefusedPeer,
}

/// Finds a TLS refusal anywhere in an error's chain (hyper and h2 wrap I/O errors, which
/// wrap rustls errors).
pub(crate) fn handshake_refusal(
    err: &(dyn std::error::Error + 'static),
) -> Option<HandshakeRefusal> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return classify(tls);
        }
        // `io::Error::source` skips the wrapped error itself, so look inside explicitly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return classify(inner);
        }
        current = e.source();
    }
    None
}

fn classify(e: &rustls::Error) -> Option<HandshakeRefusal> {
    use AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_) => Some(HandshakeRefusal::WeRefusedPeer),
        // DecryptError and HandshakeFailure are what a peer sends when our certificate's
        // signature does not verify against its CA (a CA of the same name but another key).
        rustls::Error::AlertReceived(
            A::DecryptError
            | A::HandshakeFailure
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired,
        ) => Some(HandshakeRefusal::PeerRefusedUs),
        _ => None,
    }
}

/// A TLS stream that remembers the first handshake refusal it sees.
///
/// In TLS 1.3 a client's handshake completes before the server has checked the client's
/// certificate, so the server's refusal arrives later, on a read inside the HTTP/2 connection
/// task; h2 then flattens the I/O error into a message. Recording the typed error here, where
/// it is still a `rustls::Error`, lets the peer client report "refused our certificate"
/// instead of "unreachable".
pub(crate) struct RefusalWatch<S> {
    inner: S,
    refusal: Arc<std::sync::OnceLock<HandshakeRefusal>>,
}

impl<S> RefusalWatch<S> {
    pub(crate) fn new(inner: S) -> (Self, Arc<std::sync::OnceLock<HandshakeRefusal>>) {
        let refusal = Arc::new(std::sync::OnceLock::new());
        (
            RefusalWatch {
                inner,
                refusal: refusal.clone(),
            },
            refusal,
        )
    }

    fn note<T>(&self, result: &std::task::Poll<std::io::Result<T>>) {
        if let std::task::Poll::Ready(Err(e)) = result {
            if let Some(r) = handshake_refusal(e) {
                let _ = self.refusal.set(r);
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for RefusalWatch<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(&result);
        result
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for RefusalWatch<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&result);
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&result);
        result
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rustls_errors_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        );
        assert_eq!(
            handshake_refusal(&io),
            Some(HandshakeRefusal::PeerRefusedUs)
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(
            handshake_refusal(&io),
            Some(HandshakeRefusal::WeRefusedPeer)
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(handshake_refusal(&plain), None);
    }

    #[test]
    fn the_client_api_offers_tls_1_3_and_1_2_only() {
        let versions: Vec<_> = CLIENT_API_VERSIONS.iter().map(|v| v.version).collect();
        assert_eq!(
            versions,
            [
                rustls::ProtocolVersion::TLSv1_3,
                rustls::ProtocolVersion::TLSv1_2
            ]
        );
    }

    /// Records every incoming handshake's claimed site and whether it was accepted.
    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<(String, bool)>>);

    impl HandshakeObserver for Seen {
        fn incoming_handshake(&self, site: &SiteName, outcome: Result<(), String>) {
            self.0
                .lock()
                .unwrap()
                .push((site.to_string(), outcome.is_ok()));
        }
    }

    fn site(name: &str) -> SiteName {
        SiteName::parse(name).unwrap()
    }

    fn anchored(name: &str, ca: &TlsConfig) -> PeerAnchor {
        PeerAnchor {
            site: site(name),
            ca: Some(ca.ca.clone()),
        }
    }

    /// One handshake over an in-memory pipe: `client` connects to `server` as `peer`.
    /// Returns the client's and the server's outcome; the server's `Ok` carries the peer it
    /// identified. (In TLS 1.3 the client finishes before the server has checked its
    /// certificate, so a refused client certificate shows on the server's side.)
    async fn handshake(
        client: &PeerTls,
        server: &PeerTls,
        peer: &str,
    ) -> (Result<(), String>, Result<Option<SiteName>, String>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let connector = client.connector(&site(peer), PeerTransport::Http1);
        let name = ServerName::try_from(peer.to_owned()).unwrap();
        let (client_side, server_side) = tokio::join!(
            connector.connect(name, client_io),
            server.acceptor().accept(server_io)
        );
        (
            client_side.map(|_| ()).map_err(|e| e.to_string()),
            server_side
                .map(|tls| {
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| server.identify_peer(cert))
                })
                .map_err(|e| e.to_string()),
        )
    }

    #[tokio::test]
    async fn peers_with_their_own_cas_are_checked_against_their_own_anchor_only() {
        let dir = tempfile::tempdir().unwrap();
        let org = |org: &str, names: &[&str]| {
            let path = dir.path().join(org);
            std::fs::create_dir_all(&path).unwrap();
            crate::test_certificates::write_sites(&path, names)
        };
        // Three organisations, each with its own CA. site3's CA also issued an impostor: a
        // certificate naming site1.
        let org1 = org("org1", &["site1"]).remove(0);
        let org2 = org("org2", &["site2"]).remove(0);
        let mut org3 = org("org3", &["site3", "site1"]);
        let impostor = org3.remove(1);
        let org3 = org3.remove(0);
        let seen = Arc::new(Seen::default());
        let site2 = PeerTls::load(
            org2.clone(),
            site("site2"),
            vec![anchored("site1", &org1), anchored("site3", &org3)],
            seen.clone(),
        )
        .unwrap();
        let site1 = PeerTls::load(
            org1.clone(),
            site("site1"),
            vec![anchored("site2", &org2)],
            seen.clone(),
        )
        .unwrap();

        // `/sites` shows each peer's anchor as openssl would fingerprint the CA file.
        let fingerprint = |files: &TlsConfig| {
            let der = CertificateDer::from_pem_file(&files.ca).unwrap();
            fingerprint_sha256(der.as_ref())
        };
        let anchor = site2.trust_anchor(&site("site1"));
        assert_eq!(anchor.source, AnchorSource::Peer);
        assert_eq!(anchor.sha256, fingerprint(&org1));
        assert_eq!(
            site2.trust_anchor(&site("site3")).sha256,
            fingerprint(&org3)
        );
        assert_ne!(fingerprint(&org1), fingerprint(&org3));
        let unknown = site2.trust_anchor(&site("site9"));
        assert_eq!(unknown.source, AnchorSource::Federation);
        assert_eq!(unknown.sha256, fingerprint(&org2));

        // Each side checks the other against the anchor recorded for it.
        let (client, server) = handshake(&site1, &site2, "site2").await;
        assert_eq!(client, Ok(()));
        assert_eq!(server, Ok(Some(site("site1"))));

        // site1 expecting site2 under site1's own CA refuses site2's certificate.
        let wrong = PeerTls::load(
            org1.clone(),
            site("site1"),
            vec![PeerAnchor::federation(site("site2"))],
            seen.clone(),
        )
        .unwrap();
        let (client, _) = handshake(&wrong, &site2, "site2").await;
        assert!(client.is_err(), "{client:?}");

        // A certificate naming site1 but issued by another CA is refused, although site2
        // trusts that other CA for site3: an anchor vouches for its own peer only.
        let forged = PeerTls::load(
            impostor,
            site("site1"),
            vec![anchored("site2", &org2)],
            seen.clone(),
        );
        let forged = forged.unwrap();
        let (_, server) = handshake(&forged, &site2, "site2").await;
        assert!(server.is_err(), "{server:?}");
        let seen = seen.0.lock().unwrap().clone();
        assert!(seen.contains(&("site1".to_owned(), true)), "{seen:?}");
        assert!(seen.contains(&("site1".to_owned(), false)), "{seen:?}");
    }

    #[test]
    fn a_missing_trust_anchor_names_its_peer_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::test_certificates::write(dir.path(), "site2");
        let missing = dir.path().join("org1-ca.pem");
        let err = PeerTls::load(
            files,
            site("site2"),
            vec![PeerAnchor {
                site: site("site1"),
                ca: Some(missing),
            }],
            Arc::new(Seen::default()),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("peer 'site1'") && err.contains("org1-ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_client_api_certificate_is_named() {
        let dir = std::env::temp_dir().join(format!("sitegate-tls-{}", std::process::id()));
        let err = ClientApiTls::load(dir.join("none.pem"), dir.join("none.key"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("none.pem"), "{err}");
    }
}
