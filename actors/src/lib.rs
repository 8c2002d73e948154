//! # weirmq-actors: every actor of weirmq
//!
//! Two halves:
//!
//! * **The embedded broker** ([`EmbeddedBroker`]): topic, queue and
//!   consumer-group actors on one broker arbiter, over the sled
//!   [`PersistenceActor`](weirmq_persistence::PersistenceActor) on its own
//!   arbiter. It implements the [`Broker`](weirmq_bus::Broker) seam.
//! * **The subscriber side** ([`start_subscriber`], [`Delivery`],
//!   [`HandlerError`]): a supervisor beside the application's handler actors
//!   that decodes deliveries, hands each to a member with `send()` (so a panic
//!   is seen), restarts members that died, and returns settlements in
//!   batches. It works over any `Broker`.
//!
//! The retry *policy* lives on the subscriber side; the broker only
//! redelivers after the delay it is told.
#![warn(
    unreachable_pub,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

mod embedded;
mod members;
mod subscriber;

pub use embedded::{EmbeddedBroker, EmbeddedConfig};
pub use members::Members;
pub use subscriber::{
    start_subscriber, Delivery, HandlerError, Observer, SettlementObserver, SubscriberConfig,
    SubscriberHandle,
};
