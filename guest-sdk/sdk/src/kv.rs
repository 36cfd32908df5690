//! Typed maps over the host's transactional key-value store.
//!
//! Keys are encoded so that byte order equals the key type's natural order; values are JSON.
//! Reads see the transaction's own writes. The host commits the writes only if the handler
//! answers with a 2xx status.

use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::sys::{self, ScanBounds};

/// A key type whose encoding preserves order.
pub trait Key: Sized {
    /// Appends the key's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes a whole key; `None` if the bytes are not a key of this type.
    fn decode(bytes: &[u8]) -> Option<Self>;

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// A key that can stand inside a tuple: its encoding is self-delimiting and order-preserving.
pub trait KeyPart: Sized {
    fn encode_part(&self, out: &mut Vec<u8>);
    /// Decodes one part from the front of `bytes`, advancing it.
    fn decode_part(bytes: &mut &[u8]) -> Option<Self>;
}

impl Key for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Key for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn encode_part(&self, out: &mut Vec<u8>) {
                // Flipping the sign bit makes big-endian bytes sort like the signed value.
                #[allow(unused_comparisons)]
                let flip = if <$t>::MIN < 0 { 1 << (<$t>::BITS - 1) } else { 0 };
                out.extend_from_slice(&((*self as u128 ^ flip) as $t).to_be_bytes());
            }
            fn decode_part(bytes: &mut &[u8]) -> Option<Self> {
                const N: usize = std::mem::size_of::<$t>();
                let (head, rest) = bytes.split_at_checked(N)?;
                *bytes = rest;
                #[allow(unused_comparisons)]
                let flip = if <$t>::MIN < 0 { 1 << (<$t>::BITS - 1) } else { 0 };
                Some((<$t>::from_be_bytes(head.try_into().ok()?) as u128 ^ flip) as $t)
            }
        }
        impl Key for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                self.encode_part(out)
            }
            fn decode(mut bytes: &[u8]) -> Option<Self> {
                let v = Self::decode_part(&mut bytes)?;
                bytes.is_empty().then_some(v)
            }
        }
    )*};
}
int_keys!(u32, u64, i32, i64);

/// Inside tuples a string is escaped (`00` → `00 FF`) and terminated by `00 01`, so no string's
/// encoding is a prefix of another's and tuples sort component by component.
impl KeyPart for String {
    fn encode_part(&self, out: &mut Vec<u8>) {
        for &b in self.as_bytes() {
            out.push(b);
            if b == 0 {
                out.push(0xFF);
            }
        }
        out.extend_from_slice(&[0, 1]);
    }
    fn decode_part(bytes: &mut &[u8]) -> Option<Self> {
        let mut s = Vec::new();
        let mut i = 0;
        loop {
            match *bytes.get(i)? {
                0 => match *bytes.get(i + 1)? {
                    0xFF => s.push(0),
                    1 => break,
                    _ => return None,
                },
                b => {
                    s.push(b);
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        *bytes = &bytes[i + 2..];
        String::from_utf8(s).ok()
    }
}

impl<A: KeyPart, B: KeyPart> Key for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode_part(out);
        self.1.encode_part(out);
    }
    fn decode(mut bytes: &[u8]) -> Option<Self> {
        let a = A::decode_part(&mut bytes)?;
        let b = B::decode_part(&mut bytes)?;
        bytes.is_empty().then_some((a, b))
    }
}

/// A named map from `K` to `V` in the contract's store.
///
/// Maps whose name starts with `public:` are kept in clear in the ledger; all others are private
/// and sealed. Governance maps (`gov.…`) can be read where the host allows it, never written.
pub struct Map<K, V> {
    name: &'static str,
    _types: PhantomData<fn(K) -> V>,
}

impl<K: Key, V: Serialize + DeserializeOwned> Map<K, V> {
    pub const fn new(name: &'static str) -> Self {
        Map { name, _types: PhantomData }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn get(&self, key: &K) -> Option<V> {
        sys::get(self.name, &key.to_bytes()).map(|bytes| self.decode_value(&bytes))
    }

    pub fn contains(&self, key: &K) -> bool {
        sys::get(self.name, &key.to_bytes()).is_some()
    }

    pub fn insert(&self, key: &K, value: &V) {
        let bytes = serde_json::to_vec(value).expect("map values always serialize");
        sys::put(self.name, &key.to_bytes(), &bytes)
    }

    /// Removes the key; returns whether it was present.
    pub fn remove(&self, key: &K) -> bool {
        sys::remove(self.name, &key.to_bytes())
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        self.range(..)
    }

    /// The entries whose keys lie in `range`, in key order.
    pub fn range(&self, range: impl RangeBounds<K>) -> Iter<'_, K, V> {
        let bound = |b: Bound<&K>| b.map(Key::to_bytes);
        self.scan(ScanBounds { lower: bound(range.start_bound()), upper: bound(range.end_bound()) })
    }

    fn scan(&self, bounds: ScanBounds) -> Iter<'_, K, V> {
        Iter { map: self, scan: sys::scan(self.name, bounds) }
    }

    fn decode_value(&self, bytes: &[u8]) -> V {
        serde_json::from_slice(bytes).unwrap_or_else(|e| {
            panic!("map {}: a stored value does not decode as the map's value type: {e}", self.name)
        })
    }
}

impl<A: KeyPart, B: KeyPart, V: Serialize + DeserializeOwned> Map<(A, B), V> {
    /// Every entry whose key's first component is `first`, in key order.
    pub fn prefix(&self, first: &A) -> Iter<'_, (A, B), V> {
        let mut lower = Vec::new();
        first.encode_part(&mut lower);
        self.prefix_scan(lower, Bound::Unbounded)
    }

    /// Entries with first component `first` and second component strictly after `after`.
    pub fn prefix_after(&self, first: &A, after: &B) -> Iter<'_, (A, B), V> {
        let mut prefix = Vec::new();
        first.encode_part(&mut prefix);
        let mut lower = prefix.clone();
        after.encode_part(&mut lower);
        self.prefix_scan(prefix, Bound::Excluded(lower))
    }

    fn prefix_scan(&self, prefix: Vec<u8>, lower: Bound<Vec<u8>>) -> Iter<'_, (A, B), V> {
        let upper = prefix_end(&prefix);
        let lower = match lower {
            Bound::Unbounded => Bound::Included(prefix),
            b => b,
        };
        self.scan(ScanBounds { lower, upper })
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

/// Iterates a map in key order.
pub struct Iter<'m, K, V> {
    map: &'m Map<K, V>,
    scan: sys::Scan,
}

impl<K: Key, V: Serialize + DeserializeOwned> Iterator for Iter<'_, K, V> {
    type Item = (K, V);

    fn next(&mut self) -> Option<(K, V)> {
        let (key, value) = sys::next(&mut self.scan)?;
        let key = K::decode(&key)
            .unwrap_or_else(|| panic!("map {}: a stored key does not decode as the map's key type", self.map.name));
        Some((key, self.map.decode_value(&value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: Key>(k: K) -> Vec<u8> {
        k.to_bytes()
    }

    #[test]
    fn integer_encodings_sort_like_the_numbers() {
        let xs = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in xs.windows(2) {
            assert!(enc(w[0]) < enc(w[1]), "{} !< {}", w[0], w[1]);
        }
        for x in xs {
            assert_eq!(i64::decode(&enc(x)), Some(x));
        }
        assert!(enc(3u32) < enc(300u32));
        assert_eq!(u64::decode(&[1, 2]), None);
    }

    #[test]
    fn tuple_encodings_sort_component_wise_and_round_trip() {
        let t = |a: &str, b: &str| enc((a.to_owned(), b.to_owned()));
        assert!(t("a", "z") < t("ab", ""));
        assert!(t("a\0", "") > t("a", "zzz"));
        assert!(t("p", "1") < t("p", "2"));
        let k = ("x\0y".to_owned(), "".to_owned());
        assert_eq!(<(String, String)>::decode(&enc(k.clone())), Some(k));
        assert_eq!(<(String, String)>::decode(b"x\0\x02"), None);
    }

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"ab"), Bound::Excluded(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Bound::Excluded(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), Bound::Unbounded);
    }
}

/// Untyped access for maps whose values are raw bytes rather than JSON (for example the wasm in
/// `gov.app_code`). Prefer [`Map`] everywhere else.
pub mod raw {
    use super::sys;

    pub fn get(map: &str, key: &[u8]) -> Option<Vec<u8>> {
        sys::get(map, key)
    }

    pub fn put(map: &str, key: &[u8], value: &[u8]) {
        sys::put(map, key, value)
    }

    /// Removes the key; returns whether it was present.
    pub fn remove(map: &str, key: &[u8]) -> bool {
        sys::remove(map, key)
    }
}
