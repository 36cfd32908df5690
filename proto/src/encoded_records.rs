//! `cloister.reconcile.v1.IngestRequest` as the node's server decodes it: kept encoded, and read
//! one record and one field at a time.
//!
//! prost's own type builds a `HashMap` per record: an empty record is two bytes on the wire and
//! about fifty in memory, so a message within the decoding limit could take some twenty-five
//! times its size before any handler had checked who sent it. [`EncodedRecords`] holds the
//! records' bytes as they arrived, checked only for framing, and [`fields`] walks one record's
//! map entries without building the map, so a server can turn the request into what it needs
//! within a bound of its own.

use prost::DecodeError;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};

/// The field number of `IngestRequest.records` and of `Record.fields`; in a map entry, the key's.
const FIRST_FIELD: u32 = 1;
/// The field number of a map entry's value.
const ENTRY_VALUE: u32 = 2;

/// The records of an `IngestRequest`, each still an encoded `Record` message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedRecords {
    /// Every record as it arrived, field key and length included, so the bytes are themselves
    /// an encoded `IngestRequest`.
    encoded: Vec<u8>,
    count: usize,
}

impl EncodedRecords {
    /// How many records the request holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each record's encoded `Record` message, in the order they arrived.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut rest = &self.encoded[..];
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            // The framing was checked on the way in, so these cannot fail.
            encoding::decode_key(&mut rest).expect("framed on decode");
            let len = encoding::decode_varint(&mut rest).expect("framed on decode") as usize;
            let (record, after) = rest.split_at(len);
            rest = after;
            Some(record)
        })
    }

    /// Appends one encoded `Record` message, as a client building a request would.
    pub fn push(&mut self, record: &[u8]) {
        encoding::encode_key(FIRST_FIELD, WireType::LengthDelimited, &mut self.encoded);
        encoding::encode_varint(record.len() as u64, &mut self.encoded);
        self.encoded.extend_from_slice(record);
        self.count += 1;
    }
}

impl prost::Message for EncodedRecords {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != FIRST_FIELD {
            return encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut record = Vec::new();
        encoding::bytes::merge(wire_type, &mut record, buf, ctx)?;
        self.push(&record);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    fn clear(&mut self) {
        self.encoded.clear();
        self.count = 0;
    }
}

/// Why a record's fields could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(String);

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecordError {}

impl From<DecodeError> for RecordError {
    fn from(e: DecodeError) -> RecordError {
        RecordError(e.to_string())
    }
}

/// One encoded `Record`'s fields, name and value, in the order they were sent. A name sent
/// twice comes twice (protobuf's rule for maps is that the last one counts). Fields of the
/// message other than the map are skipped, as prost would; an entry that is not well formed,
/// or whose name or value is not UTF-8, is an error, after which the walk ends.
pub fn fields(record: &[u8]) -> impl Iterator<Item = Result<(&str, &str), RecordError>> + '_ {
    let mut rest = record;
    let mut failed = false;
    std::iter::from_fn(move || {
        while !rest.is_empty() && !failed {
            let next = next_entry(&mut rest);
            failed = next.is_err();
            if let Some(entry) = next.transpose() {
                return Some(entry);
            }
        }
        None
    })
}

/// The next map entry of a record, or `None` where the next field is not one (it is skipped).
fn next_entry<'a>(rest: &mut &'a [u8]) -> Result<Option<(&'a str, &'a str)>, RecordError> {
    let (tag, wire_type) = encoding::decode_key(rest)?;
    if tag != FIRST_FIELD {
        encoding::skip_field(wire_type, tag, rest, DecodeContext::default())?;
        return Ok(None);
    }
    let mut entry = length_delimited(wire_type, rest)?;
    let (mut name, mut value) = ("", "");
    while !entry.is_empty() {
        let (tag, wire_type) = encoding::decode_key(&mut entry)?;
        match tag {
            FIRST_FIELD => name = utf8(length_delimited(wire_type, &mut entry)?)?,
            ENTRY_VALUE => value = utf8(length_delimited(wire_type, &mut entry)?)?,
            _ => encoding::skip_field(wire_type, tag, &mut entry, DecodeContext::default())?,
        }
    }
    Ok(Some((name, value)))
}

/// A length-delimited field's bytes, taken off the front of `rest`.
fn length_delimited<'a>(wire_type: WireType, rest: &mut &'a [u8]) -> Result<&'a [u8], RecordError> {
    encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = encoding::decode_varint(rest)?;
    if len > rest.len() as u64 {
        return Err(RecordError("a field is longer than its message".into()));
    }
    let (field, after) = rest.split_at(len as usize);
    *rest = after;
    Ok(field)
}

fn utf8(bytes: &[u8]) -> Result<&str, RecordError> {
    std::str::from_utf8(bytes).map_err(|_| RecordError("a field's name or value is not valid UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use cloister_test_support::{TrackingAllocator, largest_allocation};
    use prost::Message;

    use super::*;
    use crate::reconcile::v1::{IngestRequest, Record};

    #[global_allocator]
    static ALLOCATOR: TrackingAllocator = TrackingAllocator;

    fn record(pairs: &[(&str, &str)]) -> Record {
        Record { fields: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    fn all_fields(record: &[u8]) -> Result<HashMap<String, String>, RecordError> {
        fields(record).map(|f| f.map(|(k, v)| (k.to_owned(), v.to_owned()))).collect()
    }

    #[test]
    fn reads_back_what_prost_wrote() {
        let sent = IngestRequest {
            records: vec![record(&[("lei", "A"), ("nace", "x")]), record(&[]), record(&[("lei", "é")])],
        };
        let bytes = sent.encode_to_vec();
        let got = EncodedRecords::decode(&bytes[..]).unwrap();
        assert_eq!(got.len(), 3);
        let back: Vec<_> = got.records().map(|r| all_fields(r).unwrap()).collect();
        assert_eq!(back, sent.records.iter().map(|r| r.fields.clone()).collect::<Vec<_>>());
        // Kept as it arrived: encoding it again gives the same bytes, which prost reads back.
        assert_eq!(got.encode_to_vec(), bytes);
        assert_eq!(IngestRequest::decode(&got.encode_to_vec()[..]).unwrap(), sent);
    }

    #[test]
    fn holds_the_wire_size_not_a_map_per_record() {
        // A hundred thousand empty records: two bytes each on the wire.
        let mut sent = EncodedRecords::default();
        for _ in 0..100_000 {
            sent.push(&[]);
        }
        let bytes = sent.encode_to_vec();
        assert_eq!(bytes.len(), 200_000);
        let (got, largest) = largest_allocation(|| EncodedRecords::decode(&bytes[..]).unwrap());
        assert_eq!(got.len(), 100_000);
        assert_eq!(got.encoded.len(), bytes.len(), "one buffer of the message's size");
        assert!(largest <= 2 * bytes.len(), "largest allocation {largest} for {} bytes", bytes.len());
        // What prost's own type takes for the same bytes: a `Record` of maps per two bytes.
        let (prosts, largest) = largest_allocation(|| IngestRequest::decode(&bytes[..]).unwrap());
        assert_eq!(prosts.records.len(), 100_000);
        assert!(largest >= 20 * bytes.len(), "prost's type took {largest} for {} bytes", bytes.len());
    }

    #[test]
    fn skips_unknown_fields_and_keeps_repeated_names_in_order() {
        let mut r = Vec::new();
        // An unknown varint field, then "k"="1", then "k"="2".
        encoding::encode_key(7, WireType::Varint, &mut r);
        encoding::encode_varint(5, &mut r);
        for v in ["1", "2"] {
            let entry = [&[0x0a, 1, b'k', 0x12, 1][..], v.as_bytes()].concat();
            encoding::encode_key(1, WireType::LengthDelimited, &mut r);
            encoding::encode_varint(entry.len() as u64, &mut r);
            r.extend_from_slice(&entry);
        }
        let got: Vec<_> = fields(&r).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, [("k", "1"), ("k", "2")]);
        // prost's own map keeps the last, which is what a reader taking them in order gets.
        assert_eq!(Record::decode(&r[..]).unwrap().fields["k"], "2");
    }

    #[test]
    fn refuses_what_is_not_a_record() {
        // Not UTF-8.
        let bad = [0x0a, 4, 0x0a, 2, 0xff, 0xfe];
        assert!(fields(&bad).next().unwrap().is_err());
        // An entry longer than the record.
        let short = [0x0a, 9, 0x0a, 1, b'k'];
        let walked: Vec<_> = fields(&short).collect();
        assert_eq!(walked.len(), 1, "the walk ends at its first error");
        assert!(walked[0].is_err());
        // The request's records field with the wrong wire type.
        assert!(EncodedRecords::decode(&[0x08, 1][..]).is_err());
        // A record longer than the message.
        assert!(EncodedRecords::decode(&[0x0a, 5, 0][..]).is_err());
    }
}
