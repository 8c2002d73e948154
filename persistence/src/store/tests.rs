//! Round trips of the store's encodings, range reads over random commits,
//! and index rebuilds.

use super::*;
use weirmq_bus::OutgoingMessage;

fn msg(i: usize) -> Message {
    Message::prepare(
        OutgoingMessage::new("t", format!("m{i}").into_bytes()),
        Arc::from("t"),
    )
}

#[test]
fn records_round_trip_through_range_reads() {
    let (mut store, rec) = Store::open(StoreConfig::default()).unwrap();
    assert!(rec.topics.is_empty());
    let id = store
        .create_topic("t", 2, &TopicSettings::default())
        .unwrap();
    let key = QueueKey {
        topic_id: id,
        queue: 1,
    };
    let mut b = RecordBuilder::default();
    let msgs: Vec<Message> = (0..1500).map(msg).collect();
    for (i, m) in msgs.iter().enumerate() {
        b.push(key, i as u64, m);
    }
    let records = b.finish();
    // Records close at MAX_MESSAGES messages or MAX_BYTES bytes.
    let firsts: Vec<u64> = records.closed.iter().map(|c| c.first).collect();
    // ~50-byte messages: the byte limit closes them first.
    assert!(firsts.len() > 1500_usize.div_ceil(512), "{firsts:?}");
    for w in firsts.windows(2) {
        assert!(
            w[1] - w[0] <= RecordBuilder::MAX_MESSAGES as u64,
            "{firsts:?}"
        );
    }
    let index = store.index_records(records.closed);
    store
        .write(CommitWrites {
            index,
            ..CommitWrites::log(records.log)
        })
        .unwrap();
    let r = store.reader();
    let t: Arc<str> = Arc::from("t");
    for (from, end, max) in [
        (0, 1500, 2000),
        (511, 514, 10),
        (700, 1500, 5),
        (1499, 1500, 1),
    ] {
        let got = r.read_range(&t, key, from, end, max).unwrap();
        let want: Vec<u64> = (from..end).take(max).collect();
        assert_eq!(got.iter().map(|m| m.offset()).collect::<Vec<_>>(), want);
        for m in &got {
            assert_eq!(m.body(), msgs[m.offset() as usize].body());
        }
    }
    assert_eq!(store.queue_end(key).unwrap(), 1500);
}

use proptest::prelude::*;

/// One commit: (queue, bodies) appends.
fn commits() -> impl Strategy<Value = Vec<Vec<(u32, Vec<usize>)>>> {
    let body = prop_oneof![8 => 0usize..600, 1 => 20_000usize..70_000];
    let append = (0u32..3, proptest::collection::vec(body, 1..40));
    proptest::collection::vec(proptest::collection::vec(append, 1..6), 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The queue logs behave like a map (queue, offset) -> message, across
    /// record boundaries and a reopen.
    #[test]
    fn queue_logs_match_a_btreemap_model(
        commits in commits(),
        reads in proptest::collection::vec((0u32..3, 0u64..800, 0u64..800, 1usize..300), 1..20),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig { path: Some(dir.path().to_path_buf()), ..Default::default() };
        let t: Arc<str> = Arc::from("t");
        let mut model: BTreeMap<(u32, u64), Message> = BTreeMap::new();
        let mut ends = [0u64; 3];
        {
            let (mut store, _) = Store::open(cfg.clone()).unwrap();
            let id = store.create_topic("t", 3, &TopicSettings::default()).unwrap();
            prop_assert_eq!(id, 0);
            for commit in &commits {
                let mut b = RecordBuilder::default();
                for (q, bodies) in commit {
                    for len in bodies {
                        let m = Message::prepare(
                            OutgoingMessage::new("t", vec![(*len % 251) as u8; *len]),
                            t.clone(),
                        )
                        .with_position(*q, ends[*q as usize]);
                        b.push(QueueKey { topic_id: 0, queue: *q }, m.offset(), &m);
                        model.insert((*q, m.offset()), m);
                        ends[*q as usize] += 1;
                    }
                }
                let r = b.finish();
                let index = store.index_records(r.closed);
                store
                    .write(CommitWrites {
                        index,
                        ..CommitWrites::log(r.log)
                    })
                    .unwrap();
            }
            store.sync().unwrap();
        }
        let (store, recovery) = Store::open(cfg).unwrap();
        // The topic's queues, then its priority lanes (empty here).
        let mut want = ends.to_vec();
        want.resize(weirmq_bus::queues_with_lanes(ends.len() as u32) as usize, 0);
        prop_assert_eq!(&recovery.topics[0].ends, &want);
        let r = store.reader();
        for (q, from, end, max) in reads {
            let key = QueueKey { topic_id: 0, queue: q };
            let got = r.read_range(&t, key, from, end, max).unwrap();
            let want: Vec<&Message> = model
                .range((q, from)..(q, end.max(from)))
                .take(max)
                .map(|(_, m)| m)
                .collect();
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                prop_assert_eq!(&**g, w);
            }
        }
    }
}

#[test]
fn missing_index_summaries_are_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        path: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let msgs: Vec<Message> = (0..3000)
        .map(|i| {
            Message::prepare(
                OutgoingMessage::new("t", vec![1; 8]).key(format!("k{i}")),
                Arc::from("t"),
            )
            .with_position(0, i)
        })
        .collect();
    let key = QueueKey {
        topic_id: 0,
        queue: 0,
    };
    {
        let (mut store, _) = Store::open(cfg.clone()).unwrap();
        store
            .create_topic("t", 1, &TopicSettings::default())
            .unwrap();
        // A store written before summaries existed (or a crash between
        // the log and the index): records without summaries.
        let mut b = RecordBuilder::default();
        for m in &msgs {
            b.push(key, m.offset(), m);
        }
        store.write(CommitWrites::log(b.finish().log)).unwrap();
        store.sync().unwrap();
    }
    let (store, recovery) = Store::open(cfg).unwrap();
    // Queue 0, then the nine empty priority lanes.
    assert_eq!(recovery.topics[0].ends, [vec![3000], vec![0; 9]].concat());
    let r = store.reader();
    let t: Arc<str> = Arc::from("t");
    // Two full spans written at open, the rest is the open span's tail.
    assert_eq!(r.index.len(), 2);
    for i in [0usize, 511, 512, 1023, 1024, 2047, 2048, 2999] {
        let found = r.find_id(&[(t.clone(), 0, 1)], msgs[i].id()).unwrap();
        assert_eq!(found.map(|m| m.offset()), Some(i as u64));
        assert_eq!(r.find_key(&t, 0, 1, &format!("k{i}"), 10).unwrap().len(), 1);
    }
}

#[test]
fn offsets_round_trip() {
    let s = OffsetState {
        committed: 7,
        acked_above: vec![9, 12, 13, 14, 20],
    };
    assert_eq!(s.encode().len(), 12 + 3 * 12, "three runs");
    assert_eq!(OffsetState::decode(&s.encode()).unwrap(), s);
    assert!(OffsetState::decode(&[1, 2, 3]).is_err());
}
