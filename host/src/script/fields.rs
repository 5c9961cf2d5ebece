//! [`Fields`]: named values in the order a script gave them, without the
//! hashing cost of a map on the per-message path.

use std::ops::Index;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Above this many fields, duplicate keys are found with a hash set
/// instead of a scan.
const SCAN_LIMIT: usize = 16;

/// Named values, in order, each key once. Serialises as a JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<(String, Value)>);

static NULL: Value = Value::Null;

impl Fields {
    /// No fields.
    pub fn new() -> Self {
        Fields(Vec::new())
    }

    /// Fields from pairs in order; a repeated key keeps its last value at
    /// the place of its first.
    pub fn from_pairs(mut pairs: Vec<(String, Value)>) -> Self {
        if pairs.len() <= SCAN_LIMIT {
            let mut i = 1;
            while i < pairs.len() {
                match pairs[..i].iter().position(|(k, _)| *k == pairs[i].0) {
                    Some(first) => {
                        let (_, value) = pairs.remove(i);
                        pairs[first].1 = value;
                    }
                    None => i += 1,
                }
            }
            return Fields(pairs);
        }
        let mut first_at = std::collections::HashMap::with_capacity(pairs.len());
        let mut out: Vec<(String, Value)> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            match first_at.get(&key) {
                Some(&index) => out[index] = (key, value),
                None => {
                    first_at.insert(key.clone(), out.len());
                    out.push((key, value));
                }
            }
        }
        Fields(out)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key`, replacing its value in place when present.
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// The same fields with `key` set, for chaining.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.insert(key, value.into());
        self
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

impl IntoIterator for Fields {
    type Item = (String, Value);
    type IntoIter = std::vec::IntoIter<(String, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<(String, Value)> for Fields {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        Fields::from_pairs(iter.into_iter().collect())
    }
}

/// `fields["key"]` is the value, or `null` when absent (as with JSON maps).
impl Index<&str> for Fields {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&NULL)
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;

        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of fields")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(pair) = map.next_entry::<String, Value>()? {
                    pairs.push(pair);
                }
                Ok(Fields::from_pairs(pairs))
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(keys: &[&str]) -> Vec<(String, Value)> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), json!(i)))
            .collect()
    }

    #[test]
    fn repeated_keys_keep_the_last_value_at_the_first_place() {
        let fields = Fields::from_pairs(pairs(&["a", "b", "a", "c", "b"]));
        assert_eq!(
            serde_json::to_string(&fields).unwrap(),
            r#"{"a":2,"b":4,"c":3}"#
        );
        let many: Vec<String> = (0..40).map(|i| format!("k{}", i % 20)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let fields = Fields::from_pairs(pairs(&many));
        assert_eq!(fields.len(), 20);
        assert_eq!(fields["k0"], json!(20));
    }

    #[test]
    fn json_round_trips_in_order() {
        let fields: Fields = serde_json::from_str(r#"{"z": 1, "a": [true], "m": null}"#).unwrap();
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["z", "a", "m"]);
        assert_eq!(fields["a"], json!([true]));
        assert_eq!(fields["missing"], json!(null));
        assert_eq!(
            serde_json::to_string(&fields).unwrap(),
            r#"{"z":1,"a":[true],"m":null}"#
        );
    }

    #[test]
    fn insert_replaces_in_place() {
        let mut fields = Fields::new().with("a", 1).with("b", 2);
        fields.insert("a", json!(3));
        assert_eq!(serde_json::to_string(&fields).unwrap(), r#"{"a":3,"b":2}"#);
    }
}
