//! Ledger settings: the `[ledger]` section of a node's configuration.

use serde::{Deserialize, Serialize};

pub(crate) const SIGN_EVERY_ENTRIES: u64 = 500;
pub(crate) const SIGN_INTERVAL_MS: u64 = 200;
pub(crate) const CHUNK_BYTES: u64 = 4 << 20;

/// Ledger settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerSection {
    /// The leader signs the ledger after this many new entries…
    pub sign_every_entries: u64,
    /// …or this many milliseconds after its last signature, whichever comes first.
    pub sign_interval_ms: u64,
    /// A ledger file is closed, at the next signature entry, once it holds this many bytes.
    pub chunk_bytes: u64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            sign_every_entries: SIGN_EVERY_ENTRIES,
            sign_interval_ms: SIGN_INTERVAL_MS,
            chunk_bytes: CHUNK_BYTES,
        }
    }
}
