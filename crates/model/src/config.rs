//! The configuration of one site: plain data read from TOML (and environment overrides by the
//! binary), validated before any port is bound. Every field's default is written beside it;
//! `config/sitegate.example.toml` shows them all.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::site::SiteName;
use crate::ModelError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: SiteSection,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub store: StoreConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The federation CA and this site's certificate; required once peers are configured.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The sites this one is paired with.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// This site's unique name (`site1`); also the DNS SAN of its certificate.
    pub name: SiteName,
    /// Free text shown by `GET /sites`. Default: empty.
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// The client API. Default: 127.0.0.1:8046.
    #[serde(default = "default_client_addr")]
    pub client: SocketAddr,
    /// The mutual-TLS peer link. Default: none (no peer link).
    #[serde(default)]
    pub peer: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            client: default_client_addr(),
            peer: None,
        }
    }
}

fn default_client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8046))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// SQLite in WAL mode in a directory of this machine.
    Embedded,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Default: `embedded`.
    #[serde(default = "default_backend")]
    pub backend: StoreBackend,
    /// Directory of the embedded store. Default: `data`, relative to the config file.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: default_backend(),
            path: default_store_path(),
        }
    }
}

fn default_backend() -> StoreBackend {
    StoreBackend::Embedded
}

fn default_store_path() -> PathBuf {
    PathBuf::from("data")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The users file (`[[user]]` with name, roles, argon2 password_hash).
    pub users_file: PathBuf,
    /// A session unused this long ends. Default: 1800 (30 min).
    #[serde(default = "default_idle_timeout")]
    pub session_idle_timeout_secs: u64,
    /// A session ends this long after login, used or not. Default: 86400 (24 h).
    #[serde(default = "default_max_age")]
    pub session_max_age_secs: u64,
}

fn default_idle_timeout() -> u64 {
    1800
}

fn default_max_age() -> u64 {
    86_400
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted. Default: 1048576 (1 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// A request not answered in this time fails. Default: 30.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// A client that has not sent its whole request head in this time is disconnected. Default: 10.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_secs: u64,
    /// Requests handled at once; more wait. Default: 1024.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// Open client connections at once; more wait in the accept queue. Default: 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest draining on shutdown before open connections are dropped. Default: 20.
    #[serde(default = "default_drain")]
    pub shutdown_grace_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_max_body(),
            request_timeout_secs: default_request_timeout(),
            header_read_timeout_secs: default_header_timeout(),
            max_concurrent_requests: default_max_concurrent(),
            max_connections: default_max_connections(),
            shutdown_grace_secs: default_drain(),
        }
    }
}

fn default_max_body() -> usize {
    1 << 20
}
fn default_request_timeout() -> u64 {
    30
}
fn default_header_timeout() -> u64 {
    10
}
fn default_max_concurrent() -> usize {
    1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_drain() -> u64 {
    20
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines when standard error is not a terminal, readable text when it is.
    Auto,
    Json,
    Text,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Default: `auto`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A tracing filter (`info`, `sitegate_gateway=debug`). Default: `info`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Auto
}
fn default_log_level() -> String {
    "info".to_owned()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The federation CA certificate (PEM).
    pub ca: PathBuf,
    /// This site's certificate chain (PEM); its DNS SAN is the site name.
    pub cert: PathBuf,
    /// This site's private key (PEM).
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's site name; its certificate must carry it as a DNS SAN.
    pub name: SiteName,
    /// The peer link's address, `https://host:port`; the host need not match the name.
    pub url: String,
    /// Whether this site accepts `multisite` session requests from that peer. Default: false.
    #[serde(default)]
    pub trust_multisite: bool,
    /// Free text shown by `GET /sites`. Default: empty.
    #[serde(default)]
    pub description: String,
}

impl SiteConfig {
    /// Checks what serde cannot: cross-field rules and sane ranges.
    pub fn validate(&self) -> Result<(), ModelError> {
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            return Err(ModelError::invalid("limits.max_body_bytes must be at least 1024"));
        }
        for (name, v) in [
            ("limits.request_timeout_secs", l.request_timeout_secs),
            ("limits.header_read_timeout_secs", l.header_read_timeout_secs),
            ("auth.session_idle_timeout_secs", self.auth.session_idle_timeout_secs),
            ("auth.session_max_age_secs", self.auth.session_max_age_secs),
        ] {
            if v == 0 {
                return Err(ModelError::invalid(format!("{name} must be greater than 0")));
            }
        }
        if l.max_concurrent_requests == 0 || l.max_connections == 0 {
            return Err(ModelError::invalid(
                "limits.max_concurrent_requests and limits.max_connections must be greater than 0",
            ));
        }
        let mut names = vec![&self.site.name];
        for p in &self.peers {
            if names.contains(&&p.name) {
                return Err(ModelError::invalid(format!(
                    "site name '{}' is configured twice",
                    p.name
                )));
            }
            names.push(&p.name);
            if !p.url.starts_with("https://") {
                return Err(ModelError::invalid(format!(
                    "peer '{}': url must start with https:// (the peer link is always TLS)",
                    p.name
                )));
            }
        }
        if !self.peers.is_empty() && (self.tls.is_none() || self.listen.peer.is_none()) {
            return Err(ModelError::invalid(
                "peers are configured, so [tls] and listen.peer are required",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> SiteConfig {
        SiteConfig {
            site: SiteSection {
                name: SiteName::parse("site1").unwrap(),
                description: String::new(),
            },
            listen: ListenConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig {
                users_file: "users.toml".into(),
                session_idle_timeout_secs: 1800,
                session_max_age_secs: 86400,
            },
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            tls: None,
            peers: vec![],
        }
    }

    #[test]
    fn minimal_is_valid() {
        assert!(minimal().validate().is_ok());
    }

    #[test]
    fn invalid_configs() {
        let mut c = minimal();
        c.limits.max_body_bytes = 10;
        assert!(c.validate().is_err());

        let mut c = minimal();
        c.auth.session_idle_timeout_secs = 0;
        assert!(c.validate().is_err());

        let mut c = minimal();
        c.peers.push(PeerConfig {
            name: SiteName::parse("site2").unwrap(),
            url: "https://127.0.0.1:1".into(),
            trust_multisite: false,
            description: String::new(),
        });
        assert!(c.validate().is_err(), "peers need tls");

        let mut c = minimal();
        c.peers.push(PeerConfig {
            name: SiteName::parse("site1").unwrap(),
            url: "https://127.0.0.1:1".into(),
            trust_multisite: false,
            description: String::new(),
        });
        assert!(c.validate().is_err(), "a peer may not share the local name");
    }
}
