//! Subscribing handler actors (contract: `weirmq_bus::Subscriptions`; the
//! builder is [`SubscribeBuilder`]).

use super::*;

impl Bus {
    /// Starts building a subscription of consumer group `group` to `E`'s
    /// topic; see [`SubscribeBuilder`] for the options and an example.
    pub fn subscribe<E: Event>(&self, group: impl Into<String>) -> SubscribeBuilder<E> {
        SubscribeBuilder::new(self.clone(), group.into())
    }
}
