//! The crash loop: SIGKILL at random moments while writes run, round after round, on a single
//! node and on three (a random node each round). It ends with every acknowledged write present,
//! no write half-applied, `cloister ledger verify` clean on every node, and no node that refused
//! to start. Each restarted node makes its applied state durable on a schedule of its own
//! (`raft.apply_durable_ms`). `CLOISTER_CRASH_ROUNDS` sets the rounds (CI: 30; `just crash-loop`
//! runs more).

use std::time::{Duration, Instant};

use cloister_bundled::RECONCILE;
use cloister_tests::cluster::{Cluster, Load, check_outcomes};
use cloister_tests::ledger_verify;

/// Rounds when `CLOISTER_CRASH_ROUNDS` is not set.
const ROUNDS_DEFAULT: u32 = 30;
/// How long a killed node may take to answer again after it is restarted.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// `raft.apply_durable_ms` a restarted node may get: every apply durable, the default, and
/// longer than the loop runs (so only the snapshot points, every 300 entries here, and the
/// snapshot files built for a node that is behind commit durably).
const DURABLE_MS: [u64; 3] = [0, 500, 600_000];

fn rounds() -> u32 {
    std::env::var("CLOISTER_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS_DEFAULT)
}

/// A small xorshift generator: the seed is printed, so a failing run can be repeated.
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let seed = std::env::var("CLOISTER_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        println!("crash loop seed {seed} (CLOISTER_CRASH_SEED)");
        Random(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Waits until node `i` answers after a restart; a node that exits instead refused to start.
async fn wait_answering(c: &mut Cluster, i: usize, round: u32) {
    let deadline = Instant::now() + RESTART_TIMEOUT;
    loop {
        assert!(c.nodes[i].is_running(), "round {round}: node{i} refused to start:\n{}", c.log(i));
        if c.network(i).await.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "round {round}: node{i} did not answer within {RESTART_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn crash_loop(nodes: usize) {
    let rounds = rounds();
    let mut c = Cluster::start(nodes, 1, RECONCILE, |cfg| {
        cfg.limits.request_timeout_ms = 8_000;
        // Small files and frequent snapshot points, so crashes also land in file creation, points
        // and the snapshot files built for a restarted node that is behind.
        cfg.ledger.chunk_bytes = 16 << 10;
        cfg.raft.snapshot_after_logs = 300;
        cfg.raft.snapshot_after_logs_max = 300;
        cfg.raft.logs_kept_after_snapshot = 100;
    })
    .await;
    let mut random = Random::seeded();
    let load = Load::start(&c, 4);
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(100 + random.below(600))).await;
        let victim = random.below(nodes as u64) as usize;
        c.kill(victim);
        tokio::time::sleep(Duration::from_millis(random.below(300))).await;
        // Each restart picks when the node makes applied state durable (every apply, the
        // default, or only at a snapshot point), so later kills find each kind behind them.
        let node = &mut c.nodes[victim];
        node.config.raft.apply_durable_ms = DURABLE_MS[random.below(DURABLE_MS.len() as u64) as usize];
        std::fs::write(&node.config_path, node.config.to_toml()).expect("the node's configuration is written");
        c.spawn(victim);
        wait_answering(&mut c, victim, round).await;
    }
    let outcomes = load.finish().await;
    c.wait_stable(nodes, Duration::from_secs(120)).await;
    let checked = check_outcomes(&c, &outcomes).await;
    println!(
        "crash loop, {nodes} node(s): {rounds} rounds, {} writes, {} acknowledged, 0 lost",
        checked.writes, checked.acked
    );
    if checked.acked < rounds as usize {
        panic!("too little load got through: {checked:?}\n{}", c.logs(60));
    }
    let service_cert = c.dir.path().join("service.cert.pem");
    for i in 0..nodes {
        c.stop(i);
        let (ok, out) = ledger_verify(&c.nodes[i].config.node.data_dir.join("ledger"), &service_cert);
        assert!(ok, "node{i}'s ledger does not verify:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_loses_no_acknowledged_write_across_random_kills() {
    crash_loop(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_lose_no_acknowledged_write_across_random_kills() {
    crash_loop(3).await;
}
