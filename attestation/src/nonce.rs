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
/// How many nonces one holder may have outstanding; issuing it more drops its own oldest, so
/// that a holder asking in a loop cannot push out the nonces of the nodes joining meanwhile.
pub const NONCES_PER_HOLDER_MAX: usize = 8;
/// The least time between two nonces for one holder, in milliseconds. A challenge costs the
/// verifier its own evidence, so asking faster is refused: a joining node asks once a retry,
/// every half second (`JOIN_RETRY_MS`, which the node checks is longer than this).
pub const CHALLENGE_INTERVAL_MS: u64 = 250;

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

/// Who asked for a nonce: an opaque id of the verifier's choosing (a node its certificate).
pub type Holder = u64;

/// The nonces a verifier has issued and not yet seen redeemed, each with its holder, and when
/// each holder was last issued one.
pub struct NonceStore {
    ttl: Duration,
    interval: Duration,
    state: Mutex<Issued>,
}

#[derive(Default)]
struct Issued {
    nonces: HashMap<Nonce, (Instant, Holder)>,
    last: HashMap<Holder, Instant>,
}

impl NonceStore {
    pub fn new(ttl: Duration) -> NonceStore {
        NonceStore { ttl, interval: Duration::from_millis(CHALLENGE_INTERVAL_MS), state: Mutex::default() }
    }

    /// A fresh nonce for `holder`, valid for one redemption by it within the TTL; refused if
    /// `holder` was issued one less than [`CHALLENGE_INTERVAL_MS`] ago.
    pub fn issue(&self, holder: Holder) -> Result<Nonce, Refusal> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("nonce store poisoned");
        let Issued { nonces, last } = &mut *state;
        last.retain(|_, at| now.duration_since(*at) < self.interval);
        if let Some(at) = last.get(&holder) {
            return Err(Refusal::new(
                Check::Nonce,
                format!(
                    "a nonce was issued to this holder {} ms ago; at most one per {} ms",
                    now.duration_since(*at).as_millis(),
                    self.interval.as_millis()
                ),
            ));
        }
        nonces.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        let oldest = |nonces: &HashMap<Nonce, (Instant, Holder)>, of: Option<Holder>| {
            nonces
                .iter()
                .filter(|(_, (_, h))| of.is_none_or(|of| *h == of))
                .min_by_key(|(_, (at, _))| *at)
                .map(|(n, _)| *n)
        };
        if nonces.values().filter(|(_, h)| *h == holder).count() >= NONCES_PER_HOLDER_MAX
            && let Some(own) = oldest(nonces, Some(holder))
        {
            nonces.remove(&own);
        }
        if nonces.len() >= NONCES_OUTSTANDING_MAX
            && let Some(any) = oldest(nonces, None)
        {
            nonces.remove(&any);
        }
        let nonce = Nonce::random();
        nonces.insert(nonce, (now, holder));
        last.insert(holder, now);
        Ok(nonce)
    }

    /// Consumes `nonce`: it must have been issued here to `holder`, not redeemed before, and not
    /// be stale.
    pub fn redeem(&self, nonce: &Nonce, holder: Holder) -> Result<(), Refusal> {
        let mut state = self.state.lock().expect("nonce store poisoned");
        let issued = match state.nonces.get(nonce) {
            // Another holder's nonce stays, for its holder to redeem.
            Some((_, to)) if *to != holder => None,
            _ => state.nonces.remove(nonce),
        };
        match issued {
            Some((at, _)) if at.elapsed() < self.ttl => Ok(()),
            Some((at, _)) => Err(Refusal::new(
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
                format!(
                    "nonce {} was not issued by this verifier to this holder, or was already used",
                    hex::encode(nonce.0)
                ),
            )),
        }
    }

    #[cfg(test)]
    fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(ttl: Duration) -> NonceStore {
        NonceStore::new(ttl).with_interval(Duration::ZERO)
    }

    #[test]
    fn a_nonce_redeems_once_and_only_by_its_holder() {
        let store = store(Duration::from_secs(NONCE_TTL_S));
        let n = store.issue(1).unwrap();
        let refusal = store.redeem(&n, 2).unwrap_err();
        assert_eq!(refusal.check, Check::Nonce);
        assert!(refusal.detail.contains("to this holder"), "{}", refusal.detail);
        store.redeem(&n, 1).unwrap();
        assert_eq!(store.redeem(&n, 1).unwrap_err().check, Check::Nonce);
        assert_eq!(store.redeem(&Nonce::random(), 1).unwrap_err().check, Check::Nonce);
    }

    #[test]
    fn a_stale_nonce_is_refused() {
        let store = store(Duration::from_millis(20));
        let n = store.issue(1).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        let refusal = store.redeem(&n, 1).unwrap_err();
        assert_eq!(refusal.check, Check::Nonce);
        assert!(refusal.detail.contains("expired"), "{}", refusal.detail);
    }

    #[test]
    fn outstanding_nonces_are_bounded() {
        let store = store(Duration::from_secs(NONCE_TTL_S));
        let first = store.issue(0).unwrap();
        for holder in 1..=NONCES_OUTSTANDING_MAX as u64 {
            store.issue(holder).unwrap();
        }
        assert_eq!(store.state.lock().unwrap().nonces.len(), NONCES_OUTSTANDING_MAX);
        assert!(store.redeem(&first, 0).is_err(), "the oldest nonce is dropped at the limit");
    }

    #[test]
    fn a_holder_asking_in_a_loop_drops_only_its_own_nonces() {
        let store = store(Duration::from_secs(NONCE_TTL_S));
        let joiner = store.issue(1).unwrap();
        let flood: Vec<Nonce> = (0..NONCES_OUTSTANDING_MAX).map(|_| store.issue(2).unwrap()).collect();
        assert_eq!(store.state.lock().unwrap().nonces.len(), 1 + NONCES_PER_HOLDER_MAX);
        store.redeem(&joiner, 1).expect("the joining node's nonce outlived the flood");
        // The flooder keeps its newest ones, up to its limit.
        let kept = flood.iter().filter(|n| store.redeem(n, 2).is_ok()).count();
        assert_eq!(kept, NONCES_PER_HOLDER_MAX);
        assert!(store.redeem(&flood[NONCES_OUTSTANDING_MAX - 1], 2).is_err(), "redeemed once already");
    }

    #[test]
    fn a_holder_gets_one_nonce_per_interval() {
        let store = NonceStore::new(Duration::from_secs(NONCE_TTL_S)).with_interval(Duration::from_millis(100));
        store.issue(1).unwrap();
        let refusal = store.issue(1).expect_err("a second nonce within the interval is refused");
        assert_eq!(refusal.check, Check::Nonce);
        assert!(refusal.detail.contains("at most one per 100 ms"), "{}", refusal.detail);
        store.issue(2).expect("another holder is not held back");
        std::thread::sleep(Duration::from_millis(120));
        store.issue(1).expect("after the interval, the holder may ask again");
    }
}
