//! Baselines measured in the same run: raw sled and a raw actix mailbox.

use crate::*;

pub(super) fn sled_baseline(
    name: &str,
    dir: &Path,
    n: u64,
    payload: usize,
    batch: usize,
    flush: bool,
) -> Res {
    let db = sled::open(dir).expect("sled");
    let tree = db.open_tree("bench").expect("tree");
    let value = vec![7u8; payload];
    let start = Instant::now();
    let mut i = 0u64;
    while i < n {
        if batch == 1 {
            tree.insert(i.to_be_bytes(), value.as_slice())
                .expect("insert");
            i += 1;
        } else {
            let mut b = sled::Batch::default();
            for _ in 0..batch.min((n - i) as usize) {
                b.insert(&i.to_be_bytes(), value.as_slice());
                i += 1;
            }
            tree.apply_batch(b).expect("batch");
            if flush {
                db.flush().expect("flush");
            }
        }
    }
    Res::new(name, n, payload, start.elapsed()).baseline()
}

#[derive(actix::Message)]
#[rtype(result = "()")]
pub(super) struct Ping;

pub(super) struct Counter(u64, u64, Option<tokio::sync::oneshot::Sender<()>>);

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<Ping> for Counter {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {
        self.0 += 1;
        if self.0 == self.1 {
            if let Some(tx) = self.2.take() {
                let _ = tx.send(());
            }
        }
    }
}

pub(super) async fn actix_baseline(name: &str, n: u64) -> Res {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let addr = Counter(0, n, Some(tx)).start();
    let start = Instant::now();
    for _ in 0..n {
        addr.do_send(Ping);
    }
    rx.await.expect("counter");
    Res::new(name, n, 0, start.elapsed()).baseline()
}
