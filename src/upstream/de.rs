//! Tolerant field decoders for the documented variations of upstream bodies: numbers sent as
//! strings and strings sent as numbers, `null` where a list or a flag is expected. Anything else
//! (an object where a string belongs) is still an error that names the field.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Decodes `$deserializer` with a tolerant visitor of `$value`s (`$expecting` describes them in
/// errors): `null` (or a unit) decodes as `$null`, and a present value by the `visit_*` methods
/// given.
macro_rules! decode_tolerantly {
    ($deserializer:ident, $value:ty, $expecting:literal, null => $null:expr, { $($visit:tt)* }) => {{
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = $value;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str($expecting)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok($null)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok($null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(V)
            }
            $($visit)*
        }
        $deserializer.deserialize_any(V)
    }};
}

/// A string, or a number/bool rendered as one; `null` → `None`.
pub fn opt_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    decode_tolerantly!(deserializer, Option<String>, "a string or a number", null => None, {
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    })
}

/// A required string (or number rendered as one).
pub fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    opt_string(deserializer)?.ok_or_else(|| de::Error::custom("expected a string, found null"))
}

/// A number, or a numeric string; `null` or `""` → `None`.
pub fn opt_f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    decode_tolerantly!(deserializer, Option<f64>, "a number or a numeric string", null => None, {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let v = v.trim();
            if v.is_empty() {
                return Ok(None);
            }
            v.parse()
                .map(Some)
                .map_err(|_| E::custom("expected a number, found a non-numeric string"))
        }
    })
}

/// A whole number from an integer, an integral float or a numeric string; `null` → `None`.
pub fn opt_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    match opt_f64(deserializer)? {
        None => Ok(None),
        Some(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Ok(Some(v as i64)),
        Some(_) => Err(de::Error::custom("expected a whole number")),
    }
}

/// A whole number, `null` → 0.
pub fn i64_or_zero<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    Ok(opt_i64(deserializer)?.unwrap_or(0))
}

/// A required number (or numeric string).
pub fn f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    opt_f64(deserializer)?.ok_or_else(|| de::Error::custom("expected a number, found null"))
}

/// `true`/`false`, `1`/`0`, or their string forms; `null` → `false`.
pub fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    decode_tolerantly!(deserializer, bool, "a boolean", null => false, {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
            Ok(v != 0)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
            Ok(v != 0)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" | "" => Ok(false),
                _ => Err(E::custom("expected a boolean, found another string")),
            }
        }
    })
}

/// A list, `null` → empty.
pub fn list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// A list of strings that may also arrive as one comma-separated string; `null` → empty.
pub fn string_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<Option<String>>),
        Text(String),
    }
    Ok(match Option::<Either>::deserialize(deserializer) {
        Ok(Some(Either::List(items))) => items.into_iter().flatten().collect(),
        Ok(Some(Either::Text(text))) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => {
            return Err(de::Error::custom(
                "expected a list of strings or a comma-separated string",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    struct Sample {
        #[serde(default, deserialize_with = "super::opt_string")]
        id: Option<String>,
        #[serde(default, deserialize_with = "super::opt_i64")]
        count: Option<i64>,
        #[serde(default, deserialize_with = "super::opt_f64")]
        score: Option<f64>,
        #[serde(default, deserialize_with = "super::flag")]
        active: bool,
        #[serde(default, deserialize_with = "super::string_list")]
        tags: Vec<String>,
    }

    fn sample(value: serde_json::Value) -> Result<Sample, serde_json::Error> {
        serde_json::from_value(value)
    }

    #[test]
    fn numbers_and_strings_interchange() {
        let s = sample(
            json!({"id": 12, "count": "7", "score": "8.5", "active": "true", "tags": "a, b"}),
        )
        .unwrap();
        assert_eq!(s.id.as_deref(), Some("12"));
        assert_eq!(s.count, Some(7));
        assert_eq!(s.score, Some(8.5));
        assert!(s.active);
        assert_eq!(s.tags, vec!["a", "b"]);
        let s = sample(json!({"id": null, "count": 3.0, "active": 1, "tags": null})).unwrap();
        assert_eq!(
            (s.id, s.count, s.active, s.tags.len()),
            (None, Some(3), true, 0)
        );
    }

    #[test]
    fn real_malformations_are_errors() {
        assert!(sample(json!({"id": {"nested": true}})).is_err());
        assert!(sample(json!({"count": "many"})).is_err());
        assert!(sample(json!({"count": 2.5})).is_err());
        assert!(sample(json!({"tags": [1, 2]})).is_err());
        assert!(sample(json!({"active": "perhaps"})).is_err());
    }
}
