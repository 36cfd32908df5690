//! The two systems under test, each started fresh in a temporary folder and stopped on drop:
//! an etcd cluster with TLS and client certificates, and a Cloister sandbox.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use cloister_crypto::identity::{self, KeyedCert, ServiceCa};

use crate::Mode;
use crate::etcdserverpb::StatusRequest;
use crate::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::load::Target;

/// How long a fresh network may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Lines of what a sandbox said that its start error shows.
const SAID_LINES: usize = 12;

/// An etcd cluster of one process per member on 127.0.0.1: TLS on client and peer ports, client
/// certificates required on both, fsync on (etcd's default).
pub struct Etcd {
    _dir: tempfile::TempDir,
    children: Vec<Child>,
    client_urls: Vec<String>,
    target: Target,
}

impl Etcd {
    pub async fn start(bin: &Path, members: usize, first_port: u16) -> anyhow::Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_owned();
        let d = d.as_path();
        let ca = ServiceCa::generate("etcd benchmark CA")?;
        ca.keyed.write(d, "ca")?;
        let local = ["127.0.0.1".to_owned(), "localhost".to_owned()];
        let url = |port: u16| format!("https://127.0.0.1:{port}");
        let ports: Vec<(u16, u16)> =
            (0..members).map(|i| (first_port + 2 * i as u16, first_port + 2 * i as u16 + 1)).collect();
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}={}", url(*peer))).collect();
        let client = ca.issue_node_cert("benchmark client", &local)?;
        let target = Target { ca_pem: ca.keyed.cert_pem.clone().into_bytes(), identities: vec![client] };
        let client_urls = ports.iter().map(|(c, _)| url(*c)).collect();
        // Built first, so that its Drop stops every member started, whatever fails later.
        let mut etcd = Etcd { _dir: dir, children: Vec::new(), client_urls, target };
        for (i, (client, peer)) in ports.iter().enumerate() {
            ca.issue_node_cert(&format!("etcd{i}"), &local)?.write(d, &format!("etcd{i}"))?;
            let file = |name: String| d.join(name).display().to_string();
            let (cert, key) = (file(format!("etcd{i}.cert.pem")), file(format!("etcd{i}.key.pem")));
            let log = std::fs::File::create(d.join(format!("etcd{i}.log")))?;
            let child = Command::new(bin)
                .args(["--name", &format!("e{i}"), "--data-dir", &file(format!("e{i}.data"))])
                .args(["--listen-client-urls", &url(*client), "--advertise-client-urls", &url(*client)])
                .args(["--listen-peer-urls", &url(*peer), "--initial-advertise-peer-urls", &url(*peer)])
                .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
                .args(["--client-cert-auth", "--trusted-ca-file", &file("ca.cert.pem".into())])
                .args(["--cert-file", &cert, "--key-file", &key])
                .args(["--peer-client-cert-auth", "--peer-trusted-ca-file", &file("ca.cert.pem".into())])
                .args(["--peer-cert-file", &cert, "--peer-key-file", &key])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} (Debian: apt-get install etcd-server)", bin.display()))?;
            etcd.children.push(child);
        }
        let started = Instant::now();
        while etcd.leader().await.is_err() {
            anyhow::ensure!(started.elapsed() < READY_TIMEOUT, "etcd did not elect a leader within {READY_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(etcd)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Each member's process.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// The client URL of the member that leads (etcd's Status names the leader's member id).
    async fn leader(&self) -> anyhow::Result<String> {
        for url in &self.client_urls {
            let channel =
                cloister_client::grpc_channel(url, &self.target.ca_pem, Some(&self.target.identities[0])).await?;
            let status = MaintenanceClient::new(channel).status(StatusRequest {}).await?.into_inner();
            let me = status.header.context("a Status without a header")?.member_id;
            if status.leader != 0 && status.leader == me {
                return Ok(url.clone());
            }
        }
        anyhow::bail!("no member leads yet")
    }

    pub async fn urls(&self, mode: Mode) -> anyhow::Result<Vec<String>> {
        Ok(match mode {
            Mode::Leader => vec![self.leader().await?],
            Mode::Spread => self.client_urls.clone(),
            Mode::Follower => {
                let leader = self.leader().await?;
                let follower = self.client_urls.iter().find(|u| **u != leader).context("no member follows")?;
                vec![follower.clone()]
            }
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `cloister sandbox` of N nodes with one app, started by the given binary.
pub struct Sandbox {
    _root: tempfile::TempDir,
    child: Child,
    rest_url: String,
    nodes_grpc: Vec<String>,
    /// Each node's process, as the sandbox started it.
    node_pids: Vec<u32>,
    target: Target,
}

impl Sandbox {
    /// `settings` go to every node (`cloister sandbox --set NAME=VALUE`).
    pub async fn start(bin: &Path, nodes: usize, port: u16, app: &str, settings: &[String]) -> anyhow::Result<Sandbox> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("sandbox");
        // What the sandbox says goes to a file beside its folder, for the error if it never gets
        // ready (a refused `--set`, a port in use).
        let said = root.path().join("sandbox.stderr");
        let mut child = Command::new(bin)
            .args(["sandbox", "--nodes", &nodes.to_string(), "--port", &port.to_string(), "--app", app, "--dir"])
            .arg(&dir)
            .args(settings.iter().flat_map(|s| ["--set", s.as_str()]))
            .env("CLOISTER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&said)?)
            .spawn()
            .with_context(|| format!("starting {} sandbox", bin.display()))?;
        // The sandbox prints its usage, ending with the grpcurl line, once every node is ready.
        let stdout = child.stdout.take().context("the sandbox's stdout")?;
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains("grpcurl"))
        });
        match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(Ok(true)) => {}
            _ => {
                let _ = child.kill();
                let said = std::fs::read_to_string(&said).unwrap_or_default();
                let lines: Vec<&str> = said.lines().collect();
                let tail = lines[lines.len().saturating_sub(SAID_LINES)..].join("\n");
                anyhow::bail!("the {nodes}-node {app} sandbox did not become ready; it said:\n{tail}");
            }
        }
        let file: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("sandbox.json"))?)?;
        let ca_pem = std::fs::read(dir.join("service_identity.pem"))?;
        let identities = file["parties"]
            .as_array()
            .context("sandbox.json lists no parties")?
            .iter()
            .map(|p| {
                let path = |k: &str| std::path::PathBuf::from(p[k].as_str().unwrap_or_default());
                identity::read_pair(&path("cert"), &path("key"))
            })
            .collect::<anyhow::Result<Vec<KeyedCert>>>()?;
        let listed = file["nodes"].as_array().context("sandbox.json lists no nodes")?;
        let nodes_grpc = listed.iter().filter_map(|n| n["grpc_url"].as_str().map(str::to_owned)).collect();
        let node_pids = listed
            .iter()
            .map(|n| {
                n["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).context("sandbox.json has a node without a pid")
            })
            .collect::<anyhow::Result<_>>()?;
        let rest_url = file["rest_url"].as_str().context("sandbox.json has no rest_url")?.to_owned();
        Ok(Sandbox { _root: root, child, rest_url, nodes_grpc, node_pids, target: Target { ca_pem, identities } })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Each node's process, in the sandbox's order (`n0`, `n1`, …).
    pub fn pids(&self) -> Vec<u32> {
        self.node_pids.clone()
    }

    pub async fn urls(&self, mode: Mode) -> anyhow::Result<Vec<String>> {
        if mode == Mode::Spread {
            return Ok(self.nodes_grpc.clone());
        }
        let client = cloister_client::Client::connect(&self.rest_url, &self.target.ca_pem, None).await?;
        let network = client.get("/node/network").await?.json()?;
        let leader = network["leader"].as_str().context("no leader")?;
        let nodes = network["nodes"].as_array().context("no node list")?;
        let node = match mode {
            Mode::Follower => nodes.iter().find(|n| n["id"] != leader).context("no node follows")?,
            Mode::Leader | Mode::Spread => {
                nodes.iter().find(|n| n["id"] == leader).context("the leader is not in the node list")?
            }
        };
        Ok(vec![node["grpc_url"].as_str().context("the node has no gRPC URL")?.to_owned()])
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Ctrl-C, as a user stops the sandbox: it stops its nodes cleanly.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) with a valid signal, on our own child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
