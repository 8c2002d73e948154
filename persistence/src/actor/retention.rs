//! Retention passes on the persistence thread: by age and size on a timer
//! or on demand, and under disk pressure (the oldest messages every group
//! has acked). A pass runs in steps of about a millisecond, so commits are
//! never held up long; retry entries and staged messages hold back what
//! they name.

use super::*;

/// One step of a retention pass.
#[derive(Message)]
#[rtype(result = "()")]
struct RetentionStep;

/// A retention pass under way.
#[derive(Debug, Default)]
pub(super) struct RetentionJob {
    /// Queues still to clean: (queue, cutoff ms, max bytes).
    pub(super) todo: VecDeque<(QueueKey, Option<u64>, Option<u64>)>,
    /// The lowest offset retry entries name, per queue; kept up to date
    /// with retries written during the pass.
    pub(super) floors: HashMap<QueueKey, u64>,
    /// A pressure pass (the disk is nearly full): each queue's acked floor
    /// (lowest committed offset of its groups); nothing at or above it, and
    /// nothing in a queue without groups, is removed. `None`: a normal pass.
    pub(super) acked: Option<HashMap<QueueKey, u64>>,
    pub(super) report: RetentionReport,
    /// The queue at the front lost messages in this pass.
    pub(super) touched: bool,
    pub(super) waiters: Vec<oneshot::Sender<Result<RetentionReport, StorageError>>>,
}

/// How long one retention step may run before the commits waiting get a
/// turn (it removes index spans of up to ~1,000 messages, a few at a time).
const RETENTION_STEP: Duration = Duration::from_millis(1);

/// Spans removed per call into the store within a step.
const RETENTION_SPANS_PER_CALL: usize = 2;

/// How long after a pressure pass that removed nothing the next may start.
const PRESSURE_REST: Duration = Duration::from_secs(1);

impl PersistenceActor {
    /// Starts a retention pass (if none runs) for `waiters`.
    pub(super) fn start_retention(
        &mut self,
        waiters: Vec<oneshot::Sender<Result<RetentionReport, StorageError>>>,
        ctx: &mut Context<Self>,
    ) {
        if self.retention.is_some() {
            self.retention_next.extend(waiters);
            return;
        }
        let Some(store) = self.store.store() else {
            for w in waiters {
                let _ = w.send(Err(closed()));
            }
            return;
        };
        let floors = match store.retry_floors() {
            Ok(mut f) => {
                // Retries not written yet count too.
                for u in &self.retries {
                    for e in &u.put {
                        lower(&mut f, e);
                    }
                }
                f
            }
            Err(e) => {
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
                return;
            }
        };
        let now = self.clock.now_ms();
        // Idempotency keys whose window closed: a few per key published.
        match store.purge_dedupe(now) {
            Ok(0) => {}
            Ok(n) => debug!(keys = n, "closed dedupe windows removed"),
            Err(e) => warn!(error = %e, "removing closed dedupe keys failed; retried next pass"),
        }
        // Inbox marks of messages retention removed.
        match store.purge_inbox_marks(now) {
            Ok(0) => {}
            Ok(n) => debug!(marks = n, "inbox marks of expired messages removed"),
            Err(e) => warn!(error = %e, "removing inbox marks failed; retried next pass"),
        }
        let todo = store
            .retention_plan()
            .into_iter()
            .map(|(key, r)| {
                let cutoff = r.age().map(|a| now.saturating_sub(a.as_millis() as u64));
                (key, cutoff, r.bytes())
            })
            .collect();
        self.retention = Some(RetentionJob {
            todo,
            floors,
            acked: None,
            report: RetentionReport::default(),
            touched: false,
            waiters,
        });
        ctx.notify(RetentionStep);
    }

    /// Starts a pressure pass (the disk is nearly full) unless a pass runs:
    /// it removes the oldest acked-by-every-group messages, queue by queue
    /// in turns, until there is room again.
    pub(super) fn start_pressure(&mut self, ctx: &mut Context<Self>) {
        if self.retention.is_some()
            || !self.store.is_writable()
            || self
                .pressure_rest
                .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        let Some(store) = self.store.store() else {
            return;
        };
        let plan = store.retry_floors().and_then(|mut floors| {
            for u in &self.retries {
                for e in &u.put {
                    lower(&mut floors, e);
                }
            }
            Ok((floors, store.acked_floors(&self.offsets)?))
        });
        let (floors, acked) = match plan {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %self.store.located(e), "planning a pressure pass (disk or memory budget) failed");
                return;
            }
        };
        let now = self.clock.now_ms();
        let todo = store
            .all_queues()
            .into_iter()
            .filter(|k| acked.get(k).is_some_and(|f| *f > 0))
            .map(|k| (k, Some(now), None))
            .collect();
        warn!(
            available = self.guard.available(),
            reserve = self.guard.reserve(),
            "the disk is nearly full: removing the oldest messages every group has consumed"
        );
        self.retention = Some(RetentionJob {
            todo,
            floors,
            acked: Some(acked),
            report: RetentionReport::default(),
            touched: false,
            waiters: Vec::new(),
        });
        ctx.notify(RetentionStep);
    }
}

pub(super) fn lower(floors: &mut HashMap<QueueKey, u64>, e: &RetryEntry) {
    let key = QueueKey {
        topic_id: e.key.topic_id,
        queue: e.queue,
    };
    let f = floors.entry(key).or_insert(e.offset);
    *f = (*f).min(e.offset);
}

impl Handler<RunRetention> for PersistenceActor {
    type Result = ResponseFuture<Result<RetentionReport, StorageError>>;

    fn handle(&mut self, _: RunRetention, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.start_retention(vec![tx], ctx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(closed())) })
    }
}

impl Handler<RetentionStep> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, _: RetentionStep, ctx: &mut Context<Self>) {
        let Some(mut job) = self.retention.take() else {
            return;
        };
        let outcome = match self.store.writable() {
            Err(e) => Err(e),
            Ok(store) => {
                let started = std::time::Instant::now();
                let mut result = Ok(());
                while started.elapsed() < RETENTION_STEP {
                    let Some(&(key, cutoff, max_bytes)) = job.todo.front() else {
                        break;
                    };
                    let mut keep_from = job.floors.get(&key).copied().unwrap_or(u64::MAX);
                    if let Some(acked) = &job.acked {
                        keep_from = keep_from.min(acked.get(&key).copied().unwrap_or(0));
                    }
                    match store.expire(key, cutoff, max_bytes, keep_from, RETENTION_SPANS_PER_CALL)
                    {
                        Ok(x) => {
                            self.guard.freed(x.bytes);
                            if x.messages > 0 {
                                info!(
                                    topic_id = key.topic_id,
                                    queue = key.queue,
                                    messages = x.messages,
                                    bytes = x.bytes,
                                    first_kept = x.start,
                                    "retention removed expired messages"
                                );
                                job.touched = true;
                            }
                            job.report.messages += x.messages;
                            job.report.bytes += x.bytes;
                            if !x.more {
                                job.todo.pop_front();
                                job.report.queues += job.touched as u32;
                                job.touched = false;
                            } else if job.acked.is_some() {
                                // Pressure: queues take turns, a few spans each.
                                job.report.queues += job.touched as u32;
                                job.touched = false;
                                job.todo.rotate_left(1);
                            }
                            if job.acked.is_some() && !self.guard.under_pressure() {
                                job.todo.clear();
                                break;
                            }
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
        };
        match outcome {
            Err(e) => {
                let e = self.store.located(e);
                warn!(error = %e, "retention pass failed; the next one tries again");
                for w in job.waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
            Ok(()) if job.todo.is_empty() => {
                if job.acked.is_some() {
                    info!(
                        removed = job.report.messages,
                        bytes = job.report.bytes,
                        room = !self.guard.under_pressure(),
                        "pressure pass (disk or memory budget) done"
                    );
                    // Nothing consumed was left to remove: try again later.
                    self.pressure_rest = (job.report.messages == 0)
                        .then(|| std::time::Instant::now() + PRESSURE_REST);
                } else if job.report.messages > 0 {
                    debug!(?job.report, "retention pass done");
                }
                for w in job.waiters {
                    let _ = w.send(Ok(job.report));
                }
                let next = std::mem::take(&mut self.retention_next);
                if !next.is_empty() {
                    self.start_retention(next, ctx);
                }
            }
            Ok(()) => {
                self.retention = Some(job);
                // Yield as long as the step ran: at most half of this thread's
                // time goes to removing while commits are waiting.
                // (On a manual clock the steps run back to back: pacing
                // CPU time is no part of what a test's virtual time drives.)
                if self.clock.is_manual() {
                    ctx.notify(RetentionStep);
                } else {
                    ctx.run_later(RETENTION_STEP, |_, ctx| ctx.notify(RetentionStep));
                }
            }
        }
    }
}
