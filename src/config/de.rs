//! Deserializing the merged configuration tree into [`RawConfig`](super::RawConfig).
//!
//! The `config` crate's own deserializer coerces freely (a float into an integer by rounding,
//! `true` into `1`), which would let typos pass silently. This one is strict for values that
//! come from the file, and lenient only for values from environment variables, which are always
//! strings: those are parsed into the type the key expects (`"9000"` into a port, `"false"`
//! into a bool, `"a,b"` into a list).

use std::cell::Cell;
use std::fmt;

use config::{Value, ValueKind};
use serde::de::value::StringDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};

/// The origin the `config` crate records for values from environment variables.
const ENV_ORIGIN: &str = "the environment";
/// The origin of a stand-in that loading puts where a value was wrong, so that one pass of
/// deserialization can go on past it and find the next problem (see [`stand_in`]).
const STAND_IN_ORIGIN: &str = "a stand-in for a value found wrong";

/// A stand-in value that deserializes as any type: absent for an `Option`, otherwise zero,
/// `false`, `""`, an empty list or table, or an enum's first variant. It is never part of a
/// configuration that is used: it only lets deserialization go on to report later problems.
pub(crate) fn stand_in() -> Value {
    Value::new(Some(&STAND_IN_ORIGIN.to_owned()), ValueKind::Nil)
}

/// Whether `value` is a [`stand_in`] loading already put there.
pub(crate) fn is_stand_in(value: &Value) -> bool {
    value.origin() == Some(STAND_IN_ORIGIN)
}

/// A deserialization failure; the key path is tracked separately by `serde_path_to_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeError(pub(crate) String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(msg.to_string())
    }
}

impl DeError {
    fn from_config(error: config::ConfigError) -> Self {
        match error {
            config::ConfigError::Type {
                unexpected,
                expected,
                ..
            } => DeError(format!("invalid type: {unexpected}, expected {expected}")),
            config::ConfigError::At { error, .. } => DeError::from_config(*error),
            config::ConfigError::Message(message) => DeError(message),
            other => DeError(other.to_string()),
        }
    }
}

/// One node of the merged tree. `substituted` is set when a [`stand_in`] stands in for a
/// value the configuration needs (anything but an absent `Option`).
pub(crate) struct Node<'a>(pub(crate) Value, pub(crate) &'a Cell<bool>);

impl Node<'_> {
    fn is_env(&self) -> bool {
        self.0.origin() == Some(ENV_ORIGIN)
    }

    fn is_stand_in(&self) -> bool {
        is_stand_in(&self.0)
    }
}

/// What a [`stand_in`] becomes for each type a visitor asks for.
macro_rules! stand_in_as {
    ($self:ident, $visitor:ident, $method:ident) => {
        if $self.is_stand_in() {
            $self.1.set(true);
            return stand_in_as!(@visit $visitor, $method);
        }
    };
    (@visit $visitor:ident, deserialize_bool) => { $visitor.visit_bool(false) };
    (@visit $visitor:ident, deserialize_f32) => { $visitor.visit_f64(0.0) };
    (@visit $visitor:ident, deserialize_f64) => { $visitor.visit_f64(0.0) };
    (@visit $visitor:ident, deserialize_char) => { $visitor.visit_char(' ') };
    (@visit $visitor:ident, deserialize_str) => { $visitor.visit_str("") };
    (@visit $visitor:ident, deserialize_string) => { $visitor.visit_str("") };
    (@visit $visitor:ident, deserialize_identifier) => { $visitor.visit_str("") };
    (@visit $visitor:ident, deserialize_bytes) => { $visitor.visit_bytes(&[]) };
    (@visit $visitor:ident, deserialize_byte_buf) => { $visitor.visit_bytes(&[]) };
    (@visit $visitor:ident, deserialize_unit) => { $visitor.visit_unit() };
    (@visit $visitor:ident, deserialize_ignored_any) => { $visitor.visit_unit() };
    (@visit $visitor:ident, deserialize_any) => { $visitor.visit_unit() };
    (@visit $visitor:ident, deserialize_map) => {
        $visitor.visit_map(serde::de::value::MapDeserializer::<
            std::iter::Empty<(String, String)>,
            DeError,
        >::new(std::iter::empty()))
    };
    (@visit $visitor:ident, deserialize_seq) => {
        $visitor.visit_seq(serde::de::value::SeqDeserializer::<
            std::iter::Empty<String>,
            DeError,
        >::new(std::iter::empty()))
    };
    (@visit $visitor:ident, $other:ident) => { $visitor.visit_u64(0) };
}

/// Strict for file values, delegating to the `config` crate's coercing deserializer for
/// environment values.
macro_rules! strict_or_env {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            stand_in_as!(self, visitor, $method);
            if self.is_env() {
                self.0.$method(visitor).map_err(DeError::from_config)
            } else {
                self.deserialize_any(visitor)
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Node<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        stand_in_as!(self, visitor, deserialize_any);
        let substituted = self.1;
        match self.0.kind {
            ValueKind::Nil => visitor.visit_unit(),
            ValueKind::Boolean(b) => visitor.visit_bool(b),
            ValueKind::I64(i) => visitor.visit_i64(i),
            ValueKind::I128(i) => visitor.visit_i128(i),
            ValueKind::U64(i) => visitor.visit_u64(i),
            ValueKind::U128(i) => visitor.visit_u128(i),
            ValueKind::Float(f) => visitor.visit_f64(f),
            ValueKind::String(s) => visitor.visit_string(s),
            ValueKind::Array(items) => visitor.visit_seq(Seq {
                items: items.into_iter(),
                substituted,
            }),
            ValueKind::Table(table) => {
                // Sorted, so that the first problem reported does not depend on hashing.
                let mut entries: Vec<(String, Value)> = table.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                visitor.visit_map(Table {
                    entries: entries.into_iter(),
                    next_value: None,
                    substituted,
                })
            }
        }
    }

    strict_or_env! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_map deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.is_stand_in() {
            // An absent optional key: nothing the configuration needs was made up.
            return visitor.visit_none();
        }
        match self.0.kind {
            ValueKind::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        stand_in_as!(self, visitor, deserialize_seq);
        if self.is_env() {
            // An environment variable sets a list as comma-separated items; empty is `[]`.
            let text = self.0.into_string().map_err(DeError::from_config)?;
            let origin = ENV_ORIGIN.to_owned();
            let items: Vec<Value> = text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::new(Some(&origin), ValueKind::String(item.to_owned())))
                .collect();
            return visitor.visit_seq(Seq {
                items: items.into_iter(),
                substituted: self.1,
            });
        }
        self.deserialize_any(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if self.is_stand_in() {
            self.1.set(true);
            let first: StringDeserializer<DeError> = variants
                .first()
                .copied()
                .unwrap_or_default()
                .to_owned()
                .into_deserializer();
            return visitor.visit_enum(first);
        }
        // Only unit variants are written in configuration files: `format = "json"`.
        let is_env = self.is_env();
        match self.0.kind {
            ValueKind::String(s) => {
                let variant: StringDeserializer<DeError> = s.into_deserializer();
                visitor.visit_enum(variant)
            }
            kind if is_env => visitor.visit_enum(kind.to_string().into_deserializer()),
            kind => Err(de::Error::invalid_type(unexpected(&kind), &visitor)),
        }
    }
}

fn unexpected(kind: &ValueKind) -> de::Unexpected<'_> {
    match kind {
        ValueKind::Nil => de::Unexpected::Unit,
        ValueKind::Boolean(b) => de::Unexpected::Bool(*b),
        ValueKind::I64(i) => de::Unexpected::Signed(*i),
        ValueKind::I128(_) | ValueKind::U128(_) => de::Unexpected::Other("a 128-bit integer"),
        ValueKind::U64(i) => de::Unexpected::Unsigned(*i),
        ValueKind::Float(f) => de::Unexpected::Float(*f),
        ValueKind::String(s) => de::Unexpected::Str(s),
        ValueKind::Array(_) => de::Unexpected::Seq,
        ValueKind::Table(_) => de::Unexpected::Map,
    }
}

struct Seq<'a> {
    items: std::vec::IntoIter<Value>,
    substituted: &'a Cell<bool>,
}

impl<'de> de::SeqAccess<'de> for Seq<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some(item) => seed.deserialize(Node(item, self.substituted)).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Table<'a> {
    entries: std::vec::IntoIter<(String, Value)>,
    next_value: Option<Value>,
    substituted: &'a Cell<bool>,
}

impl<'de> de::MapAccess<'de> for Table<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            Some((key, value)) => {
                self.next_value = Some(value);
                let key: StringDeserializer<DeError> = key.into_deserializer();
                seed.deserialize(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.next_value.take() {
            Some(value) => seed.deserialize(Node(value, self.substituted)),
            None => Err(de::Error::custom("a value was requested before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}
