//! `cloister sandbox`: a local network in one command.
//!
//! The first run creates the operator's CA, one identity per party, a certificate and
//! configuration per node, and the app (`--app`: reconcile and its demo data, the banking sample
//! and two users, user0 and user1, whom the members vote in, or the key-value store), all under
//! `--dir`. Every run starts each node as its own process, waits until it answers, writes
//! `sandbox.json`, prints how to use it, and on Ctrl-C stops the nodes cleanly. A later run
//! resumes on the same state.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use cloister_client::Client;
use cloister_crypto::identity;

use crate::local::{LocalNetwork, NodeAddrs, NodeProcess, mock_attestation};

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
    /// The app a new sandbox installs at genesis (a resumed sandbox keeps its own).
    #[arg(long, value_enum, default_value_t = SandboxApp::Reconcile)]
    app: SandboxApp,
    /// A disaster-recovery drill: start the existing sandbox's service again from this saved
    /// ledger folder (a node's `data/ledger`), on new data folders (`DIR/data` must be gone). The
    /// first node recovers the service; the parties, its recovery members, submit their shares
    /// until the threshold; then the other nodes join and the parties vote the service open.
    #[arg(long, value_name = "LEDGER")]
    recover: Option<PathBuf>,
    /// A node setting for every node of a new sandbox, by its dotted name in the node's
    /// configuration file, e.g. `--set raft.apply_durable_ms=5000`; repeatable. It is written
    /// into each node's `<node>.toml`, so a resumed sandbox keeps it (edit those files to change
    /// one).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, String)>,
}

/// `NAME=VALUE`, split at the first `=`.
fn parse_setting(arg: &str) -> Result<(String, String), String> {
    let (name, value) = arg.split_once('=').ok_or_else(|| format!("{arg:?} is not NAME=VALUE"))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

/// The apps the sandbox ships.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxApp {
    /// Data reconciliation, with the conformance scenario's demo data.
    #[default]
    Reconcile,
    /// The bank-consortium sample: the members are banks, and two users (user0, user1) are voted
    /// in by proposal once the service is open.
    Banking,
    /// A minimal key-value store (PUT/GET/DELETE /app/kv/{key}), for benchmarks against etcd.
    Kv,
}

impl SandboxApp {
    /// The app's wasm, as this binary ships it.
    /// The file a new sandbox writes the app to.
    fn file_name(self) -> &'static str {
        match self {
            SandboxApp::Reconcile => "reconcile.wasm",
            SandboxApp::Banking => "banking.wasm",
            SandboxApp::Kv => "kv.wasm",
        }
    }

    pub fn wasm(self) -> &'static [u8] {
        match self {
            SandboxApp::Reconcile => cloister_bundled::RECONCILE,
            SandboxApp::Banking => cloister_bundled::BANKING,
            SandboxApp::Kv => cloister_bundled::KV,
        }
    }
}

/// The users a banking sandbox creates and the members vote in.
const BANKING_USERS: &[&str] = &["user0", "user1"];

/// `sandbox.json`: what scripts and tests need to use a running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SandboxFile {
    pub rest_url: String,
    pub grpc_url: String,
    pub service_cert: PathBuf,
    /// The app installed at genesis (absent in sandboxes made before there was a choice).
    #[serde(default)]
    pub app: SandboxApp,
    pub parties: Vec<Party>,
    /// Users, for apps that have them: members vote them in by proposal.
    #[serde(default)]
    pub users: Vec<Party>,
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
pub(crate) struct NodeEntry {
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
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a sandbox file; the sandbox in {} keeps its identities and state, so fix or \
                 remove the file (or pass another --dir) rather than starting over",
                path.display(),
                dir.display()
            )
        })
    }

    /// What the sandbox's clients pin: the service identity's certificate once the sandbox has
    /// written it (`service_identity.pem`, beside the service CA). Before that (a new sandbox whose
    /// service is coming up) the operator's CA, which nodes serve until the service identity has
    /// certified them, together with the identity any node has written to its data folder.
    pub fn client_roots(&self) -> anyhow::Result<Vec<u8>> {
        let pinned = self.service_cert.with_file_name(SERVICE_IDENTITY_FILE);
        if pinned.exists() {
            return std::fs::read(&pinned).with_context(|| format!("reading {}", pinned.display()));
        }
        let mut roots = std::fs::read(&self.service_cert)
            .with_context(|| format!("reading the service CA {}", self.service_cert.display()))?;
        let identity = self
            .nodes
            .iter()
            .find_map(|n| std::fs::read(n.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE)).ok());
        roots.extend(identity.unwrap_or_default());
        Ok(roots)
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("sandbox.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    anyhow::ensure!(args.parties >= 1, "--parties must be at least 1");
    ports_fit(args.port, args.nodes)?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    // A folder with a sandbox.json is an existing sandbox: resume it, or stop if the file does not
    // parse. Creating a new one there would overwrite the identities its ledger was made with.
    let existing = if dir.join("sandbox.json").exists() { Some(SandboxFile::read(&dir)?) } else { None };
    if args.recover.is_some() {
        anyhow::ensure!(
            existing.is_some(),
            "--recover needs the sandbox's identities: {} has no sandbox.json",
            dir.display()
        );
        let data = dir.join("data");
        anyhow::ensure!(
            !data.exists(),
            "--recover starts every node on a new data folder: move {} aside first",
            data.display()
        );
    }
    let mut layout = match existing {
        Some(_) if !args.settings.is_empty() => anyhow::bail!(
            "--set applies to a new sandbox; {} exists: edit its nodes' .toml files instead",
            dir.display()
        ),
        Some(existing) => {
            // A sandbox whose service opened (its identity is pinned here) and whose first node
            // now holds no state lost its data folder: started as it is, node0 would run a new
            // service from its genesis settings, and the parties' pinned identity would be
            // replaced by the new one's, which a later --recover would then take for the old.
            let node0 = existing.nodes.first().map(|n| n.data_dir.clone()).unwrap_or_default();
            let pinned = dir.join(SERVICE_IDENTITY_FILE);
            anyhow::ensure!(
                args.recover.is_some() || !pinned.exists() || cloister_node::holds_state(&node0),
                "the sandbox in {} ran a service ({} pins its identity), but {} holds no state: its data \
                 folder is gone. Recover the service from a copy of its ledger with --recover LEDGER, or \
                 start a new sandbox in another --dir",
                dir.display(),
                pinned.display(),
                node0.display()
            );
            if existing.nodes.len() != args.nodes || existing.parties.len() != args.parties || existing.app != args.app
            {
                eprintln!(
                    "note: resuming the sandbox in {} as it was created ({} nodes, {} parties, app {:?})",
                    dir.display(),
                    existing.nodes.len(),
                    existing.parties.len(),
                    existing.app
                );
            }
            existing
        }
        None => create(&dir, &args)?,
    };

    let exe = std::env::current_exe().context("finding the cloister executable")?;
    let mut children = Vec::new();
    if let Some(ledger) = &args.recover {
        let ledger = std::path::absolute(ledger)?;
        // The recovered service has an identity of its own: the old pinned one would refuse it.
        // The parties submit shares only to a recovery of the service they knew. The old one is
        // set aside, not deleted, until the recovered service's is written: a recovery that
        // fails on the way is tried again against the same previous service.
        let (pinned, previous_file) = (dir.join(SERVICE_IDENTITY_FILE), dir.join(PREVIOUS_IDENTITY_FILE));
        if pinned.exists() {
            std::fs::rename(&pinned, &previous_file)
                .with_context(|| format!("setting {} aside as {}", pinned.display(), previous_file.display()))?;
        }
        let old = std::fs::read(&previous_file)
            .with_context(|| format!("reading the service identity the parties knew, {SERVICE_IDENTITY_FILE}"))?;
        let previous = identity::id_of_pem(&old)?;
        let node = &mut layout.nodes[0];
        let mut process = NodeProcess::new(&node.id, node.config.clone(), node.log.clone());
        node.pid = Some(process.spawn_as(&exe, "recover", &["--ledger".into(), ledger.display().to_string()], &[])?);
        children.push(process);
        if let Err(e) = submit_shares(&layout, &dir, &previous, &mut children[0]).await {
            stop(&mut children);
            return Err(e);
        }
    }
    for node in layout.nodes.iter_mut().skip(children.len()) {
        let mut process = NodeProcess::new(&node.id, node.config.clone(), node.log.clone());
        node.pid = Some(process.spawn(&exe, &[], &[])?);
        children.push(process);
    }
    layout.write(&dir)?;
    let ready = async {
        wait_ready(&layout, &mut children).await?;
        open_service(&layout).await?;
        write_service_identity(&layout, &dir).await?;
        if args.recover.is_some() {
            std::fs::remove_file(dir.join(PREVIOUS_IDENTITY_FILE))?;
        }
        onboard_users(&layout).await?;
        wait_identity_served(&layout, &dir).await
    }
    .await;
    if let Err(e) = ready {
        stop(&mut children);
        return Err(e);
    }
    print_usage(&dir, &layout);

    supervise(&layout, &mut children).await;
    eprintln!("stopping the sandbox…");
    stop(&mut children);
    for node in &mut layout.nodes {
        node.pid = None;
    }
    layout.write(&dir)?;
    eprintln!("stopped; run the same command again to resume");
    Ok(ExitCode::SUCCESS)
}

/// Each node takes three consecutive ports from `first` on: the last node's last port must
/// exist (a port past 65535 wrapped round to 0, any free port, and a join URL ending in `:0`).
fn ports_fit(first: u16, nodes: usize) -> anyhow::Result<()> {
    let last = usize::from(first) + 3 * nodes.max(1) - 1;
    anyhow::ensure!(
        last <= usize::from(u16::MAX),
        "--port {first} leaves no room for {nodes} nodes' three ports each (the last would be {last})"
    );
    Ok(())
}

/// The sandbox folder's mock firmware root (test ARK and ASK).
const MOCK_ROOT_DIR: &str = "mock-amd";

/// Creates every identity, configuration and file of a new sandbox.
fn create(dir: &Path, args: &Args) -> anyhow::Result<SandboxFile> {
    let app = (args.app.file_name(), args.app.wasm());
    // Node configurations name files relative to the sandbox folder, so each reads the same from
    // wherever the folder is; sandbox.json records absolute paths, so a sandbox resumes only
    // where it was made.
    let network = LocalNetwork::create(dir, "Cloister sandbox service", args.parties, 0, Some(app), true)?;
    let parties = network
        .members
        .iter()
        .map(|m| Party {
            cert: dir.join(format!("{}.cert.pem", m.name)),
            key: dir.join(format!("{}.key.pem", m.name)),
            id: m.id.clone(),
            name: m.name.clone(),
        })
        .collect();
    // The sandbox's mock SNP firmware: one test ARK and ASK, shared by its nodes, which the
    // service pins at genesis (attestation = "mock").
    cloister_attestation::mock::MockRoot::generate().write(&dir.join(MOCK_ROOT_DIR))?;
    let mut users = Vec::new();
    match args.app {
        SandboxApp::Reconcile => {
            let demo = dir.join("demo");
            std::fs::create_dir_all(&demo)?;
            for (name, bytes) in DEMO_FILES {
                std::fs::write(demo.join(name), bytes)?;
            }
        }
        SandboxApp::Banking => {
            for name in BANKING_USERS {
                let keyed = identity::generate_identity(name)?;
                keyed.write(dir, name)?;
                // The user's id (its certificate's hash), which paths and bodies name it by.
                std::fs::write(dir.join(format!("{name}.id")), keyed.id()?)?;
                users.push(Party {
                    cert: dir.join(format!("{name}.cert.pem")),
                    key: dir.join(format!("{name}.key.pem")),
                    id: keyed.id()?,
                    name: (*name).to_owned(),
                });
            }
        }
        // The parties (members) write and read it; it needs no users or data.
        SandboxApp::Kv => {}
    }
    let mut nodes = Vec::new();
    let first_peer = format!("https://{}", NodeAddrs::from_port(args.port).peer);
    for i in 0..args.nodes {
        let name = format!("node{i}");
        let port = u16::try_from(args.port as usize + 3 * i).context("--port leaves no room for every node")?;
        let addrs = NodeAddrs::from_port(port);
        // The first node starts the service; the others join it.
        let join = (i > 0).then(|| first_peer.clone());
        let config = network.node_config(&name, &addrs, join, mock_attestation(MOCK_ROOT_DIR.into()))?;
        let config = args
            .settings
            .iter()
            .try_fold(config, |config, (name, value)| config.with_setting(name, value))
            .context("--set")?;
        let config_path = network.write_config(&config)?;
        nodes.push(NodeEntry {
            id: name.clone(),
            pid: None,
            rest_url: format!("https://{}", addrs.rest),
            grpc_url: format!("https://{}", addrs.grpc),
            peer_url: format!("https://{}", addrs.peer),
            data_dir: dir.join("data").join(&name),
            config: config_path,
            log: dir.join(format!("{name}.log")),
        });
    }
    Ok(SandboxFile {
        rest_url: nodes[0].rest_url.clone(),
        grpc_url: nodes[0].grpc_url.clone(),
        service_cert: dir.join("service.cert.pem"),
        app: args.app,
        parties,
        users,
        nodes,
    })
}

/// Opens a new service the way its members would: the first party proposes
/// `transition_service_to_open` and the parties vote for it, as signed governance requests.
async fn open_service(layout: &SandboxFile) -> anyhow::Result<()> {
    let ca = layout.client_roots()?;
    let probe = Client::connect(&layout.rest_url, &ca, None).await?;
    let service = probe.get("/gov/service").await?.json()?;
    if service["state"] == "Open" {
        return Ok(());
    }
    let parties: Vec<cloister_crypto::identity::KeyedCert> =
        layout.parties.iter().map(|p| identity::read_pair(&p.cert, &p.key)).collect::<anyhow::Result<_>>()?;
    let client = Client::connect(&layout.rest_url, &ca, Some(&parties[0])).await?;
    let voters: Vec<&_> = parties.iter().collect();
    let actions = serde_json::json!([{ "name": "transition_service_to_open" }]);
    let (id, state) = client.pass(&parties[0], &voters, actions).await.context("opening the service")?;
    anyhow::ensure!(state["state"] == "Accepted", "the opening proposal {id} ended {}", state["state"]);
    eprintln!("the members voted the service open (proposal {id})");
    Ok(())
}

/// The recovery drill's members' part: once the first node is Recovering, each party submits its
/// share of the previous service (`cloister recovery share --submit`) until the threshold; then
/// waits until the node has restored the private state (Opening).
async fn submit_shares(layout: &SandboxFile, dir: &Path, previous: &str, node: &mut NodeProcess) -> anyhow::Result<()> {
    let state = |wanted: &'static str| async move {
        let started = Instant::now();
        loop {
            if let Ok(client) = Client::connect(&layout.rest_url, &layout.client_roots()?, None).await
                && let Ok(reply) = client.get("/gov/service").await
                && reply.status == 200
                && reply.json()?["state"] == wanted
            {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < NODE_READY_TIMEOUT,
                "the service was not {wanted} within {NODE_READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let running = |node: &mut NodeProcess| match node.check_running() {
        Err(status) => anyhow::bail!("{} exited ({status}); its log ends:\n{}", node.name, node.log_tail(10)),
        Ok(_) => Ok(()),
    };
    state("Recovering").await.or_else(|e| running(node).and(Err(e)))?;
    eprintln!("{} recovered the service's public state; the members submit their shares", node.name);
    for party in &layout.parties {
        let keyed = identity::read_pair(&party.cert, &party.key)?;
        let key_file = cloister_crypto::envelope::key_files(dir, &party.name).0;
        let key = std::fs::read_to_string(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
        let client = Client::connect(&layout.rest_url, &layout.client_roots()?, Some(&keyed)).await?;
        let answer = crate::recovery::submit_share(&client, &keyed, &key, Some(previous)).await?;
        eprintln!("{} submitted its share: {answer}", party.name);
        if answer["restoring"] == true {
            state("Opening").await.or_else(|e| running(node).and(Err(e)))?;
            eprintln!("the private state is back: the service is Opening");
            return Ok(());
        }
    }
    anyhow::bail!("every party submitted its share, and the threshold was not reached")
}

/// Votes the sandbox's users in as its members would: the first party proposes `set_user` for each
/// user the service does not know yet, and the parties vote for it.
async fn onboard_users(layout: &SandboxFile) -> anyhow::Result<()> {
    if layout.users.is_empty() {
        return Ok(());
    }
    let ca = layout.client_roots()?;
    let parties: Vec<cloister_crypto::identity::KeyedCert> =
        layout.parties.iter().map(|p| identity::read_pair(&p.cert, &p.key)).collect::<anyhow::Result<_>>()?;
    let client = Client::connect(&layout.rest_url, &ca, Some(&parties[0])).await?;
    let known = client.get("/gov/users").await?.json().context("GET /gov/users")?;
    let voters: Vec<&_> = parties.iter().collect();
    for user in layout.users.iter().filter(|u| known["users"].get(&u.id).is_none()) {
        let cert = std::fs::read_to_string(&user.cert).with_context(|| format!("reading {}", user.cert.display()))?;
        let actions = serde_json::json!([{ "name": "set_user", "args": { "cert": cert } }]);
        let (id, state) =
            client.pass(&parties[0], &voters, actions).await.with_context(|| format!("voting {} in", user.name))?;
        anyhow::ensure!(
            state["state"] == "Accepted",
            "the proposal {id} to add {} ended {}",
            user.name,
            state["state"]
        );
        eprintln!("the members voted {} in as a user (proposal {id})", user.name);
    }
    Ok(())
}

/// Where the sandbox writes the service identity's certificate, which receipts verify against.
const SERVICE_IDENTITY_FILE: &str = "service_identity.pem";
/// Where `--recover` keeps the previous service's identity until the recovered one's is written.
const PREVIOUS_IDENTITY_FILE: &str = "service_identity.previous.pem";

/// Fetches the service identity's certificate (`identity` of `GET /gov/service`) and writes it
/// beside the other certificates, for `cloister receipt verify --service-identity`.
async fn write_service_identity(layout: &SandboxFile, dir: &Path) -> anyhow::Result<()> {
    let ca = layout.client_roots()?;
    let client = Client::connect(&layout.rest_url, &ca, None).await?;
    let reply = client.get("/gov/service").await?;
    let service = reply.json().context("GET /gov/service")?;
    let identity = service["identity"].as_str().context("gov.service has no identity")?;
    std::fs::write(dir.join(SERVICE_IDENTITY_FILE), identity)
        .with_context(|| format!("writing {}", dir.join(SERVICE_IDENTITY_FILE).display()))
}

/// Waits until every node serves a certificate of the service identity, so that a client that
/// pins `service_identity.pem`, as the usage says, reaches any node: a node serves the operator's
/// until its endorsement has applied there, which on a follower can come after the service opens.
async fn wait_identity_served(layout: &SandboxFile, dir: &Path) -> anyhow::Result<()> {
    let identity = std::fs::read(dir.join(SERVICE_IDENTITY_FILE))?;
    let started = Instant::now();
    for node in &layout.nodes {
        loop {
            let served = match Client::connect(&node.rest_url, &identity, None).await {
                Ok(client) => client.get("/node/health").await.is_ok(),
                Err(_) => false,
            };
            if served {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < NODE_READY_TIMEOUT,
                "{} did not serve the service identity's certificate within {NODE_READY_TIMEOUT:?}",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Waits until every node answers `/node/health` and the first node lists them all as voters,
/// or one of them exits.
async fn wait_ready(layout: &SandboxFile, children: &mut [NodeProcess]) -> anyhow::Result<()> {
    let started = Instant::now();
    let check_exits = |children: &mut [NodeProcess]| -> anyhow::Result<()> {
        for child in children.iter_mut() {
            if let Err(status) = child.check_running() {
                anyhow::bail!(
                    "{} exited ({status}) before it was ready; its log ends:\n{}",
                    child.name,
                    child.log_tail(10)
                );
            }
        }
        Ok(())
    };
    loop {
        check_exits(children)?;
        // Read anew each time: the service identity appears once the first node serves it.
        if network_ready(layout, &layout.client_roots()?).await {
            return Ok(());
        }
        if started.elapsed() > NODE_READY_TIMEOUT {
            let logs: Vec<String> = children.iter().map(|c| format!("{}:\n{}", c.name, c.log_tail(10))).collect();
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
async fn supervise(layout: &SandboxFile, children: &mut [NodeProcess]) {
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
                && let Err(status) = child.check_running()
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
fn stop(children: &mut [NodeProcess]) {
    for child in children.iter() {
        child.request_stop();
    }
    let deadline = Instant::now() + NODE_STOP_TIMEOUT;
    for child in children.iter_mut() {
        if !child.finish_stop(deadline) {
            eprintln!("{} did not stop within {NODE_STOP_TIMEOUT:?} and was killed", child.name);
        }
    }
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
    println!("  service identity (clients pin it; receipts verify against it)  {d}/{SERVICE_IDENTITY_FILE}");
    println!("  operator's service CA (node certificates)  {d}/service.cert.pem");
    let names: Vec<&str> = layout.parties.iter().map(|p| p.name.as_str()).collect();
    println!("  parties  {}  ({d}/<name>.cert.pem, {d}/<name>.key.pem)", names.join(", "));
    if !layout.users.is_empty() {
        let names: Vec<&str> = layout.users.iter().map(|p| p.name.as_str()).collect();
        println!("  users    {}  (the same file names, and {d}/<name>.id: the user's id)", names.join(", "));
    }
    println!("  details  {d}/sandbox.json\n");
    match layout.app {
        SandboxApp::Reconcile => print_reconcile_usage(&exe, dir, layout, first, second),
        SandboxApp::Banking => print_banking_usage(&exe, dir, layout, second),
        SandboxApp::Kv => print_kv_usage(&exe, dir, first),
    }
    println!("gRPC (server reflection is on):");
    println!(
        "  grpcurl -cacert {d}/{SERVICE_IDENTITY_FILE} -cert {d}/{first}.cert.pem -key {d}/{first}.key.pem {} list",
        layout.grpc_url.trim_start_matches("https://")
    );
}

fn print_reconcile_usage(exe: &str, dir: &Path, layout: &SandboxFile, first: &str, second: &str) {
    let d = dir.display();
    println!("Ingest demo data and fetch a report with curl:");
    let curl = |who: &str| {
        format!("curl -s --cacert {d}/{SERVICE_IDENTITY_FILE} --cert {d}/{who}.cert.pem --key {d}/{who}.key.pem")
    };
    println!(
        "  {} -H 'content-type: text/csv' --data-binary @{d}/demo/member0_data.csv {}/app/csv/ingest",
        curl(first),
        layout.rest_url
    );
    println!("  {} {}/app/report\n", curl(first), layout.rest_url);
    println!("or with the cloister command:");
    println!("  {exe} call --sandbox {d} --as {second} POST /app/ingest --data @{d}/demo/member1_data.json");
    println!("  {exe} call --sandbox {d} --as {second} GET /app/report\n");
}

/// The banking demo as commands: a bank opens accounts and deposits, user0 transfers to user1,
/// and proves it with the receipt and the claim.
fn print_banking_usage(exe: &str, dir: &Path, layout: &SandboxFile, bank: &str) {
    let d = dir.display();
    let (Some(u0), Some(u1)) = (layout.users.first(), layout.users.get(1)) else { return };
    let call = |who: &str| format!("{exe} call --sandbox {d} --as {who}");
    println!("The banking demo with the cloister command ({bank} is a bank; user ids are certificate hashes):");
    for user in [u0, u1] {
        println!("  {} PUT /app/account/{}/current", call(bank), user.id);
    }
    println!("  {} POST /app/deposit/{}/current --data '{{\"value\": 100}}'", call(bank), u0.id);
    println!(
        "  {} POST /app/transfer/current --data '{{\"value\": 40, \"user_id_to\": \"{}\", \"account_name_to\": \"current\"}}'",
        call(&u0.name),
        u1.id
    );
    println!("  {} GET /app/balance/current", call(&u0.name));
    println!("then, with the tx id the transfer printed and the claim it answered:");
    println!("  {} GET '/app/receipt?id=TX' > receipt.json", call(&u0.name));
    println!("  {exe} receipt verify receipt.json --service-cert {d}/{SERVICE_IDENTITY_FILE} --claim 'CLAIM'\n");
}

fn print_kv_usage(exe: &str, dir: &Path, first: &str) {
    let d = dir.display();
    println!("Write a value and read it back with the cloister command:");
    println!("  {exe} call --sandbox {d} --as {first} PUT /app/kv/greeting --data 'hello'");
    println!("  {exe} call --sandbox {d} --as {first} GET /app/kv/greeting\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nodes_three_ports_must_exist() {
        ports_fit(65533, 1).expect("65533, 65534 and 65535");
        let e = ports_fit(65534, 1).unwrap_err().to_string();
        assert!(e.contains("the last would be 65536"), "{e}");
        ports_fit(8000, 3).unwrap();
        assert!(ports_fit(65530, 3).is_err());
    }
}
