//! The order/coupon demo as a real actix-web service: see `app.rs` for how
//! it is built and README.md for a curl walkthrough.
//!
//! ```sh
//! cargo run --example order_service -- --port 8080 --payment-timeout 30s
//! ```

mod app;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Orders over HTTP; coupons, inventory, notifications and payment
/// deadlines as consumer groups on weirmq.
#[derive(Parser, Debug)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Where the bus (and the orders) are stored.
    #[arg(long, default_value = "./order-service-data")]
    data_dir: PathBuf,
    /// How long an order may stay unpaid before it is cancelled
    /// (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    payment_timeout: Duration,
    /// Orders of at least this many cents get a coupon.
    #[arg(long, default_value_t = 10_000)]
    coupon_threshold: u64,
    /// How often the coupon service fails a first attempt (0.0 - 1.0).
    #[arg(long, default_value_t = 0.2)]
    coupon_failure_rate: f64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("`{s}`: the unit must be ms, s or m")),
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,weirmq_actors=warn,weirmq_persistence=warn".into()),
        )
        .init();
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.coupon_failure_rate) {
        eprintln!("--coupon-failure-rate must be between 0.0 and 1.0");
        std::process::exit(2);
    }
    let running = app::start(app::Config {
        port: args.port,
        data_dir: args.data_dir.clone(),
        payment_timeout: args.payment_timeout,
        coupon_threshold: args.coupon_threshold,
        coupon_failure_rate: args.coupon_failure_rate,
        admin_token: std::env::var("WEIRMQ_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    })
    .await?;
    let admin = if std::env::var("WEIRMQ_ADMIN_TOKEN").is_ok_and(|t| !t.is_empty()) {
        "changes need the token in WEIRMQ_ADMIN_TOKEN"
    } else {
        "read-only: set WEIRMQ_ADMIN_TOKEN to allow resend, reset and purge"
    };
    // One line: tests read it for the port, then close the pipe.
    println!(
        "order service listening on http://127.0.0.1:{} (data in {}, payment timeout {:?}; \
         dashboard and admin API at /admin/, {admin})",
        running.port,
        args.data_dir.display(),
        args.payment_timeout
    );
    running.serve().await?;
    println!("bye");
    Ok(())
}
