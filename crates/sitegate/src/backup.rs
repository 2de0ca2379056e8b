//! `sitegate backup` and `sitegate restore`: the embedded store's copy in and out, named by
//! the site's config. The work is `sitegate_store::backup`; this is the command-line face.

use std::path::Path;
use std::time::Instant;

use sitegate_model::config::{SiteConfig, StoreBackend};
use sitegate_store::backup::{self, CopyReport};

/// Backs up the running (or stopped) site's store to `out`.
pub fn run_backup(config: &SiteConfig, out: &Path) -> Result<(), String> {
    let dir = embedded_dir(config, "back up")?;
    let started = Instant::now();
    let report = backup::backup(dir, out).map_err(|e| e.to_string())?;
    println!(
        "backed up {} to {}: {} in {:.1} s",
        config.site.name,
        out.display(),
        describe(&report),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Restores `from` as the stopped site's store.
pub fn run_restore(config: &SiteConfig, from: &Path, force: bool) -> Result<(), String> {
    let dir = embedded_dir(config, "restore")?;
    let started = Instant::now();
    let report = backup::restore(dir, from, force).map_err(|e| e.to_string())?;
    println!(
        "restored {} from {}: {} in {:.1} s; sessions are not restored, so users log in again",
        config.site.name,
        from.display(),
        describe(&report),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn embedded_dir<'a>(config: &'a SiteConfig, verb: &str) -> Result<&'a Path, String> {
    match config.store.backend {
        StoreBackend::Embedded => Ok(&config.store.path),
        StoreBackend::Postgres => Err(format!(
            "{}'s store is PostgreSQL: {verb} its schema ({}) with pg_dump/pg_restore, as \
             deploy/README.md (\"Backup and restore\") shows",
            config.site.name, config.store.schema
        )),
    }
}

fn describe(report: &CopyReport) -> String {
    format!(
        "{} tasks, schema version {}, {:.1} MiB",
        report.tasks,
        report.schema_version,
        report.bytes as f64 / (1024.0 * 1024.0)
    )
}
