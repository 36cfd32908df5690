//! Keys and certificates: member and user identities, the service CA, and node certificates.
//!
//! Every key is ECDSA P-384, generated from the operating system's secure random source (ring).
//! An identity is known to the service by the hex SHA-256 of its certificate's DER.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P384_SHA384, PublicKeyData,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Certificates are valid for this many days from their creation.
pub(crate) const CERT_VALIDITY_DAYS: i64 = 3650;

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct KeyedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for KeyedCert {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedCert").field("id", &id_of_pem(self.cert_pem.as_bytes()).ok()).finish_non_exhaustive()
    }
}

impl KeyedCert {
    /// Writes `DIR/NAME.cert.pem` and `DIR/NAME.key.pem` (the key readable by its owner only).
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cert = dir.join(format!("{name}.cert.pem"));
        write_durably(&cert, self.cert_pem.as_bytes(), false)?;
        write_private(&dir.join(format!("{name}.key.pem")), self.key_pem.as_bytes())
    }

    /// Reads `DIR/NAME.cert.pem` and `DIR/NAME.key.pem`.
    pub fn read(dir: &Path, name: &str) -> anyhow::Result<KeyedCert> {
        read_pair(&dir.join(format!("{name}.cert.pem")), &dir.join(format!("{name}.key.pem")))
    }

    pub fn id(&self) -> anyhow::Result<String> {
        id_of_pem(self.cert_pem.as_bytes())
    }
}

/// Reads a certificate and key pair from two PEM files.
pub fn read_pair(cert: &Path, key: &Path) -> anyhow::Result<KeyedCert> {
    Ok(KeyedCert {
        cert_pem: std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?,
        key_pem: std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?,
    })
}

/// Writes a secret file that only its owner may read.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_durably(path, bytes, true)
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either the old file or the whole
/// new one, and a completed write survives power loss: a temporary file beside it, fsynced,
/// renamed over `path`, and the folder fsynced. The temporary file is made anew under a random
/// name, owner-only until written (and after, when `private`): one of a known name, opened if it
/// existed, could be another user's file (in a folder others may write), readable by them.
pub fn write_durably(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let context = || format!("writing {}", path.display());
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(context)?;
    tmp.write_all(bytes).with_context(context)?;
    #[cfg(unix)]
    if !private {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).with_context(context)?;
    }
    tmp.as_file().sync_all().with_context(context)?;
    tmp.persist(path).map_err(|e| e.error).with_context(context)?;
    sync_dir(dir).with_context(context)
}

/// Makes a folder's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn params(name: &str, sans: Vec<String>) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(sans)?;
    // A random serial: rcgen's default derives it from the key, so a key certified twice (a
    // node's signing request answered again) would get two certificates with one serial.
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(CERT_VALIDITY_DAYS);
    Ok(p)
}

/// An ECDSA P-384 signing key from PKCS#8 PEM: every key this project signs with (members',
/// nodes', the service identity's). `what` names the key in the error.
pub fn signing_key(key_pem: &str, what: &str) -> anyhow::Result<ring::signature::EcdsaKeyPair> {
    let der = private_key(key_pem.as_bytes())?;
    ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        der.secret_der(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| anyhow::anyhow!("{what} is not an ECDSA P-384 PKCS#8 key: {e}"))
}

/// A self-signed identity for a member, user or operator: `cloister keygen`.
/// An ECDSA P-384 signature (r ‖ s, hex) by the key `key_pem` over `message`.
pub fn sign_hex(key_pem: &str, what: &str, message: &[u8]) -> anyhow::Result<String> {
    let key = signing_key(key_pem, what)?;
    let signature = key
        .sign(&ring::rand::SystemRandom::new(), message)
        .map_err(|_| anyhow::anyhow!("signing with {what} failed"))?;
    Ok(hex::encode(signature.as_ref()))
}

/// Checks a signature [`sign_hex`] made against the public key of a certificate (DER).
pub fn verify_hex(cert_der: &[u8], message: &[u8], signature_hex: &str) -> Result<(), String> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let signature = hex::decode(signature_hex).map_err(|_| "the signature is not hex".to_owned())?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P384_SHA384_FIXED,
        cert.public_key().subject_public_key.data.as_ref(),
    )
    .verify(message, &signature)
    .map_err(|_| "the signature does not verify".to_owned())
}

pub fn generate_identity(name: &str) -> anyhow::Result<KeyedCert> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
    let mut p = params(name, Vec::new())?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.self_signed(&key)?;
    Ok(KeyedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A service identity: the key a service generates for itself at genesis (only its Trusted nodes
/// ever hold it), with a self-signed certificate that receipts are checked against and clients
/// pin. It certifies its Trusted nodes' TLS keys ([`endorse_tls_cert`]), so it is a CA of depth 0.
pub fn generate_service_identity(service_name: &str) -> anyhow::Result<KeyedCert> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
    let mut p = params(&format!("{service_name} service identity"), Vec::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = p.self_signed(&key)?;
    Ok(KeyedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// How long a TLS certificate the service identity gives a Trusted node is valid. The node
/// renews it at half that while its endorsement is open, so a node that is retired stops
/// passing clients' pinning within this time even if it kept serving the last one.
pub const ENDORSED_TLS_CERT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A TLS certificate for `node`'s key, valid for `hosts`, issued by the service identity
/// (`identity`: its certificate and key): what a Trusted node serves to clients, who pin the
/// service identity. Valid from an hour ago (clock skew) for [`ENDORSED_TLS_CERT_VALIDITY`].
pub fn endorse_tls_cert(
    identity: &KeyedCert,
    node: &KeyedCert,
    name: &str,
    hosts: &[String],
) -> anyhow::Result<String> {
    let identity_key = KeyPair::from_pem(&identity.key_pem).context("the service identity key is not PKCS#8 PEM")?;
    let issuer = Issuer::from_ca_cert_pem(&identity.cert_pem, identity_key)
        .context("the service identity certificate is unreadable")?;
    let node_key = KeyPair::from_pem(&node.key_pem).context("the node key is not PKCS#8 PEM")?;
    let mut p = params(name, hosts.to_vec())?;
    let now = time::OffsetDateTime::now_utc();
    p.not_after = now + ENDORSED_TLS_CERT_VALIDITY;
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(p.signed_by(&node_key, &issuer)?.pem())
}

/// Whether a chain a server presented (DER, its own certificate first) is one the service
/// identity whose id is `identity_id` ([`id_of_der`]) issued: a certificate with that id follows
/// the first, and signed it. Another certificate merely sent along counts for nothing.
pub fn served_by_identity(chain: &[Vec<u8>], identity_id: &str) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Some((leaf, rest)) = chain.split_first() else { return false };
    let Ok((_, leaf)) = X509Certificate::from_der(leaf) else { return false };
    rest.iter().filter(|issuer| id_of_der(issuer) == identity_id).any(|issuer| {
        X509Certificate::from_der(issuer)
            .is_ok_and(|(_, issuer)| leaf.verify_signature(Some(issuer.public_key())).is_ok())
    })
}

/// The DNS names and IP addresses a certificate (DER) is valid for.
pub fn cert_hosts(cert_der: &[u8]) -> anyhow::Result<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).context("the certificate does not parse")?;
    let Some(san) = cert.subject_alternative_name().context("its subjectAltName does not parse")? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// The service's certificate authority: it issues node certificates, and clients pin it.
pub struct ServiceCa {
    pub keyed: KeyedCert,
    issuer: Issuer<'static, KeyPair>,
}

impl ServiceCa {
    pub fn generate(name: &str) -> anyhow::Result<ServiceCa> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
        let mut p = params(name, Vec::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key)?;
        let keyed = KeyedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(ServiceCa { keyed, issuer: Issuer::new(p, key) })
    }

    /// The CA from its certificate and key, which must belong together: a wrong key would issue
    /// certificates nothing verifies.
    pub fn load(keyed: KeyedCert) -> anyhow::Result<ServiceCa> {
        let key = KeyPair::from_pem(&keyed.key_pem).context("the service CA key is not a PKCS#8 PEM key")?;
        let der = cert_der(keyed.cert_pem.as_bytes()).context("the service CA certificate")?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).context("the service CA certificate does not parse")?;
        anyhow::ensure!(
            cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
            "the service CA key does not belong to the service CA certificate"
        );
        let issuer =
            Issuer::from_ca_cert_pem(&keyed.cert_pem, key).context("the service CA certificate is unreadable")?;
        Ok(ServiceCa { keyed, issuer })
    }

    /// Issues a node certificate for TLS, valid for `hosts` (DNS names or IP addresses), with a
    /// key generated here: for local networks, where the operator runs the nodes itself.
    pub fn issue_node_cert(&self, name: &str, hosts: &[String]) -> anyhow::Result<KeyedCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
        let cert = node_cert_params(name, hosts)?.signed_by(&key, &self.issuer)?;
        Ok(KeyedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a node certificate for the key of a certificate signing request ([`node_csr`]), so
    /// the node's private key never leaves the machine that generated it. The request must be
    /// signed by its key (proof of possession), be for an ECDSA P-384 key, and name `name` as its
    /// common name; everything else it asks for is ignored: the certificate is valid for `hosts`
    /// and for TLS only, as [`issue_node_cert`](Self::issue_node_cert) makes it.
    pub fn sign_node_csr(&self, csr_pem: &str, name: &str, hosts: &[String]) -> anyhow::Result<String> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("the certificate signing request is refused: {e}"))?;
        // The algorithm rcgen reports comes from the request's signature; the key's own size tells
        // its curve (an uncompressed P-384 point is 97 bytes; P-256's 65, P-521's 133).
        anyhow::ensure!(
            request.public_key.algorithm() == &PKCS_ECDSA_P384_SHA384 && request.public_key.der_bytes().len() == 97,
            "the certificate signing request is for a {:?} key of {} bytes; node keys are ECDSA P-384",
            request.public_key.algorithm(),
            request.public_key.der_bytes().len()
        );
        let asked = request.params.distinguished_name.get(&DnType::CommonName).and_then(|n| match n {
            DnValue::Utf8String(s) => Some(s.as_str()),
            DnValue::PrintableString(s) => Some(s.as_str()),
            _ => None,
        });
        anyhow::ensure!(
            asked == Some(name),
            "the certificate signing request is for {}, not {name}",
            asked.map_or("no common name".to_owned(), |a| format!("{a:?}"))
        );
        anyhow::ensure!(!hosts.is_empty(), "a node certificate needs at least one host name or address");
        // A name given twice (a public host that is also the private address) is listed once.
        let mut unique: Vec<String> = Vec::with_capacity(hosts.len());
        for host in hosts {
            if !unique.contains(host) {
                unique.push(host.clone());
            }
        }
        let request = CertificateSigningRequestParams {
            params: node_cert_params(name, &unique)?,
            public_key: request.public_key,
        };
        Ok(request.signed_by(&self.issuer)?.pem())
    }
}

/// What a node certificate says: `name`, valid for `hosts`, for TLS servers and clients.
fn node_cert_params(name: &str, hosts: &[String]) -> anyhow::Result<CertificateParams> {
    let mut p = params(name, hosts.to_vec())?;
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(p)
}

/// A node's key pair and a certificate signing request for it, both PEM: what a node generates
/// where it runs (`cloister node csr`), so that the operator's CA can certify the key
/// ([`ServiceCa::sign_node_csr`]) without ever holding it. With `key_pem`, the request is for
/// that existing key instead of a new one.
pub fn node_csr(name: &str, key_pem: Option<&str>) -> anyhow::Result<(String, String)> {
    let key = match key_pem {
        Some(pem) => KeyPair::from_pem(pem).context("the node key is not a PKCS#8 PEM key")?,
        None => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?,
    };
    anyhow::ensure!(key.algorithm() == &PKCS_ECDSA_P384_SHA384, "the node key is not an ECDSA P-384 key");
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The identity id of a DER certificate: hex SHA-256.
pub fn id_of_der(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The identity id of the first certificate in a PEM buffer.
pub fn id_of_pem(pem: &[u8]) -> anyhow::Result<String> {
    Ok(id_of_der(&cert_der(pem)?))
}

/// The identity ids of every certificate in a PEM buffer.
pub fn ids_of_pem(pem: &[u8]) -> anyhow::Result<Vec<String>> {
    Ok(cert_chain(pem)?.iter().map(|c| id_of_der(c)).collect())
}

/// A certificate (DER) as PEM.
pub fn pem_of_der(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// The first certificate in a PEM buffer.
pub fn cert_der(pem: &[u8]) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem).map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))
}

/// The certificate of a PEM text that is one CERTIFICATE block and nothing else (but white
/// space around it). A text with more in it has no one meaning: PEM parsers differ on where a
/// block may begin (rustls's at a line's start, the `pem` crate's anywhere), so a text holding a
/// second block after text of its own named one certificate to the node and another to a
/// constitution parsing it with the other.
pub fn single_cert_der(pem: &[u8]) -> anyhow::Result<CertificateDer<'static>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = std::str::from_utf8(pem).map_err(|_| anyhow::anyhow!("a certificate's PEM is not UTF-8"))?.trim();
    anyhow::ensure!(
        text.starts_with(BEGIN) && text.ends_with(END) && text.matches("-----").count() == 4,
        "a certificate's PEM must be one CERTIFICATE block and nothing else"
    );
    cert_der(text.as_bytes())
}

/// Every certificate in a PEM buffer.
pub(crate) fn cert_chain(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not a PEM certificate chain: {e}"))
}

/// A private key from PEM (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(pem: &[u8]) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| anyhow::anyhow!("not a PEM private key: {e}"))
}

#[cfg(test)]
mod single_cert_tests {
    use super::*;

    /// Two certificates, the first behind text on its line: rustls's parser sees the second
    /// alone, the `pem` crate's the first. No such text is one certificate.
    #[test]
    fn a_pem_text_is_one_certificate_block_or_refused() {
        let (a, b) = (self_signed("a"), self_signed("b"));
        let one = single_cert_der(a.as_bytes()).expect("one block");
        assert_eq!(one.as_ref(), cert_der(a.as_bytes()).unwrap().as_ref());
        single_cert_der(format!("\n  {a}\n\n").as_bytes()).expect("white space around it");
        for text in [
            format!("x{a}{b}"),
            format!("{a}{b}"),
            format!("{a}junk"),
            format!("junk\n{a}"),
            a.replace("CERTIFICATE", "PRIVATE KEY"),
            String::new(),
        ] {
            assert!(single_cert_der(text.as_bytes()).is_err(), "{text}");
        }
    }

    fn self_signed(name: &str) -> String {
        rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap().cert.pem()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node certificate from the service identity: for the node's key and hosts, issued by the
    /// identity (whose certificate is a CA of depth 0), short-lived.
    #[test]
    fn the_service_identity_certifies_a_nodes_tls_key() {
        let identity = generate_service_identity("test").unwrap();
        let ca = ServiceCa::generate("operator").unwrap();
        let node = ca.issue_node_cert("node0", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let node_der = cert_der(node.cert_pem.as_bytes()).unwrap();
        let hosts = cert_hosts(&node_der).unwrap();
        assert_eq!(hosts, ["localhost", "127.0.0.1"]);
        let pem = endorse_tls_cert(&identity, &node, "node0", &hosts).unwrap();
        let der = cert_der(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let identity_der = cert_der(identity.cert_pem.as_bytes()).unwrap();
        let (_, issuer) = x509_parser::parse_x509_certificate(&identity_der).unwrap();
        cert.verify_signature(Some(issuer.public_key())).expect("signed by the service identity");
        let (_, node_cert) = x509_parser::parse_x509_certificate(&node_der).unwrap();
        assert_eq!(cert.public_key().raw, node_cert.public_key().raw, "the node's own key");
        assert_eq!(cert_hosts(&der).unwrap(), hosts);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, ENDORSED_TLS_CERT_VALIDITY.as_secs() as i64 + 3600, "a day, from an hour back");
        assert!(issuer.basic_constraints().unwrap().is_some_and(|b| b.value.ca));
    }

    /// A chain is the service identity's only when the identity's certificate follows the
    /// node's and signed it: the operator's chain is not, nor is it with the identity's
    /// certificate sent along.
    #[test]
    fn a_chain_is_served_by_the_identity_that_signed_its_first_certificate() {
        let identity = generate_service_identity("test").unwrap();
        let other = generate_service_identity("other").unwrap();
        let ca = ServiceCa::generate("operator").unwrap();
        let node = ca.issue_node_cert("node0", &["localhost".into()]).unwrap();
        let der = |pem: &str| cert_der(pem.as_bytes()).unwrap().to_vec();
        let endorsed = endorse_tls_cert(&identity, &node, "node0", &["localhost".into()]).unwrap();
        let id = id_of_der(&der(&identity.cert_pem));
        assert!(served_by_identity(&[der(&endorsed), der(&identity.cert_pem)], &id));
        assert!(!served_by_identity(&[der(&node.cert_pem), der(&ca.keyed.cert_pem)], &id), "the operator's chain");
        assert!(!served_by_identity(&[der(&node.cert_pem), der(&identity.cert_pem)], &id), "the identity sent along");
        let elsewhere = endorse_tls_cert(&other, &node, "node0", &["localhost".into()]).unwrap();
        assert!(!served_by_identity(&[der(&elsewhere), der(&identity.cert_pem)], &id), "another identity's");
        assert!(!served_by_identity(&[der(&endorsed)], &id), "the leaf alone");
        assert!(!served_by_identity(&[], &id));
    }

    /// A node certificate for a key the CA never sees: issued for the request's key, for the
    /// hosts the operator names (not those the request asks for), and verifiable under the CA.
    #[test]
    fn the_ca_certifies_a_key_it_never_holds_from_a_signed_request() {
        let ca = ServiceCa::generate("operator").unwrap();
        let (key_pem, csr_pem) = node_csr("vm0", None).unwrap();
        let cert_pem = ca.sign_node_csr(&csr_pem, "vm0", &["10.0.0.10".into(), "vm0.example".into()]).unwrap();
        let der = cert_der(cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = cert_der(ca.keyed.cert_pem.as_bytes()).unwrap();
        let (_, issuer) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(issuer.public_key())).expect("signed by the CA");
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw(), "the request's key");
        assert_eq!(cert_hosts(&der).unwrap(), ["10.0.0.10", "vm0.example"]);
        // The same key asks again (a rerun of the VM's bootstrap): same key, new request.
        let (again, csr2) = node_csr("vm0", Some(&key_pem)).unwrap();
        assert_eq!(again, key_pem);
        let pem = ca.sign_node_csr(&csr2, "vm0", &["10.0.0.10".into(), "10.0.0.10".into()]).unwrap();
        assert_eq!(cert_hosts(&cert_der(pem.as_bytes()).unwrap()).unwrap(), ["10.0.0.10"], "listed once");
    }

    #[test]
    fn a_ca_loaded_with_another_key_is_refused_and_serials_differ() {
        let ca = ServiceCa::generate("operator").unwrap();
        let other = ServiceCa::generate("other").unwrap();
        let err =
            ServiceCa::load(KeyedCert { cert_pem: ca.keyed.cert_pem.clone(), key_pem: other.keyed.key_pem.clone() })
                .err()
                .expect("a mismatched key");
        assert!(err.to_string().contains("does not belong"), "{err}");
        let loaded = ServiceCa::load(ca.keyed.clone()).unwrap();
        // The same key certified twice gets two serials.
        let (_, csr) = node_csr("vm0", None).unwrap();
        let serial = |pem: String| {
            let der = cert_der(pem.as_bytes()).unwrap();
            x509_parser::parse_x509_certificate(&der).unwrap().1.raw_serial().to_vec()
        };
        let a = serial(loaded.sign_node_csr(&csr, "vm0", &["h".into()]).unwrap());
        let b = serial(loaded.sign_node_csr(&csr, "vm0", &["h".into()]).unwrap());
        assert_ne!(a, b);
    }

    #[test]
    fn a_request_for_another_node_a_broken_signature_or_another_curve_is_refused() {
        let ca = ServiceCa::generate("operator").unwrap();
        let (_, csr) = node_csr("vm1", None).unwrap();
        let err = ca.sign_node_csr(&csr, "vm0", &["10.0.0.10".into()]).unwrap_err().to_string();
        assert!(err.contains("is for \"vm1\", not vm0"), "{err}");
        let err = ca.sign_node_csr(&csr, "vm1", &[]).unwrap_err().to_string();
        assert!(err.contains("at least one host"), "{err}");
        // One bit of the signed request flipped: the proof of possession fails.
        let parsed = pem::parse(&csr).unwrap();
        let mut der = parsed.contents().to_vec();
        let at = der.len() / 3;
        der[at] ^= 1;
        let forged = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca.sign_node_csr(&forged, "vm1", &["10.0.0.11".into()]).unwrap_err().to_string();
        assert!(err.contains("the certificate signing request is refused"), "{err}");
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "vm1");
        let weak = p.serialize_request(&p256).unwrap().pem().unwrap();
        let err = ca.sign_node_csr(&weak, "vm1", &["10.0.0.11".into()]).unwrap_err().to_string();
        assert!(err.contains("node keys are ECDSA P-384"), "{err}");
        assert!(ca.sign_node_csr("not a request", "vm1", &["h".into()]).is_err());
    }

    #[test]
    fn identities_are_distinct_and_ids_are_certificate_hashes() {
        let a = generate_identity("a").unwrap();
        let b = generate_identity("a").unwrap();
        assert_ne!(a.key_pem, b.key_pem, "keys are random");
        let id = a.id().unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(id, id_of_der(cert_der(a.cert_pem.as_bytes()).unwrap().as_ref()));
        assert!(!format!("{a:?}").contains("PRIVATE"), "Debug never shows the key");
    }

    #[test]
    fn the_ca_survives_a_round_trip_and_issues_chained_certs() {
        let ca = ServiceCa::generate("svc").unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.keyed.write(dir.path(), "service").unwrap();
        let again = ServiceCa::load(KeyedCert::read(dir.path(), "service").unwrap()).unwrap();
        let node = again.issue_node_cert("node0", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let node_der = cert_der(node.cert_pem.as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(node_der.as_ref()).unwrap();
        let ca_der = cert_der(ca.keyed.cert_pem.as_bytes()).unwrap();
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
        assert_eq!(parsed.issuer(), ca_parsed.subject());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("service.key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "keys are private to their owner");
        }
    }

    /// In a folder others may write, another user made the temporary file the key went through
    /// (its name was fixed), readable by all: the key was written into it and renamed into
    /// place, theirs and readable still. The temporary file is now made anew, owner-only.
    #[cfg(unix)]
    #[test]
    fn a_key_never_goes_through_a_file_someone_else_made() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join(".member0.key.pem.tmp");
        std::fs::write(&planted, "planted").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        let key = dir.path().join("member0.key.pem");
        write_private(&key, b"the key").unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"the key");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o077, 0);
        assert_eq!(std::fs::read(&planted).unwrap(), b"planted", "not written through");
        let cert = dir.path().join("member0.cert.pem");
        write_durably(&cert, b"a certificate", false).unwrap();
        assert_eq!(std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777, 0o644);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 3, "no temporary file left: {left:?}");
    }
}
