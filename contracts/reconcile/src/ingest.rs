//! Parsing and validating a batch of records, from JSON or CSV. A batch is valid as a whole or
//! not at all: every invalid row is reported, up to [`ERRORS_REPORTED_MAX`].

use std::collections::BTreeMap;

use cloister_sdk::Error;
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
        return Err(Error::payload_too_large(format!(
            "the batch holds {rows} records; the limit is {} (setting batch_records_max)",
            settings.batch_records_max
        )));
    }
    Ok(())
}

/// Parses a JSON body: one record object, or a non-empty array of them.
pub fn from_json(settings: &Settings, body: &[u8]) -> Result<Vec<Record>, Error> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| Error::bad_request(format!("request body is not valid JSON: {e}")))?;
    let rows = match doc {
        Value::Array(rows) => rows,
        obj @ Value::Object(_) => vec![obj],
        other => {
            return Err(Error::bad_request(format!(
                "expected a record object or an array of records, got {}",
                kind(&other)
            )));
        }
    };
    check_size(settings, rows.len())?;
    let mut errors = RowErrors::default();
    let mut records = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let parsed = match row {
            Value::Object(obj) => record(settings, |name| match obj.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(v) => Err(format!("field {name} must be a string, got {}", kind(v))),
            }),
            v => Err(format!("expected a record object, got {}", kind(v))),
        };
        match parsed {
            Ok(r) => records.push(r),
            Err(reason) => errors.add(i + 1, reason),
        }
    }
    errors.into_result(records)
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

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
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
