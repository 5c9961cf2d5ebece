//! [`Fields`]: named values in the order a script gave them, each key
//! once, with constant-time insert and lookup however many there are.
//!
//! The rule for a repeated key, on both sides of the script boundary: the
//! last value wins, at the place of the first.

use std::hash::BuildHasher;
use std::ops::Index;
use std::sync::Arc;

use hashbrown::HashTable;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Up to this many fields, keys are found by a scan (faster than hashing
/// for the few fields of a typical report); beyond it, through an index.
const SCAN_LIMIT: usize = 16;

/// A field's name. Shared: the keys a script produces again and again are
/// interned, and a snapshot that merges a report keeps the report's key.
pub type Key = Arc<str>;

/// Named values, in order, each key once. Serialises as a JSON object.
#[derive(Clone, Default)]
pub struct Fields {
    entries: Vec<(Key, Value)>,
    /// Positions in `entries` by key hash, once there are more than
    /// [`SCAN_LIMIT`] entries.
    index: Option<KeyIndex>,
}

#[derive(Clone, Default)]
struct KeyIndex {
    table: HashTable<u32>,
    hasher: std::hash::RandomState,
}

impl KeyIndex {
    fn build(entries: &[(Key, Value)]) -> Self {
        let mut index = KeyIndex {
            table: HashTable::with_capacity(entries.len()),
            hasher: std::hash::RandomState::new(),
        };
        for position in 0..entries.len() {
            index.insert(entries, position);
        }
        index
    }

    fn find(&self, entries: &[(Key, Value)], key: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&i| &*entries[i as usize].0 == key)
            .map(|&i| i as usize)
    }

    fn insert(&mut self, entries: &[(Key, Value)], position: usize) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(&*entries[position].0);
        let position = u32::try_from(position).expect("fewer than 4 billion fields");
        self.table.insert_unique(hash, position, |&i| {
            hasher.hash_one(&*entries[i as usize].0)
        });
    }
}

static NULL: Value = Value::Null;

impl Fields {
    /// No fields.
    pub fn new() -> Self {
        Fields::default()
    }

    /// No fields, with room for `capacity`.
    pub fn with_capacity(capacity: usize) -> Self {
        Fields {
            entries: Vec::with_capacity(capacity),
            index: None,
        }
    }

    /// Fields from pairs in order; a repeated key keeps its last value at
    /// the place of its first.
    pub fn from_pairs<K: AsRef<str> + Into<Key>>(pairs: Vec<(K, Value)>) -> Self {
        let mut fields = Fields::with_capacity(pairs.len());
        for (key, value) in pairs {
            fields.insert(key, value);
        }
        fields
    }

    fn position(&self, key: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.find(&self.entries, key),
            None => self.entries.iter().position(|(k, _)| &**k == key),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.position(key).map(|i| &self.entries[i].1)
    }

    /// Sets `key`, replacing its value in place when present (the key is
    /// then not converted, so no allocation is made for it).
    pub fn insert<K: AsRef<str> + Into<Key>>(&mut self, key: K, value: Value) {
        if let Some(position) = self.position(key.as_ref()) {
            self.entries[position].1 = value;
            return;
        }
        self.entries.push((key.into(), value));
        let last = self.entries.len() - 1;
        match &mut self.index {
            Some(index) => index.insert(&self.entries, last),
            None if self.entries.len() > SCAN_LIMIT => {
                self.index = Some(KeyIndex::build(&self.entries));
            }
            None => {}
        }
    }

    /// The same fields with `key` set, for chaining.
    pub fn with<K: AsRef<str> + Into<Key>>(mut self, key: K, value: impl Into<Value>) -> Self {
        self.insert(key, value.into());
        self
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }

    /// The fields in order, with their shared keys (cloning one is a
    /// reference count, not a copy).
    pub fn entries(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl IntoIterator for Fields {
    type Item = (Key, Value);
    type IntoIter = std::vec::IntoIter<(Key, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<K: AsRef<str> + Into<Key>> FromIterator<(K, Value)> for Fields {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut fields = Fields::with_capacity(iter.size_hint().0);
        for (key, value) in iter {
            fields.insert(key, value);
        }
        fields
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
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (key, value) in &self.entries {
            map.serialize_entry(&**key, value)?;
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
                let mut fields = Fields::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(KeyOf(key)) = map.next_key()? {
                    let value = map.next_value::<Value>()?;
                    fields.insert(key, value);
                }
                Ok(fields)
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A map key read straight into a [`Key`], without an intermediate `String`.
struct KeyOf(Key);

impl<'de> Deserialize<'de> for KeyOf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = KeyOf;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<KeyOf, E> {
                Ok(KeyOf(Key::from(key)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
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
        assert_eq!(fields.iter().next().map(|(k, _)| k), Some("k0"));
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

    #[test]
    fn many_keys_merge_in_linear_time() {
        // 100,000 distinct keys merged into a snapshot of as many: with a
        // scan per insert this is 10^10 comparisons; with the index, 10^5.
        let mut snapshot = Fields::new();
        for round in 0..2 {
            for i in 0..100_000 {
                snapshot.insert(format!("key-{i}"), json!(round));
            }
        }
        assert_eq!(snapshot.len(), 100_000);
        assert_eq!(snapshot["key-99999"], json!(1));
        assert!(snapshot.contains_key("key-0"));
        assert!(!snapshot.contains_key("key-100000"));
    }
}
