//! Build facts for `GET /diagnostics/about`: the commit the binary was built from and that
//! commit's time (reproducible, unlike the wall clock), taken from git when the source is a
//! checkout. `SITEGATE_BUILD_COMMIT` / `SITEGATE_BUILD_DATE` (epoch ms) override them, for
//! builds from a source archive.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    for var in ["SITEGATE_BUILD_COMMIT", "SITEGATE_BUILD_DATE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // A new commit moves HEAD or the branch it points at.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{branch}");
        }
        println!("cargo:rerun-if-changed={dir}/packed-refs");
    }
    let commit = std::env::var("SITEGATE_BUILD_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=10", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let date_ms = std::env::var("SITEGATE_BUILD_DATE")
        .ok()
        .and_then(|d| d.parse::<i64>().ok())
        .or_else(|| {
            git(&["log", "-1", "--format=%ct"])
                .and_then(|s| s.parse::<i64>().ok())
                .map(|secs| secs * 1000)
        })
        .unwrap_or(0);
    println!("cargo:rustc-env=SITEGATE_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=SITEGATE_BUILD_DATE={date_ms}");
}
