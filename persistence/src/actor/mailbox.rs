//! How the persistence actor handles each message: appends and retry
//! updates wait for the next commit, offsets ride in it (or in a small
//! commit of their own after a quiet moment), topic changes and purges are
//! written at once.

use super::*;

impl Handler<SetScheduler> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: SetScheduler, _: &mut Context<Self>) {
        self.scheduler = Some(msg.0);
    }
}

impl Handler<RecordTrace> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: RecordTrace, ctx: &mut Context<Self>) {
        if !self.store.is_writable() {
            return;
        }
        self.traces.extend(msg.0);
        self.commit_soon(ctx);
    }
}

impl Handler<ConfigureTopic> for PersistenceActor {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, msg: ConfigureTopic, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.writable()?;
        let written = store.write_topic(&msg.name, msg.id, msg.queues, &msg.settings);
        written.map_err(|e| self.store.located(e))?;
        debug!(topic = %msg.name, settings = ?msg.settings, "topic reconfigured");
        Ok(())
    }
}

impl Handler<Append> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: Append, ctx: &mut Context<Self>) {
        self.clock.touch();
        if let Some(e) = self.store.refusal() {
            (msg.done)(Err(e));
            return;
        }
        self.pending_messages += msg.messages.len();
        self.pending.push(msg);
        self.queue_commit(ctx);
    }
}

impl Handler<Commit> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, _: Commit, ctx: &mut Context<Self>) {
        self.clock.touch();
        self.commit_queued = false;
        if self.commit() {
            self.queue_commit(ctx);
        }
    }
}

impl Handler<UpdateRetries> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: UpdateRetries, ctx: &mut Context<Self>) {
        self.clock.touch();
        if let Some(e) = self.store.refusal() {
            (msg.done)(Err(e));
            return;
        }
        if let Some(job) = &mut self.retention {
            for e in &msg.put {
                lower(&mut job.floors, e);
            }
        }
        self.retries.push(msg);
        self.queue_commit(ctx);
    }
}

impl Handler<CommitOffsets> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: CommitOffsets, ctx: &mut Context<Self>) {
        if !self.store.is_open() {
            return;
        }
        for (key, state) in msg.entries {
            self.offsets.insert((msg.group.clone(), key), state);
        }
        if msg.now {
            while !self.pending.is_empty() || !self.offsets.is_empty() || !self.retries.is_empty() {
                self.commit();
                if !self.store.is_writable() {
                    return;
                }
            }
            if self.durable {
                if let Err(e) = self.store.writable().and_then(Store::sync) {
                    self.store.trip(e);
                }
            }
            return;
        }
        self.commit_soon(ctx);
    }
}

impl Handler<PurgeQueue> for PersistenceActor {
    type Result = Result<u64, StorageError>;

    fn handle(&mut self, msg: PurgeQueue, _: &mut Context<Self>) -> Self::Result {
        while !self.pending.is_empty() || !self.retries.is_empty() {
            self.commit();
        }
        let store = self.store.writable()?;
        let purged = store.purge_queue(msg.key, &resent_prefix(&msg.group));
        let n = purged.map_err(|e| self.store.located(e))?;
        debug!(?msg.key, group = %msg.group, purged = n, "queue purged");
        Ok(n)
    }
}

impl Handler<CreateTopic> for PersistenceActor {
    type Result = Result<u32, StorageError>;

    fn handle(&mut self, msg: CreateTopic, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.writable()?;
        let created = store.create_topic(&msg.name, msg.queues, &msg.settings);
        let id = created.map_err(|e| self.store.located(e))?;
        debug!(topic = %msg.name, id, queues = msg.queues, "topic created");
        Ok(id)
    }
}

impl Handler<ShutdownStore> for PersistenceActor {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, _: ShutdownStore, ctx: &mut Context<Self>) -> Self::Result {
        while !self.pending.is_empty()
            || !self.offsets.is_empty()
            || !self.retries.is_empty()
            || !self.traces.is_empty()
        {
            self.commit();
            if !self.store.is_writable() {
                break;
            }
        }
        if let Some(job) = self.retention.take() {
            for w in job.waiters {
                let _ = w.send(Err(closed()));
            }
        }
        for w in self.retention_next.drain(..) {
            let _ = w.send(Err(closed()));
        }
        let result = self.store.close(self.durable);
        ctx.stop();
        debug!("store closed");
        result
    }
}
