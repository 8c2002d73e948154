//! The transactions role on the embedded store (contract:
//! `weirmq_bus::Transactions`): a half message waits in the half topic,
//! staged in the delay index until its first check; the `Scheduler` ends
//! it or asks the topic's checker.

use super::*;

#[async_trait]
impl Transactions for EmbeddedBroker {
    async fn publish_half(
        &self,
        mut message: OutgoingMessage,
        durability: Durability,
    ) -> Result<HalfMessage, Error> {
        self.check_open()?;
        self.inner.admission.check_one(&mut message)?;
        self.disk_room(std::slice::from_ref(&message))?;
        if message.deliver_at.is_some() {
            return Err(Error::Unsupported {
                feature: "a delayed transactional message (delay it after the commit instead)"
                    .into(),
            });
        }
        let dest = self.existing_or_default(&message.topic, false).await?;
        let config = self.inner.checkers.config(&message.topic);
        // Its "delivery" time is its first check.
        let now = self.inner.clock.now();
        message.deliver_at = Some(now + config.check_immunity);
        let half = self.existing_or_default(HALF_TOPIC, true).await?;
        let _room = self.inner.admission.admit(1, true).await?;
        let m = BusMessage::prepare_at(message, half.name.clone(), now)
            .with_destination(dest.name.to_string())
            .as_half();
        let check_at_ms = m.deliver_at().map_or(0, unix_ms);
        let mut r = self
            .publish_stamped(&half, vec![(0, m)], durability)
            .await?;
        let (_, receipt) = r.pop().ok_or(Error::Closed)?;
        Ok(HalfMessage {
            message_id: receipt.message_id,
            topic: dest.name.to_string(),
            offset: receipt.offset,
            check_at_ms,
        })
    }

    async fn end_transaction(
        &self,
        half: &HalfMessage,
        outcome: TransactionOutcome,
    ) -> Result<Option<SendReceipt>, Error> {
        self.check_open()?;
        let half_topic = self.known_topic(HALF_TOPIC)?;
        self.scheduler()?
            .send(EndTransaction {
                half: half.clone(),
                half_topic_id: half_topic.id,
                outcome,
            })
            .await
            .map_err(|_| Error::Closed)?
    }

    fn register_checker(
        &self,
        topic: &str,
        checker: Arc<dyn TransactionChecker>,
        config: TransactionConfig,
    ) -> Result<(), Error> {
        self.inner.checkers.register(topic, checker, config)
    }
}
