//! The NATS JetStream peer: a server of its own (started like the tests'
//! servers, retrying on a port race) and a plain async-nats producer and
//! consumer.

use crate::*;

pub(super) struct NatsServer {
    pub(super) child: tokio::process::Child,
    pub(super) url: String,
    pub(super) _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(super) async fn start_nats() -> Result<NatsServer, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // WEIRMQ_NATS_SERVER: another server binary (e.g. a newer version).
    let binary = std::env::var("WEIRMQ_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    // A free port can be taken between the pick and the server's bind (by
    // anything on the machine): a server that exits is retried on another
    // port, and only its own listening counts (a connect could reach the
    // other process).
    for _ in 0..5 {
        let port = free_port();
        let mut child = tokio::process::Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("cannot start nats-server (install it, or pass --no-peer): {e}")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(NatsServer {
                    child,
                    url: format!("nats://127.0.0.1:{port}"),
                    _dir: dir,
                });
            }
            if Instant::now() > deadline {
                return Err("nats-server did not start listening within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Err("nats-server exited on each of 5 free ports".into())
}

/// JetStream with file storage: pipelined publishes (256 acks in flight), a
/// durable pull consumer fetching batches with explicit acks. With
/// `offered = Some(rate)`, publishes are paced at that rate instead (for
/// latency at a fixed load).
pub(super) async fn nats_peer(
    url: &str,
    name: &str,
    n: u64,
    payload: usize,
    consume: bool,
    offered: Option<u64>,
) -> Result<Res, async_nats::Error> {
    use async_nats::jetstream::{self, consumer, stream};
    use futures::StreamExt;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let stream_name = format!("BENCH{}", now_ns());
    let s = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{stream_name}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let subject = format!("{stream_name}.events");
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let consumer_task = if consume {
        let c: consumer::PullConsumer = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 4096,
                ..Default::default()
            })
            .await?;
        let lat = lat.clone();
        Some(tokio::spawn(async move {
            let mut msgs = c.stream().max_messages_per_batch(256).messages().await?;
            let mut got = 0;
            while got < n {
                let Some(m) = msgs.next().await else { break };
                let m = m?;
                let sent = u64::from_be_bytes(m.payload[..8].try_into().unwrap_or([0; 8]));
                lat.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(since_us(sent));
                m.ack().await?;
                got += 1;
            }
            Ok::<_, async_nats::Error>(())
        }))
    } else {
        None
    };
    let start = Instant::now();
    let mut acks = std::collections::VecDeque::with_capacity(256);
    let mut publish_lat = Vec::with_capacity(n as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for i in 0..n {
        if let Some(rate) = offered {
            while (start.elapsed().as_secs_f64() * rate as f64) < i as f64 {
                tick.tick().await;
            }
        }
        let t = now_ns();
        let mut body = t.to_be_bytes().to_vec();
        body.resize(payload.max(8), b'x');
        acks.push_back((t, js.publish(subject.clone(), body.into()).await?));
        if acks.len() >= 256 {
            if let Some((t, ack)) = acks.pop_front() {
                ack.await?;
                publish_lat.push(since_us(t));
            }
        }
    }
    for (t, ack) in acks {
        ack.await?;
        publish_lat.push(since_us(t));
    }
    if let Some(task) = consumer_task {
        task.await??;
    }
    let res = Res::new(name, n, payload, start.elapsed()).baseline();
    let lats = if consume {
        std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()))
    } else {
        publish_lat
    };
    js.delete_stream(&stream_name).await?;
    Ok(res.latencies(lats))
}
