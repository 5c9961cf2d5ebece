//! Reading a configuration file: TOML, `${VAR}` expansion in strings, and
//! errors that name the file, the key and what was expected.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration (or device registry) file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not valid TOML (or JSON).
    #[error("{file}: {reason}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// What the parser said, with line and column.
        reason: String,
    },
    /// A key has the wrong type, an unknown name or a bad value.
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The dotted path of the key, such as `sources.mqtt[0].url`.
        key: String,
        /// What was expected.
        reason: String,
    },
}

impl ConfigError {
    /// An error about `key` in `file`.
    pub fn invalid(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Reads `file` as TOML (or JSON when it ends in `.json`) into `T`,
/// expanding `${VAR}` in every string first.
pub fn load_file<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_text(&text, file, &|name| std::env::var(name).ok())
}

/// Parses `text` (TOML, or JSON when `file` ends in `.json`) into `T`;
/// `env` resolves `${VAR}` references.
pub fn parse_text<T: DeserializeOwned>(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<T, ConfigError> {
    let syntax = |reason: String| ConfigError::Syntax {
        file: file.to_path_buf(),
        reason,
    };
    let mut value: serde_json::Value = if file.extension().is_some_and(|e| e == "json") {
        // TOML refuses a key given twice; JSON parsers keep the last one,
        // which would let a second API key hide behind the first.
        serde_json::from_str::<NoDuplicateKeys>(text).map_err(|e| syntax(e.to_string()))?;
        serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?
    } else {
        let table: toml::Table = toml::from_str(text).map_err(|e| syntax(toml_error(text, &e)))?;
        serde_json::to_value(table).map_err(|e| syntax(e.to_string()))?
    };
    expand(&mut value, &mut Vec::new(), file, env)?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let mut key = error.path().to_string();
        // A path into the API keys would name a key: a secret.
        if let Some(rest) = key.strip_prefix("auth.api_keys.") {
            let length = rest.split('.').next().map_or(0, |k| k.chars().count());
            key = format!("auth.api_keys.<key of {length} characters>");
        }
        ConfigError::invalid(
            file,
            if key == "." {
                "(top level)".into()
            } else {
                key
            },
            error.into_inner().to_string(),
        )
    })
}

/// A JSON document in which no object has a key twice.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = NoDuplicateKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key) {
                        return Err(serde::de::Error::custom(
                            "an object has a key twice (the key is not shown: it may be a secret)",
                        ));
                    }
                    map.next_value::<NoDuplicateKeys>()?;
                }
                Ok(NoDuplicateKeys)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
                Ok(NoDuplicateKeys)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// A TOML error as `line L, column C: what`, without quoting the line: it
/// may hold a secret (a duplicate API key, say).
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// Replaces `${VAR}` (and `${VAR:-default}`) in every string; `$${` is a
/// literal `${`.
fn expand(
    value: &mut serde_json::Value,
    path: &mut Vec<String>,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        serde_json::Value::String(text) if text.contains("${") => {
            *text = expand_str(text, env)
                .map_err(|reason| ConfigError::invalid(file, path.join("."), reason))?;
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let last = path.pop();
                path.push(format!("{}[{i}]", last.as_deref().unwrap_or("")));
                expand(item, path, file, env)?;
                path.pop();
                path.extend(last);
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                path.push(key.clone());
                expand(item, path, file, env)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unterminated `${{` in {text:?}"))?;
        let reference = &rest[start + 2..start + end];
        let (name, default) = match reference.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (reference, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{reference}}}` is not an environment variable reference"
            ));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        #[allow(dead_code, reason = "read only to check its type")]
        port: u16,
        #[serde(default)]
        secret: String,
    }

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "hunter2".to_owned())
    }

    fn parse(text: &str) -> Result<Sample, ConfigError> {
        parse_text(text, Path::new("sluice.toml"), &env)
    }

    #[test]
    fn strings_expand_environment_references() {
        let sample = parse("name = \"a-${SECRET}-${MISSING:-dflt}-$${LIT}\"\n[[items]]\nport = 1\nsecret = \"${SECRET}\"").unwrap();
        assert_eq!(sample.name, "a-hunter2-dflt-${LIT}");
        assert_eq!(sample.items[0].secret, "hunter2");
    }

    #[test]
    fn an_unset_variable_names_the_key() {
        let err = parse("name = \"x\"\n[[items]]\nport = 1\nsecret = \"${NOPE}\"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sluice.toml: key `items[0].secret`: environment variable NOPE is not set"
        );
    }

    #[test]
    fn type_errors_name_the_key_and_expectation() {
        let err = parse("name = \"x\"\n[[items]]\nport = \"eighty\"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sluice.toml: key `items[0].port`: invalid type: string \"eighty\", expected u16"
        );
        let err = parse("name = \"x\"\ncolour = 1").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("sluice.toml: key `colour`: unknown field `colour`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse("name = \n").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
