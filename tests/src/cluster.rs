//! Networks of node processes on 127.0.0.1, for fault tests: nodes are started with the
//! `cloister` command line (`cloister-test-cli node start`), killed with SIGKILL, stopped with
//! SIGTERM, and restarted on the same data folders.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cloister_cli::local::{LocalNetwork, NodeAddrs, NodeProcess};
use cloister_client::Client;
use cloister_node::config::{NodeConfig, RaftSection};
use serde_json::Value;

use crate::{Identity, open_service};

/// One node process and its configuration.
pub struct NodeProc {
    pub name: String,
    pub config_path: PathBuf,
    pub config: NodeConfig,
    pub rest_url: String,
    /// Flags added after `node start --config FILE`, such as `--mock-measurement HEX`.
    pub start_args: Vec<String>,
    process: NodeProcess,
}

impl NodeProc {
    pub fn is_running(&mut self) -> bool {
        self.process.check_running() == Ok(true)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn grpc_url(&self) -> String {
        format!("https://{}", self.config.node.grpc_addr)
    }

    /// SIGTERM, then waits up to `timeout`: whether the process exited by itself (else it is
    /// killed).
    pub fn stop_within(&mut self, timeout: Duration) -> bool {
        self.process.stop(timeout)
    }
}

/// How long a node asked to stop (SIGTERM) may take before it is killed.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The nodes' log filter: info, openraft's warnings, and why the signer's entries did not commit
/// (what a test that waits for a receipt prints when none comes).
const NODE_LOG: &str = "info,openraft=warn,cloister_node::signer=debug";

/// Cluster tests take turns: several networks of node processes at once would overload a small
/// machine into election storms that test the machine, not the code.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A network of node processes sharing one service identity and one set of members.
pub struct Cluster {
    _turn: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub members: Vec<Identity>,
    /// The operator's CA: what nodes pin between them, and what a node serves clients until the
    /// service identity has certified it.
    pub ca_pem: Vec<u8>,
    pub nodes: Vec<NodeProc>,
}

impl Cluster {
    /// Writes identities and configurations for `nodes` nodes and starts them as processes;
    /// node 0 runs genesis, the others join it. `configure` adjusts every node's configuration.
    pub async fn start(nodes: usize, members: usize, app: &[u8], configure: impl Fn(&mut NodeConfig)) -> Cluster {
        let mut cluster = Cluster::prepare(nodes, members, app, configure);
        for i in 0..nodes {
            cluster.spawn(i);
        }
        cluster.wait_stable(nodes, Duration::from_secs(120)).await;
        cluster.open(0).await;
        cluster.wait_endorsed(Duration::from_secs(60)).await;
        cluster
    }

    /// Waits until every running node serves a certificate from the service identity: what a
    /// client that signs governance requests requires of the node it asks which service it is
    /// (`Client::service_id`), and what clients pinning the identity alone can reach.
    pub async fn wait_endorsed(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_running() {
                self.wait_serves_identity(i, deadline).await;
            }
        }
    }

    /// Waits until node `i` (a process or a node started in this one) serves a certificate from
    /// the service identity, failing at `deadline`.
    async fn wait_serves_identity(&self, i: usize, deadline: Instant) {
        loop {
            let identity = self.nodes.iter().find_map(|n| {
                std::fs::read(n.config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE)).ok()
            });
            let served = match identity {
                Some(identity) => match Client::connect(&self.nodes[i].rest_url, &identity, None).await {
                    Ok(client) => client.get("/node/health").await.is_ok(),
                    Err(_) => false,
                },
                None => false,
            };
            if served {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node{i} did not serve the service identity's certificate in time\n{}",
                self.logs(15)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Opens the service through node `via`, once it serves the service identity's certificate
    /// (a node that just joined is endorsed a moment later): every member votes for
    /// `transition_service_to_open`.
    pub async fn open(&self, via: usize) {
        self.wait_serves_identity(via, Instant::now() + Duration::from_secs(60)).await;
        let client = self.client(via, 0).await.expect("member 0 connects");
        open_service(&client, &self.members).await;
    }

    /// Writes identities and configurations without starting anything.
    pub fn prepare(nodes: usize, members: usize, app: &[u8], configure: impl Fn(&mut NodeConfig)) -> Cluster {
        let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let network =
            LocalNetwork::create(dir.path(), "cluster test service", members, 0, Some(("app.wasm", app)), false)
                .expect("the network's files are written");
        let first = crate::ports::free_ports(u16::try_from(3 * nodes).expect("a few nodes"));
        let port = |i: usize, k: usize| first + u16::try_from(3 * i + k).expect("a few nodes");
        let addrs = |i: usize| NodeAddrs {
            rest: format!("127.0.0.1:{}", port(i, 0)),
            grpc: format!("127.0.0.1:{}", port(i, 1)),
            peer: format!("127.0.0.1:{}", port(i, 2)),
        };
        let first_peer = format!("https://{}", addrs(0).peer);
        let mut node_procs = Vec::new();
        for i in 0..nodes {
            let name = format!("node{i}");
            let join = (i > 0).then(|| first_peer.clone());
            let mut config = network.node_config(&name, &addrs(i), join, crate::mock_attestation()).unwrap();
            config.raft = RaftSection {
                heartbeat_interval_ms: 100,
                election_timeout_min_ms: 600,
                election_timeout_max_ms: 1200,
                ..config.raft
            };
            configure(&mut config);
            let config_path = network.write_config(&config).unwrap();
            let log_path = dir.path().join(format!("{name}.log"));
            node_procs.push(NodeProc {
                process: NodeProcess::new(&name, config_path.clone(), log_path),
                rest_url: format!("https://{}", addrs(i).rest),
                name,
                config_path,
                config,
                start_args: Vec::new(),
            });
        }
        Cluster {
            _turn: turn,
            ca_pem: network.service_cert_pem().as_bytes().to_vec(),
            members: network.members,
            nodes: node_procs,
            dir,
        }
    }

    /// Starts node `i`'s process (again).
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.process
            .spawn(&crate::cli_exe(), &node.start_args, &[("CLOISTER_LOG", NODE_LOG)])
            .expect("a node process starts");
    }

    /// Starts node `i` as `cloister node recover --ledger LEDGER`: a new service from a previous
    /// service's ledger folder.
    pub fn spawn_recover(&mut self, i: usize, ledger: &std::path::Path) {
        let node = &mut self.nodes[i];
        let args = vec!["--ledger".to_owned(), ledger.display().to_string()];
        node.process
            .spawn_as(&crate::cli_exe(), "recover", &args, &[("CLOISTER_LOG", NODE_LOG)])
            .expect("a node process starts");
    }

    /// Gives node `i` a new key and certificate from the operator's CA, as for a new machine.
    pub fn renew_node_identity(&self, i: usize) {
        use cloister_crypto::identity::{KeyedCert, ServiceCa};
        let ca = ServiceCa::load(KeyedCert::read(self.dir.path(), "service").unwrap()).unwrap();
        let name = &self.nodes[i].name;
        ca.issue_node_cert(name, &["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .write(self.dir.path(), name)
            .unwrap();
    }

    /// The node's log so far.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].process.log()
    }

    /// The last `lines` lines of every node's log, each under its node's name: what a test
    /// prints when the network as a whole did not get somewhere in time.
    pub fn logs(&self, lines: usize) -> String {
        (0..self.nodes.len()).map(|i| format!("--- {}\n{}\n", self.nodes[i].name, tail(&self.log(i), lines))).collect()
    }

    /// SIGKILL: the process dies at once, mid-whatever.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].process.kill();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].process.stop(NODE_STOP_TIMEOUT);
    }

    /// What this harness's clients pin: the service identity's certificate, as the first node that
    /// serves one wrote it out, and the operator's CA too, so that a node still joining (or a
    /// network before genesis) answers the harness's polls. `tests/node_api.rs` and the in-process
    /// services pin the service identity alone.
    pub fn roots(&self) -> Vec<u8> {
        let mut roots = self.ca_pem.clone();
        let identity = self.nodes.iter().find_map(|n| {
            std::fs::read(n.config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE)).ok()
        });
        roots.extend(identity.unwrap_or_default());
        roots
    }

    pub async fn client(&self, node: usize, member: usize) -> anyhow::Result<Client> {
        Client::connect(&self.nodes[node].rest_url, &self.roots(), Some(&self.members[member].keyed)).await
    }

    /// Node `i`'s `/node/metrics`, as text and parsed.
    pub async fn metrics(&self, i: usize) -> (String, crate::metrics::Exposition) {
        let client = Client::connect(&self.nodes[i].rest_url, &self.roots(), None).await.unwrap();
        crate::metrics::scrape(&client).await
    }

    /// `/node/network` as node `i` sees it.
    pub async fn network(&self, i: usize) -> Option<Value> {
        let client = Client::connect(&self.nodes[i].rest_url, &self.roots(), None).await.ok()?;
        client.get("/node/network").await.ok()?.json().ok()
    }

    /// The index of the node process that currently leads, as a running node reports it.
    pub async fn leader(&mut self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            if let Some(net) = self.network(i).await {
                let leader = net["leader"].as_str()?.to_owned();
                let name =
                    net["nodes"].as_array()?.iter().find(|n| n["id"] == leader.as_str())?["name"].as_str()?.to_owned();
                return self.nodes.iter().position(|n| n.name == name);
            }
        }
        None
    }

    /// Each running node's view: the leader it names and the position it has applied. `None`
    /// while some running node does not answer, counts other than `voters` voters, or names no
    /// leader.
    async fn views(&mut self, voters: usize) -> Option<Vec<(String, String)>> {
        let mut views = Vec::new();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let net = self.network(i).await?;
            let counted =
                net["nodes"].as_array().map(|ns| ns.iter().filter(|n| n["role"] != "learner").count()).unwrap_or(0);
            if counted != voters || net["leader"].is_null() {
                return None;
            }
            views.push((net["leader"].to_string(), net["applied"].as_str().unwrap_or_default().to_owned()));
        }
        Some(views)
    }

    /// Whether the leader the running nodes agree on is alive.
    async fn leader_alive(&mut self) -> bool {
        let leader = self.leader().await;
        leader.is_some_and(|l| self.nodes[l].is_running())
    }

    /// Waits until the running nodes agree on one live leader and `voters` voters, and each has
    /// applied at least what the furthest of them had applied when they first agreed. Under a
    /// load that keeps writing, no two nodes need ever report the same position at once, so
    /// [`Cluster::wait_stable`] could wait for a moment that never comes.
    pub async fn wait_caught_up(&mut self, voters: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut target = None;
        loop {
            let views = self.views(voters).await;
            if let Some(views) = &views
                && views.iter().map(|(leader, _)| leader).collect::<BTreeSet<_>>().len() == 1
            {
                let seqno = |applied: &str| applied.rsplit('.').next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                let applied: Vec<u64> = views.iter().map(|(_, a)| seqno(a)).collect();
                let target = *target.get_or_insert(applied.iter().copied().max().unwrap_or(0));
                if applied.iter().all(|&a| a >= target) && self.leader_alive().await {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the network did not catch up within {timeout:?}: views {views:?}, target {target:?}\n{}",
                self.logs(15)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the running nodes agree on one leader and `voters` voters, and have applied
    /// the same position.
    pub async fn wait_stable(&mut self, voters: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let views = self.views(voters).await;
            if let Some(views) = &views
                && views.iter().collect::<BTreeSet<_>>().len() == 1
                && self.leader_alive().await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the network did not settle within {timeout:?}: {views:?}\n{}",
                self.logs(15)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Member 0 ingests `rows` (JSON) through node `node`; returns the transaction's id.
    pub async fn ingest(&self, node: usize, rows: &Value) -> String {
        let reply = self
            .client(node, 0)
            .await
            .unwrap()
            .post("/app/ingest", "application/json", serde_json::to_vec(rows).unwrap())
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.tx_id().expect("a tx id")
    }

    /// Every key member `member`'s report lists on node `node`.
    pub async fn report_keys(&self, node: usize, member: usize) -> anyhow::Result<BTreeSet<String>> {
        let client = self.client(node, member).await?;
        let mut keys = BTreeSet::new();
        let mut target = "/app/report?limit=10000".to_owned();
        loop {
            let reply = client.get(&target).await?;
            anyhow::ensure!(reply.status == 200, "report: {} {}", reply.status, reply.text());
            for row in reply.json()?.as_array().cloned().unwrap_or_default() {
                keys.insert(row["lei"].as_str().unwrap_or_default().to_owned());
            }
            match reply.headers.get("x-next-cursor").and_then(|v| v.to_str().ok()) {
                Some(cursor) => target = format!("/app/report?limit=10000&after={cursor}"),
                None => return Ok(keys),
            }
        }
    }
}

/// The last `lines` lines of a log.
fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `/node/tx` for `tx`, as node `node` answers it.
pub async fn tx_status(cluster: &Cluster, node: usize, tx: &str) -> String {
    let client = cluster.client(node, 0).await.unwrap();
    let reply = client.get(&format!("/node/tx?id={tx}")).await.unwrap();
    reply.json().unwrap()["status"].as_str().unwrap().to_owned()
}

/// What became of one write.
#[derive(Debug)]
pub enum Outcome {
    /// Answered 200 with this transaction id.
    Acked(String),
    /// No answer, or an error (with the transaction id when the node knew it).
    Unknown(Option<String>),
}

/// Writers that each ingest a pair of keys (`w{w}-{n}-a`, `w{w}-{n}-b`) per transaction, one
/// after another, moving to the next node whenever theirs stops answering, until finished.
pub struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<Vec<(String, String, Outcome)>>>,
}

impl Load {
    pub fn start(c: &Cluster, writers: usize) -> Load {
        let urls: Vec<String> = c.nodes.iter().map(|n| n.rest_url.clone()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = (0..writers)
            .map(|w| {
                let (urls, stop) = (urls.clone(), stop.clone());
                let (ca, id) = (c.roots(), c.members[0].keyed.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let mut target = w % urls.len();
                    let mut client: Option<Client> = None;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if client.is_none() {
                            client = Client::connect(&urls[target], &ca, Some(&id)).await.ok();
                            if client.is_none() {
                                target = (target + 1) % urls.len();
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        }
                        let (a, b) = (format!("w{w}-{n}-a"), format!("w{w}-{n}-b"));
                        let body =
                            serde_json::to_vec(&serde_json::json!([{"lei": a, "nace": "X"}, {"lei": b, "nace": "X"}]))
                                .unwrap();
                        let sent = client.as_ref().unwrap().post("/app/ingest", "application/json", body).await;
                        let outcome = match sent {
                            Ok(r) if r.status == 200 => Outcome::Acked(r.tx_id().expect("acked writes carry a tx id")),
                            Ok(r) => Outcome::Unknown(r.tx_id()),
                            Err(_) => {
                                client = None;
                                target = (target + 1) % urls.len();
                                Outcome::Unknown(None)
                            }
                        };
                        outcomes.push((a, b, outcome));
                        n += 1;
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, writers }
    }

    /// Stops the writers and returns every write's outcome.
    pub async fn finish(self) -> Vec<(String, String, Outcome)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for w in self.writers {
            outcomes.extend(w.await.unwrap());
        }
        outcomes
    }
}

/// What [`check_outcomes`] found.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    pub writes: usize,
    pub acked: usize,
}

/// Checks a load's outcomes against a settled network: every node holds the same keys; no
/// write is half-applied; every acknowledged write is present and Committed; a write whose
/// outcome was unknown is Committed exactly when present. Panics naming the first violation.
pub async fn check_outcomes(c: &Cluster, outcomes: &[(String, String, Outcome)]) -> Checked {
    let keys = c.report_keys(0, 0).await.unwrap();
    for node in 1..c.nodes.len() {
        assert_eq!(c.report_keys(node, 0).await.unwrap(), keys, "node{node} agrees with node0");
    }
    let mut acked = 0;
    for (a, b, outcome) in outcomes {
        let (has_a, has_b) = (keys.contains(a), keys.contains(b));
        assert_eq!(has_a, has_b, "{a}/{b} ({outcome:?}) is half-applied");
        match outcome {
            Outcome::Acked(tx) => {
                acked += 1;
                assert!(has_a, "acknowledged write {a} ({tx}) was lost");
                assert_eq!(tx_status(c, 0, tx).await, "Committed");
            }
            Outcome::Unknown(Some(tx)) => {
                let status = tx_status(c, 0, tx).await;
                let want = if has_a { "Committed" } else { "Invalid" };
                assert_eq!(status, want, "{a}: {tx} is {status} but present={has_a}");
            }
            Outcome::Unknown(None) => {}
        }
    }
    Checked { writes: outcomes.len(), acked }
}
