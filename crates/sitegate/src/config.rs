//! Reading a site's configuration: the TOML file, then `SITEGATE_*` environment overrides,
//! then validation, all before any port is bound.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use sitegate_model::config::{
    AuthConfig, LimitsConfig, ListenConfig, LogConfig, PeeringConfig, SiteConfig, SiteSection,
    StoreConfig, TelemetryConfig,
};
use sitegate_model::session::{Role, UserEntry, UsersFile};
use sitegate_model::site::SiteName;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("dev setup in {dir}: {reason}")]
    Dev { dir: String, reason: String },
}

/// Loads `path`, applies `SITEGATE_SECTION__KEY=value` overrides, resolves relative paths
/// against the file's directory, and validates.
pub fn load(path: &Path) -> Result<SiteConfig, ConfigError> {
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(ConfigError::Read {
            path: shown,
            reason: "no such file".into(),
        });
    }
    let mut config: SiteConfig = Figment::new()
        .merge(Toml::file(path))
        // Only SITEGATE_<SECTION>__<KEY> variables are settings: every key lives in a section,
        // and other SITEGATE_* variables (scripts, benchmarks) must not stop a site starting.
        .merge(
            Env::prefixed("SITEGATE_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        )
        .extract()
        .map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    resolve_paths(&mut config, &base);
    config.validate().map_err(|e| ConfigError::Invalid {
        path: shown,
        reason: e.to_string(),
    })?;
    Ok(config)
}

fn resolve_paths(config: &mut SiteConfig, base: &Path) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    fix(&mut config.store.path);
    fix(&mut config.auth.users_file);
    for path in [&mut config.listen.tls_cert, &mut config.listen.tls_key]
        .into_iter()
        .flatten()
    {
        fix(path);
    }
    if let Some(tls) = &mut config.tls {
        fix(&mut tls.ca);
        fix(&mut tls.cert);
        fix(&mut tls.key);
    }
    for ca in config.peers.iter_mut().filter_map(|p| p.ca.as_mut()) {
        fix(ca);
    }
}

/// `serve` without a config: site `local` on 127.0.0.1:8046, data in `./data`, and dev users
/// whose password is generated once, kept in `./data/dev-password` and printed at start.
pub fn dev_default() -> Result<SiteConfig, ConfigError> {
    let dir = PathBuf::from("data");
    let dev_err = |reason: String| ConfigError::Dev {
        dir: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| dev_err(e.to_string()))?;
    let password_file = dir.join("dev-password");
    let users_file = dir.join("dev-users.toml");
    let password = match std::fs::read_to_string(&password_file) {
        Ok(p) if users_file.is_file() => p.trim().to_owned(),
        _ => {
            let password = crate::init::random_password();
            let users = dev_users(&password).map_err(dev_err)?;
            let text = toml::to_string(&users).map_err(|e| dev_err(e.to_string()))?;
            crate::init::write_private(&users_file, &text).map_err(dev_err)?;
            crate::init::write_private(&password_file, &password).map_err(dev_err)?;
            password
        }
    };
    println!(
        "sitegate dev site 'local' on http://127.0.0.1:8046 — log in as admin, alice, bob or svc \
         with password {password}"
    );
    let config = SiteConfig {
        site: SiteSection {
            name: SiteName::parse("local").map_err(|e| dev_err(e.to_string()))?,
            description: "development site".into(),
        },
        listen: ListenConfig::default(),
        store: StoreConfig {
            path: dir.join("local"),
            ..StoreConfig::default()
        },
        auth: AuthConfig::new(users_file),
        limits: LimitsConfig::default(),
        log: LogConfig::default(),
        tls: None,
        telemetry: TelemetryConfig::default(),
        peering: PeeringConfig::default(),
        peers: vec![],
    };
    config.validate().map_err(|e| dev_err(e.to_string()))?;
    Ok(config)
}

/// The standard users of a new site: admin, alice, bob (users) and svc (writer).
pub fn dev_users(password: &str) -> Result<UsersFile, String> {
    let mut users = Vec::new();
    for (name, role) in [
        ("admin", Role::Admin),
        ("alice", Role::User),
        ("bob", Role::User),
        ("svc", Role::Writer),
    ] {
        users.push(UserEntry {
            name: name.to_owned(),
            roles: vec![role],
            password_hash: sitegate_gateway::auth::hash_password(password)?,
            org: None,
        });
    }
    Ok(UsersFile { users })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid_and_shows_every_section() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/sitegate.example.toml");
        let c = load(&path).unwrap();
        assert_eq!(c.site.name.as_str(), "site1");
        assert_eq!(c.peers.len(), 1);
        assert!(c.tls.is_some());
        let text = std::fs::read_to_string(&path).unwrap();
        for section in [
            "[site]",
            "[listen]",
            "[store]",
            "[auth]",
            "[limits]",
            "[log]",
            "[telemetry]",
            "[peering]",
            "[tls]",
            "[[peer]]",
        ] {
            assert!(text.contains(section), "{section} is documented");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_and_paths_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[site]\nname = \"site1\"\n[auth]\nusers_file = \"u.toml\"\n[store]\npath = \"d\"\n",
        )
        .unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.auth.users_file, dir.path().join("u.toml"));
        assert_eq!(c.store.path, dir.path().join("d"));
        assert_eq!(c.limits.max_body_bytes, 1 << 20);

        std::fs::write(
            &path,
            "[site]\nname = \"site1\"\nbogus = 1\n[auth]\nusers_file = \"u\"\n",
        )
        .unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");

        std::fs::write(
            &path,
            "[site]\nname = \"bad name\"\n[auth]\nusers_file = \"u\"\n",
        )
        .unwrap();
        assert!(load(&path).is_err());
    }
}
