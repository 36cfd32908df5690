//! A service's ledger secrets, one per version. The newest seals what is written now; older ones
//! still open the history written under them. A rekey (`trigger_ledger_rekey`) adds a version:
//! the leader seals the new secret to each Trusted node's key and seals the previous secret
//! under the new one, both in the public map `gov.ledger_secrets`, and every node learns the new
//! version as it applies that entry ([`LedgerSecrets::learn`]). A node left out (a retired one)
//! holds only the versions before, which open nothing written after.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::seal::{Purpose, SealError, Sealer, Unseal};

pub const SECRET_BYTES: usize = crate::seal::SECRET_BYTES;

/// A new version, as a node finds it in a record of the ledger-secrets map sealed to its key.
pub struct Rekeyed {
    pub version: u64,
    pub secret: [u8; SECRET_BYTES],
    /// The previous version's secret, sealed under this one ([`seal_previous`]).
    pub previous_sealed: Vec<u8>,
}

/// What a node adds to its secrets: how it opens a record sealed to it, and how it keeps the
/// whole set durably.
pub trait Keeper: Send + Sync {
    /// The new version in a record (`key`, `value`) of the ledger-secrets map, if one is sealed
    /// to this node; `None` if none is.
    fn unwrap(&self, key: &[u8], value: &[u8]) -> Result<Option<Rekeyed>, String>;
    /// Keeps every version durably, before the entry that taught the newest is applied.
    fn persist(&self, all: &[(u64, [u8; SECRET_BYTES])]) -> std::io::Result<()>;
}

struct Held {
    secret: [u8; SECRET_BYTES],
    sealer: Arc<Sealer>,
}

/// The ledger secrets this node holds, by version.
pub struct LedgerSecrets {
    versions: RwLock<BTreeMap<u64, Held>>,
    keeper: Option<Box<dyn Keeper>>,
}

impl std::fmt::Debug for LedgerSecrets {
    // Never show a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<u64> = self.read().keys().copied().collect();
        f.debug_struct("LedgerSecrets").field("versions", &versions).finish_non_exhaustive()
    }
}

/// Why a version was not learned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LearnError {
    #[error("ledger secret version {0} is sealed to this node, but it does not open: {1}")]
    Unwrap(u64, String),
    #[error(
        "ledger secret version {0} does not follow version {1} this node holds (the previous secret it seals is \
         another): refused"
    )]
    NotASuccessor(u64, u64),
    #[error("ledger secret version {0} follows version {1}, which this node does not hold: refused")]
    Gap(u64, u64),
    #[error("this node already holds another secret for ledger secret version {0}: refused")]
    Conflict(u64),
    #[error("keeping the ledger secrets failed: {0}")]
    Persist(String),
}

impl LedgerSecrets {
    /// The secrets `versions`, which must not be empty.
    pub fn new(versions: impl IntoIterator<Item = (u64, [u8; SECRET_BYTES])>) -> Result<LedgerSecrets, String> {
        let versions: BTreeMap<u64, Held> = versions
            .into_iter()
            .map(|(v, secret)| (v, Held { secret, sealer: Arc::new(Sealer::new(&secret)) }))
            .collect();
        if versions.is_empty() {
            return Err("no ledger secret".into());
        }
        Ok(LedgerSecrets { versions: RwLock::new(versions), keeper: None })
    }

    /// A new service's first secret, version 1.
    pub fn first(secret: [u8; SECRET_BYTES]) -> LedgerSecrets {
        LedgerSecrets::new([(1, secret)]).expect("one version")
    }

    /// Learns new versions through `keeper` ([`LedgerSecrets::learn`]).
    pub fn with_keeper(mut self, keeper: Box<dyn Keeper>) -> LedgerSecrets {
        self.keeper = Some(keeper);
        self
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Held>> {
        self.versions.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest version and its sealer: what seals every write now.
    pub fn current(&self) -> (u64, Arc<Sealer>) {
        let versions = self.read();
        let (v, held) = versions.last_key_value().expect("never empty");
        (*v, held.sealer.clone())
    }

    /// The newest version and its secret.
    pub fn current_secret(&self) -> (u64, [u8; SECRET_BYTES]) {
        let versions = self.read();
        let (v, held) = versions.last_key_value().expect("never empty");
        (*v, held.secret)
    }

    /// The sealer of `version`, if this node holds it.
    pub fn get(&self, version: u64) -> Option<Arc<Sealer>> {
        self.read().get(&version).map(|h| h.sealer.clone())
    }

    /// Keeps every version durably through the keeper, if there is one: a new service's first
    /// secret, kept as the service begins.
    pub fn persist(&self) -> std::io::Result<()> {
        match &self.keeper {
            Some(keeper) => keeper.persist(&self.all()),
            None => Ok(()),
        }
    }

    /// Every version with its secret, oldest first: for keeping at rest and for a joining node.
    pub fn all(&self) -> Vec<(u64, [u8; SECRET_BYTES])> {
        self.read().iter().map(|(v, h)| (*v, h.secret)).collect()
    }

    /// Adds the version a record of the ledger-secrets map seals to this node, if any, once it
    /// proves to follow the previous version this node holds (the record seals that previous
    /// secret under the new one). Returns the version learned, if new.
    pub fn learn(&self, key: &[u8], value: &[u8]) -> Result<Option<u64>, LearnError> {
        let Some(keeper) = &self.keeper else { return Ok(None) };
        let Some(new) = keeper.unwrap(key, value).map_err(|e| LearnError::Unwrap(version_of(key), e))? else {
            return Ok(None);
        };
        let mut versions = self.versions.write().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = versions.get(&new.version) {
            return if held.secret == new.secret { Ok(None) } else { Err(LearnError::Conflict(new.version)) };
        }
        let before = new.version.checked_sub(1).ok_or(LearnError::Gap(0, 0))?;
        let previous = versions.get(&before).ok_or(LearnError::Gap(new.version, before))?;
        match open_previous(new.version, &new.secret, &new.previous_sealed) {
            Ok(p) if p == previous.secret => {}
            _ => return Err(LearnError::NotASuccessor(new.version, before)),
        }
        // On disk before in memory: a version held but not kept would seal writes at once, and
        // applying its record again would find it held and never keep it.
        let mut all: Vec<_> = versions.iter().map(|(v, h)| (*v, h.secret)).collect();
        let at = all.partition_point(|(v, _)| *v < new.version);
        all.insert(at, (new.version, new.secret));
        keeper.persist(&all).map_err(|e| LearnError::Persist(e.to_string()))?;
        versions.insert(new.version, Held { secret: new.secret, sealer: Arc::new(Sealer::new(&new.secret)) });
        Ok(Some(new.version))
    }
}

impl Unseal for LedgerSecrets {
    /// Newest first: most of what a node opens was written under the current secret. Each
    /// version is authenticated, so trying one that is not the blob's fails and changes nothing.
    fn open(&self, purpose: Purpose, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let versions = self.read();
        versions.values().rev().find_map(|h| h.sealer.open(purpose, aad, sealed).ok()).ok_or(SealError)
    }
}

/// The key of a version in the ledger-secrets map: the version in 20 decimal digits, so the map
/// is in version order and its keys read as text.
pub fn version_key(version: u64) -> Vec<u8> {
    format!("{version:020}").into_bytes()
}

/// The version a key of the ledger-secrets map names (0 if it names none).
pub fn version_of(key: &[u8]) -> u64 {
    std::str::from_utf8(key).ok().filter(|k| k.len() == 20).and_then(|k| k.parse().ok()).unwrap_or(0)
}

/// What a new version's secret is sealed to a Trusted node's key under (an envelope): the
/// version, so a record of one version never passes for another.
pub fn node_aad(version: u64) -> Vec<u8> {
    let mut aad = b"cloister ledger secret for a Trusted node, version ".to_vec();
    aad.extend_from_slice(&version_key(version));
    aad
}

/// `previous` sealed under `secret`, the secret of `version`, bound to that version.
pub fn seal_previous(version: u64, secret: &[u8; SECRET_BYTES], previous: &[u8; SECRET_BYTES]) -> Vec<u8> {
    Sealer::new(secret).seal(Purpose::PreviousSecret, &version_key(version), previous)
}

/// The secret of `version - 1`, from what [`seal_previous`] sealed under the secret of `version`.
pub fn open_previous(
    version: u64,
    secret: &[u8; SECRET_BYTES],
    sealed: &[u8],
) -> Result<[u8; SECRET_BYTES], SealError> {
    let plain = Sealer::new(secret).open(Purpose::PreviousSecret, &version_key(version), sealed)?;
    <[u8; SECRET_BYTES]>::try_from(plain).map_err(|_| SealError)
}

/// Every version from the newest back to the oldest the chain reaches: `records` are
/// (version, previous sealed under it) of a ledger-secrets map. Stops where a record is missing;
/// fails on one that does not open.
pub fn walk_back(
    newest: (u64, [u8; SECRET_BYTES]),
    records: &BTreeMap<u64, Vec<u8>>,
) -> Result<Vec<(u64, [u8; SECRET_BYTES])>, String> {
    let mut all = vec![newest];
    let (mut version, mut secret) = newest;
    while version > 1 {
        let Some(sealed) = records.get(&version) else { break };
        secret = open_previous(version, &secret, sealed)
            .map_err(|_| format!("the record of ledger secret version {version} does not open under it"))?;
        version -= 1;
        all.push((version, secret));
    }
    all.reverse();
    Ok(all)
}

/// Every version, as kept at rest and handed to a joining node: (u64 big-endian ‖ secret)…
pub fn encode(all: &[(u64, [u8; SECRET_BYTES])]) -> Vec<u8> {
    all.iter().flat_map(|(v, s)| v.to_be_bytes().into_iter().chain(s.iter().copied())).collect()
}

/// The inverse of [`encode`]; a bare secret (what older versions kept) is version 1.
pub fn decode(bytes: &[u8]) -> Result<Vec<(u64, [u8; SECRET_BYTES])>, String> {
    if bytes.len() == SECRET_BYTES {
        return Ok(vec![(1, bytes.try_into().expect("32 bytes"))]);
    }
    const RECORD: usize = 8 + SECRET_BYTES;
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        return Err(format!("{} bytes are not a list of ledger secrets", bytes.len()));
    }
    let all: Vec<_> = bytes
        .chunks(RECORD)
        .map(|c| (u64::from_be_bytes(c[..8].try_into().expect("8")), c[8..].try_into().expect("32")))
        .collect();
    if !all.windows(2).all(|w| w[0].0 < w[1].0) {
        return Err("ledger secret versions are not in order".into());
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Seals every new version to "this node" by keeping it in clear; records are
    /// `version ‖ secret ‖ previous sealed`, or empty when not meant for this node.
    type Versions = Vec<(u64, [u8; 32])>;
    struct Clear(Mutex<Vec<Versions>>);

    impl Keeper for Arc<Clear> {
        fn unwrap(&self, key: &[u8], value: &[u8]) -> Result<Option<Rekeyed>, String> {
            if value.is_empty() {
                return Ok(None);
            }
            Ok(Some(Rekeyed {
                version: version_of(key),
                secret: value[..32].try_into().unwrap(),
                previous_sealed: value[32..].to_vec(),
            }))
        }

        fn persist(&self, all: &[(u64, [u8; 32])]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(all.to_vec());
            Ok(())
        }
    }

    fn record(version: u64, secret: [u8; 32], previous: [u8; 32]) -> Vec<u8> {
        let mut r = secret.to_vec();
        r.extend(seal_previous(version, &secret, &previous));
        r
    }

    #[test]
    fn a_rekey_is_learned_only_as_a_successor_and_old_secrets_open_nothing_new() {
        let kept = Arc::new(Clear(Mutex::default()));
        let (v1, v2) = (Sealer::generate_secret(), Sealer::generate_secret());
        let secrets = LedgerSecrets::first(v1).with_keeper(Box::new(kept.clone()));
        let old = secrets.current().1.seal(Purpose::LedgerPrivate, b"tx1", b"before");

        // Not sealed to this node: nothing learned.
        assert_eq!(secrets.learn(&version_key(2), b""), Ok(None));
        // A version 3 with no version 2 held, and a version 2 that does not seal version 1.
        assert_eq!(secrets.learn(&version_key(3), &record(3, v2, v1)), Err(LearnError::Gap(3, 2)));
        let stranger = Sealer::generate_secret();
        assert_eq!(secrets.learn(&version_key(2), &record(2, v2, stranger)), Err(LearnError::NotASuccessor(2, 1)));
        assert_eq!(secrets.current().0, 1);
        assert!(kept.0.lock().unwrap().is_empty());

        assert_eq!(secrets.learn(&version_key(2), &record(2, v2, v1)), Ok(Some(2)));
        assert_eq!(secrets.learn(&version_key(2), &record(2, v2, v1)), Ok(None), "applying it again");
        assert_eq!(secrets.learn(&version_key(2), &record(2, stranger, v1)), Err(LearnError::Conflict(2)));
        assert_eq!(kept.0.lock().unwrap().as_slice(), &[vec![(1, v1), (2, v2)]]);
        assert_eq!(secrets.current().0, 2);

        let new = secrets.current().1.seal(Purpose::LedgerPrivate, b"tx2", b"after");
        assert_eq!(secrets.open(Purpose::LedgerPrivate, b"tx1", &old).unwrap(), b"before");
        assert_eq!(secrets.open(Purpose::LedgerPrivate, b"tx2", &new).unwrap(), b"after");
        let retired = LedgerSecrets::first(v1);
        assert_eq!(retired.open(Purpose::LedgerPrivate, b"tx2", &new), Err(SealError), "the old secret alone");
    }

    /// A [`Clear`] whose first persist fails, as a full disk would.
    struct FailsFirst(Arc<Clear>, std::sync::atomic::AtomicBool);

    impl Keeper for FailsFirst {
        fn unwrap(&self, key: &[u8], value: &[u8]) -> Result<Option<Rekeyed>, String> {
            self.0.unwrap(key, value)
        }

        fn persist(&self, all: &[(u64, [u8; 32])]) -> std::io::Result<()> {
            if self.1.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("disk full"));
            }
            self.0.persist(all)
        }
    }

    #[test]
    fn a_version_that_fails_to_persist_is_not_held_and_is_learned_again() {
        let kept = Arc::new(Clear(Mutex::default()));
        let (v1, v2) = (Sealer::generate_secret(), Sealer::generate_secret());
        let keeper = FailsFirst(kept.clone(), true.into());
        let secrets = LedgerSecrets::first(v1).with_keeper(Box::new(keeper));

        let failed = secrets.learn(&version_key(2), &record(2, v2, v1));
        assert!(matches!(failed, Err(LearnError::Persist(_))), "{failed:?}");
        assert_eq!(secrets.current().0, 1, "nothing seals under a version not on disk");
        assert!(kept.0.lock().unwrap().is_empty());

        // Applying the record again persists it this time.
        assert_eq!(secrets.learn(&version_key(2), &record(2, v2, v1)), Ok(Some(2)));
        assert_eq!(kept.0.lock().unwrap().as_slice(), &[vec![(1, v1), (2, v2)]]);
        assert_eq!(secrets.current().0, 2);
    }

    #[test]
    fn the_chain_walks_back_from_the_newest_and_encodes_round_trip() {
        let s: Vec<[u8; 32]> = (0..4).map(|_| Sealer::generate_secret()).collect();
        let records: BTreeMap<u64, Vec<u8>> =
            (2..=4u64).map(|v| (v, seal_previous(v, &s[v as usize - 1], &s[v as usize - 2]))).collect();
        let all = walk_back((4, s[3]), &records).unwrap();
        assert_eq!(all, vec![(1, s[0]), (2, s[1]), (3, s[2]), (4, s[3])]);
        assert!(walk_back((4, s[2]), &records).is_err(), "a wrong newest secret opens nothing");
        assert_eq!(decode(&encode(&all)).unwrap(), all);
        assert_eq!(decode(&s[0]).unwrap(), vec![(1, s[0])], "a bare secret is version 1");
        assert!(decode(&[0; 41]).is_err());
        assert!(decode(&encode(&[(2, s[0]), (1, s[1])])).is_err());
    }
}
