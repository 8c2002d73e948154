//! Everything an application needs to publish and subscribe, in one `use`:
//! `use weirmq::prelude::*;`.
//!
//! Brings in the bus types, the actix types a handler actor needs (`Actor`,
//! `Context`, `Handler`, `ResponseFuture`), and serde's derives.

pub use crate::{
    Bus, Delivery, Durability, Event, Filter, HandlerError, OutgoingMessage, Publish, Retention,
    RetryPolicy, SendReceipt, StartFrom, Subscription, TopicConfig,
};
pub use actix::{Actor, AsyncContext, Context, Handler, ResponseFuture};
pub use serde::{Deserialize, Serialize};
