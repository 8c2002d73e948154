//! The backends a conformance test runs against: the embedded store in a
//! temp dir, or a NATS JetStream server of the test's own.
//!
//! NATS tests start `nats-server -js -p <free port> -sd <temp dir>` (on
//! the PATH, or the binary named by `WEIRMQ_NATS_SERVER`, e.g. a newer
//! server), so they are hermetic and run in parallel. Without the binary
//! they use `NATS_URL` if it is set (serialised, and every weirmq stream
//! is deleted first); otherwise they fail when `WEIRMQ_REQUIRE_NATS` is set
//! (CI sets it) and are skipped with a message saying why when it is not.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weirmq::prelude::*;

/// A NATS server started for one test, killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _shared: Option<std::sync::MutexGuard<'static, ()>>,
    /// Held while the server is down after [`crash`](Self::crash): no
    /// other test starts a server on its port meanwhile.
    down: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

static SHARED: Mutex<()> = Mutex::new(());
/// Held while a test starts a server (see `NatsServer::spawn`).
static STARTING: Mutex<()> = Mutex::new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The server binary: `WEIRMQ_NATS_SERVER`, or `nats-server` on the PATH.
fn server_binary() -> String {
    std::env::var("WEIRMQ_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

fn has_nats_server() -> bool {
    Command::new(server_binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl NatsServer {
    /// Starts a JetStream server on a free port with its own store, and
    /// waits until it accepts connections. `None` (with a message on
    /// stderr) when there is no server to be had and the run does not
    /// require one.
    pub fn start() -> Option<NatsServer> {
        if has_nats_server() {
            return Some(Self::spawn());
        }
        if let Ok(url) = std::env::var("NATS_URL") {
            let guard = SHARED.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!("nats-server is not on the PATH: using NATS_URL={url} (tests serialised)");
            return Some(NatsServer {
                child: None,
                url,
                _dir: None,
                _shared: Some(guard),
                down: None,
            });
        }
        let why = "nats-server is not on the PATH and NATS_URL is not set \
                   (install it: `apt-get install nats-server`, or set NATS_URL)";
        if std::env::var_os("WEIRMQ_REQUIRE_NATS").is_some() {
            panic!("{why}; WEIRMQ_REQUIRE_NATS is set, so this is a failure");
        }
        eprintln!("SKIPPED (NATS backend): {why}");
        None
    }

    fn spawn() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("weirmq-nats-")
            .tempdir()
            .expect("temp dir");
        // Tests start servers in parallel: one at a time picks a free port
        // and waits until its own server listens on it (two picks of the
        // same just-released port would otherwise race), retrying with
        // another port if the server exits.
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = Self::launch(port, dir.path()) {
                return NatsServer {
                    child: Some(child),
                    url: format!("nats://127.0.0.1:{port}"),
                    _dir: Some(dir),
                    _shared: None,
                    down: None,
                };
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// Starts the server on `port` and waits until it listens; `None` if
    /// it exited (the port was taken meanwhile).
    fn launch(port: u16, dir: &std::path::Path) -> Option<Child> {
        let mut child = Command::new(server_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if !matches!(child.try_wait(), Ok(None)) {
                return None;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(child);
            }
            assert!(
                Instant::now() < end,
                "nats-server did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the server and starts it again on the same port and store
    /// (a server crash). `false` for a shared server (`NATS_URL`), which
    /// this cannot restart.
    pub fn crash_and_restart(&mut self) -> bool {
        if !self.crash() {
            return false;
        }
        self.restart();
        true
    }

    /// SIGKILLs the server and leaves it down (an outage) until
    /// [`restart`](Self::restart); no other test may start a server
    /// meanwhile (its port stays reserved). `false` for a shared server.
    pub fn crash(&mut self) -> bool {
        let (Some(child), Some(_)) = (&mut self.child, &self._dir) else {
            return false;
        };
        let guard = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        child.kill().expect("kill nats-server");
        child.wait().expect("reap nats-server");
        self.down = Some(guard);
        true
    }

    /// Starts a crashed server again on its port and store.
    pub fn restart(&mut self) {
        let dir = self._dir.as_ref().expect("a server of the test's own");
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        self.child = Some(
            Self::launch(port, dir.path())
                .expect("nats-server restarted on its port (was the port taken meanwhile?)"),
        );
        self.down = None;
    }

    /// Deletes every weirmq stream (for a shared server).
    async fn clean(&self) {
        if self.child.is_some() {
            return;
        }
        let bus = Bus::builder().nats(self.url.clone()).open().await.unwrap();
        bus.shutdown().await.unwrap();
        let client = async_nats::connect(&self.url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        use futures::StreamExt;
        let names: Vec<String> = js
            .stream_names()
            .filter_map(|n| async move { n.ok() })
            .collect()
            .await;
        for n in names.into_iter().filter(|n| n.starts_with("WQ_")) {
            let _ = js.delete_stream(&n).await;
        }
    }
}

/// Whether the NATS tests ask for the server's message schedules
/// (`WEIRMQ_NATS_SCHEDULES=1`; used where the server has them, 2.12+).
pub fn native_schedules_asked() -> bool {
    std::env::var("WEIRMQ_NATS_SCHEDULES").is_ok_and(|v| v == "1")
}

impl NatsServer {
    /// The server's version and how many delayed messages wait in weirmq's
    /// forwarder stream (`WQ_SYS_SCHEDULE`).
    pub async fn version_and_staged_delays(&self) -> (String, u64) {
        let client = async_nats::connect(&self.url).await.expect("connect");
        let version = client.server_info().version;
        let js = async_nats::jetstream::new(client);
        let staged = match js.get_stream("WQ_SYS_SCHEDULE").await {
            Ok(mut s) => s.info().await.expect("stream info").state.messages,
            Err(_) => 0,
        };
        (version, staged)
    }
}

/// Where a conformance test's bus keeps its messages.
pub enum Backend {
    /// The embedded sled store in a temp dir.
    Embedded(tempfile::TempDir),
    /// The embedded broker in memory (`BusBuilder::in_memory`): opening
    /// again is a new, empty bus, so restart tests leave it out.
    Memory,
    /// A NATS JetStream server.
    Nats(NatsServer),
}

impl Backend {
    pub fn embedded() -> Backend {
        Backend::Embedded(super::temp_dir())
    }

    pub fn memory() -> Backend {
        Backend::Memory
    }

    /// `None` when the test is skipped (no server, not required).
    pub async fn nats() -> Option<Backend> {
        let server = NatsServer::start()?;
        server.clean().await;
        Some(Backend::Nats(server))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded(_) => "embedded",
            Backend::Memory => "memory",
            Backend::Nats(_) => "nats",
        }
    }

    pub fn is_nats(&self) -> bool {
        matches!(self, Backend::Nats(_))
    }

    /// A builder on this backend (the same storage every time: opening
    /// again after a shutdown is a restart).
    pub fn builder(&self) -> weirmq::BusBuilder {
        match self {
            Backend::Embedded(dir) => Bus::builder().data_dir(dir.path()),
            Backend::Memory => Bus::builder().in_memory(),
            Backend::Nats(s) => {
                let mut config = weirmq::nats::NatsConfig::new(s.url.clone());
                config.use_message_schedules = native_schedules_asked();
                Bus::builder().nats_config(config)
            }
        }
    }

    /// Opens a bus on this backend.
    pub async fn open(&self) -> Bus {
        self.builder().open().await.expect("open the bus")
    }
}
