//! The crate graph's rules, checked against Cargo's resolved graph.
//!
//! ARCHITECTURE.md states each rule once, in its "Dependency rules" section, as a line of one of
//! two forms, and this test reads them from there, so the document and the check cannot drift:
//! - "`A` does not depend on `B`, `C`." — neither B nor C is reachable from A through normal or
//!   build dependencies (dev-dependencies are for A's tests, not A);
//! - "Only `A` depends directly on `B`." — no other workspace crate lists B as a dependency.
//!
//! It also checks that the workspace's crates form no cycle, dev-dependencies included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Package name → the names of its direct dependencies.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The resolved dependency graph, split by kind, and the workspace's own package names.
struct Resolved {
    /// Normal and build dependencies: what a crate is made of.
    built: Graph,
    /// Every dependency, dev-dependencies included.
    all: Graph,
    workspace: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    NotReachable { from: String, to: Vec<String> },
    OnlyDirect { owner: String, dependency: String },
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace")
}

fn resolve() -> Resolved {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()
        .expect("running cargo metadata");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let name_of: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().expect("id"), p["name"].as_str().expect("name")))
        .collect();
    let workspace = metadata["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|id| name_of[id.as_str().unwrap()].to_owned())
        .collect();
    let mut resolved = Resolved { built: Graph::new(), all: Graph::new(), workspace };
    for node in metadata["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let name = name_of[node["id"].as_str().expect("node id")].to_owned();
        for dep in node["deps"].as_array().expect("deps") {
            let dep_name = name_of[dep["pkg"].as_str().expect("dep pkg")].to_owned();
            let kinds = dep["dep_kinds"].as_array().expect("dep_kinds");
            let built = kinds.iter().any(|k| k["kind"].is_null() || k["kind"] == "build");
            resolved.all.entry(name.clone()).or_default().insert(dep_name.clone());
            if built {
                resolved.built.entry(name.clone()).or_default().insert(dep_name);
            }
        }
    }
    resolved
}

/// The rules, read from ARCHITECTURE.md's lines of the two forms.
fn rules(text: &str) -> Vec<Rule> {
    let names = |s: &str| -> Vec<String> { s.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    let mut rules = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some(line) = line.strip_prefix("- ") else { continue };
        if let Some((from, to)) = line.split_once(" does not depend on ") {
            let from = names(from);
            assert_eq!(from.len(), 1, "a rule names one crate before 'does not depend on': {line}");
            rules.push(Rule::NotReachable { from: from[0].clone(), to: names(to) });
        } else if let Some(rest) = line.strip_prefix("Only ")
            && let Some((owner, dependency)) = rest.split_once(" depends directly on ")
        {
            let (owner, dependency) = (names(owner), names(dependency));
            assert!(owner.len() == 1 && dependency.len() == 1, "an 'Only' rule names one crate on each side: {line}");
            rules.push(Rule::OnlyDirect { owner: owner[0].clone(), dependency: dependency[0].clone() });
        }
    }
    rules
}

/// Every crate reachable from `from` (itself excluded), with the path that first reached it.
fn reachable(graph: &Graph, from: &str) -> BTreeMap<String, Vec<String>> {
    let mut paths: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue = vec![vec![from.to_owned()]];
    while let Some(path) = queue.pop() {
        let last = path.last().expect("paths are never empty");
        for next in graph.get(last).into_iter().flatten() {
            if next != from && !paths.contains_key(next) {
                let mut longer = path.clone();
                longer.push(next.clone());
                paths.insert(next.clone(), longer.clone());
                queue.push(longer);
            }
        }
    }
    paths
}

/// Each broken rule, as a sentence naming the edge that breaks it.
fn violations(resolved: &Resolved, rules: &[Rule]) -> Vec<String> {
    let known = |name: &str| resolved.all.contains_key(name) || resolved.all.values().any(|deps| deps.contains(name));
    let mut found = Vec::new();
    for rule in rules {
        match rule {
            Rule::NotReachable { from, to } => {
                for name in std::iter::once(from).chain(to) {
                    if !known(name) {
                        found.push(format!("the rule for `{from}` names `{name}`, which is no crate in the graph"));
                    }
                }
                let paths = reachable(&resolved.built, from);
                for forbidden in to {
                    if let Some(path) = paths.get(forbidden) {
                        found
                            .push(format!("`{from}` must not depend on `{forbidden}`, but does: {}", path.join(" → ")));
                    }
                }
            }
            Rule::OnlyDirect { owner, dependency } => {
                for member in &resolved.workspace {
                    if member != owner && resolved.all.get(member).is_some_and(|d| d.contains(dependency)) {
                        found
                            .push(format!("only `{owner}` may depend directly on `{dependency}`, but `{member}` does"));
                    }
                }
            }
        }
    }
    found
}

/// Workspace crates on a cycle, dev-dependencies included.
fn cycles(resolved: &Resolved) -> Vec<String> {
    let inside: Graph = resolved
        .workspace
        .iter()
        .map(|m| {
            let deps = resolved.all.get(m).into_iter().flatten().filter(|d| resolved.workspace.contains(*d)).cloned();
            (m.clone(), deps.collect())
        })
        .collect();
    let on_cycle = |m: &&String| inside[*m].iter().any(|d| d == *m || reachable(&inside, d).contains_key(*m));
    resolved.workspace.iter().filter(on_cycle).cloned().collect()
}

fn documented_rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md")).expect("reading ARCHITECTURE.md");
    let rules = rules(&text);
    assert!(rules.len() >= 10, "ARCHITECTURE.md's dependency rules were not found (read {} rules)", rules.len());
    rules
}

#[test]
fn the_crate_graph_keeps_every_documented_rule() {
    let resolved = resolve();
    let broken = violations(&resolved, &documented_rules());
    assert!(broken.is_empty(), "the crate graph breaks ARCHITECTURE.md's dependency rules:\n{}", broken.join("\n"));
}

#[test]
fn the_workspace_crates_form_no_cycle_even_through_dev_dependencies() {
    let resolved = resolve();
    let on_cycles = cycles(&resolved);
    assert!(on_cycles.is_empty(), "workspace crates on a dependency cycle: {on_cycles:?}");
}

#[test]
fn a_forbidden_edge_is_caught_and_named() {
    let mut resolved = resolve();
    let rules = documented_rules();
    // The edge the old single crate had: the ledger reaching into consensus.
    resolved.built.entry("cloister-ledger".into()).or_default().insert("cloister-consensus".into());
    let broken = violations(&resolved, &rules);
    assert!(
        broken.iter().any(|v| v.contains("`cloister-ledger` must not depend on `cloister-consensus`")),
        "an added ledger → consensus edge went unnoticed: {broken:?}"
    );
    assert!(
        broken.iter().any(|v| v.contains("`cloister-ledger` must not depend on `openraft`")),
        "openraft reached through the added edge went unnoticed: {broken:?}"
    );

    let mut resolved = resolve();
    resolved.all.entry("cloister-node".into()).or_default().insert("openraft".into());
    let broken = violations(&resolved, &rules);
    assert!(
        broken.iter().any(|v| v.contains("but `cloister-node` does")),
        "a second direct openraft user went unnoticed"
    );

    let mut resolved = resolve();
    resolved.all.entry("cloister-crypto".into()).or_default().insert("cloister-node".into());
    let on_cycles = cycles(&resolved);
    assert!(
        on_cycles.contains(&"cloister-crypto".to_owned()) && on_cycles.contains(&"cloister-node".to_owned()),
        "a crypto → node cycle went unnoticed: {on_cycles:?}"
    );
}

#[test]
fn a_rule_naming_no_crate_is_itself_an_error() {
    let resolved = resolve();
    let rules = rules("- `cloister-ledger` does not depend on `cloister-runtim`.");
    let broken = violations(&resolved, &rules);
    assert!(broken.iter().any(|v| v.contains("`cloister-runtim`, which is no crate")), "{broken:?}");
}
