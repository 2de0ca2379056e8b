//! `sitegate-testkit` is the one test harness of the workspace, used only as a
//! dev-dependency and compiled once for every integration-test binary: it starts real
//! `sitegate` processes and talks to them over HTTP and raw sockets, starts real PostgreSQL
//! clusters, and finds free loopback ports.
//!
//! It is not a mock or fake of anything, and not shipped: every test runs the real binary
//! (found beside the test binary, see [`site::bin`]) and the machine's own tools. [`PgCluster`]
//! runs the machine's PostgreSQL server binaries (`initdb`, `pg_ctl`) in a temporary
//! directory, as the `postgres` user when the tests run as root (PostgreSQL refuses to run as
//! root), and stops it on drop. It holds no test cases of the product: those are in each
//! crate's `tests/`.
//!
//! Modules:
//! - [`site`]: the federation harness: `sitegate init` into a temporary directory
//!   ([`site::Federation`]), `sitegate serve` processes ([`site::Site`]) with JSON calls
//!   answering a [`site::Reply`], other child processes ([`site::Proc`], HAProxy), polling
//!   with a deadline ([`site::wait_for`]), task bodies ([`site::new_task`]), JSON log lines, a
//!   federation on PostgreSQL;
//! - [`raw`]: HTTP/1.1 byte for byte over a plain socket, and bytes that are not HTTP;
//! - [`curl`]: the `curl` tool as a second TLS client;
//! - [`prometheus`]: a strict parser of `/metrics` text;
//! - [`acked_writes`]: writers that record what the server acknowledged, a `kill -9` while
//!   they write, and the check that nothing acknowledged was lost;
//! - this file: [`free_port`] (one port; a run of consecutive ports that no other test of the
//!   process is handed is [`site::free_base_port`]), [`pg_bindir`], [`PgCluster`].

#![allow(clippy::unwrap_used)]

pub mod acked_writes;
pub mod curl;
pub mod prometheus;
pub mod raw;
pub mod site;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS has a free loopback port")
}

/// Where the machine's PostgreSQL server binaries are.
pub fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("SITEGATE_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect(
        "PostgreSQL server binaries not found (install Debian's postgresql package; .ci/run does)",
    )
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL server of its own for one test: `initdb` in a temp dir, `pg_ctl start` on a
/// free port, trust authentication on loopback only. Stopped (immediate) on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    pub fn start() -> PgCluster {
        let bindir = pg_bindir();
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("sitegate-pg-")
            .tempdir()
            .unwrap();
        if as_postgres {
            // The server runs as `postgres`, which must own its directory.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let cluster = PgCluster {
            port: 0,
            dir,
            bindir,
            as_postgres,
        };
        let data = cluster.data_dir();
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = cluster;
        for _ in 0..5 {
            cluster.port = free_port();
            if cluster.start_server() {
                return cluster;
            }
        }
        panic!(
            "PostgreSQL did not start; log:\n{}",
            std::fs::read_to_string(cluster.log_file()).unwrap_or_default()
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn start_server(&self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-l",
                self.log_file().to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        out.status.success()
    }

    /// The URL of the `postgres` database as superuser.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh database and returns its URL, so tests sharing a cluster are isolated.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::SeqCst)
        );
        let out = self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ],
        );
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Stops the server (fast shutdown), for tests of a store that goes away.
    pub fn stop(&self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.start_server() {
            assert!(Instant::now() < deadline, "PostgreSQL did not restart");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}
