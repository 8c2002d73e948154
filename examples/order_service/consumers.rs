//! The order service's consumer groups, one handler actor each: coupons
//! (fails a first attempt now and then, to show retries), payments (a
//! delayed payment deadline), deadlines (cancel if unpaid), inventory
//! (FIFO per order) and notifications. Every handler is idempotent:
//! delivery is at least once.

use super::*;

type Outcome = ResponseFuture<Result<(), HandlerError>>;

fn retry(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::retry(e.to_string())
}

async fn mark_seen(bus: &Bus, id: &str, group: &str, kind: &str) -> Result<(), HandlerError> {
    bus.write_state(StateBatch::new().put(seen_key(id, group, kind), "1"))
        .await
        .map_err(retry)
}

/// Grants a coupon for orders over the threshold; fails now and then to
/// show retries (the failure happens before anything is written).
pub struct Coupons {
    pub bus: Bus,
    pub threshold: u64,
    pub failure_rate: f64,
}

impl Actor for Coupons {
    type Context = Context<Self>;
}

impl Handler<Delivery<OrderEvent>> for Coupons {
    type Result = Outcome;

    fn handle(&mut self, d: Delivery<OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        let (bus, threshold) = (self.bus.clone(), self.threshold);
        // Deterministic per message: the same first attempt always fails.
        let roll = (d.message_id().as_u128() % 1000) as f64 / 1000.0;
        let fail = d.attempt() == 1 && roll < self.failure_rate;
        let msg_id = d.message_id();
        let event = d.into_event();
        Box::pin(async move {
            let OrderEvent::Created { order } = event else {
                return Ok(());
            };
            if fail {
                return Err(HandlerError::retry(
                    "coupon service unavailable (simulated)",
                ));
            }
            if order.amount >= threshold
                && bus
                    .state_get(coupon_key(&order.id).as_bytes())
                    .await
                    .map_err(retry)?
                    .is_none()
            {
                let code = format!("CPN-{}", order.id.to_uppercase());
                // The grant is recorded under the event that caused it: an
                // audit trail that shows a coupon was issued once.
                bus.write_state(
                    StateBatch::new()
                        .put(coupon_key(&order.id), code.clone())
                        .put(format!("coupon-issued/{}/{msg_id}", order.id), code.clone())
                        .put(seen_key(&order.id, "coupon", "created"), "1"),
                )
                .await
                .map_err(retry)?;
                info!(order = %order.id, %code, "coupon granted");
            } else {
                mark_seen(&bus, &order.id, "coupon", "created").await?;
            }
            Ok(())
        })
    }
}

/// Schedules each new order's payment deadline (a delayed message).
pub struct Payments {
    pub bus: Bus,
    pub timeout: Duration,
}

impl Actor for Payments {
    type Context = Context<Self>;
}

impl Handler<Delivery<OrderEvent>> for Payments {
    type Result = Outcome;

    fn handle(&mut self, d: Delivery<OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        let (bus, timeout) = (self.bus.clone(), self.timeout);
        let event = d.into_event();
        Box::pin(async move {
            let OrderEvent::Created { order } = event else {
                return Ok(());
            };
            bus.publish_with(
                &PaymentTimeout {
                    order_id: order.id.clone(),
                },
                Publish::new().key(order.id.clone()).delay(timeout),
            )
            .await
            .map_err(retry)?;
            mark_seen(&bus, &order.id, "payments", "created").await
        })
    }
}

/// Cancels orders still unpaid when their deadline comes.
pub struct Deadlines {
    pub bus: Bus,
    pub book: Addr<OrderBook>,
}

impl Actor for Deadlines {
    type Context = Context<Self>;
}

impl Handler<Delivery<PaymentTimeout>> for Deadlines {
    type Result = Outcome;

    fn handle(&mut self, d: Delivery<PaymentTimeout>, _: &mut Context<Self>) -> Self::Result {
        let (bus, book) = (self.bus.clone(), self.book.clone());
        let id = d.into_event().order_id;
        Box::pin(async move {
            match book.send(CancelIfUnpaid(id.clone())).await.map_err(retry)? {
                Ok(Change::Done(_)) => info!(order = %id, "unpaid in time: cancelled"),
                Ok(_) => {}
                Err(e) => return Err(retry(e)),
            }
            mark_seen(&bus, &id, "payment-timeout", "timeout").await
        })
    }
}

/// Reserves stock when an order is created and releases it when it is
/// cancelled: a FIFO subscription, so per order the release never comes
/// before the reservation.
pub struct Inventory {
    pub bus: Bus,
}

impl Actor for Inventory {
    type Context = Context<Self>;
}

impl Handler<Delivery<OrderEvent>> for Inventory {
    type Result = Outcome;

    fn handle(&mut self, d: Delivery<OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        let bus = self.bus.clone();
        let step = match d.event() {
            OrderEvent::Created { .. } => Some("reserve"),
            OrderEvent::Cancelled { .. } => Some("release"),
            OrderEvent::Paid { .. } => None,
        };
        let id = d.event().order_id().to_string();
        let kind = d.event().tag();
        let key = inventory_key(&id, &d);
        Box::pin(async move {
            let mut batch = StateBatch::new().put(seen_key(&id, "inventory", kind), "1");
            if let Some(step) = step {
                batch = batch.put(key, step);
            }
            bus.write_state(batch).await.map_err(retry)
        })
    }
}

/// Logs every event (a stand-in for e-mail or push).
pub struct Notifications {
    pub bus: Bus,
}

impl Actor for Notifications {
    type Context = Context<Self>;
}

impl Handler<Delivery<OrderEvent>> for Notifications {
    type Result = Outcome;

    fn handle(&mut self, d: Delivery<OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        let bus = self.bus.clone();
        let (id, kind) = (d.event().order_id().to_string(), d.event().tag());
        info!(order = %id, event = kind, "notify user");
        Box::pin(async move { mark_seen(&bus, &id, "notification", kind).await })
    }
}
