//! TLS for every listener and client, with rustls and ring only.
//!
//! Servers offer client authentication without requiring it, and accept any client certificate
//! whose holder proves possession of its key: members and users are self-signed, and the service
//! knows them by certificate hash (the API answers 401 for unknown ones). Clients pin the service
//! identity, which certifies each Trusted node's TLS key; nodes pin the operator's CA between them.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{self, KeyedCert};

/// ALPN: HTTP/2 first (gRPC needs it), HTTP/1.1 for curl and friends.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any well-formed client certificate; the handshake still proves the key.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A root store holding the service CA.
fn service_roots(service_ca_pem: &[u8]) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in identity::cert_chain(service_ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The chain a node presents: its certificate, then the service CA.
fn node_chain(
    node: &KeyedCert,
    service_ca_pem: &str,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let mut chain = identity::cert_chain(node.cert_pem.as_bytes())?;
    chain.extend(identity::cert_chain(service_ca_pem.as_bytes())?);
    Ok(chain)
}

/// A server presenting this node's certificate (chained to the service CA), checking client
/// certificates with `verifier`, offering the protocols `alpn`.
fn server_with(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    node: &KeyedCert,
    service_ca_pem: &str,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(node_chain(node, service_ca_pem)?, identity::private_key(node.key_pem.as_bytes())?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The server side: this node's certificate (chained to the service CA), any client certificate.
pub fn server_config(node: &KeyedCert, service_ca_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let verifier = Arc::new(AnyClientCert { algorithms: provider.signature_verification_algorithms });
    server_with(provider, verifier, node, service_ca_pem, &ALPN)
}

/// A server certificate that can be replaced while the listener runs: a node serves its
/// CA-issued certificate until the service identity has certified it, then that one.
#[derive(Debug)]
pub struct SwappableCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl SwappableCert {
    fn new(chain: Vec<CertificateDer<'static>>, key_pem: &str) -> anyhow::Result<SwappableCert> {
        Ok(SwappableCert(std::sync::RwLock::new(Arc::new(certified(chain, key_pem)?))))
    }

    /// Serves `chain_pem` (leaf first) with the key `key_pem` from the next handshake on.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let key = certified(identity::cert_chain(chain_pem.as_bytes())?, key_pem)?;
        *self.0.write().expect("certificate lock") = Arc::new(key);
        Ok(())
    }

    /// The leaf certificate (DER) being served.
    pub fn current(&self) -> Vec<u8> {
        self.0.read().expect("certificate lock").cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key_pem: &str) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let key = provider().key_provider.load_private_key(identity::private_key(key_pem.as_bytes())?)?;
    Ok(rustls::sign::CertifiedKey::new(chain, key))
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().expect("certificate lock").clone())
    }
}

/// The client-facing listeners' configuration: [`server_config`], with the certificate in a
/// [`SwappableCert`] the caller can replace.
pub fn swappable_server_config(
    node: &KeyedCert,
    service_ca_pem: &str,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<SwappableCert>)> {
    let provider = provider();
    let verifier = Arc::new(AnyClientCert { algorithms: provider.signature_verification_algorithms });
    let cert = Arc::new(SwappableCert::new(node_chain(node, service_ca_pem)?, &node.key_pem)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), cert))
}

/// The client side: trusts only the service CA, optionally presents an identity.
pub fn client_config(
    service_ca_pem: &[u8],
    identity: Option<&KeyedCert>,
    alpn_h2_only: bool,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = service_roots(service_ca_pem)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(
            identity::cert_chain(id.cert_pem.as_bytes())?,
            identity::private_key(id.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols =
        if alpn_h2_only { vec![ALPN[0].to_vec()] } else { ALPN.iter().map(|p| p.to_vec()).collect() };
    // Every connection shows the certificate the node serves now: a resumed session carries the
    // first handshake's, and a client decides from it which service it signs for.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The handshake-signature checks of a verifier that wraps another (`self.chain`) and adds a
/// check of the certificate only: they are the wrapped verifier's.
macro_rules! signatures_checked_by_chain {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.chain.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.chain.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.chain.supported_verify_schemes()
        }
    };
}

/// A node's client side towards one peer: the peer's certificate must chain to the service CA,
/// name the host, and be the certificate of node `expected` ([`crate::node_id_of`]). The CA
/// alone would let any holder of one of its certificates for that address (a retired node, a
/// machine that took its address) answer in the peer's place: vote, acknowledge appends, and
/// read what is forwarded to it. Presents `node`; HTTP/2 only.
pub fn peer_client_config(
    service_ca_pem: &[u8],
    node: &KeyedCert,
    expected: u64,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let roots = Arc::new(service_roots(service_ca_pem)?);
    let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedPeer { chain, expected }))
        .with_client_auth_cert(
            identity::cert_chain(node.cert_pem.as_bytes())?,
            identity::private_key(node.key_pem.as_bytes())?,
        )?;
    config.alpn_protocols = vec![ALPN[0].to_vec()];
    Ok(Arc::new(config))
}

/// The service-CA chain and host name check, then that the certificate is the expected node's.
#[derive(Debug)]
struct ExpectedPeer {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    expected: u64,
}

impl rustls::client::danger::ServerCertVerifier for ExpectedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let id = crate::node_id_of(end_entity.as_ref());
        if id != self.expected {
            tracing::warn!(expected = self.expected, found = id, server = ?server_name, "a peer answered with another node's certificate");
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure));
        }
        Ok(verified)
    }

    signatures_checked_by_chain!();
}

/// Decides during the peer handshake whether a certificate that chains to the service CA may
/// connect at all; the error says why not, for the node's log.
pub type PeerGate = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// The service-CA chain check, then the [`PeerGate`].
struct GatedPeerCert {
    chain: Arc<dyn ClientCertVerifier>,
    gate: PeerGate,
}

impl std::fmt::Debug for GatedPeerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedPeerCert").field("chain", &self.chain).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for GatedPeerCert {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        (self.gate)(end_entity.as_ref()).map_err(|reason| {
            tracing::warn!(%reason, "refused a peer's TLS handshake");
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        })?;
        Ok(verified)
    }

    signatures_checked_by_chain!();
}

/// The peer listener: node certificates only, chained to the service CA, on both sides, and
/// admitted by `gate` (which refuses retired nodes).
pub fn peer_server_config(
    node: &KeyedCert,
    service_ca_pem: &str,
    gate: PeerGate,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let roots = service_roots(service_ca_pem.as_bytes())?;
    let chain =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    server_with(provider, Arc::new(GatedPeerCert { chain, gate }), node, service_ca_pem, &ALPN[..1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ServiceCa;

    /// Runs a TLS handshake between the two configurations in memory.
    fn handshake(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client, name)?;
        let mut server = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
            let mut bytes = Vec::new();
            client.write_tls(&mut bytes).unwrap();
            server.read_tls(&mut bytes.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut bytes = Vec::new();
            server.write_tls(&mut bytes).unwrap();
            client.read_tls(&mut bytes.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        panic!("the handshake did not finish")
    }

    /// A node connecting to a peer holds it to the node it expects there: a certificate the
    /// service CA issued for that address to another node (a retired one, a machine that took
    /// the address) is refused, though it passes the CA and host name checks.
    #[test]
    fn a_peer_must_be_the_node_expected_not_any_node_of_the_ca() {
        let ca = ServiceCa::generate("svc").unwrap();
        let (me, peer, impostor) = (
            ca.issue_node_cert("me", &["localhost".into()]).unwrap(),
            ca.issue_node_cert("peer", &["localhost".into()]).unwrap(),
            ca.issue_node_cert("impostor", &["localhost".into()]).unwrap(),
        );
        let ca_pem = ca.keyed.cert_pem.as_str();
        let id = |keyed: &KeyedCert| crate::node_id_of(&identity::cert_der(keyed.cert_pem.as_bytes()).unwrap());
        let serving = |keyed: &KeyedCert| peer_server_config(keyed, ca_pem, Arc::new(|_: &[u8]| Ok(()))).unwrap();
        let expecting = |expected: u64| peer_client_config(ca_pem.as_bytes(), &me, expected).unwrap();

        handshake(expecting(id(&peer)), serving(&peer)).expect("the expected node");
        let refused = handshake(expecting(id(&peer)), serving(&impostor)).unwrap_err();
        assert!(
            matches!(
                refused,
                rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
            ),
            "{refused:?}"
        );
    }
}
