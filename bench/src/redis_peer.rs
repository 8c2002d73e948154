//! The Redis Streams peer, as its users run a work queue on it (the
//! `redis` crate): producers `XADD` on one multiplexed connection (a
//! batch: one pipeline), a consumer group of 4 consumers on their own
//! connections `XREADGROUP` up to 256 at a time and `XACK` what they read.
//! Durability at ack: memory only (this machine's Redis keeps nothing on
//! disk). `WEIRMQ_REDIS_URL` overrides `redis://127.0.0.1:6379/`.

use std::sync::atomic::AtomicBool;

use redis::streams::StreamReadReply;

use crate::*;

const GROUP: &str = "weirmq-bench";

/// Runs `load` on Redis Streams; `None` (after saying so) when Redis is
/// not reachable.
pub(super) async fn redis_peer(
    name: &str,
    load: Load,
    payload: usize,
) -> Result<Option<Res>, String> {
    let url =
        std::env::var("WEIRMQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let client = redis::Client::open(url.as_str()).map_err(|e| format!("{url}: {e}"))?;
    let connect = || {
        let client = client.clone();
        async move {
            match tokio::time::timeout(
                Duration::from_secs(3),
                client.get_multiplexed_async_connection(),
            )
            .await
            {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer in 3 s".to_string()),
            }
        }
    };
    let mut con = match connect().await {
        Ok(c) => c,
        Err(e) => {
            skipped(name, &format!("Redis is not reachable at {url}: {e}"));
            return Ok(None);
        }
    };
    let key = format!("weirmq-bench-{}", std::process::id());
    let redis_err = |e: redis::RedisError| format!("{name}: {e}");
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut con)
        .await
        .map_err(redis_err)?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut con)
        .await
        .map_err(redis_err)?;
    // A run killed before it deletes its stream leaves nothing behind for
    // long.
    redis::cmd("EXPIRE")
        .arg(&key)
        .arg(600)
        .query_async::<()>(&mut con)
        .await
        .map_err(redis_err)?;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for c in 0..4 {
        let mut cc = connect().await?;
        let (key, tally, stop) = (key.clone(), tally.clone(), stop.clone());
        consumers.push(tokio::task::spawn_local(async move {
            while !stop.load(Ordering::Relaxed) {
                let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(format!("c{c}"))
                    .arg("COUNT")
                    .arg(256)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut cc)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut ids = Vec::new();
                for k in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in k.ids {
                        let body: Vec<u8> = entry.get("p").unwrap_or_default();
                        tally.seen(&body);
                        ids.push(entry.id);
                    }
                }
                if !ids.is_empty() {
                    redis::cmd("XACK")
                        .arg(&key)
                        .arg(GROUP)
                        .arg(&ids)
                        .query_async::<()>(&mut cc)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(())
        }));
    }
    let (k, pc) = (key.clone(), con.clone());
    let res = drive(name, load, payload, tally, move |batch: Vec<Vec<u8>>| {
        let (key, mut con) = (k.clone(), pc.clone());
        async move {
            if batch.len() == 1 {
                redis::cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("p")
                    .arg(&batch[0])
                    .query_async::<String>(&mut con)
                    .await
                    .map(drop)
            } else {
                let mut pipe = redis::pipe();
                for p in &batch {
                    pipe.cmd("XADD").arg(&key).arg("*").arg("p").arg(p);
                }
                pipe.query_async::<Vec<String>>(&mut con).await.map(drop)
            }
            .map_err(|e| e.to_string())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await.map_err(|e| e.to_string())??;
    }
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut con)
        .await
        .map_err(redis_err)?;
    res.map(Some)
}
