//! Transaction ids: `term.seqno`, as clients see them in `x-cloister-tx-id`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Identifies a committed transaction: the term it was proposed in and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId {
    pub term: u64,
    pub seqno: u64,
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.seqno)
    }
}

impl FromStr for TxId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not a transaction id of the form term.seqno (e.g. 2.41)");
        let (term, seqno) = s.split_once('.').ok_or_else(err)?;
        Ok(TxId { term: term.parse().map_err(|_| err())?, seqno: seqno.parse().map_err(|_| err())? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let id = TxId { term: 2, seqno: 41 };
        assert_eq!(id.to_string().parse::<TxId>(), Ok(id));
        for bad in ["", "2", "2.", ".4", "a.b", "2.4.1", "-1.3"] {
            assert!(bad.parse::<TxId>().is_err(), "{bad}");
        }
    }
}
