//! # weirmq-bus: the vocabulary and contracts of weirmq
//!
//! This crate owns everything the rest of weirmq agrees on and nothing that
//! runs: message and topic types, the [`Event`] trait and its [`Codec`]s,
//! validation [`Limits`], the [`Error`] types, and the [`Broker`] seam — its roles, one
//! trait each — between the subscriber side (typed events, handler actors, retry
//! policy) and a storage/transport backend (the embedded sled broker, later
//! NATS JetStream).
//!
//! It knows neither actix nor sled: it is plain Rust, cheap to test, and the
//! one place a backend author reads to learn what is expected of them.
#![warn(
    unreachable_pub,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

mod broker;
mod clock;
mod error;
mod event;
mod filter;
mod message;
pub mod metrics;
mod retry;
mod sql;
mod time;
mod topic;
mod trace_context;
mod trace_sampling;

pub use broker::{
    delayed_receipt, dlq_topic, inbox_key, pending_publishes, Admin, Admission, AdmissionPermit,
    Broker, BrokerSubscription, CancelOutcome, Capabilities, DeadLetter, DeadLetterCopy,
    DeadLetters, DeliveryBatch, GroupStats, GroupTopic, HalfMessage, History, MessageTrace,
    Ordering, Outbox, Publisher, QueuePosition, QueueStats, RawDelivery, Resend, ResendOutcome,
    ResendPlan, ResendReport, ResetTo, RetentionReport, SettleToken, Settlement, Settler,
    StartFrom, StateBatch, StateEntries, StateOp, SubscriptionSpec, Subscriptions, TopicStats,
    TraceEvent, TraceKind, TransactionChecker, TransactionCheckers, TransactionConfig,
    TransactionOutcome, Transactions, DLQ_ATTEMPTS, DLQ_DEAD_LETTERED_AT_MS,
    DLQ_FIRST_FAILED_AT_MS, DLQ_ORIGIN_MSG_ID, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_QUEUE,
    DLQ_ORIGIN_TOPIC, DLQ_PROPERTIES, DLQ_REASON, DLQ_TOPIC_PREFIX, INBOX_PREFIX,
};
pub use clock::{Clock, Sleep};
pub use error::{
    utc_time, CodecError, Error, NameKind, PublishError, StorageError, TryPublishError,
};
pub use event::{Codec, Event, Json};
pub use filter::Filter;
pub use message::{
    Durability, Message, MessageId, MessageParts, OutgoingMessage, Publish, SendReceipt,
    HALF_TOPIC, SCHEDULE_TOPIC,
};
pub use retry::{Backoff, RetryPolicy};
pub use sql::{SqlExpr, MAX_FILTER_BYTES, MAX_NESTING};
pub use time::{from_unix_ms, now_ms, unix_ms, unix_ms_ceil};
pub use topic::{
    priority_queue, queue_for_message_group, queue_priority, queues_with_lanes,
    validate_group_name, validate_topic_name, Limits, Retention, TopicConfig,
    DEFAULT_DEDUPE_WINDOW, DEFAULT_QUEUES, MAX_DEDUPE_KEY_BYTES, MAX_DEDUPE_WINDOW,
    MAX_GROUP_NAME_LEN, MAX_PRIORITY, MAX_QUEUES, MAX_TOPIC_NAME_LEN, PRIORITY_LANES,
    SYSTEM_TOPIC_PREFIX,
};
pub use trace_context::{
    explicit_parent, link_process, span_context, stamp_publish, SpanId, TraceContext,
    TraceContextError, TraceId, MAX_TRACESTATE_LEN, OTEL, TRACEPARENT, TRACESTATE,
};
pub use trace_sampling::TraceSampling;
