//! Azure vTPM evidence through the whole verifier: an HCL report around a mock-signed SNP report, and
//! a vTPM quote by the AK that var_data names. Each link of the chain, broken, is refused at its check.

mod common;

use cloister_attestation::azure::{self, AzureEvidence};
use cloister_attestation::mock::{self, MockConfig, MockFirmware, MockRoot};
use cloister_attestation::{Check, Evidence, Kind, Nonce, binding, verify};
use common::{fixtures, policy};

const NODE_KEY: &[u8] = b"a node's SubjectPublicKeyInfo";
/// Where the SNP report sits in the HCL report: after the 32-byte HCL header.
const HCL_SNP_REPORT_OFFSET: usize = 32;

/// Evidence from a mock Azure CVM whose vTPM quote carries `user_data`.
fn azure_evidence(user_data: &[u8; 64]) -> AzureEvidence {
    let (_, firmware, ak) = fixtures();
    azure::testing::synthetic(|report_data| firmware.report(report_data), ak, user_data)
}

fn refused(e: AzureEvidence, expected: &[u8; 64]) -> (Check, String) {
    let refusal = verify(&Evidence::AzureVtpm(e), &policy(), Some(expected)).expect_err("the evidence must be refused");
    (refusal.check, refusal.detail)
}

#[test]
fn azure_evidence_verifies_end_to_end_and_round_trips_through_json() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let evidence = Evidence::AzureVtpm(azure_evidence(&expected));
    let again = Evidence::from_json(&evidence.to_json()).unwrap();
    assert_eq!(again, evidence);
    let verified = verify(&again, &policy(), Some(&expected)).unwrap();
    assert_eq!(verified.kind, Kind::AzureVtpm);
    assert_eq!(verified.root, "mock");
    assert_eq!(verified.measurement, hex::encode(mock::default_measurement()));
    assert!(verified.binding_checked);
    // The SNP report commits to var_data, not to the node's binding: that travels in the quote.
    assert_ne!(verified.report_data, hex::encode(expected));
}

#[test]
fn azure_quote_for_another_key_or_nonce_is_refused_at_binding() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let stale = binding(NODE_KEY, &Nonce::random());
    let (check, detail) = refused(azure_evidence(&stale), &expected);
    assert_eq!(check, Check::Binding, "{detail}");
    assert!(detail.contains(&hex::encode(stale)) && detail.contains(&hex::encode(expected)), "{detail}");
}

#[test]
fn azure_tampered_quote_is_refused_at_quote_signature() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let mut e = azure_evidence(&expected);
    let last = e.quote.len() - 1;
    e.quote[last] ^= 0x01;
    let (check, detail) = refused(e, &expected);
    assert_eq!(check, Check::QuoteSignature, "{detail}");
}

#[test]
fn azure_tampered_var_data_is_refused_at_hcl_var_data() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let mut e = azure_evidence(&expected);
    let last = e.hcl_report.len() - 1;
    assert_eq!(e.hcl_report[last], b'}', "var_data is JSON and ends the HCL report");
    e.hcl_report[last - 1] ^= 0x01;
    let (check, detail) = refused(e, &expected);
    assert_eq!(check, Check::HclVarData, "{detail}");
}

#[test]
fn azure_tampered_snp_report_is_refused_at_report_signature() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let mut e = azure_evidence(&expected);
    // A byte of report_data (0x50 into the SNP report): what pointing it at other var_data would take.
    e.hcl_report[HCL_SNP_REPORT_OFFSET + 0x50] ^= 0x01;
    let (check, detail) = refused(e, &expected);
    assert_eq!(check, Check::ReportSignature, "{detail}");
}

#[test]
fn azure_evidence_under_another_root_is_refused_at_root() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let rogue = MockFirmware::new(&MockRoot::generate(), MockConfig::default());
    let e = azure::testing::synthetic(|report_data| rogue.report(report_data), &fixtures().2, &expected);
    let (check, detail) = refused(e, &expected);
    assert_eq!(check, Check::Root, "{detail}");
}

#[test]
fn azure_truncated_hcl_report_is_refused_at_format() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let mut e = azure_evidence(&expected);
    e.hcl_report.truncate(HCL_SNP_REPORT_OFFSET + 100);
    let (check, detail) = refused(e, &expected);
    assert_eq!(check, Check::Format, "{detail}");
}

/// Evidence from a mock Azure CVM whose PCR 7 (the Secure Boot policy) holds something else.
fn azure_evidence_with_pcr7(user_data: &[u8; 64], pcr7: [u8; 32]) -> AzureEvidence {
    let (_, firmware, ak) = fixtures();
    let mut pcrs = azure::testing::default_pcrs();
    pcrs[7] = pcr7;
    azure::testing::synthetic_with_pcrs(|report_data| firmware.report(report_data), ak, user_data, &pcrs)
}

/// The attack: on Azure the SNP measurement is the paravisor's, the same for every confidential
/// VM, so any CVM running anything passed. The quote's PCRs are what the VM booted; a VM whose
/// Secure Boot policy (PCR 7) is not an allowed one is refused, naming the PCR.
#[test]
fn azure_evidence_whose_pcrs_match_no_allowed_set_is_refused_naming_the_pcr() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let (check, detail) = refused(azure_evidence_with_pcr7(&expected, [0xee; 32]), &expected);
    assert_eq!(check, Check::Pcrs, "{detail}");
    assert!(detail.contains("PCR 7 is eeee"), "{detail}");

    // Any of several allowed sets will do; none at all admits nothing.
    let mut policy = policy();
    let other: azure::PcrSet = [(7u8, hex::encode([0xee; 32]))].into();
    policy.azure_pcrs.insert(other);
    let e = Evidence::AzureVtpm(azure_evidence_with_pcr7(&expected, [0xee; 32]));
    verify(&e, &policy, Some(&expected)).expect("a second allowed set matches");
    policy.azure_pcrs.clear();
    let refusal = verify(&e, &policy, Some(&expected)).unwrap_err();
    assert_eq!(refusal.check, Check::Pcrs);
    assert!(refusal.detail.contains("azure_pcrs is empty"), "{}", refusal.detail);
}

/// PCR values that are not the ones the AK-signed quote attests are refused, whichever way they
/// differ: a value changed to pass the allow-list, a PCR left out, one added.
#[test]
fn azure_pcr_values_must_be_the_quotes() {
    let expected = binding(NODE_KEY, &Nonce::random());
    let genuine = azure_evidence_with_pcr7(&expected, [0xee; 32]);
    let allowed = hex::encode(azure::testing::default_pcrs()[7]);

    let mut claimed = genuine.clone();
    claimed.pcrs.insert(7, allowed);
    let (check, detail) = refused(claimed, &expected);
    assert_eq!(check, Check::PcrDigest, "{detail}");
    assert!(detail.contains("not the values it attests"), "{detail}");

    let mut fewer = genuine.clone();
    fewer.pcrs.remove(&23);
    let (check, detail) = refused(fewer, &expected);
    assert_eq!(check, Check::PcrDigest, "{detail}");
    let mut more = genuine;
    more.pcrs.insert(30, hex::encode([0; 32]));
    assert_eq!(refused(more, &expected).0, Check::PcrDigest);

    // Evidence from before PCRs were carried: refused, not waved through.
    let mut none = azure_evidence(&expected);
    none.pcrs.clear();
    assert_eq!(refused(none, &expected).0, Check::PcrDigest);
}
