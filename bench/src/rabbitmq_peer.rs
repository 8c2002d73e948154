//! The RabbitMQ peer, as its users run a durable work queue (`lapin`): a
//! quorum queue (replicated log, fsync before it confirms), publisher
//! confirms (each publish waits for its confirm; a batch publishes all,
//! then waits for all), 4 consumers with a prefetch of 256 acking each
//! delivery. Durability at ack: on disk (fsync'd). `WEIRMQ_AMQP_URL`
//! overrides `amqp://guest:guest@127.0.0.1:5672/%2f`.

use std::sync::atomic::AtomicUsize;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::*;

/// Publishing channels (each with confirms), shared round robin.
const CHANNELS: usize = 8;

/// Runs `load` on a RabbitMQ quorum queue; `None` (after saying so) when
/// RabbitMQ is not reachable.
pub(super) async fn rabbitmq_peer(
    name: &str,
    load: Load,
    payload: usize,
) -> Result<Option<Res>, String> {
    let url = std::env::var("WEIRMQ_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = match tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            skipped(name, &format!("RabbitMQ is not reachable at {url}: {e}"));
            return Ok(None);
        }
        Err(_) => {
            skipped(name, &format!("RabbitMQ at {url} did not answer in 5 s"));
            return Ok(None);
        }
    };
    let amqp = |e: lapin::Error| format!("{name}: {e}");
    let queue = format!("weirmq-bench-{}", std::process::id());
    let admin = conn.create_channel().await.map_err(amqp)?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    // A run killed before it deletes its queue leaves nothing behind for
    // long: the server drops a queue unused for a minute.
    args.insert("x-expires".into(), AMQPValue::LongUInt(60_000));
    admin
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(amqp)?;
    let tally = Arc::new(Tally::default());
    let mut consumers = Vec::new();
    for c in 0..4 {
        let ch = conn.create_channel().await.map_err(amqp)?;
        ch.basic_qos(256, BasicQosOptions::default())
            .await
            .map_err(amqp)?;
        let mut deliveries = ch
            .basic_consume(
                &queue,
                &format!("c{c}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let tally = tally.clone();
        consumers.push(tokio::task::spawn_local(async move {
            while let Some(d) = deliveries.next().await {
                let d = d.map_err(|e| e.to_string())?;
                tally.seen(&d.data);
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let ch = conn.create_channel().await.map_err(amqp)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        channels.push(ch);
    }
    let channels = Arc::new(channels);
    let next = Arc::new(AtomicUsize::new(0));
    let q = queue.clone();
    let res = drive(name, load, payload, tally, move |batch: Vec<Vec<u8>>| {
        let ch = channels[next.fetch_add(1, Ordering::Relaxed) % CHANNELS].clone();
        let queue = q.clone();
        async move {
            let mut confirms = Vec::with_capacity(batch.len());
            for p in &batch {
                confirms.push(
                    ch.basic_publish(
                        "",
                        &queue,
                        BasicPublishOptions::default(),
                        p,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(|e| e.to_string())?,
                );
            }
            for c in confirms {
                let confirmation = c.await.map_err(|e| e.to_string())?;
                if !confirmation.is_ack() {
                    return Err(format!("publish not confirmed: {confirmation:?}"));
                }
            }
            Ok(())
        }
    })
    .await;
    admin
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await
        .map_err(amqp)?;
    let _ = conn.close(200, "done").await;
    for c in consumers {
        // The consumers end when the connection closes.
        let _ = c.await;
    }
    res.map(Some)
}
