//! AMD SEV-SNP specifics: the report's binary layout, the VCEK's extensions, and collecting a
//! report from `/dev/sev-guest`.

use std::path::Path;

use p384::elliptic_curve::generic_array::GenericArray;
use sev::firmware::host::CertType;
use x509_cert::spki::ObjectIdentifier;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{Check, Refusal, SnpEvidence, Tcb};

/// The size of an SNP attestation report.
pub const REPORT_LEN: usize = 1184;
/// The report's signature covers bytes `0..SIGNED_LEN`.
pub const SIGNED_LEN: usize = 0x2a0;
/// Where the signature starts: r then s, each 72 bytes little-endian.
const SIGNATURE_OFFSET: usize = 0x2a0;
const SIGNATURE_COMPONENT_LEN: usize = 72;
/// The report's `sig_algo` for ECDSA P-384 with SHA-384, the only algorithm SNP defines.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// AMD's VCEK certificate extensions (SEV-SNP VCEK specification).
pub const OID_STRUCT_VERSION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.1");
pub const OID_PRODUCT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.2");
pub const OID_BL_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
pub const OID_TEE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
pub const OID_SNP_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
pub const OID_UCODE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
pub const OID_FMC_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
pub const OID_HWID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");

/// Writes an ECDSA signature into a raw report in AMD's layout.
pub(crate) fn write_signature(raw: &mut [u8], signature: &p384::ecdsa::Signature) {
    let (r, s) = signature.split_bytes();
    for (i, component) in [r, s].iter().enumerate() {
        let start = SIGNATURE_OFFSET + i * SIGNATURE_COMPONENT_LEN;
        let field = &mut raw[start..start + SIGNATURE_COMPONENT_LEN];
        field.fill(0);
        for (j, b) in component.iter().rev().enumerate() {
            field[j] = *b;
        }
    }
}

/// Reads the ECDSA signature out of a raw report.
pub(crate) fn read_signature(raw: &[u8]) -> Result<p384::ecdsa::Signature, Refusal> {
    // r and s are followed by reserved bytes, which AMD's firmware leaves zero. They are outside
    // what the signature covers, so anything else there would be a second encoding of the same
    // signed report.
    let reserved = &raw[SIGNATURE_OFFSET + 2 * SIGNATURE_COMPONENT_LEN..REPORT_LEN];
    if reserved.iter().any(|b| *b != 0) {
        return Err(Refusal::new(
            Check::ReportSignature,
            "the reserved bytes after the report's signature are not zero",
        ));
    }
    let mut components = [[0u8; 48]; 2];
    for (i, component) in components.iter_mut().enumerate() {
        let start = SIGNATURE_OFFSET + i * SIGNATURE_COMPONENT_LEN;
        let field = &raw[start..start + SIGNATURE_COMPONENT_LEN];
        if field[48..].iter().any(|b| *b != 0) {
            return Err(Refusal::new(Check::ReportSignature, "the report's signature component exceeds 384 bits"));
        }
        for (j, b) in field[..48].iter().rev().enumerate() {
            component[j] = *b;
        }
    }
    p384::ecdsa::Signature::from_scalars(
        *GenericArray::from_slice(&components[0]),
        *GenericArray::from_slice(&components[1]),
    )
    .map_err(|e| Refusal::new(Check::ReportSignature, format!("the report's signature is malformed: {e}")))
}

/// What a VCEK certificate says about its chip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcekClaims {
    pub hwid: Option<Vec<u8>>,
    pub tcb: Tcb,
    /// The VCEK's public key, SEC1.
    pub public_key: Vec<u8>,
}

fn ext_u8(value: &[u8], oid: &ObjectIdentifier) -> Result<u8, Refusal> {
    // AMD encodes each SPL as a DER INTEGER.
    let n = <u32 as x509_cert::der::Decode>::from_der(value).map_err(|e| {
        Refusal::new(Check::VcekExtensions, format!("the VCEK's extension {oid} is not an integer: {e}"))
    })?;
    u8::try_from(n).map_err(|_| Refusal::new(Check::VcekExtensions, format!("the VCEK's extension {oid} is {n}")))
}

/// Reads the hwID and TCB extensions and the public key of a VCEK (DER).
pub fn vcek_claims(der: &[u8]) -> Result<VcekClaims, Refusal> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Refusal::new(Check::Format, format!("the VCEK is not an X.509 certificate: {e}")))?;
    let mut claims =
        VcekClaims { hwid: None, tcb: Tcb::default(), public_key: cert.public_key().subject_public_key.data.to_vec() };
    for ext in cert.extensions() {
        let Ok(oid) = ObjectIdentifier::from_bytes(ext.oid.as_bytes()) else { continue };
        let value = ext.value;
        match oid {
            OID_BL_SPL => claims.tcb.bootloader = ext_u8(value, &oid)?,
            OID_TEE_SPL => claims.tcb.tee = ext_u8(value, &oid)?,
            OID_SNP_SPL => claims.tcb.snp = ext_u8(value, &oid)?,
            OID_UCODE_SPL => claims.tcb.microcode = ext_u8(value, &oid)?,
            OID_FMC_SPL => claims.tcb.fmc = Some(ext_u8(value, &oid)?),
            OID_HWID => {
                // AMD's hwID is an OCTET STRING of the 64-byte chip id; some VCEKs carry it raw.
                let id = <x509_cert::der::asn1::OctetString as x509_cert::der::Decode>::from_der(value)
                    .map(|o| o.as_bytes().to_vec())
                    .unwrap_or_else(|_| value.to_vec());
                claims.hwid = Some(id);
            }
            _ => {}
        }
    }
    Ok(claims)
}

/// Where a bare-metal SNP node finds its VCEK chain when the host supplies none.
#[derive(Debug, Clone)]
pub enum VcekSource<'a> {
    /// Only the extended report's certificate table.
    ExtendedReport,
    /// A DER or PEM file (the VCEK; the ASK and ARK come from `sev`'s builtin copies).
    File(&'a Path),
}

fn der_or_pem(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.starts_with(b"-----BEGIN") {
        let cert = sev::certs::snp::Certificate::from_pem(bytes).map_err(|e| e.to_string())?;
        cert.to_der().map_err(|e| e.to_string())
    } else {
        Ok(bytes.to_vec())
    }
}

/// Asks `/dev/sev-guest` for an extended report over `report_data`, with the VCEK chain from the
/// host's certificate table or from `source`.
pub fn collect(report_data: [u8; 64], source: VcekSource<'_>) -> Result<SnpEvidence, String> {
    let mut firmware = sev::firmware::guest::Firmware::open()
        .map_err(|e| format!("opening /dev/sev-guest failed ({e}): is this an SEV-SNP guest?"))?;
    let (report, certs) = firmware
        .get_ext_report(None, Some(report_data), Some(0))
        .map_err(|e| format!("the SNP firmware refused the report request: {e}"))?;
    let mut evidence = SnpEvidence { report, vcek: Vec::new(), ask: None, ark: None };
    for entry in certs.unwrap_or_default() {
        let der = der_or_pem(&entry.data)?;
        match entry.cert_type {
            CertType::VCEK => evidence.vcek = der,
            CertType::ASK => evidence.ask = Some(der),
            CertType::ARK => evidence.ark = Some(der),
            _ => {}
        }
    }
    if evidence.vcek.is_empty() {
        match source {
            VcekSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("reading the VCEK {}: {e}", path.display()))?;
                evidence.vcek = der_or_pem(&bytes)?;
            }
            VcekSource::ExtendedReport => {
                return Err("the host supplied no VCEK with the extended report; configure a VCEK file".into());
            }
        }
    }
    Ok(evidence)
}

/// The firmware's derived key for this guest (`MSG_KEY_REQ` through `/dev/sev-guest`): from the
/// chip's VCEK secret, mixed with the launch measurement and the guest policy (guest field select
/// bits 3 and 0) at VMPL 0. A guest launched with another measurement, or on another chip, gets
/// another key; the host never sees it.
pub fn derived_key() -> Result<[u8; 32], String> {
    use sev::firmware::guest::{DerivedKey, Firmware, GuestFieldSelect};
    let mut firmware =
        Firmware::open().map_err(|e| format!("opening /dev/sev-guest failed ({e}): is this an SEV-SNP guest?"))?;
    let request = DerivedKey::new(false, GuestFieldSelect(0b1001), 0, 0, 0, None);
    firmware.get_derived_key(Some(1), request).map_err(|e| format!("the firmware refused a derived key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{MockConfig, MockFirmware, MockRoot};

    #[test]
    fn the_signature_layout_round_trips() {
        let root = MockRoot::generate();
        let config = MockConfig { tcb: Tcb { fmc: Some(2), ..crate::mock::MOCK_TCB_DEFAULT }, ..Default::default() };
        let firmware = MockFirmware::new(&root, config.clone());
        let evidence = firmware.report([1; 64]);
        read_signature(&evidence.report).unwrap();
        let claims = vcek_claims(&evidence.vcek).unwrap();
        assert_eq!(claims.hwid.as_deref(), Some(&config.chip_id[..]));
        assert_eq!(claims.tcb, config.tcb);
    }

    #[test]
    fn the_genuine_milan_vcek_carries_amd_extensions() {
        let claims = vcek_claims(include_bytes!("../testdata/milan/vcek_milan.der")).unwrap();
        assert_eq!(claims.hwid.as_ref().map(Vec::len), Some(64));
        assert!(claims.tcb.microcode > 0, "{:?}", claims.tcb);
    }
}
