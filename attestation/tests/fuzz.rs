//! Property tests over the evidence parsers (SNP reports, VCEK certificates, HCL reports, TPM
//! quotes, evidence JSON): any input is refused with a named check, never a panic, and never an
//! allocation beyond what the input's size explains. Quick pass in CI; `just fuzz` runs 1,000,000.

use std::sync::OnceLock;

mod common;

use cloister_attestation::azure::{self, AzureEvidence};
use cloister_attestation::{Evidence, Policy, verify};
use cloister_test_support::proptest::prelude::*;
use cloister_test_support::{TrackingAllocator, config, largest_allocation};
use common::fixtures;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

/// Where the SNP report sits in an HCL report, and where var_data starts (after the IGVM header).
const HCL_SNP_REPORT_AT: usize = 32;
const VAR_DATA_AT: usize = HCL_SNP_REPORT_AT + 1184 + 20;
/// The bytes of an SNP report its signature covers.
const SNP_SIGNED_LEN: usize = 0x2a0;

/// Most a verification may allocate at once beyond its input: certificate and signature work.
const VERIFY_ALLOCATION_BYTES_MAX: usize = 1 << 20;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(common::policy)
}

fn genuine_azure() -> &'static AzureEvidence {
    static EVIDENCE: OnceLock<AzureEvidence> = OnceLock::new();
    EVIDENCE.get_or_init(|| {
        let (_, firmware, ak) = fixtures();
        azure::testing::synthetic(|report_data| firmware.report(report_data), ak, &[7; 64])
    })
}

/// Flips, overwrites or cuts `bytes` at positions chosen by `edits` (position, value pairs).
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for (at, value) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= value | 1;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

fn check(evidence: &Evidence, input_len: usize) -> Result<(), TestCaseError> {
    let (result, largest) = largest_allocation(|| verify(evidence, policy(), None));
    prop_assert!(largest <= input_len + VERIFY_ALLOCATION_BYTES_MAX, "allocated {largest} bytes at once");
    if let Err(refusal) = result {
        prop_assert!(!refusal.detail.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn evidence_json_of_any_shape_is_refused_by_name(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let (result, largest) = largest_allocation(|| Evidence::from_json(&bytes));
        prop_assert!(largest <= 64 * bytes.len() + 65_536, "allocated {largest} bytes for {} of JSON", bytes.len());
        if let Ok(evidence) = result {
            check(&evidence, bytes.len())?;
        }
    }

    /// A changed report never verifies (every byte of it is signed, or must be zero). A changed
    /// VCEK may still verify when the change is in the certificate's unsigned framing, but then
    /// it attests exactly what the genuine one does.
    #[test]
    fn a_mutated_snp_report_or_vcek_never_attests_anything_else(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<usize>()),
        in_vcek in any::<bool>(),
    ) {
        let genuine = fixtures().1.report([3; 64]);
        let attested = verify(&Evidence::Mock(genuine.clone()), policy(), None).unwrap();
        let mut snp = genuine;
        if in_vcek {
            snp.vcek = mutate(snp.vcek, &edits, cut);
        } else {
            snp.report = mutate(snp.report, &edits, cut);
        }
        let len = snp.report.len() + snp.vcek.len();
        let evidence = Evidence::Mock(snp);
        check(&evidence, len)?;
        match verify(&evidence, policy(), None) {
            Err(_) => {}
            Ok(verified) => {
                prop_assert!(in_vcek, "a changed report verified");
                prop_assert_eq!(verified, attested, "a changed VCEK attested something else");
            }
        }
    }

    #[test]
    fn a_mutated_hcl_report_or_quote_never_verifies(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<usize>()),
        part in 0u8..3,
    ) {
        let mut e = genuine_azure().clone();
        match part {
            // The HCL report's own header and the IGVM header around var_data are unsigned
            // framing; what must never change unnoticed is the SNP report's signed part and the
            // var_data the report commits to.
            0 => {
                let signed: Vec<usize> = (HCL_SNP_REPORT_AT..HCL_SNP_REPORT_AT + SNP_SIGNED_LEN)
                    .chain(VAR_DATA_AT..e.hcl_report.len())
                    .collect();
                let edits: Vec<(usize, u8)> = edits.iter().map(|(at, v)| (signed[at % signed.len()], *v)).collect();
                e.hcl_report = mutate(e.hcl_report, &edits, None);
            }
            1 => e.quote = mutate(e.quote, &edits, cut),
            _ => e.quote_signature = mutate(e.quote_signature, &edits, cut),
        }
        let len = e.hcl_report.len() + e.quote.len() + e.quote_signature.len();
        let evidence = Evidence::AzureVtpm(e);
        check(&evidence, len)?;
        prop_assert!(verify(&evidence, policy(), Some(&[7; 64])).is_err(), "mutated Azure evidence verified");
    }

    #[test]
    fn arbitrary_bytes_as_a_report_and_quote_are_refused(
        report in prop::collection::vec(any::<u8>(), 0..2048),
        quote in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut e = genuine_azure().clone();
        e.hcl_report = report.clone();
        e.quote = quote.clone();
        check(&Evidence::AzureVtpm(e), report.len() + quote.len())?;
        let mut snp = fixtures().1.report([0; 64]);
        snp.report = report.clone();
        check(&Evidence::Mock(snp), report.len())?;
    }
}

/// The case the property test found: one byte of a VCEK turned into a 3-byte DER length that
/// claims 10 MB. It is refused as a format error, allocating about what the input explains.
#[test]
fn a_vcek_length_claiming_megabytes_is_refused_without_allocating_them() {
    let mut snp = fixtures().1.report([3; 64]);
    let at = 1651326682028996490usize % snp.vcek.len();
    snp.vcek[at] ^= 183;
    let len = snp.report.len() + snp.vcek.len();
    let (result, largest) = largest_allocation(|| verify(&Evidence::Mock(snp), policy(), None));
    let refusal = result.expect_err("a broken VCEK");
    assert_eq!(refusal.check, cloister_attestation::Check::Format, "{refusal}");
    assert!(largest <= len + VERIFY_ALLOCATION_BYTES_MAX, "allocated {largest} bytes at once");
}
