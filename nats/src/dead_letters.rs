//! The dead-letters role on JetStream (contract:
//! `weirmq_bus::DeadLetters`): every group's dead letters share the DLQ
//! stream, one subject per group; a resend publishes the original to the
//! group's own subject of its queue and records a "resent" mark on a
//! subject beside the letters.

use crate::prelude::*;

impl Inner {
    /// Stores a dead letter of `group` (a copy with its own id).
    pub(crate) async fn store_dead_letter(
        &self,
        group: &str,
        dl: OutgoingMessage,
    ) -> Result<(), Error> {
        let m = Message::prepare(dl, Arc::from(dlq_topic(group).as_str()));
        let (body, headers) = crate::wire::encode(&m);
        self.publish_with_headers(vec![(
            dlq_subject(group),
            body,
            m.id().to_string(),
            Some(headers),
        )])
        .await?;
        Ok(())
    }

    pub(crate) async fn read_dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let stream = self.stream(DLQ_STREAM).await?;
        let resent: std::collections::HashSet<u64> = self
            .read_raw(&stream, &dlq_resent_subject(group), 1, usize::MAX)
            .await?
            .into_iter()
            .filter_map(|m| std::str::from_utf8(&m.payload).ok()?.parse().ok())
            .collect();
        let topic: Arc<str> = Arc::from(dlq_topic(group).as_str());
        let mut out = Vec::new();
        for raw in self
            .read_raw(&stream, &dlq_subject(group), from, max)
            .await?
        {
            let m = crate::wire::decode_stored(topic.clone(), 0, &raw)?;
            out.push(DeadLetter {
                dlq_offset: raw.sequence,
                message: Arc::new(m),
                resent: resent.contains(&raw.sequence),
            });
        }
        Ok(out)
    }

    /// Resends one dead letter to `group`'s own subject of its queue, then
    /// marks it resent.
    pub(crate) async fn resend_one(&self, group: &str, d: &DeadLetter) -> Result<(), Error> {
        let (Some(topic), Some(id)) = (d.origin_topic(), d.original_id()) else {
            return Err(Error::InvalidConfig {
                reason: "the dead letter does not say where it came from".into(),
            });
        };
        let out = d.original();
        let t = self.known_topic(topic).await?;
        let m = Message::prepare(out, Arc::from(t.config.name()));
        let m = m.with_identity(id, d.message.born_at());
        let q = d.origin_queue().unwrap_or(0) % t.config.queue_count();
        let (body, headers) = crate::wire::encode(&m);
        self.publish_with_headers(vec![(
            queue_subject(topic, q, &group_target(group)),
            body,
            format!("{}-resend-{}", m.id(), d.dlq_offset),
            Some(headers),
        )])
        .await?;
        self.publish_raw(vec![(
            dlq_resent_subject(group),
            Bytes::from(d.dlq_offset.to_string()),
            format!("resent-{group}-{}", d.dlq_offset),
        )])
        .await?;
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for NatsBroker {
    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let g = group.to_string();
        self.run(move |i| async move { i.read_dead_letters(&g, from, max).await })
            .await
    }

    async fn dead_letter_count(&self, group: &str) -> Result<u64, Error> {
        let g = group.to_string();
        self.run(move |i| async move { i.subject_count(DLQ_STREAM, &dlq_subject(&g)).await })
            .await
    }

    async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        validate_group_name(group)?;
        let g = group.to_string();
        self.run(move |i| async move {
            let all = i.read_dead_letters(&g, 1, usize::MAX).await?;
            let mut plan = ResendPlan::choose(&all, &which);
            for k in 0..plan.chosen.len() {
                let dl = plan.chosen[k].1.clone();
                if let Err(e) = i.resend_one(&g, &dl).await {
                    plan.fail(k, e.to_string());
                }
            }
            Ok(plan.reports)
        })
        .await
    }

    async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error> {
        let g = group.to_string();
        self.run(move |i| async move {
            let n = i.subject_count(DLQ_STREAM, &dlq_subject(&g)).await?;
            i.stream(DLQ_STREAM)
                .await?
                .purge()
                .filter(dlq_group_filter(&g))
                .await
                .map_err(|e| nats_err("purging dead letters", e))?;
            Ok(n)
        })
        .await
    }
}
