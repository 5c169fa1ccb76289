//! Opaque JSON payloads (`data`) and request references (`ref`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Any JSON value, kept as the exact text the publisher sent, so that the server
/// never re-encodes application data.
#[derive(Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// Parses and validates `json` as one JSON value.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        let raw: Box<RawValue> = serde_json::from_str(json)?;
        Ok(Payload(raw))
    }

    /// Wraps an already validated raw value.
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        Payload(raw)
    }

    /// Encodes a serialisable value as a payload.
    pub fn from_value<T: Serialize>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Payload(serde_json::value::to_raw_value(value)?))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    pub fn raw(&self) -> &RawValue {
        &self.0
    }

    /// The payload as a parsed value (allocates; for tests and tools).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

/// Two payloads are equal when they encode the same JSON value (formatting aside).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get() || self.to_value() == other.to_value()
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    /// Goes through `serde_json::Value` so that it also works inside internally tagged enums,
    /// where a borrowed raw value is not available.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        serde_json::value::to_raw_value(&value)
            .map(Payload)
            .map_err(serde::de::Error::custom)
    }
}

/// Longest string `ref`, in bytes.
pub const MAX_REF_BYTES: usize = 64;

/// A client's request reference, echoed in the reply: an unsigned integer or a short string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ref {
    Num(u64),
    Str(String),
}

impl Ref {
    /// Reads a `ref` from its raw JSON text.
    pub fn from_raw(raw: &RawValue) -> Result<Self, String> {
        let parsed: Ref = serde_json::from_str(raw.get())
            .map_err(|_| "ref must be an unsigned integer or a string".to_string())?;
        if let Ref::Str(s) = &parsed
            && s.len() > MAX_REF_BYTES
        {
            return Err(format!(
                "ref is {} bytes long; the limit is {MAX_REF_BYTES}",
                s.len()
            ));
        }
        Ok(parsed)
    }
}
