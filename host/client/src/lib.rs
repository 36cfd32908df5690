//! A client for a node's HTTPS and gRPC endpoints, with the service CA pinned and an optional
//! client identity. The CLI, the sandbox, the benchmarks and the tests all use it.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;

use cloister_crypto::cose::GovWrite;
pub use cloister_crypto::cose::unix_now;
use cloister_crypto::cose::{self, MsgType};
use cloister_crypto::identity::KeyedCert;
use cloister_crypto::tls;

/// An HTTP/2 connection to one node; cheap to clone, and clones share the connection. A
/// connection the node has closed (an idle one, after `idle_connection_timeout_ms`) is opened
/// again for the next request.
#[derive(Clone)]
pub struct Client {
    connection: std::sync::Arc<std::sync::Mutex<Connection>>,
    dialer: std::sync::Arc<Dialer>,
}

/// One connection to a node: where its requests go, and the certificate chain the node served
/// on it (its own certificate first).
#[derive(Clone)]
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    served: std::sync::Arc<Vec<Vec<u8>>>,
}

/// Marks a request's failure that came before any of it reached the connection: sending it
/// again cannot apply it twice. Every other failure of a write leaves its outcome unknown.
#[derive(Debug, Clone, Copy)]
pub struct NotSent;

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request was not sent")
    }
}

/// Whether `e`, a failure from [`Client::request`] or [`Client::connect`], came before the
/// request reached the connection.
pub fn not_sent(e: &anyhow::Error) -> bool {
    e.downcast_ref::<NotSent>().is_some()
}

/// How long opening a connection to a node may take, its TCP, TLS and HTTP/2 handshakes
/// together: a node that accepts connections but never answers (stopped, wedged) fails the
/// connection, so that a caller moves on rather than wait for good.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a connection with a request waiting pings the node (HTTP/2 PING), and how long the
/// node has to answer: a node that stops answering (stopped, wedged) fails the requests waiting
/// on it within about the two together, while a node that is alive and slow is waited for (its
/// own `request_timeout_ms` answers those). An idle connection is not pinged.
pub const KEEPALIVE: (std::time::Duration, std::time::Duration) =
    (std::time::Duration::from_secs(10), std::time::Duration::from_secs(10));

/// How to open a connection to one node.
struct Dialer {
    authority: String,
    server_name: ServerName<'static>,
    config: std::sync::Arc<rustls::ClientConfig>,
    local: Option<std::net::SocketAddr>,
    /// [`CONNECT_TIMEOUT`], but for tests.
    timeout: std::time::Duration,
    /// [`KEEPALIVE`], but for tests.
    keepalive: (std::time::Duration, std::time::Duration),
    /// The ids of the certificates the client trusts: the service identities it may sign for.
    anchors: Vec<String>,
}

impl Dialer {
    async fn dial(&self) -> anyhow::Result<Connection> {
        let authority = &self.authority;
        tokio::time::timeout(self.timeout, self.handshakes()).await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!("{authority} did not complete a connection within {:?}", self.timeout))
        })
    }

    async fn handshakes(&self) -> anyhow::Result<Connection> {
        let authority = &self.authority;
        let connecting = async {
            let Some(local) = self.local else { return tokio::net::TcpStream::connect(authority).await };
            let remote = tokio::net::lookup_host(authority)
                .await?
                .find(|a| a.is_ipv4() == local.is_ipv4())
                .ok_or_else(|| std::io::Error::other(format!("{authority} has no address of {local}'s family")))?;
            let socket =
                if local.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(local)?;
            socket.connect(remote).await
        };
        let tcp = connecting.await.with_context(|| format!("connecting to {authority}"))?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS handshake with {authority}"))?;
        let served = tls.get_ref().1.peer_certificates().unwrap_or_default().iter().map(|c| c.to_vec()).collect();
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keepalive.0)
            .keep_alive_timeout(self.keepalive.1)
            .handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("HTTP/2 handshake with {authority}"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "client connection closed");
            }
        });
        Ok(Connection { sender, served: std::sync::Arc::new(served) })
    }
}

/// A response: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// HTTP/2 trailers (gRPC puts its status there).
    pub trailers: Option<http::HeaderMap>,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("the body is not JSON: {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The transaction id of a committed write.
    pub fn tx_id(&self) -> Option<String> {
        let v = self.headers.get(cloister_proto::TX_ID_HEADER)?;
        Some(v.to_str().ok()?.to_owned())
    }
}

/// `host:port` and the TLS server name of an `https://` URL.
fn endpoint(url: &str) -> anyhow::Result<(String, ServerName<'static>)> {
    let uri: http::Uri = url.parse().with_context(|| format!("{url} is not a URL"))?;
    anyhow::ensure!(uri.scheme_str() == Some("https"), "{url}: only https:// URLs are supported");
    let host = uri.host().with_context(|| format!("{url} names no host"))?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(host.clone()).with_context(|| format!("{host} is not a valid server name"))?;
    // An IPv6 literal keeps its brackets in the authority, as URLs and socket addresses write it.
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok((authority, name))
}

impl Client {
    /// Connects to `https://host:port`, trusting only the service CA, presenting `identity`.
    pub async fn connect(url: &str, service_ca_pem: &[u8], identity: Option<&KeyedCert>) -> anyhow::Result<Client> {
        Client::connect_from(url, service_ca_pem, identity, None).await
    }

    /// As [`Client::connect`], from local address `local` (an IP with port 0 picks any port).
    pub async fn connect_from(
        url: &str,
        service_ca_pem: &[u8],
        identity: Option<&KeyedCert>,
        local: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<Client> {
        let (authority, server_name) = endpoint(url)?;
        let config = tls::client_config(service_ca_pem, identity, true)?;
        let anchors = cloister_crypto::identity::ids_of_pem(service_ca_pem)?;
        let dialer =
            Dialer { authority, server_name, config, local, timeout: CONNECT_TIMEOUT, keepalive: KEEPALIVE, anchors };
        let connection = dialer.dial().await.context(NotSent)?;
        Ok(Client {
            connection: std::sync::Arc::new(std::sync::Mutex::new(connection)),
            dialer: std::sync::Arc::new(dialer),
        })
    }

    /// The shared connection, ready for a request; opened again if the node has closed it.
    /// Nothing was sent on a closed one, so opening another cannot repeat a request.
    async fn ready_connection(&self) -> anyhow::Result<Connection> {
        let mut connection = self.shared().clone();
        if connection.sender.ready().await.is_err() {
            connection = self.dialer.dial().await.context("the connection to the node was closed; opening another")?;
            *self.shared() = connection.clone();
            connection.sender.ready().await.context("the connection to the node is closed")?;
        }
        Ok(connection)
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one request; `target` is a path with an optional query.
    pub async fn request(
        &self,
        method: &str,
        target: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let headers: Vec<(&str, &str)> = content_type.map(|ct| vec![("content-type", ct)]).unwrap_or_default();
        self.request_with_headers(method, target, &headers, body).await
    }

    /// Sends one request with extra headers.
    pub async fn request_with_headers(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut req = http::Request::builder().method(method).uri(format!("https://{}{target}", self.dialer.authority));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(body.into())).context("building the request").context(NotSent)?;
        let connection = self.ready_connection().await.context(NotSent)?;
        send_on(connection.sender, req).await
    }

    /// `GET /gov/service` on `connection`: the id of the service the node names, and whether
    /// the node served that connection a certificate from the service's identity.
    async fn named_on(&self, connection: &Connection) -> anyhow::Result<(String, bool)> {
        let uri = format!("https://{}/gov/service", self.dialer.authority);
        let req = http::Request::get(uri).body(Full::new(Bytes::new())).context("building the request")?;
        let reply = send_on(connection.sender.clone(), req).await?;
        anyhow::ensure!(reply.status == 200, "/gov/service refused ({}): {}", reply.status, reply.text());
        let id = service_id_of(&reply.json()?)?;
        let served = cloister_crypto::identity::served_by_identity(&connection.served, &id);
        Ok((id, served))
    }

    pub async fn get(&self, target: &str) -> anyhow::Result<Reply> {
        self.request("GET", target, None, Bytes::new()).await
    }

    pub async fn post(&self, target: &str, content_type: &str, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        self.request("POST", target, Some(content_type), body).await
    }
}

/// Sends `req` on a connection.
async fn send_on(mut sender: SendRequest<Full<Bytes>>, req: http::Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let response = match sender.try_send_request(req).await {
        Ok(response) => response,
        Err(mut e) => {
            // hyper hands back a request that never reached the connection.
            let unsent = e.take_message().is_some();
            let failed = anyhow::Error::new(e.into_error()).context("sending the request");
            return Err(if unsent { failed.context(NotSent) } else { failed });
        }
    };
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.context("reading the response")?;
    let trailers = collected.trailers().cloned();
    Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body: collected.to_bytes(), trailers })
}

/// The content type of signed governance requests.
pub const COSE_CONTENT_TYPE: &str = "application/cose";

impl Client {
    /// The id of the service this node serves (the hex SHA-256 of its identity certificate's
    /// DER, from `GET /gov/service`): what a governance request is signed for. Read for each
    /// request, since a recovery gives a service a new identity.
    ///
    /// The identity must be one the client trusts, and the node must serve a certificate from
    /// it: a client that trusts more than the identity (the operator's CA too) could otherwise be
    /// told another service's id by a node the operator runs, and sign a request that service
    /// would take. Trusting the identity is not implied by the handshake: a certificate of the
    /// identity's name and key that another trusted CA issued gives the node a path past it.
    /// The answer and the certificate are the same connection's; a node endorsed after the
    /// connection opened is asked again on a new one.
    pub async fn service_id(&self) -> anyhow::Result<String> {
        let (id, served) = self.named_on(&self.ready_connection().await?).await?;
        anyhow::ensure!(
            self.dialer.anchors.contains(&id),
            "the node names service {id}, whose identity this client was not given: to sign for that service, \
             pin its identity's certificate (its service_identity.pem)"
        );
        if served {
            return Ok(id);
        }
        let fresh = self.dialer.dial().await?;
        *self.shared() = fresh.clone();
        let (id, served) = self.named_on(&fresh).await?;
        anyhow::ensure!(
            served,
            "the node names service {id}, but does not serve a certificate from that service's identity, so a \
             request signed for it could be taken to that service: pin the service identity's certificate \
             (service_identity.pem), not the operator's CA, or ask a node the service has endorsed"
        );
        Ok(id)
    }

    /// The service's record, `GET /gov/service`.
    pub async fn service_record(&self) -> anyhow::Result<serde_json::Value> {
        let reply = self.get("/gov/service").await?;
        anyhow::ensure!(reply.status == 200, "/gov/service refused ({}): {}", reply.status, reply.text());
        reply.json()
    }

    /// Signs `payload` as `who` for a governance write (created now) to this node's service, and
    /// sends it.
    pub async fn gov(&self, who: &KeyedCert, write: &GovWrite, payload: &serde_json::Value) -> anyhow::Result<Reply> {
        let signed = self.sign_gov(who, write, payload).await?;
        self.post(&write.path(), COSE_CONTENT_TYPE, signed).await
    }

    /// Signs `payload` as `who` for a governance write (created now) to this node's service.
    pub async fn sign_gov(
        &self,
        who: &KeyedCert,
        write: &GovWrite,
        payload: &serde_json::Value,
    ) -> anyhow::Result<Vec<u8>> {
        sign_gov(who, write, payload, next_created_at(&who.id()?), &self.service_id().await?)
    }

    /// As [`Client::gov`], failing unless the node accepts the request; returns its JSON answer.
    pub async fn gov_ok(
        &self,
        who: &KeyedCert,
        write: &GovWrite,
        payload: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let reply = self.gov(who, write, payload).await?;
        anyhow::ensure!(reply.status == 200, "{} refused ({}): {}", write.path(), reply.status, reply.text());
        reply.json()
    }

    /// Proposes `actions` as `proposer`, then has each of `voters` approve until the proposal is
    /// no longer Open. Returns the proposal's id and final JSON state.
    pub async fn pass(
        &self,
        proposer: &KeyedCert,
        voters: &[&KeyedCert],
        actions: serde_json::Value,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        let answer = self.gov_ok(proposer, &GovWrite::Propose, &serde_json::json!({ "actions": actions })).await?;
        let id = answer["proposal_id"].as_str().context("the proposal answer names no proposal_id")?.to_owned();
        let mut state = answer;
        for voter in voters {
            if state["state"] != "Open" {
                break;
            }
            state = self.gov_ok(voter, &GovWrite::Vote(id.clone()), &serde_json::json!({ "approve": true })).await?;
        }
        Ok((id, state))
    }
}

/// The `created_at` for `signer`'s next request from this process: the clock, but always after
/// the last one this process signed for that signer. A request's identity is what was signed, so
/// two requests with the same content signed within one second would otherwise be one request
/// (the second a replay); this keeps a member's tool from losing a request to timing.
pub fn next_created_at(signer: &str) -> u64 {
    static LAST: std::sync::Mutex<Option<std::collections::HashMap<String, u64>>> = std::sync::Mutex::new(None);
    let now = unix_now();
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let entry = last.get_or_insert_with(Default::default).entry(signer.to_owned()).or_default();
    *entry = now.max(*entry + 1);
    *entry
}

/// The id of the service `/gov/service` answered with (`record`): the hex SHA-256 of its
/// identity certificate's DER.
pub fn service_id_of(record: &serde_json::Value) -> anyhow::Result<String> {
    let identity = record["identity"]
        .as_str()
        .context("this service has no identity yet (its leader creates one shortly): try again")?;
    cloister_crypto::identity::id_of_pem(identity.as_bytes()).context("the service identity's certificate")
}

/// Signs a governance request body for `write`, created at `created_at` (Unix seconds), for the
/// service whose id is `service` ([`Client::service_id`]).
pub fn sign_gov(
    who: &KeyedCert,
    write: &GovWrite,
    payload: &serde_json::Value,
    created_at: u64,
    service: &str,
) -> anyhow::Result<Vec<u8>> {
    let (msg_type, proposal_id) = match write {
        GovWrite::Propose => (MsgType::Proposal, None),
        GovWrite::Vote(id) => (MsgType::Ballot, Some(id.as_str())),
        GovWrite::Withdraw(id) => (MsgType::Withdrawal, Some(id.as_str())),
        GovWrite::Ack => (MsgType::Ack, None),
        GovWrite::RecoveryShare => (MsgType::RecoveryShare, None),
    };
    cose::sign(who, msg_type, proposal_id, created_at, service, payload.to_string().as_bytes())
}

/// A gRPC channel to `https://host:port`, trusting only the service CA, presenting `identity`.
pub async fn grpc_channel(
    url: &str,
    service_ca_pem: &[u8],
    identity: Option<&KeyedCert>,
) -> anyhow::Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let (_, server_name) = endpoint(url)?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(service_ca_pem))
        .domain_name(server_name.to_str().into_owned());
    if let Some(id) = identity {
        config = config.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let channel = Endpoint::from_shared(url.to_owned())?
        .tls_config(config)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE.0)
        .keep_alive_timeout(KEEPALIVE.1)
        .connect()
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 literal's authority keeps its brackets: without them, every request's URI
    /// (`https://::1:8000/…`) failed to build.
    #[tokio::test]
    async fn an_ipv6_literals_authority_keeps_its_brackets() {
        let (authority, name) = endpoint("https://[::1]:8443").unwrap();
        assert_eq!(authority, "[::1]:8443");
        assert_eq!(name.to_str(), "::1");
        let uri: http::Uri = format!("https://{authority}/node/health").parse().unwrap();
        assert_eq!(uri.port_u16(), Some(8443));
        assert_eq!(endpoint("https://localhost:8443").unwrap().0, "localhost:8443");
    }

    /// A node that accepts connections and never answers them (stopped with SIGSTOP, its kernel
    /// still completing TCP handshakes) fails the connection within the timeout; before, the
    /// TLS handshake waited for good, and so did `cloister ingest`, never trying the next node.
    #[tokio::test]
    async fn a_node_that_never_answers_fails_the_connection_in_time() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = silent.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut accepted = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                accepted.push(stream);
            }
        });
        let ca = cloister_crypto::identity::generate_identity("ca").unwrap();
        let dialer = Dialer {
            authority: authority.clone(),
            server_name: ServerName::try_from("localhost").unwrap(),
            config: tls::client_config(ca.cert_pem.as_bytes(), None, true).unwrap(),
            local: None,
            timeout: std::time::Duration::from_millis(300),
            keepalive: KEEPALIVE,
            anchors: Vec::new(),
        };
        let failed = tokio::time::timeout(std::time::Duration::from_secs(10), dialer.dial())
            .await
            .expect("the dial gives up on its own")
            .err()
            .expect("no connection");
        assert!(failed.to_string().contains("did not complete a connection"), "{failed:#}");
        held.abort();
    }

    /// A node that takes a request and then stops answering on its connection (wedged, or
    /// stopped with SIGSTOP once the request arrived) fails the request when it misses a ping;
    /// before, `call` and `gov` waited for good once connected.
    #[tokio::test]
    async fn a_node_that_stops_answering_mid_request_fails_it() {
        let ca = cloister_crypto::identity::ServiceCa::generate("ca").unwrap();
        let node = ca.issue_node_cert("node", &["localhost".to_owned()]).unwrap();
        let server_tls = tls::server_config(&node, &ca.keyed.cert_pem).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let wedged = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server_tls).accept(tcp).await.unwrap();
            let (arrived, arrival) = tokio::sync::oneshot::channel::<()>();
            let arrived = std::sync::Mutex::new(Some(arrived));
            let service = hyper::service::service_fn(move |_| {
                if let Some(arrived) = arrived.lock().unwrap().take() {
                    let _ = arrived.send(());
                }
                std::future::pending::<Result<http::Response<Full<Bytes>>, std::convert::Infallible>>()
            });
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => panic!("the connection ended before the request arrived"),
                _ = arrival => {}
            }
            // Wedged: the connection stays open, and nothing reads it or answers on it again.
            std::future::pending::<()>().await;
        });
        let dialer = Dialer {
            authority,
            server_name: ServerName::try_from("localhost").unwrap(),
            config: tls::client_config(ca.keyed.cert_pem.as_bytes(), None, true).unwrap(),
            local: None,
            timeout: CONNECT_TIMEOUT,
            keepalive: (std::time::Duration::from_millis(200), std::time::Duration::from_millis(200)),
            anchors: Vec::new(),
        };
        let connection = dialer.dial().await.unwrap();
        let client = Client {
            connection: std::sync::Arc::new(std::sync::Mutex::new(connection)),
            dialer: std::sync::Arc::new(dialer),
        };
        let failed = tokio::time::timeout(std::time::Duration::from_secs(10), client.get("/node/health"))
            .await
            .expect("the request gives up on its own")
            .expect_err("no answer");
        assert!(!not_sent(&failed), "the request was sent: {failed:#}");
        wedged.abort();
    }

    /// Serves `leaf` (with `issuer`'s certificates after it) and `key`, answering every request
    /// with `body`; returns the address.
    async fn serve_chain(leaf: &str, issuer: &str, key: &str, body: String) -> String {
        let node = KeyedCert { cert_pem: leaf.to_owned(), key_pem: key.to_owned() };
        serve(tls::server_config(&node, issuer).unwrap(), body).await
    }

    /// Serves `server_tls`, answering every request with `body`; returns the address.
    async fn serve(server_tls: std::sync::Arc<rustls::ServerConfig>, body: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (server_tls, body) = (server_tls.clone(), body.clone());
                tokio::spawn(async move {
                    let tls = tokio_rustls::TlsAcceptor::from(server_tls).accept(tcp).await.unwrap();
                    let service = hyper::service::service_fn(move |_| {
                        let reply = http::Response::new(Full::new(Bytes::from(body.clone())));
                        std::future::ready(Ok::<_, std::convert::Infallible>(reply))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        authority
    }

    /// A client that trusts the operator's CA as well as the service identity signs for the
    /// service a node names only if the node serves a certificate from that service's identity:
    /// a node serving the operator's certificate, naming another service (one where the same
    /// member sits), got the member's signature for that service.
    #[tokio::test]
    async fn a_client_signs_only_for_the_identity_the_node_serves() {
        use cloister_crypto::identity::endorse_tls_cert;
        let (ca, node, identity, record) = operator_and_production();
        let mut roots = ca.keyed.cert_pem.clone();
        roots.push_str(&identity.cert_pem);
        let operator = serve_chain(&node.cert_pem, &ca.keyed.cert_pem, &node.key_pem, record.clone()).await;
        let client = Client::connect(&format!("https://localhost:{}", port_of(&operator)), roots.as_bytes(), None)
            .await
            .unwrap();
        let refused = client.service_id().await.expect_err("signed for a service the node is not endorsed by");
        assert!(
            refused.to_string().contains("does not serve a certificate from that service's identity"),
            "{refused:#}"
        );
        let endorsed = endorse_tls_cert(&identity, &node, "node0", &["localhost".to_owned()]).unwrap();
        let service = serve_chain(&endorsed, &identity.cert_pem, &node.key_pem, record).await;
        let client =
            Client::connect(&format!("https://localhost:{}", port_of(&service)), roots.as_bytes(), None).await.unwrap();
        let id = cloister_crypto::identity::id_of_pem(identity.cert_pem.as_bytes()).unwrap();
        assert_eq!(client.service_id().await.unwrap(), id);
    }

    /// A client that trusts an operator's own CA (one with no path length limit, as `openssl req
    /// -x509` makes) and the staging service's identity signs only for a service whose identity
    /// it was given. The operator's node, once endorsed by production (where the same member
    /// sits), served its production certificate with production's identity and a certificate of
    /// production's name and public key that its own CA issued: the handshake found its path
    /// through that certificate to the CA, production's identity had signed the node's
    /// certificate, and the member signed a request production would take.
    #[tokio::test]
    async fn a_client_signs_only_for_an_identity_it_was_given() {
        use cloister_crypto::identity::{ServiceCa, endorse_tls_cert, generate_service_identity};
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_params = |name: &str| {
            let mut p = CertificateParams::new(Vec::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            p
        };
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let ca_cert = ca_params("the operator's own CA").self_signed(&ca_key).unwrap();
        let operator = Issuer::new(ca_params("the operator's own CA"), ca_key);
        let production = generate_service_identity("production").unwrap();
        let staging = generate_service_identity("staging").unwrap();
        let node = ServiceCa::generate("any").unwrap().issue_node_cert("node0", &["localhost".to_owned()]).unwrap();
        let endorsed = endorse_tls_cert(&production, &node, "node0", &["localhost".to_owned()]).unwrap();
        // Production's public key (its certificate holds it), under production's name.
        let production_key = KeyPair::from_pem(&production.key_pem).unwrap();
        let cross = ca_params("production service identity").signed_by(&production_key, &operator).unwrap();
        let record = serde_json::json!({ "state": "Open", "identity": production.cert_pem }).to_string();
        let chain = format!("{}{}", production.cert_pem, cross.pem());
        let node_url = serve_chain(&endorsed, &chain, &node.key_pem, record).await;
        let roots = format!("{}{}", ca_cert.pem(), staging.cert_pem);
        let client = Client::connect(&format!("https://localhost:{}", port_of(&node_url)), roots.as_bytes(), None)
            .await
            .expect("the handshake finds its path through the operator's certificate");
        let refused = client.service_id().await.expect_err("signed for a service whose identity it was not given");
        assert!(refused.to_string().contains("whose identity this client was not given"), "{refused:#}");
    }

    /// A client connected before its node was endorsed learns the service on a new connection:
    /// the second connection resumed the first's TLS session, so it showed the certificate the
    /// first handshake had, and a long-lived client kept refusing to sign.
    #[tokio::test]
    async fn a_client_connected_before_the_endorsement_signs_after_it() {
        use cloister_crypto::identity::endorse_tls_cert;
        let (ca, node, identity, record) = operator_and_production();
        let (server_tls, served) = tls::swappable_server_config(&node, &ca.keyed.cert_pem).unwrap();
        let node_url = serve(server_tls, record).await;
        let roots = format!("{}{}", ca.keyed.cert_pem, identity.cert_pem);
        let client = Client::connect(&format!("https://localhost:{}", port_of(&node_url)), roots.as_bytes(), None)
            .await
            .unwrap();
        assert_eq!(client.get("/gov/service").await.unwrap().status, 200);
        let endorsed = endorse_tls_cert(&identity, &node, "node0", &["localhost".to_owned()]).unwrap();
        served.set(&format!("{endorsed}{}", identity.cert_pem), &node.key_pem).unwrap();
        let id = cloister_crypto::identity::id_of_pem(identity.cert_pem.as_bytes()).unwrap();
        assert_eq!(client.service_id().await.unwrap(), id);
    }

    /// An operator's CA, the certificate it issued node0, the production service's identity, and
    /// production's `/gov/service` record.
    fn operator_and_production() -> (cloister_crypto::identity::ServiceCa, KeyedCert, KeyedCert, String) {
        let ca = cloister_crypto::identity::ServiceCa::generate("operator").unwrap();
        let node = ca.issue_node_cert("node0", &["localhost".to_owned()]).unwrap();
        let identity = cloister_crypto::identity::generate_service_identity("production").unwrap();
        let record = serde_json::json!({ "state": "Open", "identity": identity.cert_pem }).to_string();
        (ca, node, identity, record)
    }

    fn port_of(authority: &str) -> &str {
        authority.rsplit(':').next().unwrap()
    }
}
