//! `cloister sandbox`: a local network in one command.
//!
//! The first run creates the service identity (a CA), one identity per party, a certificate and
//! configuration per node, the reconcile app and demo data, all under `--dir`. Every run starts
//! each node as its own process, waits until it answers, writes `sandbox.json`, prints how to use
//! it, and on Ctrl-C stops the nodes cleanly. A later run resumes on the same state.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::config::{
    AttestationSection, GenesisAttestation, GenesisSection, Limits, NetworkSection, NodeConfig, NodeSection,
    RaftSection, TlsSection,
};
use crate::node::identity::{self, ServiceCa};

/// How long a node may take to answer its health check after it starts.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node may take to stop after SIGTERM before it is killed.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(15);

const DEMO_FILES: &[(&str, &[u8])] = &[
    ("member0_data.csv", include_bytes!("../../../tests/conformance/recon-sample/member0_data.csv")),
    ("member0_data_pt2.json", include_bytes!("../../../tests/conformance/recon-sample/member0_data_pt2.json")),
    ("member1_data.json", include_bytes!("../../../tests/conformance/recon-sample/member1_data.json")),
    ("member2_data.json", include_bytes!("../../../tests/conformance/recon-sample/member2_data.json")),
];

#[derive(clap::Args)]
pub struct Args {
    /// Folder for the sandbox's identities, configuration and state.
    #[arg(long, default_value = "sandbox")]
    dir: PathBuf,
    /// Number of parties (members) to create: member0, member1, …
    #[arg(long, default_value_t = 3)]
    parties: usize,
    /// Number of nodes.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// First port: node i listens on PORT+3i (HTTPS), PORT+3i+1 (gRPC) and PORT+3i+2 (peers).
    #[arg(long, default_value_t = 8000)]
    port: u16,
}

/// `sandbox.json`: what scripts and tests need to use a running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxFile {
    pub rest_url: String,
    pub grpc_url: String,
    pub service_cert: PathBuf,
    pub parties: Vec<Party>,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Party {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: String,
    pub pid: Option<u32>,
    pub rest_url: String,
    pub grpc_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl SandboxFile {
    pub fn read(dir: &Path) -> anyhow::Result<SandboxFile> {
        let path = dir.join("sandbox.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("reading {} (is a sandbox running there? pass --url/--cacert otherwise)", path.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a sandbox file", path.display()))
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("sandbox.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    anyhow::ensure!(args.parties >= 1, "--parties must be at least 1");
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let mut layout = match SandboxFile::read(&dir) {
        Ok(existing) => {
            if existing.nodes.len() != args.nodes || existing.parties.len() != args.parties {
                eprintln!(
                    "note: resuming the sandbox in {} as it was created ({} nodes, {} parties)",
                    dir.display(),
                    existing.nodes.len(),
                    existing.parties.len()
                );
            }
            existing
        }
        Err(_) => create(&dir, &args)?,
    };

    let mut children = Vec::new();
    for node in &mut layout.nodes {
        let child = spawn_node(node)?;
        node.pid = Some(child.id());
        children.push(child);
    }
    layout.write(&dir)?;
    let ready = match wait_ready(&layout, &mut children).await {
        Ok(()) => open_service(&layout).await,
        Err(e) => Err(e),
    };
    if let Err(e) = ready {
        stop(&mut children).await;
        return Err(e);
    }
    print_usage(&dir, &layout);

    supervise(&layout, &mut children).await;
    eprintln!("stopping the sandbox…");
    stop(&mut children).await;
    for node in &mut layout.nodes {
        node.pid = None;
    }
    layout.write(&dir)?;
    eprintln!("stopped; run the same command again to resume");
    Ok(ExitCode::SUCCESS)
}

/// The sandbox folder's mock firmware root (test ARK and ASK).
const MOCK_ROOT_DIR: &str = "mock-amd";

/// Creates every identity, configuration and file of a new sandbox.
fn create(dir: &Path, args: &Args) -> anyhow::Result<SandboxFile> {
    let ca = ServiceCa::generate("Cloister sandbox service")?;
    ca.keyed.write(dir, "service")?;
    let mut parties = Vec::new();
    for i in 0..args.parties {
        let name = format!("member{i}");
        let id = identity::generate_identity(&name)?;
        id.write(dir, &name)?;
        parties.push(Party {
            cert: dir.join(format!("{name}.cert.pem")),
            key: dir.join(format!("{name}.key.pem")),
            id: id.id()?,
            name,
        });
    }
    // The sandbox's mock SNP firmware: one test ARK and ASK, shared by its nodes, which the
    // service pins at genesis (attestation = "mock").
    cloister_attestation::mock::MockRoot::generate().write(&dir.join(MOCK_ROOT_DIR))?;
    std::fs::write(dir.join("reconcile.wasm"), crate::bundled::RECONCILE)?;
    let demo = dir.join("demo");
    std::fs::create_dir_all(&demo)?;
    for (name, bytes) in DEMO_FILES {
        std::fs::write(demo.join(name), bytes)?;
    }
    let mut nodes = Vec::new();
    let first_peer = format!("https://127.0.0.1:{}", args.port as usize + 2);
    for i in 0..args.nodes {
        let name = format!("node{i}");
        let base = args.port as usize + 3 * i;
        let addr = |offset: usize| format!("127.0.0.1:{}", base + offset);
        ca.issue_node_cert(&name, &["localhost".into(), "127.0.0.1".into()])?.write(dir, &name)?;
        let config = NodeConfig {
            node: NodeSection {
                name: name.clone(),
                data_dir: PathBuf::from(format!("data/{name}")),
                rest_addr: addr(0),
                grpc_addr: addr(1),
                peer_addr: addr(2),
            },
            tls: TlsSection {
                service_cert: "service.cert.pem".into(),
                node_cert: format!("{name}.cert.pem").into(),
                node_key: format!("{name}.key.pem").into(),
            },
            // The first node starts the service; the others join it.
            network: NetworkSection { join: (i > 0).then(|| first_peer.clone()) },
            genesis: GenesisSection {
                members: parties.iter().map(|p| PathBuf::from(format!("{}.cert.pem", p.name))).collect(),
                users: Vec::new(),
                app: Some("reconcile.wasm".into()),
                constitution: None,
                attestation: GenesisAttestation::Mock,
            },
            attestation: AttestationSection {
                kind: cloister_attestation::Kind::Mock,
                mock_root: Some(MOCK_ROOT_DIR.into()),
                ..Default::default()
            },
            limits: Limits::default(),
            ledger: Default::default(),
            gov: Default::default(),
            raft: RaftSection::default(),
            wasm: Default::default(),
        };
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config.to_toml())?;
        nodes.push(NodeEntry {
            id: name.clone(),
            pid: None,
            rest_url: format!("https://{}", addr(0)),
            grpc_url: format!("https://{}", addr(1)),
            peer_url: format!("https://{}", addr(2)),
            data_dir: dir.join("data").join(&name),
            config: config_path,
            log: dir.join(format!("{name}.log")),
        });
    }
    Ok(SandboxFile {
        rest_url: nodes[0].rest_url.clone(),
        grpc_url: nodes[0].grpc_url.clone(),
        service_cert: dir.join("service.cert.pem"),
        parties,
        nodes,
    })
}

/// Starts `cloister node start` for one node, logging to its log file.
fn spawn_node(node: &NodeEntry) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
    let exe = std::env::current_exe().context("finding the cloister executable")?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["node", "start", "--config"])
        .arg(&node.config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    stop_with_parent(&mut command);
    command.spawn().with_context(|| format!("starting {}", node.id))
}

/// Asks the kernel to stop a node when the sandbox itself dies, however it dies (a `kill -9` of the
/// sandbox must not leave nodes running on its ports). A node stopped this way resumes on the next run.
#[cfg(target_os = "linux")]
fn stop_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_: &mut std::process::Command) {}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Opens a new service the way its members would: the first party proposes
/// `transition_service_to_open` and the parties vote for it, as signed governance requests.
async fn open_service(layout: &SandboxFile) -> anyhow::Result<()> {
    let ca = std::fs::read(&layout.service_cert)?;
    let probe = Client::connect(&layout.rest_url, &ca, None).await?;
    let service = probe.get("/gov/service").await?.json()?;
    if service["state"] == "Open" {
        return Ok(());
    }
    let parties: Vec<crate::node::identity::KeyedCert> =
        layout.parties.iter().map(|p| identity::read_pair(&p.cert, &p.key)).collect::<anyhow::Result<_>>()?;
    let client = Client::connect(&layout.rest_url, &ca, Some(&parties[0])).await?;
    let voters: Vec<&_> = parties.iter().collect();
    let actions = serde_json::json!([{ "name": "transition_service_to_open" }]);
    let (id, state) = client.pass(&parties[0], &voters, actions).await.context("opening the service")?;
    anyhow::ensure!(state["state"] == "Accepted", "the opening proposal {id} ended {}", state["state"]);
    eprintln!("the members voted the service open (proposal {id})");
    Ok(())
}

/// Waits until every node answers `/node/health` and the first node lists them all as voters,
/// or one of them exits.
async fn wait_ready(layout: &SandboxFile, children: &mut [Child]) -> anyhow::Result<()> {
    let ca = std::fs::read(&layout.service_cert)?;
    let started = Instant::now();
    let check_exits = |children: &mut [Child]| -> anyhow::Result<()> {
        for (node, child) in layout.nodes.iter().zip(children.iter_mut()) {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("{} exited ({status}) before it was ready; its log ends:\n{}", node.id, tail(&node.log));
            }
        }
        Ok(())
    };
    loop {
        check_exits(children)?;
        if network_ready(layout, &ca).await {
            return Ok(());
        }
        if started.elapsed() > NODE_READY_TIMEOUT {
            let logs: Vec<String> = layout.nodes.iter().map(|n| format!("{}:\n{}", n.id, tail(&n.log))).collect();
            anyhow::bail!(
                "the network did not become ready within {NODE_READY_TIMEOUT:?}; logs end:\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every node is healthy and every node sees all of them as leader or follower.
async fn network_ready(layout: &SandboxFile, ca: &[u8]) -> bool {
    for node in &layout.nodes {
        let Ok(client) = Client::connect(&node.rest_url, ca, None).await else {
            return false;
        };
        let Ok(reply) = client.get("/node/network").await else {
            return false;
        };
        let Ok(network) = reply.json() else {
            return false;
        };
        let voters = network["nodes"]
            .as_array()
            .map(|ns| ns.iter().filter(|n| n["role"] == "leader" || n["role"] == "follower").count())
            .unwrap_or(0);
        if reply.status != 200 || voters != layout.nodes.len() || network["leader"].is_null() {
            return false;
        }
    }
    true
}

/// Runs until Ctrl-C or SIGTERM, reporting nodes that exit meanwhile.
async fn supervise(layout: &SandboxFile, children: &mut [Child]) {
    let mut reported = vec![false; children.len()];
    let signal = super::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (i, child) in children.iter_mut().enumerate() {
            if !reported[i]
                && let Ok(Some(status)) = child.try_wait()
            {
                reported[i] = true;
                let node = &layout.nodes[i];
                eprintln!(
                    "{} exited ({status}); restart it with: {} node start --config {}",
                    node.id,
                    exe_name(),
                    node.config.display()
                );
            }
        }
    }
}

/// Asks every node to stop (SIGTERM), then kills those that do not within the timeout.
async fn stop(children: &mut [Child]) {
    for child in children.iter() {
        terminate(child);
    }
    let deadline = Instant::now() + NODE_STOP_TIMEOUT;
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &Child) {
    #[cfg(unix)]
    {
        let pid = libc::pid_t::try_from(child.id()).expect("pids fit pid_t");
        // SAFETY: kill(2) with a valid signal number; the pid is our own child's.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = child;
}

fn exe_name() -> String {
    std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "cloister".into())
}

fn print_usage(dir: &Path, layout: &SandboxFile) {
    let d = dir.display();
    let exe = exe_name();
    let first = &layout.parties[0].name;
    let second = layout.parties.get(1).map_or(first.as_str(), |p| p.name.as_str());
    println!("Cloister sandbox is running ({} node(s)). Press Ctrl-C to stop.\n", layout.nodes.len());
    for n in &layout.nodes {
        println!(
            "  {}  HTTPS {}  gRPC {}  peers {}  pid {}  data {}",
            n.id,
            n.rest_url,
            n.grpc_url,
            n.peer_url,
            n.pid.unwrap_or(0),
            n.data_dir.display()
        );
    }
    println!("  service certificate  {d}/service.cert.pem");
    let names: Vec<&str> = layout.parties.iter().map(|p| p.name.as_str()).collect();
    println!("  parties  {}  ({d}/<name>.cert.pem, {d}/<name>.key.pem)", names.join(", "));
    println!("  details  {d}/sandbox.json\n");
    println!("Ingest demo data and fetch a report with curl:");
    let curl =
        |who: &str| format!("curl -s --cacert {d}/service.cert.pem --cert {d}/{who}.cert.pem --key {d}/{who}.key.pem");
    println!(
        "  {} -H 'content-type: text/csv' --data-binary @{d}/demo/member0_data.csv {}/app/csv/ingest",
        curl(first),
        layout.rest_url
    );
    println!("  {} {}/app/report\n", curl(first), layout.rest_url);
    println!("or with the cloister command:");
    println!("  {exe} call --sandbox {d} --as {second} POST /app/ingest --data @{d}/demo/member1_data.json");
    println!("  {exe} call --sandbox {d} --as {second} GET /app/report\n");
    println!("gRPC (server reflection is on):");
    println!(
        "  grpcurl -cacert {d}/service.cert.pem -cert {d}/{first}.cert.pem -key {d}/{first}.key.pem {} list",
        layout.grpc_url.trim_start_matches("https://")
    );
}
