//! The decoupling scenario: user registration → coupon, without the
//! registration code knowing the coupon service.
//!
//! A registration service records users and publishes `UserRegistered`,
//! returning at once. The `coupon-service` consumer group grants a coupon to
//! each new user. Later, marketing adds a `gift-pack` group: it subscribes to
//! the same topic and the registration code is not touched.
//!
//! Run: `cargo run --example register_coupon` (data in `./weirmq-data`), or
//! the same demo on NATS JetStream:
//! `cargo run --example register_coupon -- --nats nats://127.0.0.1:4222`
//! (or set `WEIRMQ_NATS_URL`). Nothing but the bus's builder changes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use weirmq::prelude::*;

/// The decoupling demo: user registration → coupon, and a gift pack added
/// later without touching the registration code.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Run on NATS JetStream at this URL (e.g. nats://127.0.0.1:4222)
    /// instead of the embedded store; default: the environment variable
    /// WEIRMQ_NATS_URL if set.
    #[arg(long)]
    nats: Option<String>,
    /// The embedded store's data directory.
    #[arg(long, default_value = "./weirmq-data")]
    data_dir: PathBuf,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct UserRegistered {
    user_id: u64,
    email: String,
}

impl Event for UserRegistered {
    const TOPIC: &'static str = "user-registered";
}

/// The registration service: it knows the bus, not who listens.
struct Registration {
    bus: Bus,
}

impl Registration {
    async fn register(&self, user_id: u64, email: &str) -> Result<(), weirmq::Error> {
        // ... store the user in the service's own database ...
        let evt = UserRegistered {
            user_id,
            email: email.to_string(),
        };
        let receipt = self
            .bus
            .publish_with(&evt, Publish::new().key(format!("user-{user_id}")))
            .await?;
        println!(
            "[registration] user {user_id} registered; event {} stored at queue {} offset {}",
            receipt.message_id, receipt.queue, receipt.offset
        );
        Ok(())
    }
}

type Seen = Arc<Mutex<BTreeSet<u64>>>;

/// Grants a coupon to each new user.
struct CouponService {
    granted: Seen,
}

impl Actor for CouponService {
    type Context = Context<Self>;
}

impl Handler<Delivery<UserRegistered>> for CouponService {
    type Result = ResponseFuture<Result<(), HandlerError>>;

    fn handle(&mut self, d: Delivery<UserRegistered>, _: &mut Context<Self>) -> Self::Result {
        let granted = self.granted.clone();
        Box::pin(async move {
            let user = d.event();
            // Idempotent: a redelivered message must not grant twice.
            if granted.lock().unwrap().insert(user.user_id) {
                println!(
                    "[coupon-service] 10% coupon for user {} <{}> (message {})",
                    user.user_id,
                    user.email,
                    d.message_id()
                );
            }
            Ok(())
        })
    }
}

/// Added later by marketing: a gift pack for each new user.
struct GiftPack {
    sent: Seen,
}

impl Actor for GiftPack {
    type Context = Context<Self>;
}

impl Handler<Delivery<UserRegistered>> for GiftPack {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, d: Delivery<UserRegistered>, _: &mut Context<Self>) -> Self::Result {
        if self.sent.lock().unwrap().insert(d.event().user_id) {
            println!(
                "[gift-pack] welcome gift pack for user {}",
                d.event().user_id
            );
        }
        Ok(())
    }
}

async fn wait_for(seen: &Seen, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if seen.lock().unwrap().len() >= n {
            return true;
        }
        actix::clock::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[actix::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("register_coupon: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let nats = args.nats.or_else(|| std::env::var("WEIRMQ_NATS_URL").ok());
    let bus = match &nats {
        Some(url) => {
            println!("[bus] NATS JetStream at {url}");
            Bus::builder().nats(url.clone()).open().await?
        }
        None => Bus::builder().data_dir(&args.data_dir).open().await?,
    };
    let registration = Registration { bus: bus.clone() };

    // The coupon service subscribes; a group that already ran resumes where it left off.
    let coupons: Seen = Default::default();
    let c = coupons.clone();
    let coupon_sub = bus
        .subscribe::<UserRegistered>("coupon-service")
        .members(2, move || CouponService { granted: c.clone() })
        .start()
        .await?;

    let started = Instant::now();
    for (id, email) in [
        (1, "ada@example.com"),
        (2, "grace@example.com"),
        (3, "linus@example.com"),
    ] {
        registration.register(id, email).await?;
    }
    println!(
        "[registration] 3 users registered in {:?}; the service never waited for coupons",
        started.elapsed()
    );
    let coupons_ok = wait_for(&coupons, 3).await;

    // Marketing adds a gift pack: a new consumer group, no change to Registration.
    let gifts: Seen = Default::default();
    let g = gifts.clone();
    let gift_sub = bus
        .subscribe::<UserRegistered>("gift-pack")
        .members(1, move || GiftPack { sent: g.clone() })
        .start()
        .await?;
    registration.register(4, "margaret@example.com").await?;
    let gifts_ok = wait_for(&gifts, 1).await && wait_for(&coupons, 4).await;

    coupon_sub.drain().await?;
    gift_sub.drain().await?;
    for group in ["coupon-service", "gift-pack"] {
        let lag: u64 = bus
            .positions(group, UserRegistered::TOPIC)
            .await?
            .iter()
            .map(|p| p.lag)
            .sum();
        println!("[admin] group {group}: lag {lag}");
    }
    bus.shutdown().await?;
    if coupons_ok && gifts_ok {
        println!("done: coupons for users 1-4, gift pack for user 4 (it subscribed after 1-3)");
        Ok(())
    } else {
        Err("not every event was handled in time".into())
    }
}
