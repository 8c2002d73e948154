//! The publisher role on JetStream (contract: `weirmq_bus::Publisher`):
//! admission, then each message to its queue's subject (the id as
//! `Nats-Msg-Id`), a delayed one as a schedule definition in its topic's
//! stream (2.12+) or to the schedule stream (the forwarder); publishes are
//! pipelined and their acks awaited together.

use crate::prelude::*;
use crate::wire;

impl Inner {
    /// Publishes stamped messages to `subject`s, pipelined; returns each
    /// one's stream sequence.
    pub(crate) async fn publish_raw(
        &self,
        items: Vec<(String, Bytes, String)>,
    ) -> Result<Vec<u64>, Error> {
        self.publish_with_headers(
            items
                .into_iter()
                .map(|(s, p, id)| (s, p, id, None))
                .collect(),
        )
        .await
    }

    /// As `publish_raw`, each message with extra headers.
    pub(crate) async fn publish_with_headers(
        &self,
        items: Vec<(String, Bytes, String, Option<async_nats::HeaderMap>)>,
    ) -> Result<Vec<u64>, Error> {
        Ok(self
            .publish_acked(items)
            .await?
            .into_iter()
            .map(|(seq, _)| seq)
            .collect())
    }

    /// As `publish_with_headers`; each ack also says whether the stream
    /// dropped the message as a duplicate of the stored one at that
    /// sequence (same `Nats-Msg-Id` within its window).
    pub(crate) async fn publish_acked(
        &self,
        items: Vec<(String, Bytes, String, Option<async_nats::HeaderMap>)>,
    ) -> Result<Vec<(u64, bool)>, Error> {
        let mut acks = Vec::with_capacity(items.len());
        for (subject, payload, msg_id, headers) in items {
            let mut publish = jetstream::message::PublishMessage::build();
            if let Some(h) = headers {
                publish = publish.headers(h);
            }
            let publish = publish.payload(payload).message_id(msg_id);
            acks.push(
                self.js
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| publish_err("NATS publish", e))?,
            );
        }
        let mut seqs = Vec::with_capacity(acks.len());
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            let ack = ack.map_err(|e| publish_err("NATS publish not acknowledged", e))?;
            seqs.push((ack.sequence, ack.duplicate));
        }
        Ok(seqs)
    }

    /// The receipt of the message stored at `seq` of `topic`'s stream
    /// (what a deduplicated publish answers).
    async fn stored_receipt(&self, topic: &str, seq: u64) -> Result<SendReceipt, Error> {
        let stream = self.stream(&topic_stream(topic)).await?;
        let raw = stream.get_raw_message(seq).await.map_err(|e| {
            nats_err(
                format!("reading the first publish of a duplicate (sequence {seq})"),
                e,
            )
        })?;
        let queue = parse_queue_subject(&raw.subject)
            .map(|(q, _)| q)
            .unwrap_or_default();
        let m = wire::decode_stored(Arc::from(topic), queue, &raw)?;
        Ok(SendReceipt {
            message_id: m.id(),
            queue,
            offset: seq,
            deliver_at: None,
        })
    }

    /// Stores stamped messages in their topic (queue chosen here), as
    /// `target`'s; returns receipts in order.
    pub(crate) async fn store_in_topic(
        &self,
        messages: Vec<Message>,
        target: &str,
    ) -> Result<Vec<SendReceipt>, Error> {
        let mut items = Vec::with_capacity(messages.len());
        let mut places = Vec::with_capacity(messages.len());
        for m in &messages {
            let t = self.topic(TopicConfig::new(m.topic()), false).await?;
            let q = t.pick_queue(m);
            let (body, headers) = wire::encode(m);
            items.push((
                queue_subject(m.topic(), q, target),
                body,
                if target == ALL_GROUPS {
                    match m.dedupe() {
                        Some((key, _)) => dedupe_msg_id(key),
                        None => m.id().to_string(),
                    }
                } else {
                    // A resend must not be dropped as a duplicate of the original.
                    format!("{}-{target}-{}", m.id(), now_ms())
                },
                Some(headers),
            ));
            places.push(q);
        }
        let acks = self.publish_acked(items).await?;
        let mut out = Vec::with_capacity(acks.len());
        for ((m, queue), (offset, duplicate)) in messages.iter().zip(places).zip(acks) {
            out.push(if duplicate {
                // Deduplicated by the stream's window: the first publish's
                // receipt (its id and queue are in the stored copy).
                self.stored_receipt(m.topic(), offset).await?
            } else {
                SendReceipt {
                    message_id: m.id(),
                    queue,
                    offset,
                    deliver_at: None,
                }
            });
        }
        Ok(out)
    }

    /// Publishes `messages`; an outcome the server did not confirm is
    /// [`Error::Unavailable`] naming every message's id (a retry with them
    /// is deduplicated by the stream's window).
    pub(crate) async fn publish(
        self: Arc<Self>,
        messages: Vec<OutgoingMessage>,
        wait: bool,
    ) -> Result<Vec<SendReceipt>, Error> {
        let mut ids = Vec::new();
        self.publish_prepared(messages, wait, &mut ids)
            .await
            .map_err(|e| match e {
                Error::Unavailable {
                    operation, detail, ..
                } => Error::Unavailable {
                    operation,
                    detail,
                    message_ids: ids,
                },
                e => e,
            })
    }

    /// As `publish`; `ids` gets each message's id as it is prepared.
    async fn publish_prepared(
        &self,
        messages: Vec<OutgoingMessage>,
        wait: bool,
        ids: &mut Vec<MessageId>,
    ) -> Result<Vec<SendReceipt>, Error> {
        let mut messages = messages;
        self.admission.check(&mut messages)?;
        refuse_priority(&messages)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let n = messages.len();
        let _permit = self.admission.admit(n, wait).await?;
        let now = SystemTime::now();
        let mut out: Vec<Option<SendReceipt>> = vec![None; n];
        let mut plain = Vec::new();
        let mut plain_at = Vec::new();
        let mut delayed = Vec::new();
        let mut scheduled = Vec::new();
        for (i, m) in messages.into_iter().enumerate() {
            let t = self.topic(TopicConfig::new(m.topic.clone()), false).await?;
            let topic: Arc<str> = Arc::from(t.config.name());
            let native = match (m.deliver_at, t.native_horizon) {
                (Some(at), Some(h)) => at.duration_since(now).unwrap_or_default() < h,
                _ => false,
            };
            if native {
                let msg = Message::prepare(m, topic);
                ids.push(msg.id());
                let q = t.pick_queue(&msg);
                scheduled.push((i, q, msg));
            } else if m.deliver_at.is_some() {
                let msg = Message::prepare(m, Arc::from(weirmq_bus::SCHEDULE_TOPIC))
                    .with_destination(topic.to_string());
                ids.push(msg.id());
                delayed.push((i, msg));
            } else {
                let msg = Message::prepare(m, topic);
                ids.push(msg.id());
                plain.push(msg);
                plain_at.push(i);
            }
        }
        if !plain.is_empty() {
            let receipts = self.store_in_topic(plain, ALL_GROUPS).await?;
            for (i, r) in plain_at.into_iter().zip(receipts) {
                out[i] = Some(r);
            }
        }
        if !scheduled.is_empty() {
            // Native (2.12+): a schedule definition in the topic's own
            // stream; the server publishes its payload to the queue's
            // subject when due (and purges the definition).
            let mut items = Vec::with_capacity(scheduled.len());
            for (_, q, m) in &scheduled {
                let (body, mut h) = wire::encode(m);
                let at = m.deliver_at().unwrap_or_else(SystemTime::now);
                let at = time::OffsetDateTime::from(at)
                    .format(&time::format_description::well_known::Rfc3339)
                    .map_err(|e| nats_err("formatting a schedule time", e))?;
                h.insert("Nats-Schedule", format!("@at {at}").as_str());
                h.insert(
                    "Nats-Schedule-Target",
                    queue_subject(m.topic(), *q, ALL_GROUPS).as_str(),
                );
                items.push((
                    schedule_definition_subject(m.topic(), m.id()),
                    body,
                    m.id().to_string(),
                    Some(h),
                ));
            }
            let seqs = self.publish_with_headers(items).await?;
            for ((i, q, m), seq) in scheduled.into_iter().zip(seqs) {
                out[i] = Some(SendReceipt {
                    message_id: m.id(),
                    queue: q,
                    offset: seq,
                    deliver_at: m.deliver_at(),
                });
            }
        }
        if !delayed.is_empty() {
            let items = delayed
                .iter()
                .map(|(_, m)| {
                    let (body, headers) = wire::encode(m);
                    (
                        schedule_subject(m.destination().unwrap_or_default()),
                        body,
                        m.id().to_string(),
                        Some(headers),
                    )
                })
                .collect();
            let seqs = self.publish_with_headers(items).await?;
            for ((i, m), seq) in delayed.into_iter().zip(seqs) {
                out[i] = Some(SendReceipt {
                    message_id: m.id(),
                    queue: 0,
                    offset: seq,
                    deliver_at: m.deliver_at(),
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

#[async_trait]
impl Publisher for NatsBroker {
    async fn publish(
        &self,
        messages: Vec<OutgoingMessage>,
        _durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.run(|i| i.publish(messages, true)).await
    }

    async fn try_publish(
        &self,
        messages: Vec<OutgoingMessage>,
        _durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.run(|i| i.publish(messages, false)).await
    }

    /// Not on JetStream yet: deleting the staged copy races the forwarder
    /// (or the server's schedule) at the due instant, so "cancelled" could
    /// be answered for a message that was delivered — a typed refusal
    /// instead (docs/message-types.md, docs/scaling.md).
    async fn cancel_delayed(
        &self,
        receipt: &SendReceipt,
    ) -> Result<weirmq_bus::CancelOutcome, Error> {
        weirmq_bus::delayed_receipt(receipt)?;
        Err(Error::Unsupported {
            feature: "recalling a delayed message (cancel_delayed) on NATS JetStream: \
                      see docs/scaling.md"
                .into(),
        })
    }
}

/// A JetStream publish error as the bus's: no answer in time or a broken
/// connection leave the outcome unknown ([`Error::Unavailable`], ids
/// filled in by the caller); anything else is the server's refusal.
pub(crate) fn publish_err(context: &str, e: async_nats::jetstream::context::PublishError) -> Error {
    use async_nats::jetstream::context::PublishErrorKind;
    match e.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => Error::Unavailable {
            operation: context.to_string(),
            detail: format!("{e} (is the NATS server reachable? the bus reconnects by itself)"),
            message_ids: Vec::new(),
        },
        _ => nats_err(context, e),
    }
}

/// The `Nats-Msg-Id` of a publish with an idempotency key
/// (`Publish::dedupe_key`): the key, in a namespace no message id is in (an
/// id is 32 hex digits), so the stream's duplicate window deduplicates by
/// it.
/// Priority messages are refused on JetStream: a consumer there fetches
/// each queue's subject on its own, so no fetch could prefer a higher
/// priority's backlog (docs/scaling.md).
pub(crate) fn refuse_priority(messages: &[OutgoingMessage]) -> Result<(), Error> {
    match messages.iter().find(|m| m.priority > 0) {
        Some(m) => Err(Error::Unsupported {
            feature: format!(
                "message priority ({}) on NATS JetStream: see docs/scaling.md",
                m.priority
            ),
        }),
        None => Ok(()),
    }
}

pub(crate) fn dedupe_msg_id(key: &str) -> String {
    format!("wq-key:{key}")
}
