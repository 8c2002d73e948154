//! The local outbox on the embedded store (contract: `weirmq_bus::Outbox`):
//! state writes ride in the same sled transaction as their message's
//! record, in commit order.

use super::*;

#[async_trait]
impl Outbox for EmbeddedBroker {
    async fn publish_with_state(
        &self,
        mut message: OutgoingMessage,
        durability: Durability,
        state: weirmq_bus::StateBatch,
    ) -> Result<SendReceipt, Error> {
        self.check_open()?;
        self.inner.admission.check_one(&mut message)?;
        self.disk_room(std::slice::from_ref(&message))?;
        if message.deliver_at.is_some() {
            return Err(Error::Unsupported {
                feature: "a delayed message with application state".into(),
            });
        }
        let h = self.existing_or_default(&message.topic, false).await?;
        let _room = self.inner.admission.admit(1, true).await?;
        let m = BusMessage::prepare_at(message, h.name.clone(), self.inner.clock.now());
        let mut r = self
            .publish_stamped_with(&h, vec![(0, m)], durability, state.into_ops())
            .await?;
        r.pop().map(|(_, r)| r).ok_or(Error::Closed)
    }

    async fn write_state(
        &self,
        state: weirmq_bus::StateBatch,
        durability: Durability,
    ) -> Result<(), Error> {
        self.check_open()?;
        let (tx, rx) = oneshot::channel();
        // An append without messages: the state ops alone, in one
        // transaction, in commit order with everything else.
        self.inner.persistence.do_send(weirmq_persistence::Append {
            key: QueueKey {
                topic_id: u32::MAX,
                queue: 0,
            },
            messages: Vec::new(),
            durability,
            trace: false,
            state: state.into_ops(),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.await.map_err(|_| Error::Closed)?.map_err(Error::from)
    }

    async fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let reader = self.reader()?;
        let key = key.to_vec();
        self.blocking(move || reader.state_get(&key)).await
    }

    async fn state_get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let reader = self.reader()?;
        let keys = keys.to_vec();
        self.blocking(move || keys.iter().map(|k| reader.state_get(k)).collect())
            .await
    }

    async fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, Error> {
        let reader = self.reader()?;
        let prefix = prefix.to_vec();
        self.blocking(move || reader.state_scan(&prefix)).await
    }
}
