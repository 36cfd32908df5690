//! Nonces: issued by a verifier, redeemed once, and only while fresh.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};

use crate::{Check, Refusal};

/// How long an issued nonce may be redeemed.
pub const NONCE_TTL_S: u64 = 60;
/// How many nonces may be outstanding at once; issuing more drops the oldest.
pub const NONCES_OUTSTANDING_MAX: usize = 4096;

/// A verifier's challenge: 32 random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 32]);

impl Nonce {
    pub fn random() -> Nonce {
        let mut n = [0u8; 32];
        OsRng.fill_bytes(&mut n);
        Nonce(n)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Nonce, Refusal> {
        <[u8; 32]>::try_from(bytes)
            .map(Nonce)
            .map_err(|_| Refusal::new(Check::Nonce, format!("a nonce is 32 bytes, not {}", bytes.len())))
    }
}

/// The nonces a verifier has issued and not yet seen redeemed.
pub struct NonceStore {
    ttl: Duration,
    issued: Mutex<HashMap<Nonce, Instant>>,
}

impl NonceStore {
    pub fn new(ttl: Duration) -> NonceStore {
        NonceStore { ttl, issued: Mutex::new(HashMap::new()) }
    }

    /// A fresh nonce, valid for one redemption within the TTL.
    pub fn issue(&self) -> Nonce {
        let nonce = Nonce::random();
        let now = Instant::now();
        let mut issued = self.issued.lock().expect("nonce store poisoned");
        issued.retain(|_, at| now.duration_since(*at) < self.ttl);
        if issued.len() >= NONCES_OUTSTANDING_MAX
            && let Some(oldest) = issued.iter().min_by_key(|(_, at)| **at).map(|(n, _)| *n)
        {
            issued.remove(&oldest);
        }
        issued.insert(nonce, now);
        nonce
    }

    /// Consumes `nonce`: it must have been issued here, not redeemed before, and not be stale.
    pub fn redeem(&self, nonce: &Nonce) -> Result<(), Refusal> {
        let at = self.issued.lock().expect("nonce store poisoned").remove(nonce);
        match at {
            Some(at) if at.elapsed() < self.ttl => Ok(()),
            Some(at) => Err(Refusal::new(
                Check::Nonce,
                format!(
                    "nonce {} expired {} ms ago (nonces live {} s)",
                    hex::encode(nonce.0),
                    (at.elapsed() - self.ttl).as_millis(),
                    self.ttl.as_secs()
                ),
            )),
            None => Err(Refusal::new(
                Check::Nonce,
                format!("nonce {} was not issued by this verifier, or was already used", hex::encode(nonce.0)),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_redeems_once() {
        let store = NonceStore::new(Duration::from_secs(NONCE_TTL_S));
        let n = store.issue();
        store.redeem(&n).unwrap();
        assert_eq!(store.redeem(&n).unwrap_err().check, Check::Nonce);
        assert_eq!(store.redeem(&Nonce::random()).unwrap_err().check, Check::Nonce);
    }

    #[test]
    fn a_stale_nonce_is_refused() {
        let store = NonceStore::new(Duration::from_millis(20));
        let n = store.issue();
        std::thread::sleep(Duration::from_millis(40));
        let refusal = store.redeem(&n).unwrap_err();
        assert_eq!(refusal.check, Check::Nonce);
        assert!(refusal.detail.contains("expired"), "{}", refusal.detail);
    }

    #[test]
    fn outstanding_nonces_are_bounded() {
        let store = NonceStore::new(Duration::from_secs(NONCE_TTL_S));
        let first = store.issue();
        for _ in 0..NONCES_OUTSTANDING_MAX {
            store.issue();
        }
        assert_eq!(store.issued.lock().unwrap().len(), NONCES_OUTSTANDING_MAX);
        assert!(store.redeem(&first).is_err(), "the oldest nonce is dropped at the limit");
    }
}
