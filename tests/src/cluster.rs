//! Networks of node processes on 127.0.0.1, for fault tests: nodes are started with the
//! `cloister` command line (`cloister-test-cli node start`), killed with SIGKILL, stopped with
//! SIGTERM, and restarted on the same data folders.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloister_host::client::Client;
use cloister_host::config::{GenesisSection, Limits, NetworkSection, NodeConfig, NodeSection, RaftSection, TlsSection};
use cloister_host::node::identity::ServiceCa;
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
    child: Option<Child>,
}

impl NodeProc {
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Cluster tests take turns: several networks of node processes at once would overload a small
/// machine into election storms that test the machine, not the code.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A network of node processes sharing one service identity and one set of members.
pub struct Cluster {
    _turn: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub members: Vec<Identity>,
    pub ca_pem: Vec<u8>,
    pub nodes: Vec<NodeProc>,
}

/// Free ports on 127.0.0.1, reserved only while choosing them.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
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
        cluster
    }

    /// Opens the service through node `via`: every member votes for `transition_service_to_open`.
    pub async fn open(&self, via: usize) {
        let client = self.client(via, 0).await.expect("member 0 connects");
        open_service(&client, &self.members).await;
    }

    /// Writes identities and configurations without starting anything.
    pub fn prepare(nodes: usize, members: usize, app: &[u8], configure: impl Fn(&mut NodeConfig)) -> Cluster {
        let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let ca = ServiceCa::generate("cluster test service").unwrap();
        ca.keyed.write(dir.path(), "service").unwrap();
        std::fs::write(dir.path().join("app.wasm"), app).unwrap();
        let members: Vec<Identity> = (0..members)
            .map(|i| {
                let id = Identity::generate(&format!("member{i}"));
                id.keyed.write(dir.path(), &id.name).unwrap();
                id
            })
            .collect();
        let ports = free_ports(3 * nodes);
        let mut cluster =
            Cluster { _turn: turn, ca_pem: ca.keyed.cert_pem.clone().into_bytes(), members, nodes: Vec::new(), dir };
        for i in 0..nodes {
            let name = format!("node{i}");
            let d = cluster.dir.path();
            ca.issue_node_cert(&name, &["localhost".into(), "127.0.0.1".into()]).unwrap().write(d, &name).unwrap();
            let addr = |k: usize| format!("127.0.0.1:{}", ports[3 * i + k]);
            let mut config = NodeConfig {
                node: NodeSection {
                    name: name.clone(),
                    data_dir: d.join(format!("data-{name}")),
                    rest_addr: addr(0),
                    grpc_addr: addr(1),
                    peer_addr: addr(2),
                },
                tls: TlsSection {
                    service_cert: d.join("service.cert.pem"),
                    node_cert: d.join(format!("{name}.cert.pem")),
                    node_key: d.join(format!("{name}.key.pem")),
                },
                network: NetworkSection { join: (i > 0).then(|| format!("https://127.0.0.1:{}", ports[2])) },
                genesis: GenesisSection {
                    members: cluster.members.iter().map(|m| d.join(format!("{}.cert.pem", m.name))).collect(),
                    users: Vec::new(),
                    app: Some(d.join("app.wasm")),
                    constitution: None,
                    attestation: cloister_host::config::GenesisAttestation::Mock,
                },
                attestation: crate::mock_attestation(),
                limits: Limits::default(),
                ledger: Default::default(),
                gov: Default::default(),
                raft: RaftSection {
                    heartbeat_interval_ms: 100,
                    election_timeout_min_ms: 600,
                    election_timeout_max_ms: 1200,
                    ..RaftSection::default()
                },
                wasm: Default::default(),
            };
            configure(&mut config);
            let config_path = d.join(format!("{name}.toml"));
            std::fs::write(&config_path, config.to_toml()).unwrap();
            let rest_url = format!("https://{}", addr(0));
            cluster.nodes.push(NodeProc { name, config_path, config, rest_url, start_args: Vec::new(), child: None });
        }
        cluster
    }

    /// Starts node `i`'s process (again).
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", node.name)))
            .unwrap();
        let child = Command::new(crate::cli_exe())
            .args(["node", "start", "--config"])
            .arg(&node.config_path)
            .args(&node.start_args)
            .env("CLOISTER_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("a node process starts");
        node.child = Some(child);
    }

    /// The node's log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name))).unwrap_or_default()
    }

    /// SIGKILL: the process dies at once, mid-whatever.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            // SAFETY: kill(2) on our own child with a valid signal.
            unsafe { libc::kill(libc::pid_t::try_from(child.id()).unwrap(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn client(&self, node: usize, member: usize) -> anyhow::Result<Client> {
        Client::connect(&self.nodes[node].rest_url, &self.ca_pem, Some(&self.members[member].keyed)).await
    }

    /// `/node/network` as node `i` sees it.
    pub async fn network(&self, i: usize) -> Option<Value> {
        let client = Client::connect(&self.nodes[i].rest_url, &self.ca_pem, None).await.ok()?;
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

    /// Waits until the running nodes agree on one leader and `voters` voters, and have applied
    /// the same position.
    pub async fn wait_stable(&mut self, voters: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = BTreeSet::new();
            let mut ok = true;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].is_running() {
                    continue;
                }
                match self.network(i).await {
                    Some(net) => {
                        let counted = net["nodes"]
                            .as_array()
                            .map(|ns| ns.iter().filter(|n| n["role"] != "learner").count())
                            .unwrap_or(0);
                        ok &= counted == voters && !net["leader"].is_null();
                        views.insert((net["leader"].to_string(), net["applied"].to_string()));
                    }
                    None => ok = false,
                }
            }

            if ok && views.len() == 1 {
                // …and the leader they agree on is alive.
                let l = self.leader().await;

                if let Some(leader) = l
                    && self.nodes[leader].is_running()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the network did not settle within {timeout:?}: {views:?}\n{}",
                (0..self.nodes.len())
                    .map(|i| format!("--- {}\n{}", self.nodes[i].name, tail(&self.log(i))))
                    .collect::<String>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
