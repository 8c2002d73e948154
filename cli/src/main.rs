//! `weirmq`: operate a weirmq bus from the shell — offline on a data
//! directory (`--data-dir`, the service stopped) or online against a
//! service's admin API (`--url http://host:port/admin`, `--token`). Both
//! go through the same admin scope, so they answer alike.
//!
//! Exit codes (scripts can rely on them):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the operation failed (a storage error, the bus closing, ...) |
//! | 2 | bad usage or input (a bad flag, name, time or filter) |
//! | 3 | not found (topic, message, dead letter, data directory) |
//! | 4 | not allowed (no or wrong token; a read-only admin API) |
//! | 5 | unreachable (the admin API, or a store another process holds) |
//! | 6 | not offered by this backend (e.g. query by key on NATS) |

mod output;
mod target;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

use target::Target;

/// Operate a weirmq bus: topics, groups, lag, messages, traces, the
/// dead-letter queue, resets.
#[derive(Parser, Debug)]
#[command(name = "weirmq", version, propagate_version = true)]
struct Cli {
    /// A service's admin API: its scope's URL (http://127.0.0.1:8080/admin).
    #[arg(long, env = "WEIRMQ_URL", global = true, conflicts_with = "data_dir")]
    url: Option<String>,
    /// The admin token for changes (resend, purge, reset) online.
    #[arg(
        long,
        env = "WEIRMQ_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
    /// A data directory to open here (the service using it must be stopped).
    #[arg(long, env = "WEIRMQ_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Machine-readable output: the admin API's JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Topics with their queues, messages, size and retention.
    Topics,
    /// Consumer groups with lag, in flight, retries and dead letters.
    Groups,
    /// Lag per queue of every group (or one).
    Lag {
        /// Only this group.
        group: Option<String>,
    },
    /// Prints a topic's messages as they are stored (follows until Ctrl-C).
    Tail {
        topic: String,
        /// Start at each queue's first stored message, not at its end.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// How often to look for new messages, in milliseconds.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// One message by id.
    Get { id: String },
    /// Messages of a topic by key.
    Find {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        key: String,
        /// Only those published at or after: Unix ms, RFC 3339 UTC, or an age (2h).
        #[arg(long)]
        since: Option<String>,
    },
    /// What happened to a message: published, delivered, retried, ...
    Trace { id: String },
    /// The dead-letter queue of a group.
    #[command(subcommand)]
    Dlq(Dlq),
    /// Moves a group's position in a topic.
    Reset {
        group: String,
        topic: String,
        /// earliest, latest, or a time (Unix ms, RFC 3339 UTC, or an age: 2h).
        #[arg(long)]
        to: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Applies every topic's retention now (embedded store).
    Retention,
    /// Prints a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
enum Dlq {
    /// Every group's dead-letter count, or one group's dead letters.
    List { group: Option<String> },
    /// One dead letter, by its offset in the group's DLQ.
    Show { group: String, dlq_offset: u64 },
    /// Sends dead letters back to their group (a result per message).
    Resend {
        group: String,
        /// Original message ids to resend.
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        /// Every dead letter not resent yet.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Deletes every dead letter of a group.
    Purge {
        group: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub enum Failure {
    Failed(String),
    Usage(String),
    NotFound(String),
    NotAllowed(String),
    Unreachable(String),
    Unsupported(String),
}

impl Failure {
    /// The admin API's answer, or the failure its status says.
    pub fn check(status: u16, v: Value) -> Result<Value, Failure> {
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = v["message"].as_str().unwrap_or("no message").to_string();
        Err(match status {
            400 | 409 | 413 => Failure::Usage(msg),
            404 => Failure::NotFound(msg),
            401 | 403 => Failure::NotAllowed(msg),
            501 => Failure::Unsupported(msg),
            _ => Failure::Failed(format!("{msg} (status {status})")),
        })
    }

    fn code(&self) -> u8 {
        match self {
            Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NotFound(_) => 3,
            Failure::NotAllowed(_) => 4,
            Failure::Unreachable(_) => 5,
            Failure::Unsupported(_) => 6,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Failed(m)
            | Failure::Usage(m)
            | Failure::NotFound(m)
            | Failure::NotAllowed(m)
            | Failure::Unreachable(m)
            | Failure::Unsupported(m) => m,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "weirmq", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let result = actix_rt::System::new().block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("weirmq: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let target = match (&cli.url, &cli.data_dir) {
        (Some(url), _) => Target::online(url, cli.token.clone()),
        (None, Some(dir)) => Target::offline(dir).await?,
        (None, None) => {
            return Err(Failure::Usage(
                "say where the bus is: --url http://host:port/admin (a running service) or \
                 --data-dir DIR (a stopped one)"
                    .into(),
            ))
        }
    };
    let r = command(&target, &cli).await;
    target.close().await;
    r
}

fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asks on the terminal; refuses without one (scripts pass `--yes`).
fn confirm(question: &str) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "{question} — not asked without a terminal: pass --yes"
        )));
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| Failure::Failed(e.to_string()))?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Usage("not confirmed; nothing changed".into()))
    }
}

/// A spinner on stderr while a long operation runs (hidden when stderr
/// is not a terminal).
fn spinner(what: String) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner().with_message(what);
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

async fn command(t: &Target, cli: &Cli) -> Result<(), Failure> {
    let json = cli.json;
    let print = |v: &Value, human: &dyn Fn(&Value) -> String| {
        if json {
            println!("{v}");
        } else {
            print!("{}", human(v));
        }
    };
    match &cli.command {
        Command::Topics => print(&t.get("/topics").await?, &output::topics),
        Command::Groups => print(&t.get("/groups").await?, &output::groups),
        Command::Lag { group } => {
            let mut out = Vec::new();
            for g in t
                .get("/groups")
                .await?
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let name = g["group"].as_str().unwrap_or("");
                if group.as_deref().is_some_and(|w| w != name) {
                    continue;
                }
                let topic = g["topic"].as_str().unwrap_or("");
                out.push(
                    t.get(&format!("/groups/{}/{}", seg(name), seg(topic)))
                        .await?,
                );
            }
            if out.is_empty() {
                if let Some(g) = group {
                    return Err(Failure::NotFound(format!("no group `{g}`")));
                }
            }
            print(&Value::Array(out), &output::lag);
        }
        Command::Tail {
            topic,
            from_start,
            count,
            interval_ms,
        } => {
            let info = t.get(&format!("/topics/{}", seg(topic))).await?;
            let mut next: Vec<(u64, u64)> = info["queues"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|q| {
                    let at = if *from_start { &q["first"] } else { &q["end"] };
                    (q["queue"].as_u64().unwrap_or(0), at.as_u64().unwrap_or(0))
                })
                .collect();
            let mut printed = 0u64;
            loop {
                for (queue, from) in next.iter_mut() {
                    let page = t
                        .get(&format!(
                            "/topics/{}/queues/{queue}/messages?from={from}&max=500",
                            seg(topic)
                        ))
                        .await?;
                    for m in page["messages"].as_array().cloned().unwrap_or_default() {
                        if json {
                            println!("{m}");
                        } else {
                            println!("{}", output::message_line(&m));
                        }
                        printed += 1;
                        if count.is_some_and(|c| printed >= c) {
                            return Ok(());
                        }
                    }
                    if let Some(n) = page["next"].as_u64() {
                        *from = n;
                    }
                }
                actix_rt::time::sleep(Duration::from_millis(*interval_ms)).await;
            }
        }
        Command::Get { id } => print(
            &t.get(&format!("/messages/{}", seg(id))).await?,
            &output::message,
        ),
        Command::Find { topic, key, since } => {
            let mut q = format!("/messages?topic={}&key={}", seg(topic), seg(key));
            if let Some(s) = since {
                q.push_str(&format!("&since={}", seg(s)));
            }
            print(&t.get(&q).await?, &output::messages);
        }
        Command::Trace { id } => print(
            &t.get(&format!("/messages/{}/trace", seg(id))).await?,
            &output::trace,
        ),
        Command::Dlq(Dlq::List { group: None }) => {
            print(&t.get("/dlq").await?, &output::dlq_groups)
        }
        Command::Dlq(Dlq::List { group: Some(g) }) => {
            let mut all = Vec::new();
            let mut from = 0u64;
            loop {
                let page = t
                    .get(&format!("/dlq/{}?from={from}&max=1000", seg(g)))
                    .await?;
                let letters = page["dead_letters"].as_array().cloned().unwrap_or_default();
                let n = letters.len();
                all.extend(letters);
                match page["next"].as_u64() {
                    Some(next) if n == 1000 => from = next,
                    _ => break,
                }
            }
            print(&Value::Array(all), &output::dead_letters);
        }
        Command::Dlq(Dlq::Show { group, dlq_offset }) => print(
            &t.get(&format!("/dlq/{}/{dlq_offset}", seg(group))).await?,
            &output::dead_letter,
        ),
        Command::Dlq(Dlq::Resend { group, ids, all }) => {
            let body = if *all {
                json!({ "all": true })
            } else {
                json!({ "ids": ids })
            };
            let pb = spinner(format!("resending dead letters of {group}"));
            let r = t.post(&format!("/dlq/{}/resend", seg(group)), body).await;
            pb.finish_and_clear();
            let r = r?;
            print(&r, &output::resend);
            let failed = r["results"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|x| x["outcome"] == "failed"));
            if failed {
                return Err(Failure::Failed(
                    "some dead letters could not be resent".into(),
                ));
            }
        }
        Command::Dlq(Dlq::Purge { group, yes }) => {
            if !yes {
                confirm(&format!("delete every dead letter of {group}?"))?;
            }
            let pb = spinner(format!("purging the dead letters of {group}"));
            let r = t
                .post(&format!("/dlq/{}/purge", seg(group)), json!({}))
                .await;
            pb.finish_and_clear();
            print(&r?, &|v| {
                format!("purged {} dead letters of {group}\n", v["purged"])
            });
        }
        Command::Reset {
            group,
            topic,
            to,
            yes,
        } => {
            if !yes {
                confirm(&format!("move group {group} on {topic} to {to}?"))?;
            }
            let pb = spinner(format!("resetting {group} on {topic}"));
            let r = t
                .post(
                    &format!("/groups/{}/{}/reset", seg(group), seg(topic)),
                    json!({ "to": to }),
                )
                .await;
            pb.finish_and_clear();
            print(&r?, &output::positions);
        }
        Command::Retention => {
            let pb = spinner("applying retention".into());
            let r = t.post("/retention", json!({})).await;
            pb.finish_and_clear();
            print(&r?, &|v| {
                format!(
                    "removed {} messages ({} bytes) from {} queues\n",
                    v["messages"], v["bytes"], v["queues"]
                )
            });
        }
        Command::Completions { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(())
}
