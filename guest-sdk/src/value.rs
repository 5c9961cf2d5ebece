//! Conversions into [`Value`] and the [`Fields`] builder.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::{Field, Value};

impl From<bool> for Value {
    fn from(value: bool) -> Self {
        Value::Boolean(value)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Value::Float(value)
    }
}

macro_rules! integer_values {
    ($($int:ty),*) => {
        $(impl From<$int> for Value {
            fn from(value: $int) -> Self {
                Value::Integer(i64::from(value))
            }
        })*
    };
}

integer_values!(i8, i16, i32, i64, u8, u16, u32);

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

/// `None` becomes [`Value::Null`].
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

/// Scalars map to their own variants; arrays and objects travel as
/// [`Value::Json`]. Integers that do not fit `i64` become floats.
impl From<serde_json::Value> for Value {
    fn from(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s),
            nested @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
                Value::Json(nested.to_string())
            }
        }
    }
}

impl Field {
    /// A field named `key` holding `value`.
    pub fn new(key: impl Into<String>, value: impl Into<Value>) -> Self {
        Field {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// An ordered list of fields, built one at a time.
///
/// A key given twice keeps its last value, at the place of its first: that
/// is how sluice stores the fields, and how [`Fields::get`] and
/// [`Fields::take`] read them.
///
/// ```
/// use sluice_guest::{Fields, Value};
///
/// let fields = Fields::new().with("temperature", 21.5).with("door", "open");
/// assert_eq!(fields.get("door"), Some(&Value::Text("open".into())));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<Field>);

impl Fields {
    /// No fields yet.
    pub fn new() -> Self {
        Fields(Vec::new())
    }

    /// Adds a field and returns the list, for chaining.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.push(key, value);
        self
    }

    /// Adds a field.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.0.push(Field::new(key, value));
    }

    /// The value of `key` (its last, if given more than once).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().rev().find(|f| f.key == key).map(|f| &f.value)
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One field per member of a JSON object (in the order of serde_json's
    /// map: by key, unless its `preserve_order` feature is on); `None` if
    /// `value` is not an object.
    pub fn from_json_object(value: serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Object(map) => Some(map.into_iter().collect()),
            _ => None,
        }
    }
}

impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Fields(iter.into_iter().map(|(k, v)| Field::new(k, v)).collect())
    }
}

impl From<Fields> for Vec<Field> {
    fn from(fields: Fields) -> Self {
        fields.0
    }
}

impl From<Vec<Field>> for Fields {
    fn from(fields: Vec<Field>) -> Self {
        Fields(fields)
    }
}

impl Fields {
    /// Removes `key` and returns its value (its last, if given more than once).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        let mut taken = None;
        self.0.retain_mut(|field| {
            if field.key != key {
                return true;
            }
            taken = Some(std::mem::replace(&mut field.value, Value::Null));
            false
        });
        taken
    }

    /// The fields, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Field> {
        self.0.iter()
    }
}

impl Value {
    /// The value as a number, if it is an integer or a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Integer(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }

    /// The value as an integer, if it is one.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Integer(i) => Some(i),
            _ => None,
        }
    }

    /// The value as text, if it is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A JSON value read straight into a [`Value`]: scalars to their variants,
/// arrays and objects to [`Value::Json`].
impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::Float(v as f64), Value::Integer))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let nested = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Value::Json(nested.to_string()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let nested = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Value::Json(nested.to_string()))
    }
}

/// A JSON object read straight into fields, in document order, without an
/// intermediate map: `message.json::<Fields>()`.
impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;

        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    fields.push(Field { key, value });
                }
                Ok(Fields(fields))
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_map_to_their_variants() {
        assert_eq!(Value::from(true), Value::Boolean(true));
        assert_eq!(Value::from(7u16), Value::Integer(7));
        assert_eq!(Value::from(-3i32), Value::Integer(-3));
        assert_eq!(Value::from(2.5), Value::Float(2.5));
        assert_eq!(Value::from("x"), Value::Text("x".into()));
        assert_eq!(Value::from(None::<f64>), Value::Null);
    }

    #[test]
    fn json_values_keep_integers_and_nest_documents() {
        let doc: serde_json::Value = serde_json::from_str(
            r#"{"n": 3, "big": 18446744073709551615, "f": 0.5, "o": {"a": [1]}}"#,
        )
        .unwrap();
        let fields = Fields::from_json_object(doc).unwrap();
        assert_eq!(fields.get("n"), Some(&Value::Integer(3)));
        assert_eq!(
            fields.get("big"),
            Some(&Value::Float(18446744073709551615.0))
        );
        assert_eq!(fields.get("f"), Some(&Value::Float(0.5)));
        assert_eq!(fields.get("o"), Some(&Value::Json(r#"{"a":[1]}"#.into())));
    }

    #[test]
    fn objects_deserialize_into_fields_in_document_order() {
        let mut fields: Fields = serde_json::from_str(
            r#"{"z": 1, "a": "x", "n": null, "o": {"k": [true]}, "u": 18446744073709551615}"#,
        )
        .unwrap();
        let keys: Vec<&str> = fields.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["z", "a", "n", "o", "u"]);
        assert_eq!(fields.get("n"), Some(&Value::Null));
        assert_eq!(
            fields.get("o"),
            Some(&Value::Json(r#"{"k":[true]}"#.into()))
        );
        assert_eq!(
            fields.get("u").and_then(Value::as_f64),
            Some(18446744073709551615.0)
        );
        assert_eq!(fields.take("z"), Some(Value::Integer(1)));
        assert_eq!(fields.len(), 4);
        let mut twice = Fields::new().with("k", 1).with("j", 2).with("k", 3);
        assert_eq!(twice.get("k"), Some(&Value::Integer(3)));
        assert_eq!(twice.take("k"), Some(Value::Integer(3)));
        assert_eq!(twice.len(), 1);
        assert!(serde_json::from_str::<Fields>("[1]").is_err());
    }

    #[test]
    fn non_objects_are_not_fields() {
        assert!(Fields::from_json_object(serde_json::json!([1, 2])).is_none());
    }
}
