//! How a [`NatsBroker`](crate::NatsBroker) connects ([`NatsConfig`]) and
//! what the server it connected to offers ([`ServerFeatures`]).

use crate::prelude::*;
use std::path::PathBuf;

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
    /// How the connection authenticates (default [`NatsAuth::None`]).
    pub auth: NatsAuth,
    /// TLS for the connection (default `None`: plain, unless a `tls://`
    /// URL or the server asks for it, then the system's roots).
    pub tls: Option<NatsTls>,
}

/// How a [`NatsBroker`](crate::NatsBroker) authenticates to the server.
/// `Debug` never shows a secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A user and password (`authorization { users = [...] }`, or an
    /// account's users).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token (`authorization { token: ... }`).
    Token(String),
    /// A credentials file (decentralised JWT auth: the user JWT and its
    /// NKey seed, as `nsc` writes them).
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
        }
    }
}

/// TLS settings of the connection (rustls; PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// The CA certificate(s) that signed the server's certificate (a
    /// private CA); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers that verify clients
    /// (`verify: true`): `(certificate, key)`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse to connect without TLS (default `true` once TLS settings are
    /// given).
    pub required: bool,
}

impl NatsTls {
    /// TLS required, the server verified against `ca_file`.
    pub fn with_ca(ca_file: impl Into<PathBuf>) -> Self {
        NatsTls {
            ca_file: Some(ca_file.into()),
            client_cert: None,
            required: true,
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("ack_wait", &self.ack_wait)
            .field("limits", &self.limits)
            .field("replicas", &self.replicas)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
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
            auth: NatsAuth::None,
            tls: None,
        }
    }

    /// The async-nats connect options these settings ask for.
    pub(crate) async fn connect_options(&self) -> Result<async_nats::ConnectOptions, Error> {
        let mut o = async_nats::ConnectOptions::new()
            .name("weirmq")
            .connection_timeout(Duration::from_secs(5));
        o = match &self.auth {
            NatsAuth::None => o,
            NatsAuth::UserPassword { user, password } => {
                o.user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(t) => o.token(t.clone()),
            NatsAuth::CredentialsFile(path) => {
                o.credentials_file(path)
                    .await
                    .map_err(|e| Error::InvalidConfig {
                        reason: format!(
                            "cannot read the NATS credentials file {}: {e}",
                            path.display()
                        ),
                    })?
            }
        };
        if let Some(tls) = &self.tls {
            for (what, path) in tls.ca_file.iter().map(|p| ("CA file", p)).chain(
                tls.client_cert
                    .iter()
                    .flat_map(|(c, k)| [("client certificate", c), ("client key", k)]),
            ) {
                if !path.is_file() {
                    return Err(Error::InvalidConfig {
                        reason: format!("the NATS TLS {what} {} does not exist", path.display()),
                    });
                }
            }
            if let Some(ca) = &tls.ca_file {
                o = o.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &tls.client_cert {
                o = o.add_client_certificate(cert.clone(), key.clone());
            }
            o = o.require_tls(tls.required);
        }
        Ok(o)
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
