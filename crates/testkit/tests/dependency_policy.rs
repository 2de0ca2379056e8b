//! The dependency policy in `deny.toml`, enforced offline on every `cargo test`, for machines
//! without cargo-deny: the resolved graph (`cargo metadata --locked --offline`, normal, build
//! and dev dependencies of every workspace member, all platforms) must hold
//! - none of the banned crates (OpenSSL, native-tls, aws-lc: TLS is rustls with ring only),
//! - one version only of each crate marked `deny-multiple-versions` (rustls),
//! - only licenses whose SPDX expression the allowed licenses satisfy,
//! - only crates from crates.io or from this repository.
//!
//! Offenders are listed with the chain of crates that pulls them in; `cargo tree -i <crate>`
//! shows the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// What the policy's tests assert `deny.toml` keeps banning, whatever else it says: a weaker
/// file fails here rather than passing silently.
const MUST_BAN: &[&str] = &[
    "openssl",
    "openssl-sys",
    "native-tls",
    "aws-lc-rs",
    "aws-lc-sys",
];
const MUST_BE_SINGLE: &[&str] = &["rustls"];
const CRATES_IO: &str = "https://github.com/rust-lang/crates.io-index";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The policy, read from `deny.toml`.
struct Policy {
    banned: BTreeSet<String>,
    single_version: BTreeSet<String>,
    licenses: BTreeSet<String>,
    registries: BTreeSet<String>,
}

fn policy() -> Policy {
    let path = workspace_root().join("deny.toml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let deny: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("deny.toml: {e}"));
    let strings = |v: Option<&toml::Value>| -> BTreeSet<String> {
        v.and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut banned = BTreeSet::new();
    let mut single_version = BTreeSet::new();
    for entry in deny["bans"]["deny"].as_array().into_iter().flatten() {
        let name = entry
            .get("crate")
            .or_else(|| entry.get("name"))
            .and_then(toml::Value::as_str)
            .unwrap_or_else(|| panic!("a [bans] deny entry without a crate: {entry}"))
            .to_owned();
        if entry
            .get("deny-multiple-versions")
            .and_then(toml::Value::as_bool)
            == Some(true)
        {
            single_version.insert(name);
        } else {
            banned.insert(name);
        }
    }
    Policy {
        banned,
        single_version,
        licenses: strings(deny["licenses"].get("allow")),
        registries: strings(deny["sources"].get("allow-registry")),
    }
}

/// The resolved dependency graph, as `cargo metadata` gives it.
struct Graph {
    /// Package ID -> package.
    packages: HashMap<String, Value>,
    /// Package ID -> IDs of its dependencies (of every kind).
    deps: HashMap<String, Vec<String>>,
    members: Vec<String>,
}

impl Graph {
    fn load() -> Graph {
        let out = metadata(&[]);
        // Every platform's dependencies when the local cache has them all; offline, crates
        // for other platforms (macOS, Windows) that were never downloaded cannot be read, and
        // then the graph of this host is checked.
        let out = if !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("--offline")
        {
            let host = host_triple();
            eprintln!("note: crates of other platforms are not cached; checking {host} only");
            metadata(&["--filter-platform", &host])
        } else {
            out
        };
        assert!(
            out.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
        let packages = meta["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (text(&p["id"]), p.clone()))
            .collect();
        let deps = meta["resolve"]["nodes"]
            .as_array()
            .expect("resolve.nodes")
            .iter()
            .map(|n| {
                let deps = n["deps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| text(&d["pkg"]))
                    .collect();
                (text(&n["id"]), deps)
            })
            .collect();
        let members = meta["workspace_members"]
            .as_array()
            .expect("workspace_members")
            .iter()
            .map(text)
            .collect();
        Graph {
            packages,
            deps,
            members,
        }
    }

    /// Every package reachable from a workspace member.
    fn resolved(&self) -> Vec<&Value> {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut queue: VecDeque<&str> = self.members.iter().map(String::as_str).collect();
        while let Some(id) = queue.pop_front() {
            if seen.insert(id) {
                queue.extend(self.deps.get(id).into_iter().flatten().map(String::as_str));
            }
        }
        seen.iter()
            .filter_map(|id| self.packages.get(*id))
            .collect()
    }

    /// The shortest chain of crates from a workspace member to `target`, for the report.
    fn chain_to(&self, target: &str) -> String {
        let mut parent: HashMap<&str, &str> = HashMap::new();
        let mut queue: VecDeque<&str> = self.members.iter().map(String::as_str).collect();
        let mut seen: BTreeSet<&str> = queue.iter().copied().collect();
        while let Some(id) = queue.pop_front() {
            if id == target {
                let mut chain = vec![id];
                while let Some(p) = parent.get(chain[chain.len() - 1]) {
                    chain.push(p);
                }
                return chain
                    .iter()
                    .rev()
                    .map(|id| self.label(id))
                    .collect::<Vec<_>>()
                    .join(" -> ");
            }
            for dep in self.deps.get(id).into_iter().flatten() {
                if seen.insert(dep) {
                    parent.insert(dep, id);
                    queue.push_back(dep);
                }
            }
        }
        self.label(target)
    }

    fn label(&self, id: &str) -> String {
        self.packages
            .get(id)
            .map(|p| format!("{}@{}", text(&p["name"]), text(&p["version"])))
            .unwrap_or_else(|| id.to_owned())
    }
}

/// `cargo metadata --locked --offline` with `extra` arguments, by the cargo that built this
/// test, so the check works wherever the tests do.
fn metadata(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(extra)
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("run cargo metadata")
}

/// The host's target triple, from `cargo -vV`.
fn host_triple() -> String {
    let out = Command::new(env!("CARGO"))
        .arg("-vV")
        .output()
        .expect("run cargo -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no host in cargo -vV: {out:?}"))
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn report(what: &str, offenders: &[String]) -> String {
    format!(
        "{what}:\n  {}\n(see `cargo tree -i <crate>@<version> --edges all --target all`)",
        offenders.join("\n  ")
    )
}

// ---------------------------------------------------------------------------------------------
// SPDX license expressions
// ---------------------------------------------------------------------------------------------

/// Whether an SPDX expression is satisfied by the allowed licenses: `OR` needs one side,
/// `AND` both; `A WITH B` must be allowed as written. The legacy `A/B` means `A OR B`.
/// Anything malformed is not satisfied.
fn license_allowed(expression: &str, allowed: &BTreeSet<String>) -> bool {
    let spaced = expression
        .replace('/', " OR ")
        .replace('(', " ( ")
        .replace(')', " ) ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut parser = Spdx {
        tokens: &tokens,
        at: 0,
        allowed,
    };
    match parser.or() {
        Some(ok) if parser.at == tokens.len() => ok,
        _ => false,
    }
}

struct Spdx<'a> {
    tokens: &'a [&'a str],
    at: usize,
    allowed: &'a BTreeSet<String>,
}

impl<'a> Spdx<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.tokens.get(self.at).copied()
    }

    fn next(&mut self) -> Option<&'a str> {
        let t = self.peek()?;
        self.at += 1;
        Some(t)
    }

    fn or(&mut self) -> Option<bool> {
        let mut ok = self.and()?;
        while self.peek() == Some("OR") {
            self.at += 1;
            ok |= self.and()?;
        }
        Some(ok)
    }

    fn and(&mut self) -> Option<bool> {
        let mut ok = self.term()?;
        while self.peek() == Some("AND") {
            self.at += 1;
            ok &= self.term()?;
        }
        Some(ok)
    }

    fn term(&mut self) -> Option<bool> {
        match self.next()? {
            "(" => {
                let ok = self.or()?;
                (self.next()? == ")").then_some(ok)
            }
            "OR" | "AND" | "WITH" | ")" => None,
            license => {
                if self.peek() == Some("WITH") {
                    self.at += 1;
                    let exception = self.next()?;
                    if matches!(exception, "(" | ")" | "OR" | "AND" | "WITH") {
                        return None;
                    }
                    Some(
                        self.allowed
                            .contains(&format!("{license} WITH {exception}")),
                    )
                } else {
                    Some(self.allowed.contains(license))
                }
            }
        }
    }
}

#[test]
fn spdx_expressions_are_judged_like_cargo_deny_does() {
    let allowed: BTreeSet<String> = [
        "MIT",
        "Apache-2.0",
        "Unicode-3.0",
        "Apache-2.0 WITH LLVM-exception",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (expression, ok) in [
        ("MIT", true),
        ("MIT OR Apache-2.0", true),
        ("GPL-3.0-only", false),
        ("GPL-3.0-only OR MIT", true),
        ("MIT AND GPL-2.0-only", false),
        ("(MIT OR Apache-2.0) AND Unicode-3.0", true),
        (
            "(MIT OR GPL-2.0-only) AND (LGPL-2.1-only OR Unicode-3.0)",
            true,
        ),
        ("(GPL-2.0-only OR LGPL-2.1-only) AND MIT", false),
        ("Apache-2.0 WITH LLVM-exception", true),
        ("MIT WITH LLVM-exception", false),
        ("GPL-2.0-only WITH Classpath-exception-2.0", false),
        ("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT", true),
        ("MIT/Apache-2.0", true),
        ("Apache-2.0 / MIT", true),
        ("", false),
        ("MIT OR", false),
        ("(MIT", false),
        ("MIT)", false),
        ("AND MIT", false),
        ("MIT Apache-2.0", false),
    ] {
        assert_eq!(license_allowed(expression, &allowed), ok, "{expression:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The policy
// ---------------------------------------------------------------------------------------------

#[test]
fn deny_toml_keeps_the_core_rules() {
    let policy = policy();
    for name in MUST_BAN {
        assert!(
            policy.banned.contains(*name),
            "deny.toml no longer bans {name}"
        );
    }
    for name in MUST_BE_SINGLE {
        assert!(
            policy.single_version.contains(*name),
            "deny.toml no longer allows {name} only once"
        );
    }
    assert_eq!(
        policy.registries,
        BTreeSet::from([CRATES_IO.to_owned()]),
        "crates.io is the only registry"
    );
    for copyleft in ["GPL-2.0", "GPL-3.0", "LGPL-2.1", "AGPL-3.0", "SSPL-1.0"] {
        assert!(
            !policy.licenses.iter().any(|l| l.starts_with(copyleft)),
            "deny.toml allows {copyleft}"
        );
    }
}

#[test]
fn no_banned_crate_is_in_the_dependency_graph() {
    let (policy, graph) = (policy(), Graph::load());
    let offenders: Vec<String> = graph
        .resolved()
        .iter()
        .filter(|p| policy.banned.contains(&text(&p["name"])))
        .map(|p| graph.chain_to(&text(&p["id"])))
        .collect();
    assert!(
        offenders.is_empty(),
        "{}",
        report("banned crates in the dependency graph", &offenders)
    );
    // The check sees the graph at all: rustls and ring are in it.
    let names: BTreeSet<String> = graph.resolved().iter().map(|p| text(&p["name"])).collect();
    assert!(
        names.contains("rustls") && names.contains("ring"),
        "{names:?}"
    );
}

#[test]
fn crates_allowed_once_resolve_to_one_version() {
    let (policy, graph) = (policy(), Graph::load());
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in graph.resolved() {
        let name = text(&p["name"]);
        if policy.single_version.contains(&name) {
            versions
                .entry(name)
                .or_default()
                .push(graph.chain_to(&text(&p["id"])));
        }
    }
    for name in &policy.single_version {
        let found = versions.get(name).map_or(0, Vec::len);
        assert!(
            found <= 1,
            "{}",
            report(&format!("{found} versions of {name}"), &versions[name])
        );
    }
    assert_eq!(
        versions.get("rustls").map(Vec::len),
        Some(1),
        "exactly one rustls"
    );
}

#[test]
fn every_license_is_on_the_allow_list() {
    let (policy, graph) = (policy(), Graph::load());
    let offenders: Vec<String> = graph
        .resolved()
        .iter()
        .filter_map(|p| {
            let license = p["license"].as_str();
            let ok = license.is_some_and(|l| license_allowed(l, &policy.licenses));
            (!ok).then(|| {
                format!(
                    "{} (license {}; via {})",
                    graph.label(&text(&p["id"])),
                    license.map_or_else(
                        || format!("none, license file {}", p["license_file"]),
                        |l| format!("{l:?}")
                    ),
                    graph.chain_to(&text(&p["id"]))
                )
            })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "{}",
        report(
            &format!("licenses outside the allow list {:?}", policy.licenses),
            &offenders
        )
    );
}

#[test]
fn every_crate_comes_from_crates_io_or_this_repository() {
    let (policy, graph) = (policy(), Graph::load());
    let allowed_sources: BTreeSet<String> = policy
        .registries
        .iter()
        .flat_map(|r| [format!("registry+{r}"), format!("sparse+{r}")])
        .chain(["sparse+https://index.crates.io/".to_owned()])
        .collect();
    let root = workspace_root().canonicalize().expect("the workspace root");
    let offenders: Vec<String> = graph
        .resolved()
        .iter()
        .filter_map(|p| {
            let ok = match p["source"].as_str() {
                Some(source) => allowed_sources.contains(source),
                // A path dependency: it must be inside this repository.
                None => Path::new(&text(&p["manifest_path"]))
                    .canonicalize()
                    .is_ok_and(|m| m.starts_with(&root)),
            };
            (!ok).then(|| {
                format!(
                    "{} from {}",
                    graph.chain_to(&text(&p["id"])),
                    p["source"]
                        .as_str()
                        .map_or_else(|| text(&p["manifest_path"]), str::to_owned)
                )
            })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "{}",
        report("crates from other sources", &offenders)
    );
}
