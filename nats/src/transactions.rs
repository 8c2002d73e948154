//! The transactions role on JetStream (contract:
//! `weirmq_bus::Transactions`): a half message waits in the half stream;
//! `end_transaction` moves it to its topic (same id) or deletes it, and the
//! checker (`system.rs`) asks about those left open.

use crate::prelude::*;
use crate::system::resolve;

#[async_trait]
impl Transactions for NatsBroker {
    async fn publish_half(
        &self,
        message: OutgoingMessage,
        _durability: Durability,
    ) -> Result<HalfMessage, Error> {
        self.inner.admission.limits().check(&message)?;
        crate::publisher::refuse_priority(std::slice::from_ref(&message))?;
        if message.deliver_at.is_some() {
            return Err(Error::Unsupported {
                feature: "a delayed transactional message".into(),
            });
        }
        self.run(|i| publish_half(i, message)).await
    }

    async fn end_transaction(
        &self,
        half: &HalfMessage,
        outcome: TransactionOutcome,
    ) -> Result<Option<SendReceipt>, Error> {
        let half = half.clone();
        self.run(move |i| end_transaction(i, half, outcome)).await
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

async fn publish_half(
    inner: Arc<Inner>,
    mut message: OutgoingMessage,
) -> Result<HalfMessage, Error> {
    let t = inner
        .topic(TopicConfig::new(message.topic.clone()), false)
        .await?;
    let topic = t.config.name().to_string();
    let cfg = inner.checkers.config(&topic);
    message.deliver_at = Some(SystemTime::now() + cfg.check_immunity);
    let m = Message::prepare(message, Arc::from(HALF_TOPIC))
        .as_half()
        .with_destination(topic.clone());
    let (body, headers) = crate::wire::encode(&m);
    let seq = inner
        .publish_with_headers(vec![(
            half_subject(&topic),
            body,
            m.id().to_string(),
            Some(headers),
        )])
        .await?[0];
    Ok(HalfMessage {
        message_id: m.id(),
        topic,
        offset: seq,
        check_at_ms: m.deliver_at().map_or_else(now_ms, unix_ms),
    })
}

async fn end_transaction(
    inner: Arc<Inner>,
    half: HalfMessage,
    outcome: TransactionOutcome,
) -> Result<Option<SendReceipt>, Error> {
    if outcome == TransactionOutcome::Unknown {
        return Ok(None);
    }
    let stream = inner.stream(HALF_STREAM).await?;
    let raw = match stream.get_raw_message(half.offset).await {
        Ok(r) => r,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(nats_err("reading a half message", e)),
    };
    let m = match crate::wire::decode_stored(Arc::from(HALF_TOPIC), 0, &raw) {
        Ok(m) if m.id() == half.message_id => m,
        _ => return Ok(None),
    };
    match outcome {
        TransactionOutcome::Commit => {
            let out = m.for_destination(Arc::from(half.topic.as_str()));
            let receipt = inner.store_in_topic(vec![out], ALL_GROUPS).await?.pop();
            resolve(&inner, half.offset).await?;
            Ok(receipt)
        }
        _ => {
            resolve(&inner, half.offset).await?;
            Ok(None)
        }
    }
}
