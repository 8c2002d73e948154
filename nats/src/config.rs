//! How a [`NatsBroker`](crate::NatsBroker) connects ([`NatsConfig`]) and
//! what the server it connected to offers ([`ServerFeatures`]).

use crate::prelude::*;

/// How a [`NatsBroker`] connects and behaves.
#[derive(Clone)]
pub struct NatsConfig {
    /// The server(s), e.g. `nats://127.0.0.1:4222` (comma-separated for a
    /// cluster).
    pub url: String,
    /// How long the server waits for a delivery's settlement before it
    /// redelivers it, to this or another process (default 30 s). A process
    /// that dies holding messages releases them after this long; handlers
    /// that run longer are kept alive by progress acks.
    pub ack_wait: Duration,
    /// Message size and delay limits (as on the embedded store).
    pub limits: Limits,
    /// The most publishes awaiting their JetStream ack at once (default
    /// 65,536); `try_publish` answers [`Error::Busy`] beyond it.
    pub max_pending_messages: usize,
    /// Replicas of every stream weirmq creates (default 1; 3 on a 3-node
    /// cluster).
    pub replicas: usize,
    /// Transaction checkers registered from the start, by topic.
    pub checkers: Vec<(String, Arc<dyn TransactionChecker>, TransactionConfig)>,
    /// Delay with the server's message schedules where it has them (2.12+)
    /// instead of weirmq's forwarder. Default `false`: on 2.12.8 the
    /// server fired schedules 145 ms late at the median and 270 ms at p99,
    /// the forwarder 1–1.4 ms and 2.2–3 ms (BENCHMARKS.md). Turn it on when
    /// delayed messages must fire with no weirmq process running.
    pub use_message_schedules: bool,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("ack_wait", &self.ack_wait)
            .field("limits", &self.limits)
            .field("replicas", &self.replicas)
            .finish()
    }
}

impl NatsConfig {
    /// Defaults for the server(s) at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            ack_wait: Duration::from_secs(30),
            limits: Limits::default(),
            max_pending_messages: 65_536,
            replicas: 1,
            checkers: Vec::new(),
            use_message_schedules: false,
        }
    }
}

/// What the connected server can do natively, detected at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFeatures {
    /// The server's version, as it reports it.
    pub version: String,
    /// Consumers with several filter subjects (2.10+). weirmq filters tags
    /// on the client on every version, so this is informational.
    pub multi_filter: bool,
    /// Message schedules (2.12+). With
    /// [`NatsConfig::use_message_schedules`], delayed messages are schedule
    /// definitions in their topic's stream, fired by the server; otherwise
    /// (and always before 2.12) weirmq's forwarder delays them.
    pub message_schedules: bool,
}

impl ServerFeatures {
    pub(crate) fn detect(version: &str) -> Self {
        let mut parts = version
            .trim_start_matches('v')
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        let at_least = |m: u32| major > 2 || (major == 2 && minor >= m);
        ServerFeatures {
            version: version.to_string(),
            multi_filter: at_least(10),
            message_schedules: at_least(12),
        }
    }
}
