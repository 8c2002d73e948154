//! Dead-letter queues: read, resend, purge (contract:
//! `weirmq_bus::DeadLetters`).

use super::*;

impl Bus {
    /// One page of `group`'s dead letters, oldest first, starting at DLQ
    /// offset `from` (use the last one's `dlq_offset + 1` for the next
    /// page). Each keeps the original message and says where it came from,
    /// why it died, after how many attempts, and whether it was resent.
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error.
    pub async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        validate_group_name(group)?;
        self.inner.broker.dead_letters(group, from, max).await
    }

    /// How many dead letters `group` holds (resent ones too, until purged).
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error.
    pub async fn dead_letter_count(&self, group: &str) -> Result<u64, Error> {
        validate_group_name(group)?;
        self.inner.broker.dead_letter_count(group).await
    }

    /// Sends dead letters back to `group` — to that group only, as attempt
    /// 1, each at most once — and reports per message: `Resent`,
    /// `NotFound`, `AlreadyResent`, or `Failed` with the reason.
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error reading the DLQ.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(bus: weirmq::Bus) -> Result<(), weirmq::Error> {
    /// use weirmq::{Resend, ResendOutcome};
    /// for r in bus.resend_dead_letters("coupon-service", Resend::All).await? {
    ///     assert_eq!(r.outcome, ResendOutcome::Resent, "{}", r.message_id);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        validate_group_name(group)?;
        let reports = self.inner.broker.resend_dead_letters(group, which).await?;
        let resent = reports
            .iter()
            .filter(|r| r.outcome == weirmq_bus::ResendOutcome::Resent)
            .count();
        metrics::counter!(weirmq_bus::metrics::RESENT, "group" => group.to_string())
            .increment(resent as u64);
        Ok(reports)
    }

    /// Deletes every dead letter of `group`; returns how many were deleted.
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error.
    pub async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error> {
        validate_group_name(group)?;
        self.inner.broker.purge_dead_letters(group).await
    }
}
