//! A bounded set of checks that passed, shared by threads: what the ledger's verifiers remember
//! so that a costly check of the same bytes runs once.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

/// Keys of passed checks, at most `max`; past it the set starts over.
pub(crate) struct Remembered<K> {
    keys: Mutex<HashSet<K>>,
    max: usize,
}

impl<K: Eq + Hash> Remembered<K> {
    pub(crate) fn new(max: usize) -> Remembered<K> {
        Remembered { keys: Mutex::new(HashSet::new()), max }
    }

    pub(crate) fn knows(&self, key: &K) -> bool {
        // The set is whole whatever a thread holding the lock did; nothing to poison.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).contains(key)
    }

    pub(crate) fn remember(&self, key: K) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.len() >= self.max {
            keys.clear();
        }
        keys.insert(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_keys_are_bounded() {
        let remembered = Remembered::new(4);
        for i in 0..=4u8 {
            remembered.remember([i; 64]);
        }
        assert!(remembered.knows(&[4; 64]));
        assert!(!remembered.knows(&[0; 64]), "the memory started over at its bound");
        assert!(remembered.keys.lock().unwrap().len() <= 4);
    }
}
