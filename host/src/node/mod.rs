//! The node's lifecycle: open its state, run genesis on a new service, start the listeners, and
//! stop cleanly.

pub mod identity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{NodeInfo, Service, rest, server, tls};
use crate::config::NodeConfig;
use crate::gov;
use crate::kv::Store;
use crate::wasm::Runtime;

/// A running node.
pub struct Node {
    pub rest_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    service: Arc<Service>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens the node's state (running genesis if it is new) and starts serving.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        std::fs::create_dir_all(&config.node.data_dir).with_context(|| {
            format!(
                "creating the data folder {}",
                config.node.data_dir.display()
            )
        })?;
        let store = Store::open(&config.node.data_dir.join("state.redb"))?;
        let runtime = Arc::new(Runtime::new(config.wasm.clone())?);
        let service_cert =
            std::fs::read_to_string(&config.tls.service_cert).with_context(|| {
                format!(
                    "reading the service certificate {}",
                    config.tls.service_cert.display()
                )
            })?;
        if gov::service(&store.begin()?)?.is_none() {
            genesis(&config, &store, &runtime, &service_cert)?;
        }
        let node_cert = identity::read_pair(&config.tls.node_cert, &config.tls.node_key)?;
        let tls = tls::server_config(&node_cert, &service_cert)?;

        let rest_listener = bind(&config.node.rest_addr).await?;
        let grpc_listener = bind(&config.node.grpc_addr).await?;
        let (rest_addr, grpc_addr) = (rest_listener.local_addr()?, grpc_listener.local_addr()?);
        let info = NodeInfo {
            name: config.node.name.clone(),
            rest_url: format!("https://{rest_addr}"),
            grpc_url: format!("https://{grpc_addr}"),
        };
        let service = Arc::new(Service::new(runtime, store, config.limits.clone(), info)?);
        let cancel = CancellationToken::new();
        let limits = &config.limits;
        let handshake = Duration::from_millis(limits.handshake_timeout_ms);

        let conns = server::accept(
            rest_listener,
            tls.clone(),
            limits.connections_max,
            handshake,
            cancel.clone(),
        );
        let rest = tokio::spawn(server::serve_http(
            conns,
            rest::router(service.clone()),
            cancel.clone(),
        ));

        let conns = server::accept(
            grpc_listener,
            tls,
            limits.connections_max,
            handshake,
            cancel.clone(),
        );
        let routes = crate::api::grpc::routes(service.clone())?;
        let stop = cancel.clone();
        let grpc = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::ReceiverStream::new(conns);
            let served = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the gRPC server failed");
            }
        });
        tracing::info!(name = %config.node.name, %rest_addr, %grpc_addr, "node started");
        Ok(Node {
            rest_addr,
            grpc_addr,
            service,
            cancel,
            tasks: vec![rest, grpc],
        })
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    pub fn rest_url(&self) -> String {
        format!("https://{}", self.rest_addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("https://{}", self.grpc_addr)
    }

    /// A token that stops the node when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops accepting, lets open requests finish, waits for the listeners to close, and closes
    /// the state, so the data folder can be reopened as soon as this returns.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        // The listeners held the other references; dropping the last one joins the writer thread
        // and closes the databases, which blocks, so it happens off the async threads.
        let mut service = self.service;
        for _ in 0..100 {
            match Arc::try_unwrap(service) {
                Ok(s) => {
                    let _ = tokio::task::spawn_blocking(move || drop(s)).await;
                    tracing::info!("node stopped");
                    return;
                }
                Err(still_shared) => {
                    service = still_shared;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tracing::warn!("node stopped, but its service was still referenced after 5 s");
    }
}

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))
}

/// Writes the genesis transaction: the members, the users, the app and the service record.
fn genesis(
    config: &NodeConfig,
    store: &Store,
    runtime: &Runtime,
    service_cert: &str,
) -> anyhow::Result<()> {
    let read_ids = |paths: &[std::path::PathBuf]| -> anyhow::Result<Vec<(String, String)>> {
        paths
            .iter()
            .map(|p| {
                let pem = std::fs::read_to_string(p)
                    .with_context(|| format!("reading genesis certificate {}", p.display()))?;
                Ok((
                    identity::id_of_pem(pem.as_bytes()).with_context(|| p.display().to_string())?,
                    pem,
                ))
            })
            .collect()
    };
    let app = match &config.genesis.app {
        None => None,
        Some(path) => {
            let wasm = std::fs::read(path)
                .with_context(|| format!("reading the genesis app {}", path.display()))?;
            let module = runtime
                .load(&wasm)
                .with_context(|| format!("the genesis app {} is refused", path.display()))?;
            Some((wasm, module.manifest().clone()))
        }
    };
    let genesis = gov::Genesis {
        service_cert: service_cert.to_owned(),
        members: read_ids(&config.genesis.members)?,
        users: read_ids(&config.genesis.users)?,
        app,
        state: gov::ServiceState::Open,
    };
    store.apply(&genesis.write_set())?;
    tracing::info!(
        members = genesis.members.len(),
        users = genesis.users.len(),
        "genesis written"
    );
    Ok(())
}
