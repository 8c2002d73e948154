//! Typed events: a serde type bound to a topic, and the codec that turns it
//! into a message body.
//!
//! Bodies are encoded once, at publish, and decoded once, in the subscriber;
//! the broker only moves bytes. JSON is the default so other languages and the
//! CLI can read bodies; an event can choose another [`Codec`] by overriding
//! [`Event::encode`] and [`Event::decode`].

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::CodecError;

/// Turns values into bytes and back.
pub trait Codec {
    /// A short name for error messages (`"json"`).
    const NAME: &'static str;
    /// Encodes a value.
    ///
    /// # Errors
    ///
    /// [`CodecError`] if the value cannot be represented.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a value.
    ///
    /// # Errors
    ///
    /// [`CodecError`] if the bytes are not a valid `T`.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError>;
}

/// The JSON codec, the default for events: serde_json's format (encoded
/// with sonic-rs to the same bytes, decoded with serde_json).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const NAME: &'static str = "json";

    /// Encodes with [sonic-rs](https://docs.rs/sonic-rs), which writes the
    /// same bytes as serde_json (the same serde data model, escaping and
    /// number formats) with SIMD string escaping, several times faster on
    /// string fields; serde_json's own escaping loop was the largest single
    /// item of a publisher's CPU time (BENCHMARKS.md, "JSON encoding").
    ///
    /// serde_json's own types that talk to its serializer through private
    /// tokens (`RawValue`, `Number` with `arbitrary_precision`) and values
    /// sonic-rs refuses are encoded by serde_json, so the bytes — and an
    /// error's message — are serde_json's in every case.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        match encode_sonic(value) {
            Some(bytes) => Ok(bytes),
            None => serde_json::to_vec(value).map_err(|e| CodecError {
                codec: Self::NAME,
                detail: e.to_string(),
            }),
        }
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError {
            codec: Self::NAME,
            detail: e.to_string(),
        })
    }
}

thread_local! {
    /// The buffer this thread encodes into, kept between bodies: sonic-rs
    /// reserves room for the worst case of every string it writes (six
    /// bytes per byte, for escapes), so a fresh body buffer grew to several
    /// times its body's size and was shrunk again — two reallocations and
    /// copies per body. A body is copied out of this buffer at its size.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most room [`SCRATCH`] keeps after a body (a larger body's room is
/// given back once it is copied out).
const SCRATCH_KEEP: usize = 256 * 1024;

/// `value` encoded by sonic-rs, or `None` when serde_json must encode it
/// (it holds one of serde_json's private tokens, or sonic-rs refused it).
fn encode_sonic<T: Serialize + ?Sized>(value: &T) -> Option<Vec<u8>> {
    let encode = |buf: &mut Vec<u8>| match sonic_rs::to_writer(&mut *buf, value) {
        Ok(()) if !has_serde_json_token(buf) => Some(buf.to_vec()),
        _ => None,
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let out = encode(&mut buf);
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            out
        }
        // A `Serialize` impl that encodes another value with this codec
        // while it is being encoded: that one gets a buffer of its own.
        Err(_) => encode(&mut Vec::new()),
    })
}

/// Whether encoded JSON holds one of serde_json's private struct tokens
/// (`$serde_json::private::RawValue`, `...::Number`): a type that expects
/// serde_json's serializer to recognise it, which only serde_json does.
/// A plain string with that text is caught too; it is then encoded by
/// serde_json, to the same bytes.
fn has_serde_json_token(json: &[u8]) -> bool {
    const TOKEN: &[u8] = b"$serde_json::private::";
    memchr::memchr_iter(b'$', json).any(|at| json[at..].starts_with(TOKEN))
}

/// A typed event: a serde type bound to a topic.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use weirmq_bus::Event;
///
/// #[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
/// struct UserRegistered { user_id: u64, email: String }
/// impl Event for UserRegistered { const TOPIC: &'static str = "user-registered"; }
///
/// let e = UserRegistered { user_id: 7, email: "a@b.c".into() };
/// let bytes = e.encode().unwrap();
/// assert_eq!(UserRegistered::decode(&bytes).unwrap(), e);
/// ```
///
/// To use another codec, override both methods:
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use weirmq_bus::{Codec, CodecError, Event, Json};
/// # #[derive(Serialize, Deserialize)] struct Ping;
/// impl Event for Ping {
///     const TOPIC: &'static str = "ping";
///     fn encode(&self) -> Result<Vec<u8>, CodecError> { Json::encode(self) /* or yours */ }
///     fn decode(bytes: &[u8]) -> Result<Self, CodecError> { Json::decode(bytes) }
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + 'static {
    /// The topic this event is published to.
    const TOPIC: &'static str;

    /// Encodes the event into a message body (JSON by default).
    ///
    /// # Errors
    ///
    /// [`CodecError`] if the event cannot be encoded.
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Json::encode(self)
    }

    /// Decodes a message body into the event (JSON by default).
    ///
    /// # Errors
    ///
    /// [`CodecError`] if the body is not a valid event; the subscriber never
    /// acks such a message silently.
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Json::decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    /// A JSON tree of every kind of value, strings with any character
    /// (controls, quotes, backslashes, non-BMP), numbers of every kind.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| n.into()),
            any::<u64>().prop_map(|n| n.into()),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            any::<String>().prop_map(serde_json::Value::String),
            "[\\x00-\\x1f\"\\\\/ a\u{7f}\u{2028}]{0,40}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Shape {
        Unit,
        New(u8),
        Tuple(u8, String),
        Struct { a: i32 },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Typed {
        name: String,
        big: u128,
        small: i128,
        ratio: f32,
        c: char,
        missing: Option<u8>,
        shapes: Vec<Shape>,
        by_number: BTreeMap<i64, bool>,
        pair: (u16, f64),
    }

    proptest! {
        #[test]
        fn json_encodes_to_serde_json_s_bytes(v in json_value()) {
            prop_assert_eq!(Json::encode(&v).unwrap(), serde_json::to_vec(&v).unwrap());
        }

        #[test]
        fn typed_values_encode_to_serde_json_s_bytes_and_round_trip(
            name in any::<String>(),
            big in any::<u128>(),
            small in any::<i128>(),
            ratio in any::<f32>(),
            c in any::<char>(),
            missing in proptest::option::of(any::<u8>()),
            keys in proptest::collection::btree_map(any::<i64>(), any::<bool>(), 0..6),
            pair in (any::<u16>(), any::<f64>()),
        ) {
            let t = Typed {
                name,
                big,
                small,
                ratio,
                c,
                missing,
                shapes: vec![Shape::Unit, Shape::New(1), Shape::Tuple(2, "x".into()), Shape::Struct { a: -3 }],
                by_number: keys,
                pair,
            };
            let bytes = Json::encode(&t).unwrap();
            prop_assert_eq!(&bytes, &serde_json::to_vec(&t).unwrap());
            if t.ratio.is_finite() && t.pair.1.is_finite() {
                // serde_json parses an f64 to within one unit in the last
                // place (without its `float_roundtrip` feature): the rest
                // must come back exactly.
                let mut back = Json::decode::<Typed>(&bytes).unwrap();
                prop_assert!((back.pair.1 - t.pair.1).abs() <= t.pair.1.abs() * 1e-15);
                back.pair.1 = t.pair.1;
                prop_assert_eq!(back, t);
            }
        }
    }

    #[test]
    fn a_body_is_allocated_at_its_size() {
        let big = "x".repeat(100_000);
        let bytes = Json::encode(&big).unwrap();
        assert_eq!(bytes.len(), 100_002);
        let small = Json::encode(&"y").unwrap();
        assert_eq!(small, br#""y""#);
        // Not the worst-case room sonic-rs reserves for a string's escapes,
        // nor what the large body before it needed.
        for body in [&bytes, &small, &Json::encode(&"z".repeat(300)).unwrap()] {
            assert!(
                body.capacity() <= body.len() + 64,
                "{} bytes in {}",
                body.len(),
                body.capacity()
            );
        }
        // The scratch buffer gives back the room of a body over its limit.
        SCRATCH.with(|s| assert!(s.borrow().capacity() <= SCRATCH_KEEP));
    }

    #[test]
    fn a_value_that_encodes_another_while_being_encoded_gets_both_right() {
        struct Nested(u32);
        impl Serialize for Nested {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                // Encodes an inner value with the codec mid-encoding.
                let inner = Json::encode(&vec![self.0; 3]).map_err(serde::ser::Error::custom)?;
                s.serialize_str(std::str::from_utf8(&inner).map_err(serde::ser::Error::custom)?)
            }
        }
        let bytes = Json::encode(&(Nested(7), "after")).unwrap();
        assert_eq!(bytes, br#"["[7,7,7]","after"]"#);
    }

    #[test]
    fn serde_json_raw_values_are_encoded_as_serde_json_does() {
        #[derive(Serialize)]
        struct WithRaw {
            id: u32,
            payload: Box<serde_json::value::RawValue>,
        }
        let raw = serde_json::value::RawValue::from_string(r#"{"a": [1, 2]}"#.into()).unwrap();
        let v = WithRaw {
            id: 7,
            payload: raw,
        };
        let bytes = Json::encode(&v).unwrap();
        assert_eq!(bytes, br#"{"id":7,"payload":{"a": [1, 2]}}"#);
        // A string that happens to hold the token is plain text either way.
        let s = "see $serde_json::private::RawValue";
        assert_eq!(Json::encode(&s).unwrap(), serde_json::to_vec(&s).unwrap());
    }

    #[test]
    fn values_json_cannot_hold_fail_with_serde_json_s_message() {
        struct NanKey;
        impl Serialize for NanKey {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(&f64::NAN, &1u8)?;
                m.end()
            }
        }
        let e = Json::encode(&NanKey).unwrap_err();
        assert_eq!(e.codec, "json");
        assert_eq!(
            e.detail,
            serde_json::to_vec(&NanKey).unwrap_err().to_string()
        );
        let mut by_list = BTreeMap::new();
        by_list.insert(vec![1u8], 1u8);
        let e = Json::encode(&by_list).unwrap_err();
        assert_eq!(e.detail, "key must be a string");
    }
}
