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

/// The JSON codec (serde_json), the default for events.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const NAME: &'static str = "json";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError {
            codec: Self::NAME,
            detail: e.to_string(),
        })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError {
            codec: Self::NAME,
            detail: e.to_string(),
        })
    }
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
