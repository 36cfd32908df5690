//! Shared harness for Cloister's integration tests: services on 127.0.0.1 with real TLS, real
//! client certificates, and the clients to reach them.

pub mod cluster;
pub mod conformance;
pub mod grpc;
pub mod metrics;
pub mod ports;

use std::path::PathBuf;

use cloister_cli::local::{LocalNetwork, NodeAddrs};
use cloister_client::Client;
use cloister_crypto::identity::{self, KeyedCert};
use cloister_node::Node;
use cloister_node::config::{Limits, NodeConfig};

/// An identity the tests act as: the local network's own party type.
pub use cloister_cli::local::Party as Identity;

/// An identity that is no party of any network yet (a stranger, a member to be).
pub fn new_identity(name: &str) -> Identity {
    let keyed = identity::generate_identity(name).expect("identity");
    let id = keyed.id().expect("id");
    Identity { name: name.to_owned(), keyed, id }
}

/// A one-node service in a temporary folder, listening on ephemeral loopback ports.
pub struct TestService {
    pub dir: tempfile::TempDir,
    pub members: Vec<Identity>,
    pub users: Vec<Identity>,
    pub config: NodeConfig,
    /// What clients pin: the service identity's certificate (not the operator's CA).
    pub ca_pem: Vec<u8>,
    node: Option<Node>,
}

impl TestService {
    /// Starts a service with `members` members, `users` users and the given app installed.
    pub async fn start(members: usize, users: usize, app: &[u8], limits: Limits) -> TestService {
        Self::start_with(members, users, app, |c| c.limits = limits).await
    }

    /// As [`TestService::start`], letting `configure` adjust the node's configuration. The
    /// members vote the service open, as they would in production.
    pub async fn start_with(
        members: usize,
        users: usize,
        app: &[u8],
        configure: impl FnOnce(&mut NodeConfig),
    ) -> TestService {
        let service = Self::start_opening(members, users, app, configure).await;
        open_service(&service.member(0).await, &service.members).await;
        service
    }

    /// A service just after genesis: still Opening, so app calls are refused.
    pub async fn start_opening(
        members: usize,
        users: usize,
        app: &[u8],
        configure: impl FnOnce(&mut NodeConfig),
    ) -> TestService {
        let dir = tempfile::tempdir().expect("temp dir");
        let network = LocalNetwork::create(dir.path(), "test service", members, users, Some(("app.wasm", app)), false)
            .expect("the network's files are written");
        let mut config = network
            .node_config("node0", &NodeAddrs::ephemeral(), None, mock_attestation())
            .expect("node0's certificate and configuration");
        configure(&mut config);
        let node = Node::start(config.clone()).await.expect("node starts");
        // Clients pin the service identity alone, as in production: the node serves a certificate
        // from it from its first client handshake, and wrote the identity's certificate out.
        let identity = config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE);
        let ca_pem = std::fs::read(&identity).expect("the first node wrote the service identity's certificate");
        TestService { dir, members: network.members, users: network.users, config, ca_pem, node: Some(node) }
    }

    /// The id governance requests to this service are signed for: the hex SHA-256 of its
    /// identity certificate, which clients pin.
    pub fn service_id(&self) -> String {
        cloister_crypto::identity::id_of_pem(&self.ca_pem).expect("the service identity's certificate")
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("the node is running")
    }

    pub fn rest_url(&self) -> String {
        self.node().rest_url()
    }

    pub fn grpc_url(&self) -> String {
        self.node().grpc_url()
    }

    /// An HTTPS client presenting `who` (or no certificate).
    pub async fn client(&self, who: Option<&KeyedCert>) -> Client {
        Client::connect(&self.rest_url(), &self.ca_pem, who).await.expect("client connects")
    }

    pub async fn member(&self, i: usize) -> Client {
        self.client(Some(&self.members[i].keyed)).await
    }

    /// Stops the node and starts it again on the same data folder.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.node = Some(Node::start(self.config.clone()).await.expect("node restarts"));
    }

    pub async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }
}

/// Has member 0 propose `transition_service_to_open` and the members approve it.
pub async fn open_service(client: &Client, members: &[Identity]) {
    let voters: Vec<&KeyedCert> = members.iter().map(|m| &m.keyed).collect();
    let actions = serde_json::json!([{ "name": "transition_service_to_open" }]);
    let (id, state) = client.pass(voters[0], &voters, actions).await.expect("the opening proposal is handled");
    assert_eq!(state["state"], "Accepted", "opening proposal {id}: {state}");
}

/// The `cloister` command line built by this crate (`cloister-test-cli`): integration tests run
/// from `target/<profile>/deps/`, and cargo puts the binary one folder up.
pub fn cli_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps/<test>");
    let cli = dir.join(format!("cloister-test-cli{}", std::env::consts::EXE_SUFFIX));
    assert!(cli.exists(), "{} is missing: it is built with this crate's tests", cli.display());
    cli
}

/// Path of a test contract built by the host's build script.
pub fn misbehave_wasm() -> Vec<u8> {
    std::fs::read(cloister_test_artifacts::MISBEHAVE_PATH).expect("misbehave.wasm was built")
}

/// The folder of this test process's mock SNP firmware root (test ARK and ASK), generated once.
pub fn mock_root_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        cloister_attestation::mock::MockRoot::generate().write(dir.path()).expect("writing the mock root");
        dir
    });
    dir.path().to_path_buf()
}

/// Mock attestation with this process's test root and the default measurement.
pub fn mock_attestation() -> cloister_node::config::AttestationSection {
    cloister_cli::local::mock_attestation(mock_root_dir())
}

/// `cloister ledger verify DIR --service-cert CERT`, as an auditor runs it: whether it passed, and
/// what it printed.
pub fn ledger_verify(dir: &std::path::Path, service_cert: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(cli_exe())
        .args(["ledger", "verify"])
        .arg(dir)
        .arg("--service-cert")
        .arg(service_cert)
        .output()
        .expect("the CLI runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
