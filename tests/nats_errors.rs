//! Opening the bus on NATS fails with a typed error a user can act on when
//! there is no server, or a server without JetStream.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use weirmq::prelude::*;
use weirmq::Error;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[actix::test]
async fn no_server_is_a_storage_error_naming_the_url() {
    support::within_deadline("no_server_is_a_storage_error_naming_the_url", async {
        let url = format!("nats://127.0.0.1:{}", free_port());
        let err = Bus::builder().nats(url.clone()).open().await.unwrap_err();
        assert!(matches!(err, Error::Storage(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&url) && msg.contains("is nats-server running"),
            "{msg}"
        );
    })
    .await
}

#[actix::test]
async fn a_server_without_jetstream_is_refused_with_the_reason() {
    support::within_deadline(
        "a_server_without_jetstream_is_refused_with_the_reason",
        async {
            // Only the server binary is needed here (not JetStream): reuse the
            // suite's rule for finding it.
            let Some(_probe) = support::backend::NatsServer::start() else {
                return;
            };
            let binary =
                std::env::var("WEIRMQ_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
            let port = free_port();
            let mut child = Command::new(binary)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server without -js");
            support::wait_until(
                "nats-server listens",
                Duration::from_secs(10),
                || async move { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() },
            )
            .await;
            let err = Bus::builder()
                .nats(format!("nats://127.0.0.1:{port}"))
                .open()
                .await
                .unwrap_err();
            let _ = child.kill();
            let _ = child.wait();
            let msg = err.to_string();
            assert!(matches!(err, Error::Storage(_)), "{err:?}");
            assert!(msg.contains("JetStream enabled"), "{msg}");
        },
    )
    .await
}
