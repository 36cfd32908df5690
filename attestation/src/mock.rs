//! The mock SNP firmware: well-formed SNP reports signed by a test ARK→ASK→VCEK chain.
//!
//! Everything but the root is as on hardware: the ARK and ASK are RSA keys that sign with
//! RSASSA-PSS/SHA-384, the VCEK is a P-384 key whose certificate carries AMD's hwID and TCB
//! extensions, and the report is the firmware's binary layout signed with ECDSA P-384/SHA-384. So
//! [`crate::verify::verify`] checks mock reports with exactly the code that checks real ones; only a
//! service configured for `mock` pins the test ARK.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use p384::ecdsa::signature::hazmat::PrehashSigner;
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand_core::{OsRng, RngCore};
use rsa::pkcs8::EncodePublicKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use sev::firmware::guest::{AttestationReport, GuestPolicy};
use sev::firmware::host::TcbVersion;
use sev::parser::ByteParser;
use sha2::Digest;
use x509_cert::der::asn1::{BitString, Ia5String, OctetString};
use x509_cert::der::{Decode, DecodePem, Encode, EncodePem};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{DynSignatureAlgorithmIdentifier, ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::time::Validity;
use x509_cert::{Certificate, TbsCertificate};

use crate::{SnpEvidence, Tcb, snp};

/// The size of the test ARK and ASK keys. AMD's are 4096 bits; the test chain uses smaller keys
/// so that generating one at genesis takes well under a second. The verifier does not care.
pub const MOCK_RSA_BITS: usize = 2048;
/// How long the test certificates are valid.
pub const MOCK_CERT_VALIDITY_DAYS: u64 = 3650;
/// The guest policy the mock reports by default: SMT allowed, the reserved bit 17 set as the
/// specification requires, debugging not allowed.
pub const MOCK_POLICY_DEFAULT: u64 = 0x30000;
/// The bit of the guest policy that allows debugging.
pub const POLICY_DEBUG_BIT: u64 = 1 << 19;
/// The bit of the guest policy that allows association with a migration agent.
pub const POLICY_MIGRATE_MA_BIT: u64 = 1 << 18;
/// The TCB the mock reports by default (a plausible Milan platform).
pub const MOCK_TCB_DEFAULT: Tcb = Tcb { bootloader: 3, tee: 0, snp: 8, microcode: 115, fmc: None };

/// The launch measurement a mock node reports unless told otherwise: SHA-384 over a fixed label
/// and this crate's version, so a release's sandbox and tests agree on it.
pub fn default_measurement() -> [u8; 48] {
    let mut h = sha2::Sha384::new();
    h.update(b"cloister mock guest ");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.finalize().into()
}

/// A generated ARK and ASK, with their keys.
pub struct MockRoot {
    ark_key: rsa::RsaPrivateKey,
    ask_key: rsa::RsaPrivateKey,
    ark: Certificate,
    ask: Certificate,
}

impl std::fmt::Debug for MockRoot {
    // Never print the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockRoot").field("ark_sha256", &hex::encode(sha2::Sha256::digest(self.ark_der()))).finish()
    }
}

fn name(text: &str) -> Name {
    Name::from_str(text).expect("a valid distinguished name")
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).expect("a valid serial number")
}

/// Signs `tbs` with RSASSA-PSS/SHA-384 under `key`, as AMD signs its ASKs and VCEKs.
fn sign_pss(
    key: &rsa::RsaPrivateKey,
    issuer: Name,
    subject: Name,
    spki: SubjectPublicKeyInfoOwned,
    extensions: Vec<Extension>,
) -> Certificate {
    let signer = rsa::pss::SigningKey::<sha2::Sha384>::new(key.clone());
    let algorithm = signer.signature_algorithm_identifier().expect("PSS has an algorithm identifier");
    let tbs = TbsCertificate {
        version: x509_cert::Version::V3,
        serial_number: serial(),
        signature: algorithm.clone(),
        issuer,
        validity: Validity::from_now(Duration::from_secs(MOCK_CERT_VALIDITY_DAYS * 86_400)).expect("a valid validity"),
        subject,
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: if extensions.is_empty() { None } else { Some(extensions) },
    };
    let message = tbs.to_der().expect("a TBS certificate encodes");
    let signature = signer.sign_with_rng(&mut OsRng, &message);
    Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(&signature.to_bytes()).expect("a bit string"),
    }
}

fn rsa_spki(key: &rsa::RsaPrivateKey) -> SubjectPublicKeyInfoOwned {
    let der = key.to_public_key().to_public_key_der().expect("an RSA public key encodes");
    SubjectPublicKeyInfoOwned::from_der(der.as_bytes()).expect("an RSA SPKI decodes")
}

fn extension(oid: ObjectIdentifier, value: impl Encode) -> Extension {
    Extension {
        extn_id: oid,
        critical: false,
        extn_value: OctetString::new(value.to_der().expect("an extension value encodes")).expect("an octet string"),
    }
}

/// The VCEK extensions AMD issues: the product, the TCB components and the chip's hwID.
fn vcek_extensions(chip_id: &[u8; 64], tcb: &Tcb) -> Vec<Extension> {
    let mut exts = vec![
        extension(snp::OID_STRUCT_VERSION, 1u8),
        extension(snp::OID_PRODUCT_NAME, Ia5String::new("Milan-B0").expect("an IA5 string")),
        extension(snp::OID_BL_SPL, tcb.bootloader),
        extension(snp::OID_TEE_SPL, tcb.tee),
        extension(snp::OID_SNP_SPL, tcb.snp),
        extension(snp::OID_UCODE_SPL, tcb.microcode),
        extension(snp::OID_HWID, OctetString::new(chip_id.to_vec()).expect("an octet string")),
    ];
    if let Some(fmc) = tcb.fmc {
        exts.push(extension(snp::OID_FMC_SPL, fmc));
    }
    exts
}

fn pem_of(cert: &Certificate) -> String {
    cert.to_pem(LineEnding::LF).expect("a certificate encodes")
}

impl MockRoot {
    /// Generates a new test ARK (self-signed) and an ASK signed by it.
    pub fn generate() -> MockRoot {
        let ark_key = rsa::RsaPrivateKey::new(&mut OsRng, MOCK_RSA_BITS).expect("RSA key generation");
        let ask_key = rsa::RsaPrivateKey::new(&mut OsRng, MOCK_RSA_BITS).expect("RSA key generation");
        let ark_name = name("CN=ARK-Cloister-Mock,O=Cloister test firmware");
        let ask_name = name("CN=SEV-Cloister-Mock,O=Cloister test firmware");
        let ark = sign_pss(&ark_key, ark_name.clone(), ark_name.clone(), rsa_spki(&ark_key), vec![]);
        let ask = sign_pss(&ark_key, ark_name, ask_name, rsa_spki(&ask_key), vec![]);
        MockRoot { ark_key, ask_key, ark, ask }
    }

    /// The secret of the mock chip this root's platforms share (see [`MockFirmware::derived_key`]).
    fn chip_secret(&self) -> [u8; 32] {
        use rsa::pkcs8::EncodePrivateKey;
        let der = self.ask_key.to_pkcs8_der().expect("an RSA key encodes");
        blake3::derive_key("cloister mock chip secret v1", der.as_bytes())
    }

    pub fn ark_der(&self) -> Vec<u8> {
        self.ark.to_der().expect("a certificate encodes")
    }

    pub fn ask_der(&self) -> Vec<u8> {
        self.ask.to_der().expect("a certificate encodes")
    }

    /// Writes `ark.cert.pem`, `ask.cert.pem` and their keys (readable by the owner only) to `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ark.cert.pem"), pem_of(&self.ark))?;
        std::fs::write(dir.join("ask.cert.pem"), pem_of(&self.ask))?;
        for (file, key) in [("ark.key.pem", &self.ark_key), ("ask.key.pem", &self.ask_key)] {
            let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(std::io::Error::other)?;
            write_private(&dir.join(file), pem.as_bytes())?;
        }
        Ok(())
    }

    /// Reads a root written by [`MockRoot::write`].
    pub fn read(dir: &Path) -> std::io::Result<MockRoot> {
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file))
                .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", dir.join(file).display())))
        };
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} holds no valid {what}: {e}", dir.display()),
            )
        };
        let key = |file: &str| -> std::io::Result<rsa::RsaPrivateKey> {
            rsa::RsaPrivateKey::from_pkcs8_pem(&read(file)?).map_err(|e| invalid("test root key", &e))
        };
        let cert = |file: &str| -> std::io::Result<Certificate> {
            Certificate::from_pem(read(file)?.as_bytes()).map_err(|e| invalid("test root certificate", &e))
        };
        Ok(MockRoot {
            ark_key: key("ark.key.pem")?,
            ask_key: key("ask.key.pem")?,
            ark: cert("ark.cert.pem")?,
            ask: cert("ask.cert.pem")?,
        })
    }

    /// Reads the root in `dir`, or generates one there if `dir` holds none.
    pub fn read_or_generate(dir: &Path) -> std::io::Result<MockRoot> {
        if dir.join("ark.cert.pem").exists() {
            return MockRoot::read(dir);
        }
        let root = MockRoot::generate();
        root.write(dir)?;
        Ok(root)
    }

    /// Signs a VCEK certificate for `key`, naming `chip_id` and `tcb` in its extensions.
    pub fn issue_vcek(&self, key: &p384::SecretKey, chip_id: &[u8; 64], tcb: &Tcb) -> Vec<u8> {
        let der = key.public_key().to_public_key_der().expect("a P-384 public key encodes");
        let spki = SubjectPublicKeyInfoOwned::from_der(der.as_bytes()).expect("a P-384 SPKI decodes");
        let cert = sign_pss(
            &self.ask_key,
            self.ask.tbs_certificate.subject.clone(),
            name("CN=SEV-VCEK,O=Cloister test firmware"),
            spki,
            vcek_extensions(chip_id, tcb),
        );
        cert.to_der().expect("a certificate encodes")
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// What a mock platform and guest report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConfig {
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub tcb: Tcb,
    pub policy: u64,
    pub chip_id: [u8; 64],
    /// The VM privilege level the report was requested from (0, the most privileged, on a
    /// well-formed guest).
    pub vmpl: u32,
}

impl Default for MockConfig {
    /// The default measurement and TCB, no host_data, a policy without debug, and a random chip.
    fn default() -> Self {
        let mut chip_id = [0u8; 64];
        OsRng.fill_bytes(&mut chip_id);
        MockConfig {
            measurement: default_measurement(),
            host_data: [0; 32],
            tcb: MOCK_TCB_DEFAULT,
            policy: MOCK_POLICY_DEFAULT,
            chip_id,
            vmpl: 0,
        }
    }
}

/// A mock SNP platform: a chip with its VCEK, and a guest with its launch measurement.
pub struct MockFirmware {
    config: MockConfig,
    /// The mock chip's secret, which its derived keys come from: a digest of the ASK's private
    /// key, so every mock platform of one root is one "chip" whose keys survive restarts.
    chip_secret: [u8; 32],
    vcek_key: p384::SecretKey,
    vcek: Vec<u8>,
    ask: Vec<u8>,
    ark: Vec<u8>,
}

impl MockFirmware {
    /// A platform whose VCEK `root`'s ASK signs.
    pub fn new(root: &MockRoot, config: MockConfig) -> MockFirmware {
        let vcek_key = p384::SecretKey::random(&mut OsRng);
        let vcek = root.issue_vcek(&vcek_key, &config.chip_id, &config.tcb);
        let chip_secret = root.chip_secret();
        MockFirmware { config, chip_secret, vcek_key, vcek, ask: root.ask_der(), ark: root.ark_der() }
    }

    /// The firmware's derived key for this guest (`MSG_KEY_REQ` on SEV-SNP): from the chip's
    /// secret, bound to the launch measurement and the guest policy, as [`crate::snp::derived_key`]
    /// asks the real firmware. Another measurement derives another key.
    pub fn derived_key(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("cloister mock firmware derived key v1");
        hasher.update(&self.chip_secret);
        hasher.update(&self.config.measurement);
        hasher.update(&self.config.policy.to_le_bytes());
        *hasher.finalize().as_bytes()
    }

    /// A platform whose VCEK names another chip or TCB than the reports it signs: what a host
    /// presenting a borrowed VCEK looks like. For tests of the VCEK extension check.
    pub fn with_mismatched_vcek(
        root: &MockRoot,
        config: MockConfig,
        vcek_chip_id: [u8; 64],
        vcek_tcb: Tcb,
    ) -> MockFirmware {
        let vcek_key = p384::SecretKey::random(&mut OsRng);
        let vcek = root.issue_vcek(&vcek_key, &vcek_chip_id, &vcek_tcb);
        let chip_secret = root.chip_secret();
        MockFirmware { config, chip_secret, vcek_key, vcek, ask: root.ask_der(), ark: root.ark_der() }
    }

    pub fn config(&self) -> &MockConfig {
        &self.config
    }

    /// The raw report, as `SNP_GUEST_REQUEST(MSG_REPORT_REQ)` returns it, with `report_data`.
    pub fn raw_report(&self, report_data: [u8; 64]) -> Vec<u8> {
        let tcb = TcbVersion::new(
            self.config.tcb.fmc,
            self.config.tcb.bootloader,
            self.config.tcb.tee,
            self.config.tcb.snp,
            self.config.tcb.microcode,
        );
        let report = AttestationReport {
            version: 3,
            guest_svn: 0,
            policy: GuestPolicy::from(self.config.policy),
            vmpl: self.config.vmpl,
            sig_algo: snp::SIG_ALGO_ECDSA_P384_SHA384,
            current_tcb: tcb,
            reported_tcb: tcb,
            committed_tcb: tcb,
            launch_tcb: tcb,
            report_data,
            measurement: self.config.measurement,
            host_data: self.config.host_data,
            chip_id: self.config.chip_id,
            cpuid_fam_id: Some(0x19),
            cpuid_mod_id: Some(0x01),
            cpuid_step: Some(0x01),
            ..Default::default()
        };
        let mut raw = report.to_bytes().expect("a mock report encodes").to_vec();
        let digest = sha2::Sha384::digest(&raw[..snp::SIGNED_LEN]);
        let signing = p384::ecdsa::SigningKey::from(&self.vcek_key);
        let signature: p384::ecdsa::Signature = signing.sign_prehash(&digest).expect("ECDSA signing");
        snp::write_signature(&mut raw, &signature);
        raw
    }

    /// The evidence a mock node presents: the report and the chain up to the test ARK.
    pub fn report(&self, report_data: [u8; 64]) -> SnpEvidence {
        SnpEvidence {
            report: self.raw_report(report_data),
            vcek: self.vcek.clone(),
            ask: Some(self.ask.clone()),
            ark: Some(self.ark.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_survives_a_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = MockRoot::read_or_generate(dir.path()).unwrap();
        let again = MockRoot::read_or_generate(dir.path()).unwrap();
        assert_eq!(root.ark_der(), again.ark_der());
        assert_eq!(root.ask_der(), again.ask_der());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("ask.key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the test ASK's key is private");
        }
    }

    #[test]
    fn the_chain_verifies_with_sev() {
        use sev::certs::snp::{Certificate as SevCert, Chain, Verifiable, ca};
        let root = MockRoot::generate();
        let firmware = MockFirmware::new(&root, MockConfig::default());
        let evidence = firmware.report([7; 64]);
        let chain = Chain {
            ca: ca::Chain {
                ark: SevCert::from_der(&root.ark_der()).unwrap(),
                ask: SevCert::from_der(&root.ask_der()).unwrap(),
            },
            vek: SevCert::from_der(&evidence.vcek).unwrap(),
        };
        let report = AttestationReport::from_bytes(&evidence.report).unwrap();
        (&chain, &report).verify().expect("sev's own verifier accepts the mock chain and report");
        assert_eq!(report.report_data, [7; 64]);
        assert_eq!(report.measurement, default_measurement());
    }
}
