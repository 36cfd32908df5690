//! Attestation for Cloister nodes: the evidence a node presents, the policy a service admits, and
//! the one verifier that checks every kind of evidence against it.
//!
//! Three kinds of evidence exist:
//! - `snp`: a bare-metal AMD SEV-SNP report from `/dev/sev-guest` ([`snp::collect`]);
//! - `azure-vtpm`: an Azure confidential VM's HCL report (with the SNP report inside) and a vTPM
//!   quote ([`azure`]);
//! - `mock`: an SNP report from [`mock::MockFirmware`], signed by a test ARK→ASK→VCEK chain.
//!
//! All three reach [`verify::verify`], which runs the same checks in the same order. Only the
//! pinned root differs: AMD's ARKs, or the service's test ARK when its genesis chose `mock`.

pub mod azure;
pub mod mock;
pub mod nonce;
pub mod snp;
pub mod thim;
pub mod verify;

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use nonce::{CHALLENGE_INTERVAL_MS, Holder, NONCE_TTL_S, NONCES_PER_HOLDER_MAX, Nonce, NonceStore};
pub use verify::{Verified, verify};

/// The kinds of evidence, as named in configuration and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Snp,
    AzureVtpm,
    Mock,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Snp => "snp",
            Kind::AzureVtpm => "azure-vtpm",
            Kind::Mock => "mock",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "snp" => Ok(Kind::Snp),
            "azure-vtpm" => Ok(Kind::AzureVtpm),
            "mock" => Ok(Kind::Mock),
            other => Err(format!("unknown attestation kind {other:?}: expected snp, azure-vtpm or mock")),
        }
    }
}

/// Bytes carried as lowercase hex in JSON.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text.trim()).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(b) => s.serialize_some(&hex::encode(b)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            let text = Option::<String>::deserialize(d)?;
            text.map(|t| hex::decode(t.trim()).map_err(serde::de::Error::custom)).transpose()
        }
    }
}

/// An SNP report with the certificates that lead to it. The ARK travels only so that a refusal can
/// say which root the sender believed in: the verifier never trusts it, it compares it with the
/// pinned one. A missing ASK is taken from `sev`'s builtin copy for the report's processor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnpEvidence {
    /// The raw report as the firmware produced it (1184 bytes), signature included.
    #[serde(with = "hex_bytes")]
    pub report: Vec<u8>,
    /// The VCEK, DER.
    #[serde(with = "hex_bytes")]
    pub vcek: Vec<u8>,
    /// The ASK, DER.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_bytes::option")]
    pub ask: Option<Vec<u8>>,
    /// The ARK the sender chained to, DER.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_bytes::option")]
    pub ark: Option<Vec<u8>>,
}

/// A node's evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Evidence {
    Snp(SnpEvidence),
    AzureVtpm(azure::AzureEvidence),
    Mock(SnpEvidence),
}

impl Evidence {
    pub fn kind(&self) -> Kind {
        match self {
            Evidence::Snp(_) => Kind::Snp,
            Evidence::AzureVtpm(_) => Kind::AzureVtpm,
            Evidence::Mock(_) => Kind::Mock,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("evidence serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Evidence, Refusal> {
        serde_json::from_slice(bytes)
            .map_err(|e| Refusal::new(Check::Format, format!("the evidence is not valid: {e}")))
    }
}

/// A TCB version: the security patch levels of each firmware component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later only.
    pub fmc: Option<u8>,
}

impl Tcb {
    /// Whether every component is at least `min`'s.
    pub fn at_least(&self, min: &Tcb) -> bool {
        self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
            && self.fmc.unwrap_or(0) >= min.fmc.unwrap_or(0)
    }
}

impl From<sev::firmware::host::TcbVersion> for Tcb {
    fn from(t: sev::firmware::host::TcbVersion) -> Self {
        Tcb { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode, fmc: t.fmc }
    }
}

impl fmt::Display for Tcb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bootloader={} tee={} snp={} microcode={}", self.bootloader, self.tee, self.snp, self.microcode)?;
        if let Some(fmc) = self.fmc {
            write!(f, " fmc={fmc}")?;
        }
        Ok(())
    }
}

/// Which roots of trust a service accepts: AMD's, or the test ARK of a mock service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Roots {
    /// `sev`'s builtin Milan, Genoa and Turin ARKs.
    Amd,
    /// The test ARK generated at the service's genesis (DER). Only a service whose genesis says
    /// `attestation = "mock"` has this.
    Mock {
        #[serde(with = "hex_bytes")]
        ark: Vec<u8>,
    },
}

/// What a service admits: the roots, and the governed allow-lists and minimum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub roots: Roots,
    /// Allowed launch measurements, lowercase hex of 48 bytes.
    pub measurements: BTreeSet<String>,
    /// Allowed host_data, lowercase hex of 32 bytes.
    pub host_data: BTreeSet<String>,
    pub min_tcb: Tcb,
    /// Allowed vTPM PCR sets, for `azure-vtpm` evidence: one must match.
    #[serde(default)]
    pub azure_pcrs: BTreeSet<azure::PcrSet>,
}

/// The verifier's checks, in the order it runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The evidence does not parse.
    Format,
    /// 1: the chain's ARK is not a pinned root.
    Root,
    /// 1: the ASK is not signed by the ARK.
    AskSignature,
    /// 1: the VCEK is not signed by the ASK.
    VcekSignature,
    /// 2: the VCEK's hwID or TCB extensions do not match the report.
    VcekExtensions,
    /// 3: the report is not signed by the VCEK.
    ReportSignature,
    /// 4: the guest policy allows debugging.
    DebugPolicy,
    /// 4: the guest policy allows a migration agent, which could move the guest's memory, keys
    /// included, to a platform nobody attested.
    MigrationAgent,
    /// 4: the report was requested from a VM privilege level other than 0.
    Vmpl,
    /// 5: the measurement is not in `gov.attestation.measurements`.
    Measurement,
    /// 6: host_data is not in `gov.attestation.host_data`.
    HostData,
    /// 7: the reported TCB is below `gov.attestation.min_tcb`.
    Tcb,
    /// Azure: the HCL report's var_data does not hash to the SNP report's report_data.
    HclVarData,
    /// Azure: the vTPM quote is not signed by the attestation key in var_data.
    QuoteSignature,
    /// Azure: the PCR values the evidence carries are not the ones the quote attests.
    PcrDigest,
    /// Azure: the PCR values match no entry of `gov.attestation.azure_pcrs`.
    Pcrs,
    /// 8: the nonce was never issued by the verifier, or has expired or been used.
    Nonce,
    /// 8: report_data (or, on Azure, the quote's user data) does not bind the node's key and nonce.
    Binding,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Format => "format",
            Check::Root => "root",
            Check::AskSignature => "ask-signature",
            Check::VcekSignature => "vcek-signature",
            Check::VcekExtensions => "vcek-extensions",
            Check::ReportSignature => "report-signature",
            Check::DebugPolicy => "debug-policy",
            Check::MigrationAgent => "migration-agent",
            Check::Vmpl => "vmpl",
            Check::Measurement => "measurement",
            Check::HostData => "host-data",
            Check::Tcb => "tcb",
            Check::HclVarData => "hcl-var-data",
            Check::QuoteSignature => "quote-signature",
            Check::PcrDigest => "pcr-digest",
            Check::Pcrs => "pcrs",
            Check::Nonce => "nonce",
            Check::Binding => "binding",
        }
    }
}

/// Why evidence was refused: the check that failed and what it saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("attestation refused at check `{}`: {detail}", check.as_str())]
pub struct Refusal {
    pub check: Check,
    pub detail: String,
}

impl Refusal {
    pub fn new(check: Check, detail: impl Into<String>) -> Refusal {
        Refusal { check, detail: detail.into() }
    }
}

/// Domain separation for [`binding`].
const BINDING_CONTEXT: &[u8] = b"cloister attestation binding v1";

/// What a node's report_data must hold: SHA-512 over a context string, the node's public key (DER
/// SubjectPublicKeyInfo, length-prefixed) and the verifier's nonce.
pub fn binding(public_key_der: &[u8], nonce: &Nonce) -> [u8; 64] {
    let mut h = sha2::Sha512::new();
    h.update(BINDING_CONTEXT);
    h.update((public_key_der.len() as u64).to_be_bytes());
    h.update(public_key_der);
    h.update(nonce.0);
    h.finalize().into()
}
