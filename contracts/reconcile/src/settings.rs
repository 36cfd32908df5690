//! The app's settings, read from `gov.app_config`, which only governance proposals change.

use cloister_sdk::{Error, Map};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Governance-owned configuration; the app may read it and never write it.
const APP_CONFIG: Map<String, Value> = Map::new("gov.app_config");

pub const DEFAULT_KEY_FIELD: &str = "lei";
pub const DEFAULT_ATTRIBUTE_FIELDS: &[&str] = &["nace"];
pub const DEFAULT_THRESHOLD: u32 = 3;
/// Default largest batch, in records (setting `batch_records_max`).
pub const DEFAULT_BATCH_RECORDS_MAX: usize = 10_000;
/// Longest record key, in bytes.
pub const KEY_BYTES_MAX: usize = 256;
/// Longest attribute value, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024;

/// How records are keyed and compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The field that identifies a record (`lei`).
    pub key_field: String,
    /// The fields whose values parties vote on (`nace`).
    pub attribute_fields: Vec<String>,
    /// Votes a key needs before its status is more than `NOT_ENOUGH_DATA`.
    pub threshold: u32,
    /// Largest number of records accepted in one request.
    pub batch_records_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            key_field: DEFAULT_KEY_FIELD.to_owned(),
            attribute_fields: DEFAULT_ATTRIBUTE_FIELDS.iter().map(|s| s.to_string()).collect(),
            threshold: DEFAULT_THRESHOLD,
            batch_records_max: DEFAULT_BATCH_RECORDS_MAX,
        }
    }
}

impl Settings {
    /// The current settings: each key of `gov.app_config` overrides its default.
    pub fn load() -> Result<Settings, Error> {
        let d = Settings::default();
        let s = Settings {
            key_field: setting("key_field")?.unwrap_or(d.key_field),
            attribute_fields: setting("attribute_fields")?.unwrap_or(d.attribute_fields),
            threshold: setting("threshold")?.unwrap_or(d.threshold),
            batch_records_max: setting("batch_records_max")?.unwrap_or(d.batch_records_max),
        };
        s.check().map_err(|e| Error::internal(format!("gov.app_config is unusable: {e}")))?;
        Ok(s)
    }

    /// Whether the settings make sense together.
    pub fn check(&self) -> Result<(), String> {
        if self.key_field.is_empty() {
            return Err("key_field is empty".into());
        }
        if self.attribute_fields.is_empty() {
            return Err("attribute_fields is empty".into());
        }
        if self.attribute_fields.iter().any(|f| f.is_empty() || *f == self.key_field) {
            return Err("attribute_fields must be non-empty names other than key_field".into());
        }
        if self.threshold == 0 {
            return Err("threshold must be at least 1".into());
        }
        if self.batch_records_max == 0 {
            return Err("batch_records_max must be at least 1".into());
        }
        Ok(())
    }

    /// Every field a record must carry: the key, then the attributes.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.key_field.as_str()).chain(self.attribute_fields.iter().map(String::as_str))
    }
}

fn setting<T: DeserializeOwned>(name: &str) -> Result<Option<T>, Error> {
    APP_CONFIG
        .get(&name.to_owned())
        .map(|v| {
            serde_json::from_value(v)
                .map_err(|e| Error::internal(format!("gov.app_config setting {name} is malformed: {e}")))
        })
        .transpose()
}
