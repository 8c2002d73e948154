//! The subscriptions role: a consumer group's deliveries and their
//! settlement.
//!
//! # Contract
//!
//! * [`Subscriptions::subscribe`] starts delivering [`DeliveryBatch`]es of
//!   the group's messages of one topic (a group without a committed
//!   position starts where [`StartFrom`] says). One subscription per
//!   (group, topic) per backend handle: a second is
//!   [`Error::AlreadySubscribed`].
//! * Each [`RawDelivery`] is settled exactly once through the
//!   subscription's [`Settler`]. A delivery never settled stays in flight,
//!   and is delivered again after a restart (at-least-once).
//! * The backend never decides the retry policy: it redelivers a `Nack`
//!   after the delay it is given, counts attempts (1 for the first
//!   delivery), and copies a `DeadLetter` to the group's dead-letter queue
//!   ([`DeadLetterCopy`](super::DeadLetterCopy)) before it acks it.
//! * At most `max_in_flight` deliveries are unsettled per subscription; the
//!   backlog stays in the store.
//! * Messages the subscription's [`Filter`] rejects are never delivered;
//!   the group's position moves past them.
//! * [`Ordering::Fifo`]: one message per message group in flight, in
//!   publish order; a failed one is retried in place.
//! * [`Subscriptions::unsubscribe`] persists the group's offsets; deliveries
//!   not settled by then come again to the group's next subscription.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::filter::Filter;
use crate::message::Message;

/// Starting and stopping a consumer group's deliveries.
#[async_trait]
pub trait Subscriptions: Send + Sync {
    /// Starts delivering to a consumer group.
    ///
    /// # Errors
    ///
    /// Invalid names, [`Error::AlreadySubscribed`], or a storage error.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<BrokerSubscription, Error>;

    /// Stops a subscription, persisting its offsets. Deliveries not settled
    /// by then are delivered again to the next subscription of the group.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn unsubscribe(&self, group: &str, topic: &str) -> Result<(), Error>;
}

/// Where a consumer group with no committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// At the end of each queue: only messages published after the
    /// subscription (RocketMQ's default for a new group).
    #[default]
    Latest,
    /// At the first stored message of each queue.
    Earliest,
}

/// What a subscriber asks of the backend.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Where a group with no committed offset starts.
    pub start: StartFrom,
    /// The most unsettled deliveries at once for this subscription.
    pub max_in_flight: usize,
    /// Which messages the group wants; the others are skipped (its
    /// position moves past them).
    pub filter: Filter,
    /// Concurrent (default) or FIFO per message group.
    pub ordering: Ordering,
}

/// How a subscription orders its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Any order, as many at once as the in-flight limits allow (RocketMQ's
    /// concurrent consumer). A failed message is retried later while the
    /// next ones go on.
    #[default]
    Concurrent,
    /// Per message group ([`Publish::message_group`](crate::Publish::message_group)):
    /// one message of a group in flight at a time, in publish order; a
    /// failed message is retried in place and only its own group waits;
    /// different groups are handled in parallel. Messages without a group
    /// are ordered per queue.
    Fifo,
}

/// An opaque handle naming one delivery, returned with its [`Settlement`].
///
/// Backends put what they need in the two words; nothing above the seam
/// looks inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SettleToken([u64; 2]);

impl SettleToken {
    /// A token from a backend's two words.
    pub fn new(a: u64, b: u64) -> Self {
        SettleToken([a, b])
    }
    /// The backend's two words.
    pub fn parts(self) -> (u64, u64) {
        (self.0[0], self.0[1])
    }
}

/// One delivery of a stored message to a subscription.
#[derive(Debug, Clone)]
pub struct RawDelivery {
    /// The stored message (shared, never copied).
    pub message: Arc<Message>,
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub attempt: u32,
    /// Settle with this.
    pub token: SettleToken,
}

/// Deliveries travel in batches: one cross-thread message per batch.
pub type DeliveryBatch = Vec<RawDelivery>;

/// The outcome of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: never deliver again to this group.
    Ack,
    /// Failed: deliver again after `delay`, as the next attempt.
    Nack {
        /// How long the message stays invisible.
        delay: Duration,
        /// What went wrong (kept with the retry, and with the dead letter
        /// if it comes to that).
        error: String,
    },
    /// Give up now: move the message to the group's dead-letter queue.
    DeadLetter {
        /// Why (kept with the dead letter).
        reason: String,
    },
}

/// Takes settlements back to the backend, in batches. Cheap to call; never
/// blocks.
pub trait Settler: Send + Sync + fmt::Debug {
    /// Settles each delivery named by its token.
    fn settle(&self, batch: Vec<(SettleToken, Settlement)>);
}

/// A running subscription as the backend hands it over.
#[derive(Debug)]
pub struct BrokerSubscription {
    /// Delivery batches; closed when the subscription ends.
    pub deliveries: mpsc::UnboundedReceiver<DeliveryBatch>,
    /// Where settlements go.
    pub settler: Arc<dyn Settler>,
}
