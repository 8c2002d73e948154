//! The subscriptions role on JetStream (contract:
//! `weirmq_bus::Subscriptions`): one durable pull consumer per queue per
//! group; the machinery (fetch loops, settlement, keep-alive, FIFO) is in
//! `subscription/`.

use crate::prelude::*;

#[async_trait]
impl Subscriptions for NatsBroker {
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<BrokerSubscription, Error> {
        validate_group_name(&spec.group)?;
        validate_topic_name(&spec.topic)?;
        if spec.max_in_flight == 0 {
            return Err(Error::InvalidConfig {
                reason: "max_in_flight must be at least 1".into(),
            });
        }
        self.run(|i| async move {
            let key = (spec.group.clone(), spec.topic.clone());
            if i.subs.contains_key(&key) {
                return Err(Error::AlreadySubscribed {
                    group: spec.group,
                    topic: spec.topic,
                });
            }
            let t = i.topic(TopicConfig::new(spec.topic.clone()), false).await?;
            let (state, sub) = subscription::start(i.clone(), spec, t).await?;
            match i.subs.entry(key) {
                dashmap::mapref::entry::Entry::Occupied(o) => {
                    state.stop().await;
                    Err(Error::AlreadySubscribed {
                        group: o.key().0.clone(),
                        topic: o.key().1.clone(),
                    })
                }
                dashmap::mapref::entry::Entry::Vacant(v) => {
                    v.insert(state);
                    Ok(sub)
                }
            }
        })
        .await
    }

    async fn unsubscribe(&self, group: &str, topic: &str) -> Result<(), Error> {
        let key = (group.to_string(), topic.to_string());
        let inner = self.inner.clone();
        self.inner
            .handle
            .spawn(async move {
                if let Some((_, s)) = inner.subs.remove(&key) {
                    s.stop().await;
                }
            })
            .await
            .map_err(|_| Error::Closed)
    }
}
