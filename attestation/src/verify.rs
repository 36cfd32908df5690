//! The verifier: one code path for every kind of evidence.

use p384::ecdsa::signature::hazmat::PrehashVerifier;
use serde::{Deserialize, Serialize};
use sev::certs::snp::{Certificate, Verifiable, builtin};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use sha2::Digest;

use crate::snp::{self, REPORT_LEN, SIG_ALGO_ECDSA_P384_SHA384, SIGNED_LEN};
use crate::{Check, Evidence, Kind, Policy, Refusal, Roots, SnpEvidence, Tcb, azure};

/// What verified evidence established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub kind: Kind,
    /// Which root the chain ended in: `amd-milan`, `amd-genoa`, `amd-turin` or `mock`.
    pub root: String,
    pub measurement: String,
    pub host_data: String,
    pub chip_id: String,
    pub tcb: Tcb,
    pub policy: u64,
    pub report_data: String,
    /// Whether report_data was checked against a key and nonce (offline verification may not).
    pub binding_checked: bool,
    /// Azure: the PCR values the quote attests (checked against its pcrDigest and the policy).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pcrs: azure::PcrSet,
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

/// The roots a policy pins, by name, as DER.
fn pinned_roots(roots: &Roots) -> Vec<(&'static str, Vec<u8>)> {
    match roots {
        Roots::Amd => {
            [("amd-milan", builtin::milan::ARK), ("amd-genoa", builtin::genoa::ARK), ("amd-turin", builtin::turin::ARK)]
                .into_iter()
                .map(|(name, pem)| {
                    let der = Certificate::from_pem(pem).and_then(|c| c.to_der()).expect("sev's builtin ARKs parse");
                    (name, der)
                })
                .collect()
        }
        Roots::Mock { ark } => vec![("mock", ark.clone())],
    }
}

/// AMD's ASK for a builtin root, when the evidence carries none.
fn builtin_ask(root: &str) -> Option<&'static [u8]> {
    match root {
        "amd-milan" => Some(builtin::milan::ASK),
        "amd-genoa" => Some(builtin::genoa::ASK),
        "amd-turin" => Some(builtin::turin::ASK),
        _ => None,
    }
}

fn cert(der: &[u8], what: &str) -> Result<Certificate, Refusal> {
    parse_certificate(der).map_err(|e| Refusal::new(Check::Format, format!("the {what} is not a certificate: {e}")))
}

/// A certificate from untrusted DER. x509-parser reads it first: it checks every length against
/// the input without allocating. The `der` crate behind x509-cert allocates what a length field
/// claims before it finds the input shorter (a one-byte change to a VCEK made it allocate 10 MB),
/// so it only sees DER whose lengths hold.
pub(crate) fn parse_certificate(der: &[u8]) -> Result<Certificate, String> {
    x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Certificate::from_der(der).map_err(|e| e.to_string())
}

/// Check 1: the chain from a pinned ARK through the ASK to the VCEK. Returns the root's name.
fn check_chain(evidence: &SnpEvidence, report: &AttestationReport, roots: &Roots) -> Result<&'static str, Refusal> {
    let pinned = pinned_roots(roots);
    let (root, ark_der) = match &evidence.ark {
        Some(ark) => match pinned.iter().find(|(_, der)| der == ark) {
            Some((name, der)) => (*name, der.clone()),
            None => {
                let known = pinned.iter().map(|(n, d)| format!("{n} ({})", fingerprint(d))).collect::<Vec<_>>();
                return Err(Refusal::new(
                    Check::Root,
                    format!(
                        "the chain's ARK (sha256 {}) is not a pinned root; this service pins {}",
                        fingerprint(ark),
                        known.join(", ")
                    ),
                ));
            }
        },
        // Without an ARK in the evidence, the report's processor family names the root.
        None => {
            let by_cpu = match (report.cpuid_fam_id, report.cpuid_mod_id) {
                (Some(0x19), Some(0x00..=0x0f)) => "amd-milan",
                (Some(0x19), Some(_)) => "amd-genoa",
                (Some(0x1a), Some(_)) => "amd-turin",
                _ => "amd-milan",
            };
            match pinned.iter().find(|(n, _)| *n == by_cpu) {
                Some((name, der)) => (*name, der.clone()),
                None => {
                    return Err(Refusal::new(
                        Check::Root,
                        format!(
                            "the evidence names no ARK and the report's processor implies {by_cpu}, which this service does not pin"
                        ),
                    ));
                }
            }
        }
    };
    let ark = cert(&ark_der, "ARK")?;
    (&ark, &ark).verify().map_err(|e| Refusal::new(Check::Root, format!("the pinned ARK is not self-signed: {e}")))?;
    let ask = match (&evidence.ask, builtin_ask(root)) {
        (Some(der), _) => cert(der, "ASK")?,
        (None, Some(pem)) => Certificate::from_pem(pem).expect("sev's builtin ASKs parse"),
        (None, None) => return Err(Refusal::new(Check::AskSignature, "the evidence carries no ASK")),
    };
    (&ark, &ask).verify().map_err(|e| {
        Refusal::new(
            Check::AskSignature,
            format!(
                "the ASK (sha256 {}) is not signed by the {root} ARK: {e}",
                fingerprint(&ask.to_der().unwrap_or_default())
            ),
        )
    })?;
    let vcek = cert(&evidence.vcek, "VCEK")?;
    (&ask, &vcek).verify().map_err(|e| {
        Refusal::new(
            Check::VcekSignature,
            format!("the VCEK (sha256 {}) is not signed by the ASK: {e}", fingerprint(&evidence.vcek)),
        )
    })?;
    Ok(root)
}

/// Checks 2 and 3: the VCEK names this chip and TCB, and signs the report as received.
fn check_report(evidence: &SnpEvidence, report: &AttestationReport) -> Result<(), Refusal> {
    let claims = snp::vcek_claims(&evidence.vcek)?;
    // A chip id of zeros means the guest masked it (MaskChipId); there is nothing to compare.
    if let Some(hwid) = &claims.hwid
        && report.chip_id.iter().any(|b| *b != 0)
        && hwid.as_slice() != report.chip_id.as_slice()
    {
        return Err(Refusal::new(
            Check::VcekExtensions,
            format!(
                "the VCEK's hwID {} is not the report's chip_id {}",
                hex::encode(hwid),
                hex::encode(report.chip_id)
            ),
        ));
    }
    let reported = Tcb::from(report.reported_tcb);
    let tcb_matches = claims.tcb.bootloader == reported.bootloader
        && claims.tcb.tee == reported.tee
        && claims.tcb.snp == reported.snp
        && claims.tcb.microcode == reported.microcode
        && (claims.tcb.fmc.is_none() || claims.tcb.fmc == reported.fmc);
    if !tcb_matches {
        return Err(Refusal::new(
            Check::VcekExtensions,
            format!("the VCEK was issued for TCB {} but the report was signed at TCB {reported}", claims.tcb),
        ));
    }
    if report.sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(Refusal::new(
            Check::ReportSignature,
            format!("signature algorithm {} is not ECDSA P-384/SHA-384", report.sig_algo),
        ));
    }
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(&claims.public_key)
        .map_err(|e| Refusal::new(Check::ReportSignature, format!("the VCEK's key is not a P-384 key: {e}")))?;
    let signature = snp::read_signature(&evidence.report)?;
    // The raw bytes as received, not a re-encoding: reserved fields are covered too.
    let digest = sha2::Sha384::digest(&evidence.report[..SIGNED_LEN]);
    key.verify_prehash(&digest, &signature).map_err(|_| {
        Refusal::new(
            Check::ReportSignature,
            format!("the report (sha384 {}) is not signed by the VCEK", hex::encode(digest)),
        )
    })
}

/// The VM privilege level a report must come from. Lower levels are more privileged; a report
/// from VMPL 1 to 3 was requested by code that VMPL 0 (a paravisor, say) can inspect and alter,
/// so it vouches for less than the measurement suggests. On Azure the paravisor requests the
/// report at VMPL 0 too.
pub const REQUIRED_VMPL: u32 = 0;

/// Checks 4 to 7: what the report says against what the service admits.
fn check_claims(report: &AttestationReport, policy: &Policy) -> Result<(), Refusal> {
    if report.policy.debug_allowed() {
        return Err(Refusal::new(
            Check::DebugPolicy,
            format!("guest policy {:#x} allows debugging (bit 19)", u64::from(report.policy)),
        ));
    }
    if report.policy.migrate_ma_allowed() {
        return Err(Refusal::new(
            Check::MigrationAgent,
            format!("guest policy {:#x} allows a migration agent (MIGRATE_MA, bit 18)", u64::from(report.policy)),
        ));
    }
    if report.vmpl != REQUIRED_VMPL {
        return Err(Refusal::new(
            Check::Vmpl,
            format!(
                "the report comes from VMPL {}; only VMPL {REQUIRED_VMPL}, the guest's most privileged level, is admitted",
                report.vmpl
            ),
        ));
    }
    let measurement = hex::encode(report.measurement);
    if !policy.measurements.contains(&measurement) {
        return Err(Refusal::new(
            Check::Measurement,
            format!("measurement {measurement} is not in gov.attestation.measurements"),
        ));
    }
    let host_data = hex::encode(report.host_data);
    if !policy.host_data.contains(&host_data) {
        return Err(Refusal::new(
            Check::HostData,
            format!("host_data {host_data} is not in gov.attestation.host_data"),
        ));
    }
    let tcb = Tcb::from(report.reported_tcb);
    if !tcb.at_least(&policy.min_tcb) {
        return Err(Refusal::new(
            Check::Tcb,
            format!("reported TCB {tcb} is below gov.attestation.min_tcb {}", policy.min_tcb),
        ));
    }
    Ok(())
}

/// The SNP report inside any kind of evidence, checked for size and parsed, not yet verified.
fn report_of(evidence: &Evidence) -> Result<(SnpEvidence, AttestationReport), Refusal> {
    let snp_evidence = match evidence {
        Evidence::Snp(e) | Evidence::Mock(e) => e.clone(),
        Evidence::AzureVtpm(e) => azure::snp_part(e)?,
    };
    if snp_evidence.report.len() != REPORT_LEN {
        return Err(Refusal::new(
            Check::Format,
            format!("the report is {} bytes; an SNP report is {REPORT_LEN}", snp_evidence.report.len()),
        ));
    }
    let report = AttestationReport::from_bytes(&snp_evidence.report)
        .map_err(|e| Refusal::new(Check::Format, format!("the report does not parse: {e}")))?;
    Ok((snp_evidence, report))
}

/// What the evidence claims about the launch (measurement and host_data, hex), unverified: for a
/// service's first node, whose own values become the first allowed ones before it verifies itself.
pub fn launch_claims(evidence: &Evidence) -> Result<(String, String), Refusal> {
    let (_, report) = report_of(evidence)?;
    Ok((hex::encode(report.measurement), hex::encode(report.host_data)))
}

/// Verifies `evidence` against `policy`. `expected` is the binding (see [`crate::binding`]) of the
/// node's public key and the nonce this verifier issued; only offline verification passes `None`.
pub fn verify(evidence: &Evidence, policy: &Policy, expected: Option<&[u8; 64]>) -> Result<Verified, Refusal> {
    let (snp_evidence, report) = report_of(evidence)?;
    let root = check_chain(&snp_evidence, &report, &policy.roots)?;
    check_report(&snp_evidence, &report)?;
    check_claims(&report, policy)?;
    match (evidence, expected) {
        (Evidence::AzureVtpm(e), _) => {
            azure::check_binding(e, &report.report_data, expected)?;
            azure::check_pcrs(e, &policy.azure_pcrs)?;
        }
        (_, Some(expected)) if report.report_data != *expected => {
            return Err(Refusal::new(
                Check::Binding,
                format!(
                    "report_data {} does not bind this node's key and nonce (expected {})",
                    hex::encode(report.report_data),
                    hex::encode(expected)
                ),
            ));
        }
        _ => {}
    }
    Ok(Verified {
        kind: evidence.kind(),
        root: root.to_owned(),
        measurement: hex::encode(report.measurement),
        host_data: hex::encode(report.host_data),
        chip_id: hex::encode(report.chip_id),
        tcb: Tcb::from(report.reported_tcb),
        policy: u64::from(report.policy),
        report_data: hex::encode(report.report_data),
        binding_checked: expected.is_some(),
        pcrs: match evidence {
            Evidence::AzureVtpm(e) => e.pcrs.clone(),
            _ => Default::default(),
        },
    })
}
