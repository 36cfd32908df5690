//! Fixtures the attestation tests share: key generation dominates their time, so one test root,
//! one mock firmware and one Azure AK serve every test of a binary.

use std::sync::OnceLock;

use cloister_attestation::mock::{self, MockConfig, MockFirmware, MockRoot};
use cloister_attestation::{Policy, Roots};
use rsa::RsaPrivateKey;

pub fn fixtures() -> &'static (MockRoot, MockFirmware, RsaPrivateKey) {
    static FIXTURES: OnceLock<(MockRoot, MockFirmware, RsaPrivateKey)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let root = MockRoot::generate();
        let firmware = MockFirmware::new(&root, MockConfig::default());
        let ak = RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("an RSA key");
        (root, firmware, ak)
    })
}

/// The policy a mock service pins: the fixtures' root, the default measurement and TCB, and the
/// synthetic vTPM's PCRs 4, 7 and 11.
pub fn policy() -> Policy {
    let pcrs = cloister_attestation::azure::testing::default_pcrs();
    let set = [4u8, 7, 11].into_iter().map(|i| (i, hex::encode(pcrs[usize::from(i)]))).collect();
    Policy {
        roots: Roots::Mock { ark: fixtures().0.ark_der() },
        measurements: [hex::encode(mock::default_measurement())].into(),
        host_data: [hex::encode([0u8; 32])].into(),
        min_tcb: mock::MOCK_TCB_DEFAULT,
        azure_pcrs: [set].into(),
    }
}
