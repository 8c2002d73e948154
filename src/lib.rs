//! # weirmq
//!
//! An embeddable, actor-model event bus for Rust services: Apache RocketMQ's
//! messaging model (topics split into queues, consumer groups, at-least-once
//! delivery, offsets, dead letters) inside your process, on actix, durable on
//! an embedded sled store.
//!
//! ```no_run
//! use weirmq::prelude::*;
//!
//! #[derive(Serialize, Deserialize, Debug, Clone)]
//! struct UserRegistered { user_id: u64, email: String }
//! impl Event for UserRegistered { const TOPIC: &'static str = "user-registered"; }
//!
//! struct Coupons;
//! impl Actor for Coupons { type Context = Context<Self>; }
//! impl Handler<Delivery<UserRegistered>> for Coupons {
//!     type Result = ResponseFuture<Result<(), HandlerError>>; // Ok = ack, Err = retry
//!     fn handle(&mut self, d: Delivery<UserRegistered>, _: &mut Context<Self>) -> Self::Result {
//!         let user = d.event().user_id;
//!         Box::pin(async move { println!("coupon for user {user}"); Ok(()) })
//!     }
//! }
//!
//! #[actix::main]
//! async fn main() -> Result<(), weirmq::Error> {
//!     let bus = Bus::builder().data_dir("./weirmq-data").open().await?;
//!     let sub = bus.subscribe::<UserRegistered>("coupon-service")
//!         .members(2, || Coupons)
//!         .start().await?;
//!     let receipt = bus.publish(&UserRegistered { user_id: 42, email: "a@b.c".into() }).await?;
//!     println!("stored at queue {} offset {}", receipt.queue, receipt.offset);
//!     sub.drain().await?;
//!     bus.shutdown().await
//! }
//! ```
//!
//! # Delivery
//!
//! * **At least once** per consumer group: a message is delivered to one
//!   member of every group subscribed to its topic until a member acks it.
//!   Duplicates happen only for messages in flight (or acked in the last
//!   ~0.6 s) when the process crashed; use [`Delivery::message_id`] to make
//!   handlers idempotent.
//! * **Durability**: a publish with [`Durability::Flushed`] (the default)
//!   returns its receipt only after the message is fsync'd; with
//!   [`Durability::Buffered`] once it is in the store's cache.
//! * A handler error retries the message later; a panic retries it and
//!   restarts the member; a body that does not decode goes to the group's
//!   dead-letter topic `%DLQ%<group>`.
//!
//! See `docs/delivery.md` and `ARCHITECTURE.md` in the repository.
#![warn(
    unreachable_pub,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

mod bus;
pub mod prelude;
mod subscribe;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "web")]
pub mod web;

pub use bus::{Bus, BusBuilder, Transaction};
pub use subscribe::{SubscribeBuilder, Subscription};
pub use weirmq_actors::{Delivery, HandlerError};
pub use weirmq_bus::metrics;
pub use weirmq_bus::{
    inbox_key, DEFAULT_DEDUPE_WINDOW, INBOX_PREFIX, MAX_DEDUPE_KEY_BYTES, MAX_DEDUPE_WINDOW,
};
pub use weirmq_bus::{priority_queue, queue_priority, MAX_PRIORITY, PRIORITY_LANES};
pub use weirmq_bus::{
    Backoff, Broker, Capabilities, Codec, CodecError, Durability, Error, Event, Filter, GroupStats,
    Json, Limits, Message, MessageId, NameKind, OutgoingMessage, Publish, PublishError,
    QueuePosition, RetryPolicy, SendReceipt, StartFrom, StorageError, TopicConfig, TryPublishError,
    MAX_FILTER_BYTES, MAX_NESTING,
};
pub use weirmq_bus::{
    CancelOutcome, HalfMessage, MessageTrace, Ordering, Retention, RetentionReport, StateBatch,
    StateEntries, StateOp, TraceEvent, TraceKind, TransactionChecker, TransactionConfig,
    TransactionOutcome, HALF_TOPIC, SCHEDULE_TOPIC,
};
pub use weirmq_bus::{Clock, Sleep};
pub use weirmq_bus::{DeadLetter, Resend, ResendOutcome, ResendReport, ResetTo, DLQ_PROPERTIES};
pub use weirmq_bus::{GroupTopic, QueueStats, TopicStats};
pub use weirmq_bus::{
    SpanId, TraceContext, TraceContextError, TraceId, TraceSampling, TRACEPARENT, TRACESTATE,
};
pub use weirmq_persistence::{SyncEvent, SyncHook};

/// The NATS JetStream backend (feature `nats`): its configuration and what
/// the connected server offers. Open it with [`BusBuilder::nats`].
#[cfg(feature = "nats")]
pub mod nats {
    pub use weirmq_nats::{NatsAuth, NatsBroker, NatsConfig, NatsTls, ServerFeatures};
}

/// The attribute for implementing [`TransactionChecker`] (an async trait):
/// `#[weirmq::async_trait] impl TransactionChecker for MyChecker { ... }`.
pub use async_trait::async_trait;

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The Rust examples of `docs/actix.md`, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/actix.md")]
pub struct ActixDocDoctests;

/// The Rust examples of `docs/message-types.md`, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/message-types.md")]
pub struct MessageTypesDocDoctests;

/// The Rust examples of `docs/exactly-once.md`, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/exactly-once.md")]
pub struct ExactlyOnceDocDoctests;

/// The Rust examples of `docs/retention-query-trace.md`, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/retention-query-trace.md")]
pub struct RetentionDocDoctests;

/// The Rust examples of `docs/testing.md`, compiled as doc tests.
#[cfg(all(doctest, feature = "testing"))]
#[doc = include_str!("../docs/testing.md")]
pub struct TestingDocDoctests;

/// The Rust examples of `docs/observability.md`, compiled as doc tests.
#[cfg(all(doctest, feature = "web"))]
#[doc = include_str!("../docs/observability.md")]
pub struct ObservabilityDocDoctests;

/// The Rust examples of `docs/operations.md`, compiled as doc tests.
#[cfg(all(doctest, feature = "web"))]
#[doc = include_str!("../docs/operations.md")]
pub struct OperationsDocDoctests;

/// The Rust examples of `docs/scaling.md`, compiled as doc tests.
#[cfg(all(doctest, feature = "nats"))]
#[doc = include_str!("../docs/scaling.md")]
pub struct ScalingDocDoctests;
