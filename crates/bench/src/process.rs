//! Child processes and what Linux tells about them: CPU pinning with `taskset`, peak resident
//! memory (`VmHWM` in `/proc/<pid>/status`, reset between scenarios through `clear_refs`),
//! the load average, and stopping a child with SIGTERM before SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::BenchError;

/// Which CPUs the servers and the load generator run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Servers on CPU 0 (`taskset -c 0`), the load generator (this process) on CPU 1.
    Split,
    /// No pinning: everything shares all CPUs.
    None(String),
}

impl Pinning {
    /// Pins this process to CPU 1 when `taskset` exists and there are two or more CPUs, and
    /// says how servers are to be started. Call before any thread is started: threads inherit
    /// the mask of the thread that creates them.
    pub fn apply_to_self(wanted: bool) -> Pinning {
        if !wanted {
            return Pinning::None("pinning turned off (--no-pin)".into());
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            return Pinning::None(format!("only {cpus} CPU available"));
        }
        if which("taskset").is_none() {
            return Pinning::None("taskset not found (util-linux)".into());
        }
        let status = Command::new("taskset")
            .args(["-a", "-cp", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Pinning::Split,
            Ok(s) => Pinning::None(format!("taskset failed ({s})")),
            Err(e) => Pinning::None(format!("taskset failed ({e})")),
        }
    }

    /// Lets every thread of this process run on every CPU (`spread`) or only on CPU 1 again.
    /// Seeding a store runs with nothing else on the machine and uses both CPUs.
    pub fn set_self_spread(&self, spread: bool) {
        if *self == Pinning::Split {
            let cpus = if spread { "0-1023" } else { "1" };
            let _ = Command::new("taskset")
                .args(["-a", "-cp", cpus, &std::process::id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// A command for a server process: `taskset -c 0 program` when pinning, else `program`.
    pub fn server_command(&self, program: &Path) -> Command {
        match self {
            Pinning::Split => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg("0").arg(program);
                cmd
            }
            Pinning::None(_) => Command::new(program),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Pinning::Split => "servers (sites, nginx, HAProxy, limit server) pinned to CPU 0 with \
                 `taskset -c 0`, the load generator to CPU 1 (`taskset -a -cp 1`)"
                .into(),
            Pinning::None(why) => format!("not pinned: {why}"),
        }
    }
}

/// The first `name` on `PATH` (or in the sbin directories, where Debian puts nginx and
/// HAProxy).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A child process that is stopped when dropped.
#[derive(Debug)]
pub struct Supervised {
    /// What the child is, for messages.
    pub name: String,
    child: Child,
    /// Where its stderr goes, to show when it fails.
    pub log: PathBuf,
}

impl Supervised {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Supervised, BenchError> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(BenchError::io(format!("open {}", log.display())))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .spawn()
            .map_err(BenchError::io(format!("start {name}")))?;
        Ok(Supervised {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the child has exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Setup(format!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                tail(&self.log, 2000)
            ))),
            Err(e) => Err(BenchError::Setup(format!("{}: {e}", self.name))),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The last `max` bytes of a text file.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

/// Resets a process's peak RSS to its current RSS (Linux 4.0+). Returns false when the kernel
/// refused (then the peak is the peak since the process started).
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The peak resident set size of a process in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The direct children of a process (nginx's workers; HAProxy run with `-db` has none).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` has them.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// A one-line description of the machine: CPUs, model, kernel.
pub fn machine_description() -> String {
    // Counted from cpuinfo: this process may be pinned to fewer CPUs than the machine has.
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| format!(", {:.0} GiB RAM", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}){memory}, Linux {kernel}")
}
