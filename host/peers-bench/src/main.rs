//! `cloister-peers-bench`: Cloister side by side with etcd on one machine, in one run.
//!
//! For each network size it starts an etcd cluster (the `etcd` on PATH: TLS with client
//! certificates, fsync on, one process per member on loopback) and Cloister sandboxes of the same
//! size (`cloister sandbox`: TLS with client certificates, fsync on, one process per node), and
//! drives both with this one load generator: tonic, closed-loop clients, each on its own HTTP/2
//! connection, for a fixed time per point. etcd does a KV Put; Cloister does an `App.Call` of the
//! kv contract's put (the same work) and of a 1-record reconcile ingest. Clients go all to the
//! leader, or round-robin over every node. It prints one table (throughput, p50, p99, and each
//! Cloister figure divided by etcd's for the same point) and writes it as Markdown, JSON, and a
//! PNG chart. Beside each point it shows where the CPU went: the server processes' CPU time per
//! request and how busy the whole machine was, from `/proc`, over the measured seconds. Last, it
//! judges the performance goals (issue #16) that the run has the points for (`goals.rs`).
//!
//! Every system of one network size is up at once, and each point runs on each system in turn
//! before the next point: the figures a ratio compares are measured seconds apart, not minutes,
//! on a machine whose speed drifts. `--rounds` repeats every point; the table then shows medians,
//! and each ratio is the median of the rounds' own ratios, with their range. The networks stay up
//! across rounds unless `--fresh-networks` starts them again for each round: every point writes
//! fresh keys, so without it a later round runs on the state the earlier points left.

mod chart;
mod cpu;
mod goals;
mod load;
mod summary;
mod systems;

/// The slice of etcd's v3 API the benchmark speaks (`proto/etcd.proto`).
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

use load::Workload;

#[derive(Parser)]
#[command(name = "cloister-peers-bench", about = "Cloister side by side with etcd on this machine")]
struct Args {
    /// The cloister binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/cloister")]
    cloister: PathBuf,
    /// The etcd server binary (Debian: apt-get install etcd-server etcd-client).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Network sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    nodes: Vec<usize>,
    /// Concurrent clients per point, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    clients: Vec<usize>,
    /// Seconds each point runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Times every point runs (on every system in turn, each round after the one before); the
    /// table shows medians, and the range of the rounds' ratios.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Start every network again for each mode of each round, so that every mode's points start
    /// on an empty state and fresh processes, and the modes compare like with like. By default
    /// the networks stay up across modes and rounds, and every point writes fresh keys: a later
    /// mode (or round) runs on the state (and the heap) the earlier points left.
    #[arg(long)]
    fresh_networks: bool,
    /// Run the modes back to back at each client count (every system in turn in each mode), in
    /// reverse order on even rounds, instead of every point of one mode before the next mode:
    /// the points a mode's ratio to the leader compares are then measured seconds apart, not
    /// minutes. With `--fresh-networks` the networks start again for each round.
    #[arg(long)]
    interleave_modes: bool,
    /// Seconds each point's clients run first, uncounted.
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// Bytes of each value written (etcd Put and kv put).
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// First port; each system takes a few from here.
    #[arg(long, default_value_t = 19100)]
    port: u16,
    /// Where clients connect on a network of several nodes: leader (every client on the leader),
    /// spread (round-robin over all nodes) and follower (every client on one follower, which
    /// forwards each write: the cost of that hop alone).
    #[arg(long, value_delimiter = ',', default_value = "leader,spread")]
    modes: Vec<Mode>,
    /// Which systems to run: etcd, kv (Cloister's kv put), reconcile (a 1-record ingest).
    #[arg(long, value_delimiter = ',', default_value = "etcd,kv,reconcile")]
    systems: Vec<String>,
    /// A setting for every Cloister node, by its dotted name in the node's configuration
    /// (`raft.apply_durable_ms=5000`); repeatable. The sandboxes start with it, so the table
    /// compares that configuration against etcd.
    #[arg(long = "node-setting", value_name = "NAME=VALUE")]
    node_settings: Vec<String>,
    /// A second cloister binary to compare with `--cloister` (an A/B of two builds): every
    /// Cloister system asked for also runs on it, named with "(compared)", each of its points
    /// right after the same point on `--cloister`, or right before it on even rounds. A second
    /// table gives its throughput, server CPU per request and p50 over the first binary's, as
    /// the median and range of the rounds' own ratios.
    #[arg(long, value_name = "CLOISTER")]
    compare: Option<PathBuf>,
    /// Where the table and chart go.
    #[arg(long, default_value = "target/bench-peers")]
    out: PathBuf,
}

/// Where clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every client on the leader.
    Leader,
    /// Clients round-robin over all nodes (followers forward writes).
    Spread,
    /// Every client on one follower, which forwards every write.
    Follower,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Leader => "leader",
            Mode::Spread => "spread",
            Mode::Follower => "follower",
        }
    }
}

/// One measured point, in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub system: &'static str,
    pub nodes: usize,
    pub mode: Mode,
    pub clients: usize,
    /// Which round (from 1) measured it.
    pub round: u32,
    pub requests: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// The slowest answered request.
    pub max_ms: f64,
    /// Where the CPU went over the measured seconds.
    pub cpu: Option<cpu::Usage>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!args.nodes.is_empty() && !args.clients.is_empty(), "give at least one --nodes and --clients");
    anyhow::ensure!(args.nodes.iter().all(|&n| (1..=7).contains(&n)), "--nodes must be 1 to 7");
    anyhow::ensure!(!args.modes.is_empty(), "give at least one --modes");
    if let Some(s) = args.systems.iter().find(|s| !["etcd", "kv", "reconcile"].contains(&s.as_str())) {
        anyhow::bail!("--systems: {s:?} is not etcd, kv or reconcile");
    }
    let binary = |path: &PathBuf| {
        path.canonicalize().with_context(|| format!("no cloister binary at {} (cargo build --release)", path.display()))
    };
    let cloister = binary(&args.cloister)?;
    let compared = args.compare.as_ref().map(binary).transpose()?;
    let timing =
        load::Timing { warmup: Duration::from_secs(args.warmup_seconds), measured: Duration::from_secs(args.seconds) };
    let mut points: Vec<Point> = Vec::new();
    for &nodes in &args.nodes {
        let mut up: Vec<Under> = Vec::new();
        for round in 1..=args.rounds {
            if args.rounds > 1 {
                eprintln!("round {round} of {}", args.rounds);
            }
            let steps =
                schedule(&modes(nodes, &args.modes), &args.clients, round, args.interleave_modes, args.fresh_networks);
            for Step { mode, clients, fresh } in steps {
                if up.is_empty() || fresh {
                    // The networks already up stop (and free their ports) before the next start.
                    up.clear();
                    up = start(&args, &cloister, compared.as_deref(), nodes).await?;
                }
                let systems: Vec<&str> = up.iter().map(|u| u.system).collect();
                for under in run_order(&systems, round).into_iter().map(|i| &up[i]) {
                    // Asked each time: a leader may change between points.
                    let urls = under.network.urls(mode).await?;
                    let target = under.network.target();
                    let pids = under.network.pids();
                    let measured =
                        load::drive(points.len() as u32, target, &pids, &urls, clients, timing, &under.workload)
                            .await?;
                    points.push(report(under.system, nodes, mode, clients, round, measured));
                }
            }
        }
    }
    let rows = summary::rows(&points);
    let mut table = summary::table(&rows, args.rounds);
    let comparisons = summary::comparisons(&points);
    if !comparisons.is_empty() {
        table.push('\n');
        table.push_str(&summary::comparison_table(&comparisons));
    }
    let verdicts = goals::judge(&rows, &points);
    if !verdicts.is_empty() {
        table.push('\n');
        table.push_str(&goals::table(&verdicts));
    }
    println!("\n{table}");
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(args.out.join("peers.md"), &table)?;
    let json = serde_json::json!({
        "rounds": args.rounds,
        "rows": rows,
        "comparisons": comparisons,
        "goals": verdicts,
        "points": points,
    });
    std::fs::write(args.out.join("peers.json"), serde_json::to_vec_pretty(&json)?)?;
    let png = args.out.join("peers.png");
    match chart::draw(&rows, &png) {
        Ok(()) => eprintln!("wrote {}, peers.md and peers.json", png.display()),
        Err(e) => eprintln!("wrote peers.md and peers.json; no chart: {e:#}"),
    }
    Ok(())
}

/// Starts every system asked for, as networks of `nodes` members; with `compared`, each Cloister
/// system a second time on that binary, right after the first.
async fn start(
    args: &Args,
    cloister: &std::path::Path,
    compared: Option<&std::path::Path>,
    nodes: usize,
) -> anyhow::Result<Vec<Under>> {
    let mut up: Vec<Under> = Vec::new();
    if args.systems.iter().any(|s| s == "etcd") {
        let etcd = systems::Etcd::start(&args.etcd, nodes, args.port).await?;
        eprintln!("etcd: {nodes} member(s) up");
        let workload = Workload::EtcdPut { value_bytes: args.value_bytes };
        up.push(Under { system: "etcd", workload, network: Network::Etcd(etcd) });
    }
    for (names, app, workload, port) in [
        (KV, "kv", Workload::KvPut { value_bytes: args.value_bytes }, KV_PORT_OFFSET),
        (RECONCILE, "reconcile", Workload::ReconcileIngest, RECONCILE_PORT_OFFSET),
    ] {
        if !args.systems.iter().any(|s| s == app) {
            continue;
        }
        let binaries = [Some((names[0], cloister, 0)), compared.map(|c| (names[1], c, COMPARED_PORT_OFFSET))];
        for (system, binary, offset) in binaries.into_iter().flatten() {
            let first_port = args.port + port + offset;
            let sandbox = systems::Sandbox::start(binary, nodes, first_port, app, &args.node_settings).await?;
            eprintln!("{system}: {nodes} node(s) up");
            up.push(Under { system, workload: workload.clone(), network: Network::Sandbox(sandbox) });
        }
    }
    Ok(up)
}

/// The Cloister systems' names, on `--cloister` and on `--compare`'s binary.
const KV: [&str; 2] = ["cloister kv put", "cloister kv put (compared)"];
const RECONCILE: [&str; 2] = ["cloister reconcile ingest", "cloister reconcile ingest (compared)"];

/// Ports past `--port` where each Cloister sandbox starts: etcd takes 2 per member and a sandbox 3
/// per node, so up to 7 nodes of each fit side by side; a sandbox on `--compare`'s binary starts
/// `COMPARED_PORT_OFFSET` past its twin.
const KV_PORT_OFFSET: u16 = 20;
const RECONCILE_PORT_OFFSET: u16 = 50;
const COMPARED_PORT_OFFSET: u16 = 60;

/// The order the systems run each point in: as they started, except that on even rounds a
/// system on `--compare`'s binary runs just before its twin on `--cloister`, so that neither
/// binary always runs second.
fn run_order(systems: &[&str], round: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..systems.len()).collect();
    if round.is_multiple_of(2) {
        for i in 1..systems.len() {
            if summary::compared_base(systems[i]) == Some(systems[i - 1]) {
                order.swap(i - 1, i);
            }
        }
    }
    order
}

/// A system under test: its network, and what its clients send.
struct Under {
    system: &'static str,
    workload: Workload,
    network: Network,
}

enum Network {
    Etcd(systems::Etcd),
    Sandbox(systems::Sandbox),
}

impl Network {
    fn target(&self) -> &load::Target {
        match self {
            Network::Etcd(e) => e.target(),
            Network::Sandbox(s) => s.target(),
        }
    }

    async fn urls(&self, mode: Mode) -> anyhow::Result<Vec<String>> {
        match self {
            Network::Etcd(e) => e.urls(mode).await,
            Network::Sandbox(s) => s.urls(mode).await,
        }
    }

    /// The server processes: etcd's members, or the sandbox's nodes (not the sandbox itself,
    /// which only waits on them).
    fn pids(&self) -> Vec<u32> {
        match self {
            Network::Etcd(e) => e.pids(),
            Network::Sandbox(s) => s.pids(),
        }
    }
}

/// Where clients connect: on one node, the leader is every node.
fn modes(nodes: usize, asked: &[Mode]) -> Vec<Mode> {
    if nodes == 1 { vec![Mode::Leader] } else { asked.to_vec() }
}

/// One step of a round: every system at one mode and client count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    mode: Mode,
    clients: usize,
    /// The networks start again before it.
    fresh: bool,
}

/// The steps of one round, in order: every client count of one mode before the next mode, or
/// with `interleave` every mode at one client count before the next count, the modes in reverse
/// order on even rounds (so that neither mode always runs first, on the smaller state). `fresh`
/// starts the networks again for each mode, or with `interleave` for each round.
fn schedule(modes: &[Mode], clients: &[usize], round: u32, interleave: bool, fresh: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if interleave {
        let mut order = modes.to_vec();
        if round.is_multiple_of(2) {
            order.reverse();
        }
        for &clients in clients {
            for &mode in &order {
                steps.push(Step { mode, clients, fresh: fresh && steps.is_empty() });
            }
        }
    } else {
        for &mode in modes {
            for (i, &clients) in clients.iter().enumerate() {
                steps.push(Step { mode, clients, fresh: fresh && i == 0 });
            }
        }
    }
    steps
}

fn report(system: &'static str, nodes: usize, mode: Mode, clients: usize, round: u32, r: load::Measured) -> Point {
    let point = Point {
        system,
        nodes,
        mode,
        clients,
        round,
        requests: r.requests,
        errors: r.errors,
        per_second: r.per_second(),
        p50_ms: r.p50.as_secs_f64() * 1e3,
        p99_ms: r.p99.as_secs_f64() * 1e3,
        p999_ms: r.p999.as_secs_f64() * 1e3,
        max_ms: r.max.as_secs_f64() * 1e3,
        cpu: r.cpu,
    };
    eprintln!(
        "  {system:<26} {nodes} node(s) {:<6} {clients:>3} clients: {:>8.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  \
         p99.9 {:>7.2} ms  max {:>7.2} ms{}{}",
        mode.name(),
        point.per_second,
        point.p50_ms,
        point.p99_ms,
        point.p999_ms,
        point.max_ms,
        point.cpu.as_ref().map(cpu_line).unwrap_or_default(),
        if point.errors > 0 { format!("  ({} errors)", point.errors) } else { String::new() }
    );
    point
}

/// `  cpu µs/op 162+144+85=391, load 40; machine 93% busy`: each server process's CPU time per
/// request (`-` for one that ended), their sum, the load generator's, and the machine's load.
fn cpu_line(u: &cpu::Usage) -> String {
    let each: Vec<String> = u.per_process_us.iter().map(|p| p.map_or("-".into(), |us| format!("{us:.0}"))).collect();
    format!(
        "  cpu µs/op {}={:.0}, load {:.0}; machine {:.0}% busy",
        each.join("+"),
        u.servers_us(),
        u.load_generator_us,
        u.machine_busy * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(modes: &[Mode], round: u32, interleave: bool, fresh: bool) -> Vec<(&'static str, usize, bool)> {
        schedule(modes, &[1, 16], round, interleave, fresh)
            .iter()
            .map(|s| (s.mode.name(), s.clients, s.fresh))
            .collect()
    }

    #[test]
    fn by_default_a_round_runs_every_point_of_one_mode_before_the_next() {
        let modes = [Mode::Leader, Mode::Follower];
        let expected = [("leader", 1, true), ("leader", 16, false), ("follower", 1, true), ("follower", 16, false)];
        assert_eq!(steps(&modes, 1, false, true), expected);
        assert_eq!(steps(&modes, 2, false, true), expected, "the same order every round");
        assert!(steps(&modes, 1, false, false).iter().all(|s| !s.2), "networks kept up");
    }

    #[test]
    fn a_compared_system_and_its_twin_swap_places_on_even_rounds() {
        let systems = ["etcd", KV[0], KV[1], RECONCILE[0], RECONCILE[1]];
        assert_eq!(run_order(&systems, 1), [0, 1, 2, 3, 4]);
        assert_eq!(run_order(&systems, 2), [0, 2, 1, 4, 3]);
        assert_eq!(run_order(&systems, 3), [0, 1, 2, 3, 4]);
        // Without `--compare` every round runs the systems in the order they started.
        let alone = ["etcd", KV[0], RECONCILE[0]];
        assert_eq!(run_order(&alone, 2), [0, 1, 2]);
        // A compared system only swaps with its own twin.
        assert_eq!(run_order(&[KV[0], RECONCILE[1]], 2), [0, 1]);
    }

    #[test]
    fn interleaved_modes_run_back_to_back_and_swap_order_each_round() {
        let modes = [Mode::Leader, Mode::Follower];
        assert_eq!(
            steps(&modes, 1, true, true),
            [("leader", 1, true), ("follower", 1, false), ("leader", 16, false), ("follower", 16, false)]
        );
        assert_eq!(
            steps(&modes, 2, true, true),
            [("follower", 1, true), ("leader", 1, false), ("follower", 16, false), ("leader", 16, false)]
        );
        assert!(steps(&modes, 1, true, false).iter().all(|s| !s.2), "networks kept up");
    }
}
