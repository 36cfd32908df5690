//! Parsing and validating a batch of records, from JSON or CSV. A batch is valid as a whole or
//! not at all: every invalid row is reported, up to [`ERRORS_REPORTED_MAX`].

use std::collections::BTreeMap;

use std::cell::Cell;

use cloister_sdk::Error;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};

use crate::settings::{KEY_BYTES_MAX, Settings, VALUE_BYTES_MAX};

/// Most invalid rows listed in one error; the total is always given.
pub const ERRORS_REPORTED_MAX: usize = 20;

/// One valid record: its key and its attribute values by field name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub values: BTreeMap<String, String>,
}

/// The invalid rows of a batch.
#[derive(Default)]
struct RowErrors {
    listed: Vec<Value>,
    total: usize,
}

impl RowErrors {
    fn add(&mut self, row: usize, reason: String) {
        self.total += 1;
        if self.listed.len() < ERRORS_REPORTED_MAX {
            self.listed.push(json!({ "row": row, "reason": reason }));
        }
    }

    fn into_result(self, records: Vec<Record>) -> Result<Vec<Record>, Error> {
        if self.total == 0 {
            return Ok(records);
        }
        let first = self.listed[0]["reason"].as_str().unwrap_or_default().to_owned();
        let message = format!(
            "the batch was rejected whole: {} invalid row(s); first: row {}: {first}",
            self.total, self.listed[0]["row"]
        );
        Err(Error::bad_request(message).with_details(json!({ "invalid_rows": self.total, "rows": self.listed })))
    }
}

/// Checks one field value, returning it trimmed.
fn field(name: &str, raw: Option<&str>, bytes_max: usize) -> Result<String, String> {
    let value = raw.ok_or_else(|| format!("missing field {name}"))?.trim();
    if value.is_empty() {
        return Err(format!("field {name} is empty"));
    }
    if value.len() > bytes_max {
        return Err(format!("field {name} is {} bytes; the limit is {bytes_max}", value.len()));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("field {name} contains a control character"));
    }
    Ok(value.to_owned())
}

/// Builds a record from a lookup of field name to raw value.
fn record<'a>(settings: &Settings, get: impl Fn(&str) -> Result<Option<&'a str>, String>) -> Result<Record, String> {
    let key = field(&settings.key_field, get(&settings.key_field)?, KEY_BYTES_MAX)?;
    let mut values = BTreeMap::new();
    for name in &settings.attribute_fields {
        values.insert(name.clone(), field(name, get(name)?, VALUE_BYTES_MAX)?);
    }
    Ok(Record { key, values })
}

fn check_size(settings: &Settings, rows: usize) -> Result<(), Error> {
    if rows == 0 {
        return Err(Error::bad_request("the batch holds no records"));
    }
    if rows > settings.batch_records_max {
        // Both parsers stop at the first row past the limit, so the total is not known.
        return Err(Error::payload_too_large(format!(
            "the batch holds more than {} records (setting batch_records_max)",
            settings.batch_records_max
        )));
    }
    Ok(())
}

/// Parses a JSON body: one record object, or a non-empty array of them.
///
/// The body is read as it is parsed, never built as a whole document: rows past
/// `batch_records_max` stop the parse, and of each row only the fields the settings name are
/// kept, so what a body takes in memory is bounded by the batch's limit and its fields' sizes,
/// not by how many values it holds.
pub fn from_json(settings: &Settings, body: &[u8]) -> Result<Vec<Record>, Error> {
    let too_many = Cell::new(false);
    let mut parser = serde_json::Deserializer::from_slice(body);
    let seed = Reader { level: Level::Batch, settings, too_many: &too_many };
    let parsed = seed.deserialize(&mut parser).and_then(|doc| parser.end().map(|()| doc));
    let doc = match parsed {
        Ok(doc) => doc,
        Err(_) if too_many.get() => return check_size(settings, settings.batch_records_max + 1).map(|()| Vec::new()),
        Err(e) => return Err(Error::bad_request(format!("request body is not valid JSON: {e}"))),
    };
    let rows = match doc {
        Kept::Rows(rows) => rows,
        row @ Kept::Record(_) => vec![row],
        other => return Err(not_a_batch(other.kind())),
    };
    check_size(settings, rows.len())?;
    let mut errors = RowErrors::default();
    let mut records = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let parsed = match row {
            Kept::Record(fields) => record(settings, |name| match fields.get(name) {
                None => Ok(None),
                Some(Kept::Str(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(format!("field {name} must be a string, got {}", other.kind())),
            }),
            other => Err(format!("expected a record object, got {}", other.kind())),
        };
        match parsed {
            Ok(r) => records.push(r),
            Err(reason) => errors.add(i + 1, reason),
        }
    }
    errors.into_result(records)
}

fn not_a_batch(kind: &str) -> Error {
    Error::bad_request(format!("expected a record object or an array of records, got {kind}"))
}

/// What the JSON parse keeps of a value: the batch's rows, a row's named fields, a string, or
/// only the kind of anything else (which is skipped, not built).
enum Kept {
    Rows(Vec<Kept>),
    Record(BTreeMap<String, Kept>),
    Str(String),
    Other(&'static str),
}

impl Kept {
    fn kind(&self) -> &'static str {
        match self {
            Kept::Rows(_) => "an array",
            Kept::Record(_) => "an object",
            Kept::Str(_) => "a string",
            Kept::Other(kind) => kind,
        }
    }
}

/// How deep in the body a value sits, which decides what of it is kept.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    /// The body: an array of rows, or one row.
    Batch,
    /// A row: an object whose named fields are kept.
    Row,
    /// A field's value: a string is kept.
    Field,
}

/// Reads one value at `level` (a serde seed, since what is kept depends on the settings).
#[derive(Clone, Copy)]
struct Reader<'a> {
    level: Level,
    settings: &'a Settings,
    /// Set when the batch has more rows than `batch_records_max`, which ends the parse.
    too_many: &'a Cell<bool>,
}

impl Reader<'_> {
    fn at(self, level: Level) -> Self {
        Reader { level, ..self }
    }
}

impl<'de> DeserializeSeed<'de> for Reader<'_> {
    type Value = Kept;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Kept, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Reader<'_> {
    type Value = Kept;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Kept, E> {
        Ok(Kept::Other("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Kept, E> {
        Ok(Kept::Other("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Kept, E> {
        Ok(Kept::Other("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Kept, E> {
        Ok(Kept::Other("a number"))
    }

    fn visit_unit<E>(self) -> Result<Kept, E> {
        Ok(Kept::Other("null"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Kept, E> {
        Ok(match self.level {
            Level::Field => Kept::Str(v.to_owned()),
            Level::Batch | Level::Row => Kept::Other("a string"),
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kept, A::Error> {
        if self.level != Level::Batch {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Kept::Other("an array"));
        }
        let mut rows = Vec::new();
        while let Some(row) = seq.next_element_seed(self.at(Level::Row))? {
            if rows.len() == self.settings.batch_records_max {
                self.too_many.set(true);
                return Err(de::Error::custom("more rows than batch_records_max"));
            }
            rows.push(row);
        }
        Ok(Kept::Rows(rows))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kept, A::Error> {
        if self.level == Level::Field {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Kept::Other("an object"));
        }
        let mut fields = BTreeMap::new();
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.settings.fields().any(|f| f == name) {
                fields.insert(name.into_owned(), map.next_value_seed(self.at(Level::Field))?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Kept::Record(fields))
    }
}
/// Parses a CSV body whose header names at least the key field and the attribute fields.
///
/// Rows are numbered by line, the header being line 1. Extra columns are ignored.
pub fn from_csv(settings: &Settings, body: &[u8]) -> Result<Vec<Record>, Error> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::bad_request(format!("CSV body is not valid UTF-8 (at byte {})", e.valid_up_to())))?;
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(true).from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| Error::bad_request(format!("CSV header cannot be read: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    let missing: Vec<&str> = settings.fields().filter(|f| !header.iter().any(|h| h == f)).collect();
    if !missing.is_empty() {
        return Err(Error::bad_request(format!(
            "CSV header must name the columns {}; it lacks {} (found: {})",
            settings.fields().collect::<Vec<_>>().join(", "),
            missing.join(", "),
            header.join(", ")
        )));
    }
    let column = |name: &str| header.iter().position(|h| h == name);
    let mut errors = RowErrors::default();
    let mut records = Vec::new();
    let mut rows = 0;
    for result in reader.records() {
        rows += 1;
        if rows > settings.batch_records_max {
            break;
        }
        let line = result.as_ref().ok().and_then(|r| r.position()).map_or(rows + 1, |p| p.line() as usize);
        let parsed = result.map_err(|e| format!("unreadable CSV row: {e}")).and_then(|row| {
            if row.len() != header.len() {
                return Err(format!("row has {} fields; the header has {}", row.len(), header.len()));
            }
            record(settings, |name| Ok(column(name).and_then(|i| row.get(i))))
        });
        match parsed {
            Ok(r) => records.push(r),
            Err(reason) => errors.add(line, reason),
        }
    }
    check_size(settings, rows)?;
    errors.into_result(records)
}

#[cfg(test)]
mod tests {
    use cloister_test_support::{TrackingAllocator, largest_allocation};

    use super::*;

    fn s() -> Settings {
        Settings::default()
    }

    #[test]
    fn json_accepts_one_object_or_an_array() {
        let one = from_json(&s(), br#"{"lei":" A ","nace":"B","extra":1}"#).unwrap();
        assert_eq!(one, vec![Record { key: "A".into(), values: [("nace".into(), "B".into())].into() }]);
        assert_eq!(from_json(&s(), br#"[{"lei":"A","nace":"B"},{"lei":"C","nace":"D"}]"#).unwrap().len(), 2);
    }

    #[test]
    fn json_rejects_the_whole_batch_and_lists_rows() {
        let body = br#"[{"lei":"A","nace":"B"},{"lei":"","nace":"B"},{"lei":"C","nace":7},5,{"nace":"x"}]"#;
        let e = from_json(&s(), body).unwrap_err();
        assert_eq!(e.status, 400);
        let d = e.details.unwrap();
        assert_eq!(d["invalid_rows"], 4);
        let reasons: Vec<String> = d["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{}:{}", r["row"], r["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(
            reasons,
            [
                "2:field lei is empty",
                "3:field nace must be a string, got a number",
                "4:expected a record object, got a number",
                "5:missing field lei",
            ]
        );
    }

    #[test]
    fn json_edge_cases() {
        assert!(from_json(&s(), b"[]").unwrap_err().message.contains("no records"));
        assert!(from_json(&s(), b"null").unwrap_err().message.contains("got null"));
        assert!(from_json(&s(), b"{").unwrap_err().message.contains("not valid JSON"));
        let long = format!(r#"{{"lei":"{}","nace":"x"}}"#, "k".repeat(KEY_BYTES_MAX));
        assert!(from_json(&s(), long.as_bytes()).is_ok());
        let too_long = format!(r#"{{"lei":"{}","nace":"x"}}"#, "k".repeat(KEY_BYTES_MAX + 1));
        assert!(from_json(&s(), too_long.as_bytes()).unwrap_err().message.contains("the limit is 256"));
        assert!(from_json(&s(), br#"{"lei":"a\u0000b","nace":"x"}"#).unwrap_err().message.contains("control"));
    }

    #[global_allocator]
    static ALLOCATOR: TrackingAllocator = TrackingAllocator;

    #[test]
    fn a_body_of_many_values_is_not_built_whole() {
        // 8 MiB of zeros: four million values, each a few dozen bytes as a document.
        let mut zeros = b"[0".to_vec();
        zeros.extend(b",0".repeat((8 << 20) / 2));
        zeros.push(b']');
        let (result, largest) = largest_allocation(|| from_json(&s(), &zeros));
        let e = result.unwrap_err();
        assert_eq!(e.status, 413, "{}", e.message);
        assert!(e.message.contains("more than 10000 records (setting batch_records_max)"), "{}", e.message);
        assert!(largest < 1 << 20, "largest allocation {largest} bytes");
        // Within the limit, a row's other fields are skipped, however much they hold.
        let padded = format!(r#"[{{"lei":"A","nace":"B","pad":[{}0]}}]"#, "0,".repeat(1 << 20));
        let (result, largest) = largest_allocation(|| from_json(&s(), padded.as_bytes()));
        assert_eq!(result.unwrap().len(), 1);
        assert!(largest < 1 << 20, "largest allocation {largest} bytes");
    }

    #[test]
    fn json_fields_named_twice_keep_the_last_and_other_kinds_are_named() {
        let one = from_json(&s(), br#"{"lei":"A","nace":"B","lei":"C"}"#).unwrap();
        assert_eq!(one[0].key, "C");
        let body = br#"[{"lei":{"a":1},"nace":"x"},{"lei":["a"],"nace":"x"},"row",[1]]"#;
        let d = from_json(&s(), body).unwrap_err().details.unwrap();
        let reasons: Vec<&str> = d["rows"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
        assert_eq!(
            reasons,
            [
                "field lei must be a string, got an object",
                "field lei must be a string, got an array",
                "expected a record object, got a string",
                "expected a record object, got an array",
            ]
        );
        for (body, kind) in [(&b"\"x\""[..], "a string"), (b"true", "a boolean"), (b"1.5", "a number")] {
            let e = from_json(&s(), body).unwrap_err();
            assert!(e.message.ends_with(&format!("an array of records, got {kind}")), "{}", e.message);
        }
        assert!(from_json(&s(), br#"{"lei":"A","nace":"B"} x"#).unwrap_err().message.contains("not valid JSON"));
    }

    #[test]
    fn batch_size_limit_is_exact() {
        let settings = Settings { batch_records_max: 2, ..s() };
        let rows = |n| serde_json::to_vec(&vec![json!({"lei":"a","nace":"b"}); n]).unwrap();
        assert!(from_json(&settings, &rows(2)).is_ok());
        assert_eq!(from_json(&settings, &rows(3)).unwrap_err().status, 413);
        assert!(from_csv(&settings, b"lei,nace\na,b\nc,d\n").is_ok());
        assert_eq!(from_csv(&settings, b"lei,nace\na,b\nc,d\ne,f\n").unwrap_err().status, 413);
    }

    #[test]
    fn csv_checks_header_and_rows() {
        let ok = from_csv(&s(), b"nace,lei,other\nB , A,zz\n").unwrap();
        assert_eq!(ok[0].key, "A");
        assert_eq!(ok[0].values["nace"], "B");
        let e = from_csv(&s(), b"lei,value\nA,B\n").unwrap_err();
        assert!(e.message.contains("lacks nace"), "{}", e.message);
        let e = from_csv(&s(), b"[{\"lei\":\"A\"}]").unwrap_err();
        assert_eq!(e.status, 400);
        let e = from_csv(&s(), b"lei,nace\nA,B\nC\n,D\n").unwrap_err();
        let d = e.details.unwrap();
        assert_eq!(d["rows"][0]["row"], 3);
        assert_eq!(d["rows"][1]["row"], 4);
        assert!(from_csv(&s(), b"lei,nace\n").unwrap_err().message.contains("no records"));
        assert!(from_csv(&s(), b"lei,nace\n\xff,x\n").unwrap_err().message.contains("UTF-8"));
    }

    #[test]
    fn error_list_is_capped_but_counted() {
        let body = serde_json::to_vec(&vec![json!({"lei": ""}); 50]).unwrap();
        let d = from_json(&s(), &body).unwrap_err().details.unwrap();
        assert_eq!(d["invalid_rows"], 50);
        assert_eq!(d["rows"].as_array().unwrap().len(), ERRORS_REPORTED_MAX);
    }
}
