//! `sitegate init`: everything a federation of sites needs on disk, ready to `serve`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use rand::Rng;
use sitegate_model::config::{
    AuthConfig, LimitsConfig, ListenConfig, LogConfig, LogFormat, PeerConfig, PeeringConfig,
    Retention, Secret, SiteConfig, SiteSection, StoreBackend, StoreConfig, TelemetryConfig,
    TlsConfig,
};
use sitegate_model::site::SiteName;

#[derive(Args, Clone, Debug)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Comma-separated site names, e.g. site1,site2.
    #[arg(long, value_delimiter = ',', required = true)]
    pub sites: Vec<String>,
    /// Site k (0-based) serves its client API on P+2k and its peer link on P+2k+1.
    #[arg(long)]
    pub base_port: u16,
    /// The password of every generated user (admin, alice, bob, svc) at every site.
    #[arg(long)]
    pub dev_password: String,
    /// Store every site in this PostgreSQL database, each in its own schema
    /// (`sitegate_<site>`), instead of the embedded store.
    #[arg(long)]
    pub postgres: Option<String>,
}

/// Site certificates issued by `init` are valid this long.
const SITE_CERT_DAYS: i64 = 365;

pub fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Writes a file readable only by its owner: keys, password hashes, passwords.
pub fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_public(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn port(base: u16, offset: usize) -> Result<u16, String> {
    u16::try_from(usize::from(base) + offset)
        .map_err(|_| format!("--base-port {base} leaves no room for {offset} more ports"))
}

/// Writes the federation and returns its directory.
pub fn run(args: &InitArgs) -> Result<PathBuf, String> {
    let names: Vec<SiteName> = args
        .sites
        .iter()
        .map(|s| SiteName::parse(s.trim()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if names.is_empty() {
        return Err("--sites needs at least one site name".into());
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(format!("site '{n}' is named twice"));
        }
    }
    if args.dev_password.is_empty() {
        return Err("--dev-password must not be empty".into());
    }
    let dir = &args.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    let ca = crate::pki::new_authority(&crate::pki::unique_ca_name())?;
    write_public(&dir.join("ca.pem"), &ca.pem.cert)?;
    write_private(&dir.join("ca.key"), &ca.pem.key)?;

    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    for (k, name) in names.iter().enumerate() {
        let site_cert = crate::pki::issue_site_certificate(&ca, name.as_str(), SITE_CERT_DAYS)?;
        write_public(&dir.join(format!("{name}.pem")), &site_cert.cert)?;
        write_private(&dir.join(format!("{name}.key")), &site_cert.key)?;

        let users = crate::config::dev_users(&args.dev_password)?;
        let users_text = toml::to_string(&users).map_err(|e| e.to_string())?;
        write_private(&dir.join(format!("{name}.users.toml")), &users_text)?;

        let mut peers = Vec::new();
        for (j, other) in names.iter().enumerate() {
            if j != k {
                peers.push(PeerConfig {
                    name: other.clone(),
                    url: format!("https://127.0.0.1:{}", port(args.base_port, 2 * j + 1)?),
                    trust_multisite: true,
                    trust_multisite_admin: false,
                    description: String::new(),
                    ca: None,
                });
            }
        }
        let config = SiteConfig {
            site: SiteSection {
                name: name.clone(),
                description: String::new(),
            },
            listen: ListenConfig {
                client: addr(port(args.base_port, 2 * k)?),
                peer: Some(addr(port(args.base_port, 2 * k + 1)?)),
                ..ListenConfig::default()
            },
            // A new site keeps finished tasks for 30 days, so its store stops growing.
            store: match &args.postgres {
                None => StoreConfig {
                    backend: StoreBackend::Embedded,
                    path: PathBuf::from(format!("data/{name}")),
                    task_retention: thirty_days(),
                    ..StoreConfig::default()
                },
                Some(url) => StoreConfig {
                    backend: StoreBackend::Postgres,
                    url: Some(Secret::new(url.clone())),
                    schema: format!(
                        "sitegate_{}",
                        name.as_str().to_lowercase().replace('-', "_")
                    ),
                    task_retention: thirty_days(),
                    ..StoreConfig::default()
                },
            },
            auth: AuthConfig::new(PathBuf::from(format!("{name}.users.toml"))),
            limits: LimitsConfig::default(),
            // JSON lines wherever logs are collected (services, files, CI); readable text when
            // someone runs the site in a terminal.
            log: LogConfig {
                format: LogFormat::Auto,
                level: "info".into(),
            },
            tls: Some(TlsConfig {
                ca: "ca.pem".into(),
                cert: format!("{name}.pem").into(),
                key: format!("{name}.key").into(),
            }),
            telemetry: TelemetryConfig::default(),
            peering: PeeringConfig::default(),
            peers,
        };
        config.validate().map_err(|e| e.to_string())?;
        let body = toml::to_string(&config).map_err(|e| e.to_string())?;
        let text = format!(
            "# sitegate configuration of site '{name}', written by `sitegate init`.\n\
             # Every key is documented in config/sitegate.example.toml.\n\n{body}"
        );
        write_public(&dir.join(format!("{name}.toml")), &text)?;
    }
    Ok(dir.clone())
}

/// What `init` tells the user it did.
pub fn summary(args: &InitArgs, dir: &Path) -> String {
    let mut s = format!(
        "Wrote a federation of {} site(s) to {}:\n",
        args.sites.len(),
        dir.display()
    );
    for (k, name) in args.sites.iter().enumerate() {
        let client = usize::from(args.base_port) + 2 * k;
        let _ = writeln!(
            s,
            "  {name}: client API http://127.0.0.1:{client}, peer link 127.0.0.1:{}  \
             -> sitegate serve --config {}",
            client + 1,
            dir.join(format!("{name}.toml")).display()
        );
    }
    s.push_str("Users at every site: admin (admin), alice and bob (user), svc (writer).");
    s
}

fn thirty_days() -> Retention {
    Retention::keep_for(std::time::Duration::from_secs(30 * 86_400))
}
