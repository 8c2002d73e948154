//! The dead-letters role on the embedded store (contract:
//! `weirmq_bus::DeadLetters`): `%DLQ%<group>` is a system topic of one
//! queue; a resend is a retry entry of the group for the original (which
//! must still be stored) plus a "resent" mark, written in one commit.

use super::*;

/// What one dead letter's resend writes: a retry entry of the group for the
/// original, in the original's topic, and its trace event.
struct ResendWrite {
    topic: String,
    entry: RetryEntry,
    trace: Option<TraceRecord>,
}

impl EmbeddedBroker {
    /// Every dead letter of `group`, oldest first.
    async fn all_dead_letters(&self, group: &str) -> Result<Vec<DeadLetter>, Error> {
        let mut letters = Vec::new();
        loop {
            let from = letters.last().map_or(0, |l: &DeadLetter| l.dlq_offset + 1);
            let page = self.dead_letters(group, from, 1000).await?;
            if page.is_empty() {
                return Ok(letters);
            }
            letters.extend(page);
        }
    }

    /// The retry that resends `dl` to `group`, or why it cannot be.
    fn resend_write(
        &self,
        group: &str,
        dl: &DeadLetter,
        now: u64,
    ) -> Result<Result<ResendWrite, String>, Error> {
        let origin = dl
            .origin_topic()
            .and_then(|t| self.inner.topics.get(t).map(|h| h.clone()));
        let (Some(h), Some(queue), Some(offset)) = (origin, dl.origin_queue(), dl.origin_offset())
        else {
            return Ok(Err(
                "the dead letter does not say where it came from, or that topic is gone".into(),
            ));
        };
        // The retry names the original in its queue: it must still be there.
        let key = QueueKey {
            topic_id: h.id,
            queue,
        };
        let kept = self
            .reader()?
            .read_range(&h.name, key, offset, offset + 1, 1)
            .map(|m| m.len() == 1)?;
        if !kept {
            return Ok(Err(format!(
                "the original message ({} queue {queue} offset {offset}) was removed by \
                 retention; read the dead letter and publish it again instead",
                h.name
            )));
        }
        let trace = h.trace.load(Ordering::Relaxed).then(|| TraceRecord {
            key,
            offset,
            event: TraceEvent::at_ms(
                self.inner.clock.now_ms(),
                TraceKind::Resent,
                Some(group),
                1,
                None,
            ),
        });
        Ok(Ok(ResendWrite {
            topic: h.name.to_string(),
            entry: RetryEntry {
                key: RetryKey {
                    group: group.to_string(),
                    topic_id: h.id,
                    due_ms: now,
                    seq: next_seq(),
                },
                queue,
                offset,
                attempt: 1,
                first_failed_ms: now,
                last_error: "resent from the dead-letter queue".into(),
            },
            trace,
        }))
    }

    /// Stores the retries and "resent" marks in one commit, then hands the
    /// retries to the group's running actors.
    async fn commit_resends(
        &self,
        group: &str,
        writes: Vec<ResendWrite>,
        marks: Vec<(String, u64)>,
    ) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.inner.persistence.do_send(UpdateRetries {
            put: writes.iter().map(|w| w.entry.clone()).collect(),
            remove: Vec::new(),
            resent: marks,
            unschedule: Vec::new(),
            reschedule: Vec::new(),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.await.map_err(|_| Error::Closed)??;
        info!(group, resent = writes.len(), "dead letters resent");
        let mut traces = Vec::new();
        let mut by_topic: BTreeMap<String, Vec<RetryEntry>> = BTreeMap::new();
        for w in writes {
            traces.extend(w.trace);
            by_topic.entry(w.topic).or_default().push(w.entry);
        }
        if !traces.is_empty() {
            self.inner.persistence.do_send(RecordTrace(traces));
        }
        for (topic, entries) in by_topic {
            if let Some(addr) = self.running_group(group, &topic) {
                addr.do_send(AddRetries(entries));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for EmbeddedBroker {
    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let topic = dlq_topic(group);
        if !self.inner.topics.contains_key(&topic) {
            return Ok(Vec::new());
        }
        let messages = self.read_queue(&topic, 0, from, max).await?;
        let resent = self.reader()?.resent(group)?;
        Ok(messages
            .into_iter()
            .map(|m| DeadLetter {
                dlq_offset: m.offset(),
                resent: resent.contains(&m.offset()),
                message: m,
            })
            .collect())
    }

    /// Resent ones are counted too, until purged.
    async fn dead_letter_count(&self, group: &str) -> Result<u64, Error> {
        let Some(h) = self.inner.topics.get(&dlq_topic(group)).map(|h| h.clone()) else {
            return Ok(0);
        };
        Ok(self.reader()?.count(QueueKey {
            topic_id: h.id,
            queue: 0,
        })?)
    }

    /// A failure to schedule one resend is reported for that message; the
    /// call fails only if the dead-letter queue cannot be read.
    async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        validate_group_name(group)?;
        self.check_open()?;
        // One resend at a time, so two cannot both find a letter unsent.
        let _guard = self.inner.create_lock.lock().await;
        let letters = self.all_dead_letters(group).await?;
        let mut plan = ResendPlan::choose(&letters, &which);
        let now = self.inner.clock.now_ms();
        let mut writes = Vec::new();
        let mut marks = Vec::new();
        let mut failed = Vec::new();
        for (i, (_, dl)) in plan.chosen.iter().enumerate() {
            match self.resend_write(group, dl, now)? {
                Ok(w) => {
                    writes.push(w);
                    marks.push((group.to_string(), dl.dlq_offset));
                }
                Err(reason) => failed.push((i, reason)),
            }
        }
        for (i, reason) in failed {
            plan.fail(i, reason);
        }
        if writes.is_empty() {
            return Ok(plan.reports);
        }
        if let Err(e) = self.commit_resends(group, writes, marks).await {
            for r in &mut plan.reports {
                if r.outcome == ResendOutcome::Resent {
                    r.outcome = ResendOutcome::Failed(e.to_string());
                }
            }
        }
        Ok(plan.reports)
    }

    async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error> {
        let Some(h) = self.inner.topics.get(&dlq_topic(group)).map(|h| h.clone()) else {
            return Ok(0);
        };
        let n = self
            .inner
            .persistence
            .send(PurgeQueue {
                key: QueueKey {
                    topic_id: h.id,
                    queue: 0,
                },
                group: group.to_string(),
            })
            .await
            .map_err(|_| Error::Closed)??;
        info!(group, purged = n, "dead letters purged");
        Ok(n)
    }
}
