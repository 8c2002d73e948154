//! A secured NATS server (user and password, TLS with a private CA), as
//! docs/scaling.md shows it: `NatsConfig::auth` and `NatsConfig::tls`
//! connect and the bus works; a wrong password, a missing CA and a missing
//! file are typed errors that say what to check.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{init_tracing, wait_until, Log, Num};
use weirmq::nats::{NatsAuth, NatsConfig, NatsTls};
use weirmq::prelude::*;
use weirmq::Error;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and a server certificate for 127.0.0.1 signed by it:
/// (ca.pem, server.pem, server-key.pem).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(f);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=weirmq test CA",
        ])
        .arg("-keyout")
        .arg(p("ca-key.pem"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("server-key.pem"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca-key.pem"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("server.pem")));
    (p("ca.pem"), p("server.pem"), p("server-key.pem"))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A JetStream server requiring TLS and a user/password, on a free port.
fn secured_server(dir: &Path, cert: &Path, key: &Path) -> Option<(Server, u16)> {
    let _probe = support::backend::NatsServer::start()?;
    let binary = std::env::var("WEIRMQ_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    for attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let store = dir.join(format!("js-{attempt}"));
        let conf = dir.join(format!("nats-{attempt}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\n\
                 jetstream {{ store_dir: {:?} }}\n\
                 authorization {{ user: weirmq, password: \"s3cret pass\" }}\n\
                 tls {{ cert_file: {:?}, key_file: {:?} }}\n",
                store.display().to_string(),
                cert.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if !matches!(child.try_wait(), Ok(None)) {
                break; // the port was taken meanwhile: another one
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some((Server(child), port));
            }
            assert!(
                Instant::now() < end,
                "nats-server did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("the secured nats-server did not start on any of 5 ports");
}

fn config(port: u16, password: &str, tls: Option<NatsTls>) -> NatsConfig {
    let mut c = NatsConfig::new(format!("nats://127.0.0.1:{port}"));
    c.auth = NatsAuth::UserPassword {
        user: "weirmq".into(),
        password: password.into(),
    };
    c.tls = tls;
    c
}

#[actix::test]
async fn a_secured_server_takes_credentials_and_tls_and_refuses_wrong_ones_with_the_reason() {
    support::within_deadline(
        "a_secured_server_takes_credentials_and_tls_and_refuses_wrong_ones_with_the_reason",
        async {
            init_tracing();
            let dir = support::temp_dir();
            let (ca, cert, key) = certificates(dir.path());
            let Some((_server, port)) = secured_server(dir.path(), &cert, &key) else {
                return;
            };

            // The right password, TLS verified against the private CA: works.
            let bus = Bus::builder()
                .nats_config(config(port, "s3cret pass", Some(NatsTls::with_ca(&ca))))
                .open()
                .await
                .expect("a secured connection");
            let log = Log::default();
            let sub = bus
                .subscribe::<Num>("billing")
                .start_from(StartFrom::Earliest)
                .members(1, support::recorders(&log, support::ack_all()))
                .start()
                .await
                .unwrap();
            bus.publish(&Num { n: 7 }).await.unwrap();
            wait_until(
                "the message is handled",
                Duration::from_secs(20),
                || async { log.len() == 1 },
            )
            .await;
            sub.drain().await.unwrap();
            bus.shutdown().await.unwrap();

            // A wrong password: refused, and the error says to check the auth.
            let err = Bus::builder()
                .nats_config(config(port, "wrong", Some(NatsTls::with_ca(&ca))))
                .open()
                .await
                .unwrap_err();
            assert!(err.to_string().contains("refused the credentials"), "{err}");

            // No CA for the private certificate: the TLS handshake fails, and the
            // error says so.
            let err = Bus::builder()
                .nats_config(config(port, "s3cret pass", None))
                .open()
                .await
                .unwrap_err();
            assert!(err.to_string().contains("TLS"), "{err}");

            // A CA file that does not exist: a configuration error naming it.
            let missing = dir.path().join("no-such-ca.pem");
            let err = Bus::builder()
                .nats_config(config(
                    port,
                    "s3cret pass",
                    Some(NatsTls::with_ca(&missing)),
                ))
                .open()
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
            assert!(err.to_string().contains("no-such-ca.pem"), "{err}");

            // Debug output never shows the password.
            let shown = format!("{:?}", config(port, "s3cret pass", None));
            assert!(!shown.contains("s3cret"), "{shown}");
        },
    )
    .await
}
