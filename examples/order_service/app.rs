//! The order service: HTTP routes, the order book, and one handler actor
//! per consumer group (in `consumers.rs`). `main.rs` parses the command
//! line and runs it; the integration tests include this file to run it
//! in-process.
//!
//! How the pieces meet:
//!
//! ```text
//! POST /orders ──► OrderBook ──publish_with_state──► order row + OrderEvent::Created   (one commit)
//!                                                     │  topic order-events, message group = order id
//!        ┌──────────────────┬────────────────────────┼──────────────────────┐
//!   coupon (tag created)  payments (tag created)   inventory (FIFO)     notification
//!   grants a coupon,      publishes a DELAYED       reserve on Created,   logs every event
//!   fails now and then    PaymentTimeout            release on Cancelled
//!                                │ (after --payment-timeout)
//!                           payment-timeout ──► OrderBook: cancel if still unpaid
//!                                                ──► order row + OrderEvent::Cancelled (one commit)
//! POST /orders/{id}/pay ──► OrderBook: paid if still created ──► order row + OrderEvent::Paid
//! ```
//!
//! Every order change is the **local outbox** (`Bus::publish_with_state`):
//! the order row and its event are stored in one commit, so there is never an
//! order without its event, or an event without its order — even if the
//! process is killed mid-way. (The half-message alternative,
//! `Bus::publish_transactional`, needs a checker; with the order rows in the
//! bus's own store the outbox is simpler.)
//!
//! Handlers are idempotent (delivery is at least once): a coupon is granted
//! only if the order has none, and inventory steps are keyed by the event id.

#![allow(dead_code)]

use std::time::Duration;

use actix::prelude::*;
use actix_web::{get, post, web, HttpResponse};
use serde::{Deserialize, Serialize};
use tracing::info;
use weirmq::prelude::*;
use weirmq::web::HttpError;
use weirmq::{Ordering, StateBatch};

/// What the service is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// 0 picks a free port.
    pub port: u16,
    pub data_dir: std::path::PathBuf,
    /// How long an order may stay unpaid.
    pub payment_timeout: Duration,
    /// Orders of at least this amount (in cents) get a coupon.
    pub coupon_threshold: u64,
    /// How often the coupon service fails a first attempt (0.0 – 1.0).
    pub coupon_failure_rate: f64,
    /// The admin API's bearer token (`WEIRMQ_ADMIN_TOKEN`); without one
    /// the admin API and dashboard at `/admin/` are read-only.
    pub admin_token: Option<String>,
}

// ------------------------------------------------------------------ events

/// One line of an order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub sku: String,
    pub qty: u32,
}

/// What `POST /orders` takes.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewOrder {
    pub user_id: u64,
    pub items: Vec<Item>,
    /// In cents.
    pub amount: u64,
}

/// An order's state.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    Created,
    Paid,
    Cancelled,
}

/// The order row, as stored.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Order {
    pub id: String,
    pub user_id: u64,
    pub items: Vec<Item>,
    pub amount: u64,
    pub state: OrderState,
}

/// Everything that happens to an order, on one topic, with the order id as
/// message group: a FIFO subscriber sees an order's events in order.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OrderEvent {
    Created { order: Order },
    Paid { order_id: String },
    Cancelled { order_id: String, reason: String },
}

impl Event for OrderEvent {
    const TOPIC: &'static str = "order-events";
}

impl OrderEvent {
    fn order_id(&self) -> &str {
        match self {
            OrderEvent::Created { order } => &order.id,
            OrderEvent::Paid { order_id } | OrderEvent::Cancelled { order_id, .. } => order_id,
        }
    }

    fn tag(&self) -> &'static str {
        match self {
            OrderEvent::Created { .. } => "created",
            OrderEvent::Paid { .. } => "paid",
            OrderEvent::Cancelled { .. } => "cancelled",
        }
    }
}

/// Published delayed, once per order: "was it paid in time?"
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PaymentTimeout {
    pub order_id: String,
}

impl Event for PaymentTimeout {
    const TOPIC: &'static str = "payment-timeouts";
}

// ------------------------------------------------------------- state keys

fn order_key(id: &str) -> String {
    format!("order/{id}")
}
fn coupon_key(id: &str) -> String {
    format!("coupon/{id}")
}
/// `inventory/<order>/<event born ms>-<event id>` → "reserve" | "release":
/// keyed by the event, so a redelivered event is recorded once, in order.
fn inventory_key(id: &str, d: &Delivery<OrderEvent>) -> String {
    let born = d
        .message()
        .born_at()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_millis());
    format!("inventory/{id}/{born:015}-{}", d.message_id())
}
fn seen_key(id: &str, group: &str, kind: &str) -> String {
    format!("seen/{id}/{group}/{kind}")
}

pub async fn load_order(bus: &Bus, id: &str) -> Result<Option<Order>, weirmq::Error> {
    Ok(bus
        .state_get(order_key(id).as_bytes())
        .await?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

// -------------------------------------------------------------- order book

/// Owns every change of an order's state: one message at a time
/// (`AtomicResponse`), so a payment and a timeout cannot both win.
pub struct OrderBook {
    bus: Bus,
}

impl Actor for OrderBook {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<Order, HttpError>")]
pub struct Create(pub NewOrder);

/// The result of asking to change an order.
#[derive(Debug)]
pub enum Change {
    Done(Order),
    Unchanged(Order),
    NotFound,
}

#[derive(Message)]
#[rtype(result = "Result<Change, HttpError>")]
pub struct Pay(pub String);

#[derive(Message)]
#[rtype(result = "Result<Change, HttpError>")]
pub struct CancelIfUnpaid(pub String);

/// Stores the order row and its event in one commit.
async fn save(bus: &Bus, order: &Order, event: OrderEvent) -> Result<(), weirmq::Error> {
    let row = serde_json::to_vec(order).expect("an order serialises");
    let tag = event.tag();
    bus.publish_with_state(
        &event,
        Publish::new()
            .message_group(order.id.clone())
            .key(order.id.clone())
            .tag(tag),
        StateBatch::new().put(order_key(&order.id), row),
    )
    .await?;
    Ok(())
}

impl Handler<Create> for OrderBook {
    type Result = AtomicResponse<Self, Result<Order, HttpError>>;

    fn handle(&mut self, msg: Create, _: &mut Context<Self>) -> Self::Result {
        let bus = self.bus.clone();
        AtomicResponse::new(Box::pin(
            async move {
                // `<process>-<n>`: unique across restarts, short enough to type.
                let v = weirmq::MessageId::generate().as_u128();
                let order = Order {
                    id: format!("{:08x}-{}", (v >> 48) as u32, v as u64 & ((1 << 48) - 1)),
                    user_id: msg.0.user_id,
                    items: msg.0.items,
                    amount: msg.0.amount,
                    state: OrderState::Created,
                };
                save(
                    &bus,
                    &order,
                    OrderEvent::Created {
                        order: order.clone(),
                    },
                )
                .await?;
                Ok(order)
            }
            .into_actor(self),
        ))
    }
}

/// Moves an order from `Created` to `to`, with its event.
async fn transition(
    bus: &Bus,
    id: &str,
    to: OrderState,
    event: OrderEvent,
) -> Result<Change, HttpError> {
    let Some(mut order) = load_order(bus, id).await? else {
        return Ok(Change::NotFound);
    };
    if order.state != OrderState::Created {
        return Ok(Change::Unchanged(order));
    }
    order.state = to;
    save(bus, &order, event).await?;
    Ok(Change::Done(order))
}

impl Handler<Pay> for OrderBook {
    type Result = AtomicResponse<Self, Result<Change, HttpError>>;

    fn handle(&mut self, msg: Pay, _: &mut Context<Self>) -> Self::Result {
        let bus = self.bus.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let event = OrderEvent::Paid {
                    order_id: msg.0.clone(),
                };
                transition(&bus, &msg.0, OrderState::Paid, event).await
            }
            .into_actor(self),
        ))
    }
}

impl Handler<CancelIfUnpaid> for OrderBook {
    type Result = AtomicResponse<Self, Result<Change, HttpError>>;

    fn handle(&mut self, msg: CancelIfUnpaid, _: &mut Context<Self>) -> Self::Result {
        let bus = self.bus.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let event = OrderEvent::Cancelled {
                    order_id: msg.0.clone(),
                    reason: "payment timeout".into(),
                };
                transition(&bus, &msg.0, OrderState::Cancelled, event).await
            }
            .into_actor(self),
        ))
    }
}

// ---------------------------------------------------------------- handlers

#[path = "consumers.rs"]
mod consumers;

pub use consumers::{Coupons, Deadlines, Inventory, Notifications, Payments};

// ------------------------------------------------------------------ routes

#[derive(Serialize)]
struct OrderView {
    id: String,
    user_id: u64,
    amount: u64,
    state: OrderState,
    coupon: Option<String>,
    /// How many times a coupon was issued for it (at most 1).
    coupons_issued: usize,
    inventory: Vec<String>,
    events_seen: Vec<String>,
}

#[post("/orders")]
async fn create_order(
    book: web::Data<Addr<OrderBook>>,
    body: web::Json<NewOrder>,
) -> Result<HttpResponse, HttpError> {
    if body.items.is_empty() || body.items.iter().any(|i| i.qty == 0 || i.sku.is_empty()) {
        return Ok(HttpResponse::BadRequest().json(serde_json::json!({
            "error": "invalid_order",
            "message": "an order needs at least one item, each with a sku and a qty above 0"
        })));
    }
    let order = book
        .send(Create(body.into_inner()))
        .await
        .map_err(|_| HttpError(weirmq::Error::Closed))??;
    Ok(HttpResponse::Created().json(serde_json::json!({
        "id": order.id,
        "state": order.state,
    })))
}

#[post("/orders/{id}/pay")]
async fn pay_order(
    book: web::Data<Addr<OrderBook>>,
    id: web::Path<String>,
) -> Result<HttpResponse, HttpError> {
    let change = book
        .send(Pay(id.into_inner()))
        .await
        .map_err(|_| HttpError(weirmq::Error::Closed))??;
    Ok(match change {
        Change::Done(o) => {
            HttpResponse::Ok().json(serde_json::json!({"id": o.id, "state": o.state}))
        }
        Change::Unchanged(o) if o.state == OrderState::Paid => {
            HttpResponse::Ok().json(serde_json::json!({"id": o.id, "state": o.state}))
        }
        Change::Unchanged(o) => HttpResponse::Conflict().json(serde_json::json!({
            "error": "not_payable",
            "message": format!("order {} is {:?}", o.id, o.state).to_lowercase(),
        })),
        Change::NotFound => HttpResponse::NotFound().json(serde_json::json!({
            "error": "not_found", "message": "no such order"
        })),
    })
}

#[get("/orders/{id}")]
async fn get_order(bus: web::Data<Bus>, id: web::Path<String>) -> Result<HttpResponse, HttpError> {
    let Some(order) = load_order(&bus, &id).await? else {
        return Ok(HttpResponse::NotFound().json(serde_json::json!({
            "error": "not_found", "message": "no such order"
        })));
    };
    let coupon = bus
        .state_get(coupon_key(&order.id).as_bytes())
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let coupons_issued = bus
        .state_scan(format!("coupon-issued/{}/", order.id).as_bytes())
        .await?
        .len();
    let inventory = bus
        .state_scan(format!("inventory/{}/", order.id).as_bytes())
        .await?
        .into_iter()
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
        .collect();
    let prefix = format!("seen/{}/", order.id);
    let events_seen = bus
        .state_scan(prefix.as_bytes())
        .await?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
        .collect();
    Ok(HttpResponse::Ok().json(OrderView {
        id: order.id,
        user_id: order.user_id,
        amount: order.amount,
        state: order.state,
        coupon,
        coupons_issued,
        inventory,
        events_seen,
    }))
}

/// The consumer groups of this service and their topics.
pub const GROUPS: [(&str, &str); 5] = [
    ("coupon", OrderEvent::TOPIC),
    ("payments", OrderEvent::TOPIC),
    ("inventory", OrderEvent::TOPIC),
    ("notification", OrderEvent::TOPIC),
    ("payment-timeout", PaymentTimeout::TOPIC),
];

// ------------------------------------------------------------------- start

/// The running service.
pub struct Running {
    pub port: u16,
    pub bus: Bus,
    /// Stops the HTTP server.
    pub server: actix_web::dev::ServerHandle,
    /// The running server; resolves when it has stopped.
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    subscriptions: Vec<weirmq::Subscription>,
}

impl Running {
    /// Graceful shutdown from the program (tests): stop accepting and
    /// finish the requests in hand, then drain and close (see `serve`).
    pub async fn stop(self) -> Result<(), weirmq::Error> {
        self.server.stop(true).await;
        self.serve()
            .await
            .map_err(|e| weirmq::Error::Storage(weirmq::StorageError::msg(e.to_string())))
    }

    /// Serves until the server stops — on Ctrl-C or SIGTERM actix-web stops
    /// accepting and finishes the requests in hand — then drains the
    /// subscriptions (deliveries in hand finish, positions are written) and
    /// flushes and closes the store.
    pub async fn serve(self) -> std::io::Result<()> {
        let Running {
            serving,
            bus,
            subscriptions,
            ..
        } = self;
        serving.await.map_err(std::io::Error::other)??;
        info!("shutting down: draining subscriptions, closing the store");
        for s in subscriptions {
            s.drain().await.map_err(std::io::Error::other)?;
        }
        bus.shutdown().await.map_err(std::io::Error::other)
    }
}

/// The business side's settings (what [`start_services`] needs).
#[derive(Debug, Clone)]
pub struct Services {
    /// How long an order may stay unpaid.
    pub payment_timeout: Duration,
    /// Orders of at least this amount (in cents) get a coupon.
    pub coupon_threshold: u64,
    /// How often the coupon service fails a first attempt (0.0 – 1.0).
    pub coupon_failure_rate: f64,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            payment_timeout: Duration::from_secs(30 * 60),
            coupon_threshold: 10_000,
            coupon_failure_rate: 0.0,
        }
    }
}

/// The order book and the consumer groups, running on `bus`.
pub struct Started {
    pub book: Addr<OrderBook>,
    pub subscriptions: Vec<weirmq::Subscription>,
}

/// Starts the business side on `bus` — any bus: the service's own (see
/// [`start`]) or a test's `weirmq::testing::TestBus`, which runs the real
/// payment deadline in virtual time.
pub async fn start_services(bus: &Bus, cfg: Services) -> Result<Started, weirmq::Error> {
    // Order events keep a trace of their lives (the dashboard's message
    // page shows it: published, delivered, retried, dead-lettered, resent).
    bus.create_topic(weirmq::TopicConfig::new(OrderEvent::TOPIC).trace(true))
        .await?;
    let book = OrderBook { bus: bus.clone() }.start();
    let quick = RetryPolicy::fixed(Duration::from_millis(200), 16);
    let mut subs = Vec::new();
    let b = bus.clone();
    let (threshold, rate) = (cfg.coupon_threshold, cfg.coupon_failure_rate);
    subs.push(
        bus.subscribe::<OrderEvent>("coupon")
            .start_from(StartFrom::Earliest)
            .filter(Filter::tags("created")?)
            .retry(quick.clone())
            .members(2, move || Coupons {
                bus: b.clone(),
                threshold,
                failure_rate: rate,
            })
            .start()
            .await?,
    );
    let (b, timeout) = (bus.clone(), cfg.payment_timeout);
    subs.push(
        bus.subscribe::<OrderEvent>("payments")
            .start_from(StartFrom::Earliest)
            .filter(Filter::tags("created")?)
            .retry(quick.clone())
            .members(2, move || Payments {
                bus: b.clone(),
                timeout,
            })
            .start()
            .await?,
    );
    let b = bus.clone();
    subs.push(
        bus.subscribe::<OrderEvent>("inventory")
            .start_from(StartFrom::Earliest)
            .ordering(Ordering::Fifo)
            .retry(quick.clone())
            .members(4, move || Inventory { bus: b.clone() })
            .start()
            .await?,
    );
    let b = bus.clone();
    subs.push(
        bus.subscribe::<OrderEvent>("notification")
            .start_from(StartFrom::Earliest)
            .retry(quick.clone())
            .members(1, move || Notifications { bus: b.clone() })
            .start()
            .await?,
    );
    let (b, bk) = (bus.clone(), book.clone());
    subs.push(
        bus.subscribe::<PaymentTimeout>("payment-timeout")
            .start_from(StartFrom::Earliest)
            .retry(quick)
            .members(2, move || Deadlines {
                bus: b.clone(),
                book: bk.clone(),
            })
            .start()
            .await?,
    );
    Ok(Started {
        book,
        subscriptions: subs,
    })
}

/// Opens the bus, starts the consumer groups and the HTTP server (bound,
/// not yet awaited). Must run inside the actix-web `System`: the bus's
/// actors and the handler actors start on its arbiters; no second runtime.
pub async fn start(cfg: Config) -> std::io::Result<Running> {
    // Prometheus metrics at GET /metrics: installed before the bus opens, so
    // every subscription's counters record into it.
    weirmq::web::install_metrics().map_err(std::io::Error::other)?;
    let bus = Bus::builder()
        .data_dir(&cfg.data_dir)
        .open()
        .await
        .map_err(std::io::Error::other)?;
    let Started {
        book,
        subscriptions: subs,
    } = start_services(
        &bus,
        Services {
            payment_timeout: cfg.payment_timeout,
            coupon_threshold: cfg.coupon_threshold,
            coupon_failure_rate: cfg.coupon_failure_rate,
        },
    )
    .await
    .map_err(std::io::Error::other)?;
    let (data_bus, data_book) = (web::Data::new(bus.clone()), web::Data::new(book));
    // The admin API and dashboard: reads for anyone who reaches the port
    // (127.0.0.1 only, see `bind` below), changes with the token.
    let mut admin = weirmq::web::admin(bus.clone());
    if let Some(t) = &cfg.admin_token {
        admin = admin.token(t.clone());
    }
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data_bus.clone())
            .app_data(data_book.clone())
            .service(create_order)
            .service(pay_order)
            .service(get_order)
            .service(admin.clone())
            .service(weirmq::web::metrics())
    })
    .workers(2)
    .bind(("127.0.0.1", cfg.port))?;
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    Ok(Running {
        port,
        bus,
        server: handle,
        serving: actix_web::rt::spawn(server),
        subscriptions: subs,
    })
}
