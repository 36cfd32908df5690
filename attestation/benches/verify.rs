//! Verifier benchmarks (`cargo bench -p cloister-attestation --bench verify`):
//! - verifying mock and genuine Milan evidence with every check, against the baseline of `sev`'s
//!   own chain and report signature check on the same evidence (what the extra checks cost);
//! - what a join and a genesis cost the mock firmware: a report, and a new test root.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cloister_attestation::mock::{self, MockConfig, MockFirmware, MockRoot};
use cloister_attestation::{Evidence, Nonce, Policy, Roots, SnpEvidence, Tcb, binding, verify};
use sev::certs::snp::{Certificate, Chain, Verifiable, builtin, ca};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;

/// A join's verification must stay well inside the joining node's retry interval (500 ms).
const BUDGET: Duration = Duration::from_millis(10);

fn per_op(mut f: impl FnMut(), min_time: Duration) -> Duration {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < min_time {
        f();
        n += 1;
    }
    start.elapsed() / n
}

fn sev_baseline(e: &SnpEvidence, ark: &[u8], ask: &[u8]) -> impl FnMut() {
    let chain = Chain {
        ca: ca::Chain { ark: Certificate::from_der(ark).unwrap(), ask: Certificate::from_der(ask).unwrap() },
        vek: Certificate::from_der(&e.vcek).unwrap(),
    };
    let report = e.report.clone();
    move || {
        let report = AttestationReport::from_bytes(&report).unwrap();
        (&chain, &report).verify().unwrap();
    }
}

fn main() {
    let second = Duration::from_secs(2);
    let root = MockRoot::generate();
    let firmware = MockFirmware::new(&root, MockConfig::default());
    let nonce = Nonce::random();
    let expected = binding(b"node key", &nonce);
    let evidence = firmware.report(expected);
    let policy = Policy {
        roots: Roots::Mock { ark: root.ark_der() },
        measurements: [hex::encode(mock::default_measurement())].into(),
        host_data: [hex::encode([0u8; 32])].into(),
        min_tcb: Tcb::default(),
        azure_pcrs: Default::default(),
    };
    let mock_evidence = Evidence::Mock(evidence.clone());
    let ours = per_op(|| drop(black_box(verify(&mock_evidence, &policy, Some(&expected)).unwrap())), second);
    let base = per_op(sev_baseline(&evidence, &root.ark_der(), &root.ask_der()), second);
    println!(
        "verify mock evidence: {:>8.3} ms  (sev chain+signature only: {:.3} ms, ratio {:.2}x; budget {} ms: {:.1}% used)",
        ours.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        ours.as_secs_f64() / base.as_secs_f64(),
        BUDGET.as_millis(),
        100.0 * ours.as_secs_f64() / BUDGET.as_secs_f64()
    );

    let report =
        hex::decode(include_str!("../testdata/milan/report_milan.hex").split_whitespace().collect::<String>()).unwrap();
    let milan =
        SnpEvidence { report, vcek: include_bytes!("../testdata/milan/vcek_milan.der").to_vec(), ask: None, ark: None };
    let parsed = AttestationReport::from_bytes(&milan.report).unwrap();
    let milan_policy = Policy {
        roots: Roots::Amd,
        measurements: [hex::encode(parsed.measurement)].into(),
        host_data: [hex::encode(parsed.host_data)].into(),
        min_tcb: Tcb::default(),
        azure_pcrs: Default::default(),
    };
    let genuine = Evidence::Snp(milan.clone());
    let ours = per_op(|| drop(black_box(verify(&genuine, &milan_policy, Some(&parsed.report_data)).unwrap())), second);
    let ark = Certificate::from_pem(builtin::milan::ARK).unwrap().to_der().unwrap();
    let ask = Certificate::from_pem(builtin::milan::ASK).unwrap().to_der().unwrap();
    let base = per_op(sev_baseline(&milan, &ark, &ask), second);
    println!(
        "verify genuine Milan: {:>8.3} ms  (sev chain+signature only: {:.3} ms, ratio {:.2}x; budget {} ms: {:.1}% used)",
        ours.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        ours.as_secs_f64() / base.as_secs_f64(),
        BUDGET.as_millis(),
        100.0 * ours.as_secs_f64() / BUDGET.as_secs_f64()
    );

    let report = per_op(|| drop(black_box(firmware.report(expected))), second);
    println!("mock firmware report: {:>8.3} ms", report.as_secs_f64() * 1e3);
    let generate = per_op(|| drop(black_box(MockRoot::generate())), Duration::from_secs(5));
    println!(
        "mock root generation: {:>8.1} ms  ({} bits, once per sandbox or test process)",
        generate.as_secs_f64() * 1e3,
        mock::MOCK_RSA_BITS
    );
}
