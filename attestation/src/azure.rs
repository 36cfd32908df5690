//! Azure confidential VMs: the HCL report (an SNP report whose report_data commits to var_data) and a
//! vTPM quote signed by the attestation key that var_data carries.
//!
//! The chain of trust runs SNP report → sha256(var_data) in its report_data → the AK (JWK `HCLAkPub`) in
//! var_data → the quote's signature → the quote's extraData, which holds the node's binding. The SNP
//! report itself goes through the same checks as bare-metal evidence ([`snp_part`]); this module adds
//! the Azure links ([`check_binding`]).

use std::ops::Range;

use az_cvm_vtpm::hcl::{HclReport, ReportType, SNP_REPORT_SIZE};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Check, Refusal, SnpEvidence};

/// Evidence from an Azure CVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AzureEvidence {
    /// The HCL report as read from vTPM NV index 0x01400001: header, SNP report, IGVM data, var_data.
    #[serde(with = "crate::hex_bytes")]
    pub hcl_report: Vec<u8>,
    /// The vTPM quote: a marshalled TPMS_ATTEST whose extraData is the node's binding.
    #[serde(with = "crate::hex_bytes")]
    pub quote: Vec<u8>,
    /// The AK's RSASSA-PKCS1-v1_5 SHA-256 signature over `quote`, raw.
    #[serde(with = "crate::hex_bytes")]
    pub quote_signature: Vec<u8>,
    /// The VCEK, DER (from THIM on a real node).
    #[serde(with = "crate::hex_bytes")]
    pub vcek: Vec<u8>,
    /// The ASK, DER.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::hex_bytes::option")]
    pub ask: Option<Vec<u8>>,
    /// The ARK the sender chained to, DER. Never trusted: compared with the pinned roots.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::hex_bytes::option")]
    pub ark: Option<Vec<u8>>,
    /// The SHA-256 PCR values the quote covers, by PCR index, lowercase hex. Untrusted until
    /// their hash is the quote's pcrDigest ([`check_pcrs`]).
    #[serde(default, with = "pcr_indices_as_strings")]
    pub pcrs: PcrSet,
}

/// [`PcrSet`] in JSON as `{"4": "…"}`, read back through string keys: evidence is an internally
/// tagged enum, whose buffered content serde cannot turn from a string key into a `u8`.
mod pcr_indices_as_strings {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::PcrSet;

    pub fn serialize<S: Serializer>(set: &PcrSet, s: S) -> Result<S::Ok, S::Error> {
        set.iter().map(|(i, v)| (i.to_string(), v)).collect::<std::collections::BTreeMap<_, _>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PcrSet, D::Error> {
        std::collections::BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(i, v)| {
                let index = i.parse::<u8>().map_err(|_| serde::de::Error::custom(format!("PCR index {i:?}")))?;
                Ok((index, v))
            })
            .collect()
    }
}

/// PCR index → SHA-256 value (lowercase hex): what a quote attests, and an entry of the
/// governed allow-list `gov.attestation.azure_pcrs`.
pub type PcrSet = std::collections::BTreeMap<u8, String>;

/// The PCRs a new service's first node allows, from its own quote: 4 (the boot manager's code),
/// 7 (the Secure Boot policy) and 11 (the unified kernel image). Governance adds sets over any
/// PCRs, an application PCR among them.
pub const GENESIS_PCRS: [u8; 3] = [4, 7, 11];
/// PCRs a TPM 2.0 vTPM has in a bank.
pub const PCR_COUNT: u8 = 24;

// The HCL report's layout (az-cvm-vtpm's `AttestationReport`, all little-endian): a 32-byte header
// whose first word is "HCLA", the hardware report, then the IGVM request data (data_size, version,
// report_type, report_data_hash_type, variable_data_size) and var_data. az-cvm-vtpm parses it but
// keeps the header and the hash type private, and panics on a hash type other than SHA-256, so the
// few fields it hides are read here; a test checks these offsets agree with its parser.
const HCL_SIGNATURE: u32 = u32::from_le_bytes(*b"HCLA");
const HCL_VERSION: u32 = 1;
const HCL_REQUEST_TYPE: u32 = 2;
const HCL_HEADER_BYTES: usize = 32;
const HCL_SNP_REPORT: Range<usize> = HCL_HEADER_BYTES..HCL_HEADER_BYTES + SNP_REPORT_SIZE;
const IGVM_DATA_OFFSET: usize = HCL_SNP_REPORT.end;
const IGVM_DATA_BYTES: usize = 20;
const IGVM_VERSION: u32 = 1;
const IGVM_REPORT_TYPE_SNP: u32 = 2;
const IGVM_HASH_TYPE_OFFSET: usize = IGVM_DATA_OFFSET + 12;
const IGVM_HASH_TYPE_SHA256: u32 = 1;
const VAR_DATA_OFFSET: usize = IGVM_DATA_OFFSET + IGVM_DATA_BYTES;

/// TPM_GENERATED_VALUE: every TPMS_ATTEST the TPM itself produced starts with it.
const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE: the TPMS_ATTEST is a quote (not a certify, a session audit...).
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPM_ALG_SHA256, for the PCR bank and the name algorithm of synthetic quotes.
const TPM_ALG_SHA256: u16 = 0x000b;

/// The JWK id under which the HCL publishes the vTPM's attestation key in var_data.
const AK_KEY_ID: &str = "HCLAkPub";

/// The SNP report inside the HCL report, with the VCEK chain, for the common checks 1–7.
pub fn snp_part(e: &AzureEvidence) -> Result<SnpEvidence, Refusal> {
    let hcl = parse_hcl(&e.hcl_report)?;
    if hcl.report_type() != ReportType::Snp {
        return Err(Refusal::new(
            Check::Format,
            format!("the HCL report carries a {:?} report, not an SEV-SNP one", hcl.report_type()),
        ));
    }
    Ok(SnpEvidence {
        report: e.hcl_report[HCL_SNP_REPORT].to_vec(),
        vcek: e.vcek.clone(),
        ask: e.ask.clone(),
        ark: e.ark.clone(),
    })
}

/// The Azure-specific binding checks, given the report_data of the (already verified) SNP report:
/// var_data is what the SNP report commits to, the quote is signed by the AK in var_data, and the
/// quote's extraData is the `expected` binding when the caller has one.
pub fn check_binding(e: &AzureEvidence, report_data: &[u8; 64], expected: Option<&[u8; 64]>) -> Result<(), Refusal> {
    let hcl = parse_hcl(&e.hcl_report)?;
    check_var_data(&e.hcl_report, &hcl, report_data)?;
    let ak = attestation_key(&hcl)?;
    check_quote_signature(&ak, &e.quote, &e.quote_signature)?;
    // Parsed only now that the AK vouches for the bytes.
    let extra_data = quote_extra_data(&e.quote)?;
    if let Some(expected) = expected
        && extra_data != expected.as_slice()
    {
        return Err(Refusal::new(
            Check::Binding,
            format!(
                "the vTPM quote's extraData is {} but the node's key and nonce bind to {}",
                hex::encode(extra_data),
                hex::encode(expected)
            ),
        ));
    }
    Ok(())
}

/// Parses the HCL report with az-cvm-vtpm, after the header checks it leaves out.
fn parse_hcl(bytes: &[u8]) -> Result<HclReport, Refusal> {
    let signature = le_u32(bytes, 0);
    if signature != Some(HCL_SIGNATURE) {
        let seen = hex::encode(&bytes[..bytes.len().min(4)]);
        return Err(Refusal::new(Check::Format, format!("the HCL report starts with {seen:?}, not \"HCLA\"")));
    }
    HclReport::new(bytes.to_vec()).map_err(|err| {
        Refusal::new(
            Check::Format,
            format!(
                "the HCL report ({} bytes) does not parse: {err} (at least {VAR_DATA_OFFSET} bytes plus var_data)",
                bytes.len()
            ),
        )
    })
}

/// (a) report_data[..32] is sha256(var_data): what makes var_data, and so the AK, hardware-attested.
fn check_var_data(bytes: &[u8], hcl: &HclReport, report_data: &[u8; 64]) -> Result<(), Refusal> {
    // parse_hcl saw the whole IGVM request data, so the word is there.
    let hash_type = le_u32(bytes, IGVM_HASH_TYPE_OFFSET).unwrap_or(0);
    if hash_type != IGVM_HASH_TYPE_SHA256 {
        return Err(Refusal::new(
            Check::HclVarData,
            format!("the HCL report hashes var_data with IGVM hash type {hash_type}; only SHA-256 (1) is accepted"),
        ));
    }
    let var_data_sha256: [u8; 32] = Sha256::digest(hcl.var_data()).into();
    if report_data[..32] != var_data_sha256 {
        return Err(Refusal::new(
            Check::HclVarData,
            format!(
                "the SNP report's report_data[..32] is {} but sha256(var_data) is {}",
                hex::encode(&report_data[..32]),
                hex::encode(var_data_sha256)
            ),
        ));
    }
    Ok(())
}

/// The vTPM's attestation key: the RSA JWK `HCLAkPub` in var_data.
fn attestation_key(hcl: &HclReport) -> Result<RsaPublicKey, Refusal> {
    let jwk = hcl.ak_pub().map_err(|err| {
        Refusal::new(Check::QuoteSignature, format!("var_data holds no usable JWK {AK_KEY_ID:?}: {err}"))
    })?;
    let der = jwk.key.try_to_der().map_err(|err| {
        Refusal::new(Check::QuoteSignature, format!("the JWK {AK_KEY_ID:?} in var_data has no public key: {err}"))
    })?;
    RsaPublicKey::from_public_key_der(&der).map_err(|err| {
        Refusal::new(Check::QuoteSignature, format!("the JWK {AK_KEY_ID:?} in var_data is not an RSA key: {err}"))
    })
}

/// (b) the quote is signed by the AK (RSASSA-PKCS1-v1_5 over SHA-256, as the vTPM signs).
fn check_quote_signature(ak: &RsaPublicKey, quote: &[u8], signature: &[u8]) -> Result<(), Refusal> {
    let digest = Sha256::digest(quote);
    ak.verify(Pkcs1v15Sign::new::<Sha256>(), &digest, signature).map_err(|err| {
        Refusal::new(
            Check::QuoteSignature,
            format!(
                "the {}-byte quote signature {}… does not verify over the {}-byte quote with the {}-bit AK \
                 from var_data (modulus {}…): {err}",
                signature.len(),
                hex_prefix(signature),
                quote.len(),
                ak.n().bits(),
                hex_prefix(&ak.n().to_bytes_be())
            ),
        )
    })
}

/// (c) the extraData of a TPMS_ATTEST that must be a quote (TPM 2.0 Part 2, 10.12.12):
/// magic u32, type u16, qualifiedSigner TPM2B_NAME, extraData TPM2B_DATA, then fields not needed here.
fn quote_extra_data(quote: &[u8]) -> Result<&[u8], Refusal> {
    let mut r = Reader { bytes: quote, at: 0 };
    quote_through_extra_data(&mut r)
}

fn quote_format(what: String) -> Refusal {
    Refusal::new(Check::Format, format!("the vTPM quote is not a TPM2 quote: {what}"))
}

/// The PCRs a quote selects (ascending) and its pcrDigest: after extraData come clockInfo
/// (17 bytes), firmwareVersion (8), then TPMS_QUOTE_INFO: a TPML_PCR_SELECTION and a
/// TPM2B_DIGEST. Only a single SHA-256 bank is accepted, as the vTPM quotes it.
fn quote_pcr_selection(quote: &[u8]) -> Result<(Vec<u8>, &[u8]), Refusal> {
    let mut r = Reader { bytes: quote, at: 0 };
    quote_through_extra_data(&mut r)?;
    r.take(17 + 8).ok_or_else(|| quote_format("truncated in clockInfo or firmwareVersion".into()))?;
    let count = r.u32().ok_or_else(|| quote_format("truncated in pcrSelect".into()))?;
    if count != 1 {
        return Err(quote_format(format!("it selects {count} PCR banks; only the one SHA-256 bank is accepted")));
    }
    let hash = r.u16().ok_or_else(|| quote_format("truncated in pcrSelect".into()))?;
    if hash != TPM_ALG_SHA256 {
        return Err(quote_format(format!("its PCR bank is algorithm {hash:#06x}, not SHA-256")));
    }
    let size = r.take(1).ok_or_else(|| quote_format("truncated in pcrSelect".into()))?[0];
    let bitmap = r.take(usize::from(size)).ok_or_else(|| quote_format("truncated in pcrSelect".into()))?;
    let selected: Vec<u8> = (0..bitmap.len() * 8)
        .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .map(|i| u8::try_from(i).unwrap_or(u8::MAX))
        .collect();
    if selected.iter().any(|i| *i >= PCR_COUNT) {
        return Err(quote_format(format!("it selects PCRs beyond the {PCR_COUNT} a bank has")));
    }
    let digest = r.tpm2b().ok_or_else(|| quote_format("truncated in pcrDigest".into()))?;
    Ok((selected, digest))
}

/// Checks that the PCR values the evidence carries are the ones its (signature-checked) quote
/// attests: exactly the PCRs it selects, hashing to its pcrDigest; then that they match an entry
/// of `allowed` (each entry names some PCRs and the value each must have). Without this, any
/// Azure confidential VM, running anything, passed: on Azure the SNP measurement is the
/// paravisor's, the same for every VM; what the VM booted is in its PCRs.
pub fn check_pcrs(e: &AzureEvidence, allowed: &std::collections::BTreeSet<PcrSet>) -> Result<(), Refusal> {
    let (selected, digest) = quote_pcr_selection(&e.quote)?;
    let carried: Vec<u8> = e.pcrs.keys().copied().collect();
    if carried != selected {
        return Err(Refusal::new(
            Check::PcrDigest,
            format!("the evidence carries values for PCRs {carried:?} but the quote selects PCRs {selected:?}"),
        ));
    }
    let mut h = Sha256::new();
    for (index, value) in &e.pcrs {
        let bytes = hex::decode(value).ok().filter(|b| b.len() == 32).ok_or_else(|| {
            Refusal::new(Check::Format, format!("PCR {index} is not 32 bytes of hex: {}", hex_prefix(value.as_bytes())))
        })?;
        h.update(bytes);
    }
    let computed = h.finalize();
    if computed.as_slice() != digest {
        return Err(Refusal::new(
            Check::PcrDigest,
            format!(
                "the PCR values hash to {} but the quote's pcrDigest is {}: they are not the values it attests",
                hex::encode(computed),
                hex::encode(digest)
            ),
        ));
    }
    if allowed.is_empty() {
        return Err(Refusal::new(
            Check::Pcrs,
            "gov.attestation.azure_pcrs is empty: azure-vtpm evidence needs an allowed PCR set".to_owned(),
        ));
    }
    let mut misses = Vec::new();
    for entry in allowed {
        let miss = entry.iter().find_map(|(index, want)| match e.pcrs.get(index) {
            Some(have) if have.eq_ignore_ascii_case(want) => None,
            Some(have) => Some(format!("PCR {index} is {have}, the entry wants {want}")),
            None => Some(format!("PCR {index} is not in the quote")),
        });
        match miss {
            None => return Ok(()),
            Some(m) => misses.push(m),
        }
    }
    Err(Refusal::new(Check::Pcrs, format!("no entry of gov.attestation.azure_pcrs matches: {}", misses.join("; "))))
}

/// The PCRs of `indices` from evidence whose PCR values are checked: a new service's first allowed set.
pub fn pcr_subset(e: &AzureEvidence, indices: &[u8]) -> PcrSet {
    e.pcrs.iter().filter(|(i, _)| indices.contains(i)).map(|(i, v)| (*i, v.to_ascii_lowercase())).collect()
}

fn quote_through_extra_data<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], Refusal> {
    let format = quote_format;
    let quote = r.bytes;
    let magic = r.u32().ok_or_else(|| format(format!("{} bytes, too short for its magic", quote.len())))?;
    if magic != TPM_GENERATED_VALUE {
        return Err(format(format!("magic {magic:#010x}, not TPM_GENERATED_VALUE {TPM_GENERATED_VALUE:#010x}")));
    }
    let kind = r.u16().ok_or_else(|| format("truncated in its type".into()))?;
    if kind != TPM_ST_ATTEST_QUOTE {
        return Err(format(format!("type {kind:#06x}, not TPM_ST_ATTEST_QUOTE {TPM_ST_ATTEST_QUOTE:#06x}")));
    }
    r.tpm2b().ok_or_else(|| format("truncated in qualifiedSigner".into()))?;
    r.tpm2b().ok_or_else(|| format("truncated in extraData".into()))
}

/// Big-endian reads (the TPM's byte order) that fail instead of panicking past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A TPM2B: a u16 size, then that many bytes.
    fn tpm2b(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The first bytes of a long value, enough to tell two apart in a refusal.
fn hex_prefix(bytes: &[u8]) -> String {
    hex::encode(&bytes[..bytes.len().min(8)])
}

/// Collects evidence on an Azure CVM: a fresh HCL report whose user data is `user_data`, and a vTPM
/// quote over all SHA-256 PCRs with `user_data` as extraData, with the VCEK chain the caller fetched
/// from THIM ([`crate::thim::fetch`]).
///
/// Blocking (TPM calls, and az-cvm-vtpm waits 3 s for the HCL to refresh the report): call it from
/// `tokio::task::spawn_blocking`, or use [`collect_from_thim`].
#[cfg(feature = "azure")]
pub fn collect(user_data: &[u8; 64], vcek: crate::thim::VcekChain) -> Result<AzureEvidence, String> {
    use az_cvm_vtpm::vtpm;

    // Writing user_data to NV index 0x01400002 makes the HCL fetch a fresh SNP report, so its TCB is
    // the one the VCEK THIM serves now is for, rather than the one at boot.
    let hcl_report = vtpm::get_report_with_report_data(user_data)
        .map_err(|err| format!("reading the HCL report from vTPM NV index 0x01400001: {}", error_chain(&err)))?;
    let quote = vtpm::get_quote(user_data)
        .map_err(|err| format!("getting a vTPM quote from the AK at 0x81000003: {}", error_chain(&err)))?;
    Ok(AzureEvidence {
        hcl_report,
        quote: quote.message(),
        quote_signature: quote.signature(),
        vcek: vcek.vcek,
        ask: vcek.ask,
        ark: vcek.ark,
        // az-cvm-vtpm reads the bank the quote selected (every PCR), in slot order.
        pcrs: (0u8..).zip(quote.pcrs_sha256().map(hex::encode)).collect(),
    })
}

/// [`collect`], with the VCEK chain fetched from THIM at `thim_url` first, and the TPM calls kept off
/// the async runtime's threads.
#[cfg(feature = "azure")]
pub async fn collect_from_thim(
    user_data: &[u8; 64],
    thim_url: &str,
    thim_timeout: std::time::Duration,
) -> Result<AzureEvidence, String> {
    let vcek = crate::thim::fetch(thim_url, thim_timeout).await?;
    let user_data = *user_data;
    tokio::task::spawn_blocking(move || collect(&user_data, vcek))
        .await
        .map_err(|err| format!("the vTPM collection task failed: {err}"))?
}

/// az-cvm-vtpm's errors say "tpm error" and keep the TSS code in their source.
#[cfg(feature = "azure")]
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Well-formed Azure evidence without Azure, for tests here and in other crates.
pub mod testing {
    use rsa::RsaPrivateKey;

    use super::*;

    /// Builds what an Azure CVM would send: an HCL report around the SNP report that
    /// `snp_report_for` produces for report_data = sha256(var_data) ‖ 0³², var_data holding `ak` as
    /// the JWK `HCLAkPub`, and a quote with extraData = `user_data` signed by `ak`.
    pub fn synthetic(
        snp_report_for: impl FnOnce([u8; 64]) -> SnpEvidence,
        ak: &RsaPrivateKey,
        user_data: &[u8; 64],
    ) -> AzureEvidence {
        synthetic_with_pcrs(snp_report_for, ak, user_data, &default_pcrs())
    }

    /// The PCR values synthetic evidence reports unless told otherwise: PCR i holds
    /// sha256("synthetic PCR i").
    pub fn default_pcrs() -> [[u8; 32]; PCR_COUNT as usize] {
        std::array::from_fn(|i| Sha256::digest(format!("synthetic PCR {i}")).into())
    }

    /// [`synthetic`], with the vTPM's PCRs holding `pcrs`.
    pub fn synthetic_with_pcrs(
        snp_report_for: impl FnOnce([u8; 64]) -> SnpEvidence,
        ak: &RsaPrivateKey,
        user_data: &[u8; 64],
        pcrs: &[[u8; 32]; PCR_COUNT as usize],
    ) -> AzureEvidence {
        let var_data = var_data(ak, user_data);
        let mut report_data = [0u8; 64];
        report_data[..32].copy_from_slice(&Sha256::digest(&var_data));
        let snp = snp_report_for(report_data);
        assert_eq!(snp.report.len(), SNP_REPORT_SIZE, "the SNP report must be {SNP_REPORT_SIZE} bytes");
        let quote = quote(user_data, pcrs);
        AzureEvidence {
            hcl_report: hcl_report(&snp.report, &var_data),
            quote_signature: sign(ak, &quote),
            quote,
            vcek: snp.vcek,
            ask: snp.ask,
            ark: snp.ark,
            pcrs: (0u8..).zip(pcrs.iter().map(hex::encode)).collect(),
        }
    }

    /// The AK's RSASSA-PKCS1-v1_5 SHA-256 signature over `message`, as the vTPM makes it.
    pub fn sign(ak: &RsaPrivateKey, message: &[u8]) -> Vec<u8> {
        ak.sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message)).expect("the AK signs")
    }

    /// var_data as the HCL writes it: the vTPM's keys as JWKs, the VM's configuration, the user data.
    fn var_data(ak: &RsaPrivateKey, user_data: &[u8; 64]) -> Vec<u8> {
        use base64::Engine;
        let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let json = serde_json::json!({
            "keys": [{
                "kid": AK_KEY_ID,
                "key_ops": ["sign"],
                "kty": "RSA",
                "e": b64(ak.e().to_bytes_be()),
                "n": b64(ak.n().to_bytes_be()),
            }],
            "vm-configuration": {
                "console-enabled": false,
                "secure-boot": true,
                "tpm-enabled": true,
                "vmUniqueId": "00000000-0000-0000-0000-000000000000",
            },
            "user-data": hex::encode_upper(user_data),
        });
        serde_json::to_vec(&json).expect("var_data serializes")
    }

    /// Header, SNP report, IGVM request data, var_data: the layout [`HclReport::new`] reads.
    fn hcl_report(snp_report: &[u8], var_data: &[u8]) -> Vec<u8> {
        let total = VAR_DATA_OFFSET + var_data.len();
        let word = |n: usize| u32::try_from(n).expect("fits a u32").to_le_bytes();
        let mut out = Vec::with_capacity(total);
        out.extend(HCL_SIGNATURE.to_le_bytes());
        out.extend(HCL_VERSION.to_le_bytes());
        out.extend(word(total));
        out.extend(HCL_REQUEST_TYPE.to_le_bytes());
        out.resize(HCL_HEADER_BYTES, 0); // status and reserved
        out.extend(snp_report);
        out.extend(word(IGVM_DATA_BYTES + var_data.len()));
        out.extend(IGVM_VERSION.to_le_bytes());
        out.extend(IGVM_REPORT_TYPE_SNP.to_le_bytes());
        out.extend(IGVM_HASH_TYPE_SHA256.to_le_bytes());
        out.extend(word(var_data.len()));
        out.extend(var_data);
        out
    }

    /// A TPMS_ATTEST quote as the vTPM produces it: all 24 SHA-256 PCRs selected, holding `pcrs`.
    pub fn quote(user_data: &[u8], pcrs: &[[u8; 32]; PCR_COUNT as usize]) -> Vec<u8> {
        let tpm2b = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend(u16::try_from(bytes.len()).expect("a TPM2B fits a u16").to_be_bytes());
            out.extend(bytes);
        };
        let mut signer = TPM_ALG_SHA256.to_be_bytes().to_vec();
        signer.extend(Sha256::digest(b"synthetic AK"));
        let mut out = Vec::new();
        out.extend(TPM_GENERATED_VALUE.to_be_bytes());
        out.extend(TPM_ST_ATTEST_QUOTE.to_be_bytes());
        tpm2b(&mut out, &signer);
        tpm2b(&mut out, user_data);
        out.extend(0u64.to_be_bytes()); // clockInfo.clock
        out.extend(0u32.to_be_bytes()); // clockInfo.resetCount
        out.extend(0u32.to_be_bytes()); // clockInfo.restartCount
        out.push(1); // clockInfo.safe
        out.extend(0u64.to_be_bytes()); // firmwareVersion
        out.extend(1u32.to_be_bytes()); // pcrSelect.count
        out.extend(TPM_ALG_SHA256.to_be_bytes());
        out.extend([3, 0xff, 0xff, 0xff]); // sizeofSelect, PCRs 0–23
        tpm2b(&mut out, &Sha256::digest(pcrs.concat()));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use rsa::RsaPrivateKey;

    use super::testing::{quote, sign, synthetic};
    use super::*;

    const USER_DATA: [u8; 64] = [0x5a; 64];
    /// Where report_data sits in an SNP report (AMD SEV-SNP ABI, table "ATTESTATION_REPORT").
    const SNP_REPORT_DATA: Range<usize> = 0x50..0x90;

    /// RSA key generation is slow: two keys serve every test.
    fn aks() -> &'static (RsaPrivateKey, RsaPrivateKey) {
        static AKS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
        AKS.get_or_init(|| {
            let mut rng = rand_core::OsRng;
            (RsaPrivateKey::new(&mut rng, 2048).unwrap(), RsaPrivateKey::new(&mut rng, 2048).unwrap())
        })
    }

    /// An all-zero SNP report with report_data set: enough for everything here but checks 1–7.
    fn fake_snp(report_data: [u8; 64]) -> SnpEvidence {
        let mut report = vec![0u8; SNP_REPORT_SIZE];
        report[SNP_REPORT_DATA].copy_from_slice(&report_data);
        SnpEvidence { report, vcek: vec![0xc1], ask: Some(vec![0xa5]), ark: None }
    }

    fn evidence() -> AzureEvidence {
        synthetic(fake_snp, &aks().0, &USER_DATA)
    }

    /// What verify.rs does: report_data from the SNP part, then the Azure links.
    fn check(e: &AzureEvidence, expected: Option<&[u8; 64]>) -> Result<(), Refusal> {
        let snp = snp_part(e)?;
        let report_data: [u8; 64] = snp.report[SNP_REPORT_DATA].try_into().unwrap();
        check_binding(e, &report_data, expected)
    }

    fn refused_at(result: Result<(), Refusal>, check: Check) -> String {
        let refusal = result.expect_err("refused");
        assert_eq!(refusal.check, check, "{refusal}");
        refusal.detail
    }

    /// Replaces the quote and re-signs it with the AK, so only what follows the signature is tested.
    fn with_quote(mut e: AzureEvidence, quote: Vec<u8>) -> AzureEvidence {
        e.quote_signature = sign(&aks().0, &quote);
        e.quote = quote;
        e
    }

    #[test]
    fn synthetic_azure_evidence_passes_the_binding_checks() {
        let e = evidence();
        check(&e, Some(&USER_DATA)).unwrap();
        check(&e, None).unwrap();
    }

    #[test]
    fn azure_snp_part_is_the_embedded_report_with_the_chain() {
        let e = evidence();
        let snp = snp_part(&e).unwrap();
        assert_eq!(snp.report.len(), SNP_REPORT_SIZE);
        assert_eq!(snp.report, e.hcl_report[32..32 + SNP_REPORT_SIZE]);
        let var_data = HclReport::new(e.hcl_report.clone()).unwrap().var_data().to_vec();
        assert_eq!(snp.report[0x50..0x70], Sha256::digest(&var_data)[..]);
        assert_eq!(snp.report[0x70..0x90], [0u8; 32]);
        assert_eq!((snp.vcek, snp.ask, snp.ark), (vec![0xc1], Some(vec![0xa5]), None));
    }

    #[test]
    fn azure_hcl_offsets_agree_with_az_cvm_vtpm() {
        let e = evidence();
        let hcl = HclReport::new(e.hcl_report.clone()).unwrap();
        assert_eq!(hcl.var_data(), &e.hcl_report[VAR_DATA_OFFSET..]);
        assert_eq!(hcl.var_data_sha256(), <[u8; 32]>::from(Sha256::digest(&e.hcl_report[VAR_DATA_OFFSET..])));
        let var_data: serde_json::Value = serde_json::from_slice(hcl.var_data()).unwrap();
        assert_eq!(var_data["user-data"], hex::encode_upper(USER_DATA));
        assert_eq!(hcl.ak_pub().unwrap().key_id.as_deref(), Some(AK_KEY_ID));
    }

    #[test]
    fn azure_evidence_round_trips_through_json() {
        let e = crate::Evidence::AzureVtpm(evidence());
        assert_eq!(crate::Evidence::from_json(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn azure_flipped_quote_bit_is_refused_at_quote_signature() {
        let mut e = evidence();
        e.quote[20] ^= 1;
        let detail = refused_at(check(&e, Some(&USER_DATA)), Check::QuoteSignature);
        assert!(detail.contains(&hex_prefix(&e.quote_signature)), "{detail}");

        let mut e = evidence();
        let last = e.quote_signature.len() - 1;
        e.quote_signature[last] ^= 1;
        refused_at(check(&e, Some(&USER_DATA)), Check::QuoteSignature);
    }

    #[test]
    fn azure_quote_from_another_ak_is_refused_at_quote_signature() {
        let mut e = evidence();
        let other = synthetic(fake_snp, &aks().1, &USER_DATA);
        (e.quote, e.quote_signature) = (other.quote, other.quote_signature);
        refused_at(check(&e, Some(&USER_DATA)), Check::QuoteSignature);
    }

    #[test]
    fn azure_altered_var_data_is_refused_at_hcl_var_data() {
        let e = evidence();
        let at = |needle: &[u8]| {
            VAR_DATA_OFFSET + e.hcl_report[VAR_DATA_OFFSET..].windows(needle.len()).position(|w| w == needle).unwrap()
        };
        // The user data, then a byte of the AK's modulus.
        for offset in [at(b"\"user-data\":\"") + 13, at(b"\"n\":\"") + 10] {
            let mut tampered = e.clone();
            tampered.hcl_report[offset] = if tampered.hcl_report[offset] == b'A' { b'B' } else { b'A' };
            let detail = refused_at(check(&tampered, Some(&USER_DATA)), Check::HclVarData);
            let var_data_sha256 = hex::encode(Sha256::digest(&tampered.hcl_report[VAR_DATA_OFFSET..]));
            assert!(detail.contains(&var_data_sha256), "{detail}");
        }
    }

    #[test]
    fn azure_var_data_with_another_ak_is_refused_at_hcl_var_data() {
        // An attacker's var_data naming its own AK, around the genuine SNP report.
        let mut e = synthetic(fake_snp, &aks().1, &USER_DATA);
        let genuine = evidence();
        e.hcl_report[HCL_SNP_REPORT].copy_from_slice(&genuine.hcl_report[HCL_SNP_REPORT]);
        refused_at(check(&e, Some(&USER_DATA)), Check::HclVarData);
    }

    #[test]
    fn azure_var_data_hashed_otherwise_is_refused_not_panicking() {
        let mut e = evidence();
        e.hcl_report[IGVM_HASH_TYPE_OFFSET] = 2; // SHA-384
        let detail = refused_at(check(&e, Some(&USER_DATA)), Check::HclVarData);
        assert!(detail.contains("hash type 2;"), "{detail}");
    }

    #[test]
    fn azure_quote_for_other_user_data_is_refused_at_binding() {
        let e = synthetic(fake_snp, &aks().0, &[0x77; 64]);
        let detail = refused_at(check(&e, Some(&USER_DATA)), Check::Binding);
        assert!(detail.contains(&hex::encode([0x77; 64])) && detail.contains(&hex::encode(USER_DATA)), "{detail}");
        // Without an expected binding only the signatures count.
        check(&e, None).unwrap();
    }

    #[test]
    fn azure_quote_that_is_not_a_quote_is_refused_at_format() {
        let good = quote(&USER_DATA, &super::testing::default_pcrs());
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        let mut not_quote = good.clone();
        not_quote[5] = 0x17; // TPM_ST_ATTEST_CERTIFY
        let mut cases = vec![(bad_magic, "magic"), (not_quote, "type 0x8017"), (good[..3].to_vec(), "too short")];
        // extraData claims more bytes than the quote has.
        let extra_at = 4 + 2 + 2 + 34;
        let mut long_extra = good[..extra_at + 2 + 10].to_vec();
        long_extra[extra_at..extra_at + 2].copy_from_slice(&64u16.to_be_bytes());
        cases.push((long_extra, "extraData"));
        for (bytes, expect) in cases {
            let detail = refused_at(check(&with_quote(evidence(), bytes), Some(&USER_DATA)), Check::Format);
            assert!(detail.contains(expect), "{detail}");
        }
    }

    #[test]
    fn azure_truncated_hcl_report_is_refused_at_format() {
        let e = evidence();
        for len in [0, 3, 100, VAR_DATA_OFFSET - 1, e.hcl_report.len() - 1] {
            let mut truncated = e.clone();
            truncated.hcl_report.truncate(len);
            let detail = refused_at(snp_part(&truncated).map(drop), Check::Format);
            assert!(detail.contains("HCL"), "{detail}");
            refused_at(check_binding(&truncated, &[0; 64], None), Check::Format);
        }
    }

    #[test]
    fn azure_hcl_report_that_is_not_snp_is_refused_at_format() {
        let mut tdx = evidence();
        tdx.hcl_report[IGVM_DATA_OFFSET + 8] = 4; // report_type TDX
        let detail = refused_at(snp_part(&tdx).map(drop), Check::Format);
        assert!(detail.contains("Tdx"), "{detail}");

        let mut unsigned = evidence();
        unsigned.hcl_report[..4].copy_from_slice(b"XXXX");
        let detail = refused_at(snp_part(&unsigned).map(drop), Check::Format);
        assert!(detail.contains("58585858"), "{detail}");
    }

    /// The synthetic quote is what the TSS itself reads as a quote, with our extraData.
    #[cfg(feature = "azure")]
    #[test]
    fn azure_synthetic_quote_unmarshalls_with_tss_esapi() {
        use tss_esapi::structures::{Attest, AttestInfo};
        use tss_esapi::traits::UnMarshall;

        let pcrs = super::testing::default_pcrs();
        let bytes = quote(&USER_DATA, &pcrs);
        let attest = Attest::unmarshall(&bytes).unwrap();
        assert_eq!(attest.extra_data().value(), USER_DATA);
        let AttestInfo::Quote { info } = attest.attested() else { panic!("not a quote") };
        // The TSS reads the PCR digest where this module's parser does.
        let (selected, digest) = quote_pcr_selection(&bytes).unwrap();
        assert_eq!(info.pcr_digest().value(), digest);
        assert_eq!(digest, Sha256::digest(pcrs.concat()).as_slice());
        assert_eq!(selected, (0..PCR_COUNT).collect::<Vec<_>>());
    }
}
