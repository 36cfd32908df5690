//! A local network on 127.0.0.1: the files its nodes share (service CA, member and user
//! identities, node certificates, configurations) and the node processes themselves. `cloister
//! sandbox` and the integration tests' harness both build their networks with it, so a node is
//! configured and supervised one way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use cloister_crypto::identity::{self, KeyedCert, ServiceCa};
use cloister_node::config::{
    AttestationSection, GenesisAttestation, GenesisMember, GenesisSection, NetworkSection, NodeConfig, NodeSection,
    TlsSection,
};

/// An identity of the network, written to `<name>.cert.pem` and `<name>.key.pem`.
#[derive(Clone)]
pub struct Party {
    pub name: String,
    pub keyed: KeyedCert,
    /// Hex SHA-256 of the certificate: the service's id for it.
    pub id: String,
}

/// Where one node listens: `host:port` for HTTPS, gRPC and its peers.
#[derive(Debug, Clone)]
pub struct NodeAddrs {
    pub rest: String,
    pub grpc: String,
    pub peer: String,
}

impl NodeAddrs {
    /// Three consecutive ports from `first`: HTTPS, gRPC, peers.
    pub(crate) fn from_port(first: u16) -> NodeAddrs {
        let at = |offset: u16| format!("127.0.0.1:{}", first + offset);
        NodeAddrs { rest: at(0), grpc: at(1), peer: at(2) }
    }

    /// Ports the kernel picks when the node binds (an in-process node reports what it got).
    pub fn ephemeral() -> NodeAddrs {
        let any = "127.0.0.1:0".to_owned();
        NodeAddrs { rest: any.clone(), grpc: any.clone(), peer: any }
    }
}

/// The shared files of a local network, all in one folder.
pub struct LocalNetwork {
    pub dir: PathBuf,
    pub ca: ServiceCa,
    pub members: Vec<Party>,
    pub users: Vec<Party>,
    /// The file (in `dir`) the app was written to, when there is one.
    app_file: Option<String>,
    /// Whether configurations name files relative to `dir` (a folder that may move, like the
    /// sandbox's) or by absolute path.
    relative_paths: bool,
}

impl LocalNetwork {
    /// Writes a new service CA, `members` members (`member0`, …) and `users` users (`user0`, …),
    /// and the app (file name and code), if any, into `dir`.
    pub fn create(
        dir: &Path,
        service_name: &str,
        members: usize,
        users: usize,
        app: Option<(&str, &[u8])>,
        relative_paths: bool,
    ) -> anyhow::Result<LocalNetwork> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = ServiceCa::generate(service_name)?;
        ca.keyed.write(dir, "service")?;
        let parties = |prefix: &str, n: usize| -> anyhow::Result<Vec<Party>> {
            (0..n)
                .map(|i| {
                    let name = format!("{prefix}{i}");
                    let keyed = identity::generate_identity(&name)?;
                    keyed.write(dir, &name)?;
                    Ok(Party { id: keyed.id()?, name, keyed })
                })
                .collect()
        };
        let (members, users) = (parties("member", members)?, parties("user", users)?);
        // Every member is a recovery member: it gets an encryption key for its recovery share.
        for member in &members {
            cloister_crypto::envelope::write_key_pair(dir, &member.name)?;
        }
        if let Some((file, code)) = app {
            std::fs::write(dir.join(file), code).with_context(|| format!("writing {file}"))?;
        }
        let app_file = app.map(|(file, _)| file.to_owned());
        Ok(LocalNetwork { dir: dir.to_owned(), ca, members, users, app_file, relative_paths })
    }

    /// A path as configurations name it.
    fn path(&self, file: impl AsRef<Path>) -> PathBuf {
        if self.relative_paths { file.as_ref().to_owned() } else { self.dir.join(file) }
    }

    pub fn service_cert_pem(&self) -> &str {
        &self.ca.keyed.cert_pem
    }

    /// Issues node `name`'s certificate (written beside the others) and returns its
    /// configuration: data in `data/<name>`, genesis with every member and user and the app, and
    /// `join` (a peer URL) for every node but the first. Callers adjust the rest.
    pub fn node_config(
        &self,
        name: &str,
        addrs: &NodeAddrs,
        join: Option<String>,
        attestation: AttestationSection,
    ) -> anyhow::Result<NodeConfig> {
        self.ca.issue_node_cert(name, &["localhost".into(), "127.0.0.1".into()])?.write(&self.dir, name)?;
        let certs = |parties: &[Party]| parties.iter().map(|p| self.path(format!("{}.cert.pem", p.name))).collect();
        Ok(NodeConfig {
            node: NodeSection {
                name: name.to_owned(),
                data_dir: self.path(Path::new("data").join(name)),
                rest_addr: addrs.rest.clone(),
                grpc_addr: addrs.grpc.clone(),
                peer_addr: addrs.peer.clone(),
            },
            tls: TlsSection {
                service_cert: self.path("service.cert.pem"),
                node_cert: self.path(format!("{name}.cert.pem")),
                node_key: self.path(format!("{name}.key.pem")),
            },
            network: NetworkSection { join, recover: None },
            genesis: GenesisSection {
                members: self
                    .members
                    .iter()
                    .map(|m| GenesisMember::Recovery {
                        cert: self.path(format!("{}.cert.pem", m.name)),
                        encryption_key: self.path(format!("{}.enc.pub.pem", m.name)),
                    })
                    .collect(),
                recovery_threshold: None,
                users: certs(&self.users),
                app: self.app_file.as_ref().map(|f| self.path(f)),
                constitution: None,
                attestation: GenesisAttestation::Mock,
            },
            attestation,
            limits: Default::default(),
            ledger: Default::default(),
            gov: Default::default(),
            raft: Default::default(),
            wasm: Default::default(),
        })
    }

    /// Writes `config` to `<name>.toml` in the folder, for `cloister node start --config`.
    pub fn write_config(&self, config: &NodeConfig) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{}.toml", config.node.name));
        std::fs::write(&path, config.to_toml()).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Mock attestation with the firmware root in `mock_root` (see `cloister_attestation::mock`).
pub fn mock_attestation(mock_root: PathBuf) -> AttestationSection {
    AttestationSection { kind: cloister_attestation::Kind::Mock, mock_root: Some(mock_root), ..Default::default() }
}

/// One node as a process of `cloister node start`, logging to its own file.
#[derive(Debug)]
pub struct NodeProcess {
    pub name: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    pub fn new(name: &str, config_path: PathBuf, log_path: PathBuf) -> NodeProcess {
        NodeProcess { name: name.to_owned(), config_path, log_path, child: None }
    }

    /// Starts the node with `exe` (a `cloister` binary), appending to its log. `extra_args` follow
    /// `node start --config FILE`. The kernel stops the node if this process dies.
    pub fn spawn(&mut self, exe: &Path, extra_args: &[String], env: &[(&str, &str)]) -> anyhow::Result<u32> {
        self.spawn_as(exe, "start", extra_args, env)
    }

    /// As [`NodeProcess::spawn`], with another `node` subcommand that takes `--config` (such as
    /// `recover`).
    pub fn spawn_as(
        &mut self,
        exe: &Path,
        subcommand: &str,
        extra_args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let mut command = Command::new(exe);
        command
            .args(["node", subcommand, "--config"])
            .arg(&self.config_path)
            .args(extra_args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        stop_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("starting {}", self.name))?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs; an exit is reported as `Err` with its status.
    pub fn check_running(&mut self) -> Result<bool, String> {
        match self.child.as_mut().map(Child::try_wait) {
            None => Ok(false),
            Some(Ok(None)) => Ok(true),
            Some(Ok(Some(status))) => Err(status.to_string()),
            Some(Err(e)) => Err(e.to_string()),
        }
    }

    /// SIGKILL: the node dies at once, mid-whatever.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the node to stop (SIGTERM), without waiting.
    pub(crate) fn request_stop(&self) {
        if let Some(child) = &self.child {
            terminate(child);
        }
    }

    /// Waits until `deadline` for a node asked to stop to exit, then kills it. Whether it
    /// stopped by itself.
    pub(crate) fn finish_stop(&mut self, deadline: Instant) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Asks the node to stop (SIGTERM); waits up to `timeout`, then kills it. Whether it stopped
    /// by itself.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.request_stop();
        self.finish_stop(Instant::now() + timeout)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last lines of the log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
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

/// Asks the kernel to stop a node when its parent dies, however it dies (a `kill -9` of the
/// sandbox or a test must not leave nodes running on its ports).
#[cfg(target_os = "linux")]
fn stop_with_parent(command: &mut Command) {
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
fn stop_with_parent(_: &mut Command) {}
