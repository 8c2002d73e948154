//! Bad input gets a typed error with an actionable message, and nothing is
//! stored.

mod support;

use support::*;
use weirmq::prelude::*;
use weirmq::{Error, Limits, NameKind, OutgoingMessage, Resend, ResetTo};

async fn stored(bus: &Bus, topic: &str) -> u64 {
    match bus.positions("probe", topic).await {
        Ok(p) => p.iter().map(|p| p.max).sum(),
        Err(_) => 0,
    }
}

#[actix::test]
async fn each_limit_has_its_typed_error_and_stores_nothing() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    bus.create_topic(TopicConfig::new("t")).await.unwrap();
    let raw = |m: OutgoingMessage| {
        let bus = bus.clone();
        async move { bus.publish_raw(m, Durability::Flushed).await }
    };

    type Expect = fn(&Error) -> bool;
    let cases: Vec<(OutgoingMessage, Expect)> = vec![
        (OutgoingMessage::new("a b", vec![]), |e| {
            matches!(
                e,
                Error::InvalidName {
                    kind: NameKind::Topic,
                    ..
                }
            )
        }),
        (OutgoingMessage::new("x".repeat(128), vec![]), |e| {
            matches!(
                e,
                Error::InvalidName {
                    kind: NameKind::Topic,
                    ..
                }
            )
        }),
        (OutgoingMessage::new("%DLQ%g", vec![]), |e| {
            matches!(e, Error::ReservedTopic { .. })
        }),
        (
            OutgoingMessage::new("t", vec![0; 4 * 1024 * 1024 + 1]),
            |e| {
                matches!(
                    e,
                    Error::BodyTooLarge {
                        size: 4194305,
                        max: 4194304
                    }
                )
            },
        ),
        (OutgoingMessage::new("t", vec![]).tag(""), |e| {
            matches!(
                e,
                Error::InvalidName {
                    kind: NameKind::Tag,
                    ..
                }
            )
        }),
        (OutgoingMessage::new("t", vec![]).tag("a|b"), |e| {
            matches!(
                e,
                Error::InvalidName {
                    kind: NameKind::Tag,
                    ..
                }
            )
        }),
        (OutgoingMessage::new("t", vec![]).key(""), |e| {
            matches!(
                e,
                Error::InvalidName {
                    kind: NameKind::Key,
                    ..
                }
            )
        }),
        (
            OutgoingMessage {
                properties: (0..129).map(|i| (format!("p{i}"), "v".into())).collect(),
                ..OutgoingMessage::new("t", vec![])
            },
            |e| {
                matches!(
                    e,
                    Error::TooManyProperties {
                        count: 129,
                        max: 128
                    }
                )
            },
        ),
        (
            OutgoingMessage::new("t", vec![]).property("big", "v".repeat(16 * 1024)),
            |e| matches!(e, Error::PropertiesTooLarge { .. }),
        ),
    ];
    for (m, is_expected) in cases {
        let topic = m.topic.clone();
        let err = raw(m.clone()).await.expect_err("must be rejected");
        assert!(
            is_expected(&err.error),
            "{topic}: unexpected {:?}",
            err.error
        );
        assert_eq!(*err.message, m, "the message is handed back");
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(stored(&bus, "t").await, 0, "nothing was stored");
    assert_eq!(
        bus.topics().await,
        vec![TopicConfig::new("t")],
        "no topic was created"
    );

    // The largest allowed body is accepted.
    raw(OutgoingMessage::new("t", vec![0; 4 * 1024 * 1024]))
        .await
        .unwrap();
    assert_eq!(stored(&bus, "t").await, 1);

    let e = bus
        .create_topic(TopicConfig::new("t").queues(8))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TopicConflict { .. }), "{e}");
    let e = bus
        .create_topic(TopicConfig::new("zero").queues(0))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn limits_are_configurable_and_messages_say_what_to_do() {
    let bus = Bus::builder()
        .in_memory()
        .limits(Limits {
            max_body_bytes: 10,
            ..Limits::default()
        })
        .open()
        .await
        .unwrap();
    let e = bus
        .publish(&Num {
            n: 12345678901234567,
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BodyTooLarge { max: 10, .. }));
    assert!(e.to_string().contains("limit of 10 bytes"), "{e}");
    let e = bus
        .publish_with(&Num { n: 1 }, Publish::new().tag("vip|gold"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("may not contain `|`"), "{e}");
    let e = bus
        .subscribe::<Num>("bad group")
        .members(1, recorders(&Log::default(), ack_all()))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidName {
                kind: NameKind::Group,
                ..
            }
        ),
        "{e}"
    );
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn operations_after_shutdown_fail_with_closed() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    bus.shutdown().await.unwrap();
    assert!(matches!(
        bus.publish(&Num { n: 1 }).await,
        Err(Error::Closed)
    ));
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_data_dir_that_is_a_file_is_refused() {
    let dir = temp_dir();
    let file = dir.path().join("file");
    std::fs::write(&file, b"hello").unwrap();
    let e = Bus::builder().data_dir(&file).open().await.unwrap_err();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
    assert!(e.to_string().contains("not a directory"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");
}

#[actix::test]
async fn a_foreign_non_empty_directory_is_refused_and_left_alone() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["notes.txt"]);
}

#[actix::test]
async fn a_directory_in_use_is_refused() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
    assert!(e.to_string().contains("locked"), "{e}");
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_corrupt_store_is_a_typed_error_not_a_panic() {
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        for n in 0..100 {
            bus.publish(&Num { n }).await.unwrap();
        }
        bus.shutdown().await.unwrap();
    }
    // Overwrite the data file with garbage, keeping its size.
    let db = dir.path().join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&db, &garbage).unwrap();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
    assert!(e.to_string().contains("damaged"), "{e}");
    // The refusal holds on every later open: the bus never silently starts
    // empty over a damaged store (sled itself may rewrite the damaged file
    // while recovering; see ARCHITECTURE.md).
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");

    // A garbled config file is refused too.
    std::fs::write(dir.path().join("conf"), b"not a sled config").unwrap();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
}

#[test]
fn opening_outside_an_actix_system_is_an_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt.block_on(Bus::builder().in_memory().open()).unwrap_err();
    assert!(e.to_string().contains("actix System"), "{e}");
}

/// Regression (issue 13, defect 9): `positions` and `dead_letters` took
/// invalid group names (`""`, `"a b"`) and answered empty, while
/// `reset_offsets` refused them. Every call that names a group validates it
/// the same way.
#[actix::test]
async fn every_call_naming_a_group_refuses_an_invalid_name() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    bus.publish(&Num { n: 1 }).await.unwrap();
    for bad in ["", "a b", "tab\there", &"g".repeat(300)] {
        let is_group_error = |e: Error| {
            matches!(
                e,
                Error::InvalidName {
                    kind: NameKind::Group,
                    ..
                }
            )
        };
        let t = Num::TOPIC;
        assert!(
            is_group_error(bus.positions(bad, t).await.unwrap_err()),
            "positions({bad:?})"
        );
        assert!(is_group_error(
            bus.reset_offsets(bad, t, ResetTo::Earliest)
                .await
                .unwrap_err()
        ));
        assert!(
            is_group_error(bus.dead_letters(bad, 0, 10).await.unwrap_err()),
            "dead_letters({bad:?})"
        );
        assert!(is_group_error(
            bus.dead_letter_count(bad).await.unwrap_err()
        ));
        assert!(is_group_error(
            bus.resend_dead_letters(bad, Resend::All).await.unwrap_err()
        ));
        assert!(is_group_error(
            bus.purge_dead_letters(bad).await.unwrap_err()
        ));
        let sub = bus
            .subscribe::<Num>(bad)
            .members(1, recorders(&Log::default(), ack_all()));
        assert!(
            is_group_error(sub.start().await.unwrap_err()),
            "subscribe({bad:?})"
        );
    }
    bus.shutdown().await.unwrap();
}

/// No Debug formatting of inner errors, no sled internals: a message a user
/// can act on.
fn assert_plain(e: &Error) {
    let text = e.to_string();
    for bad in ["backtrace", "Some(", "Inline(", "Os {", "kind:", "Error {"] {
        assert!(!text.contains(bad), "`{bad}` in the message: {text}");
    }
}

/// Regression (issue 13, defect 3): a data directory holding the user's own
/// file named `db` was taken over: sled replaced the file and an empty bus
/// started. Now a non-empty directory without weirmq's marker is refused
/// and left exactly as it was.
#[actix::test]
async fn a_directory_with_a_foreign_file_named_db_is_refused_and_left_alone() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("db"), b"SQLite format 3\0 my precious data").unwrap();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::DataDir { ref path, .. } if path == dir.path()),
        "{e}"
    );
    assert!(
        e.to_string().contains("weirmq.store"),
        "names the marker it looked for: {e}"
    );
    assert_plain(&e);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["db"], "nothing added");
    assert_eq!(
        std::fs::read(dir.path().join("db")).unwrap(),
        b"SQLite format 3\0 my precious data"
    );
}

/// Regression (issue 13, defect 3): a store whose marker is there but whose
/// sled data file is gone was reported as "holds no weirmq store; point the
/// bus at an empty directory" — an invitation to start empty. It is a
/// damaged store.
#[actix::test]
async fn a_store_whose_data_file_is_missing_is_reported_damaged() {
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        bus.publish(&Num { n: 1 }).await.unwrap();
        bus.shutdown().await.unwrap();
    }
    std::fs::remove_file(dir.path().join("db")).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
    assert!(
        text.contains("damaged") && text.contains("backup"),
        "{text}"
    );
    assert!(
        !text.contains("point the bus at an empty"),
        "does not invite starting empty: {text}"
    );
    assert_plain(&e);
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "nothing written");
}

/// Regression (issue 13, defect 4): corruption at the start of the data
/// file surfaced as `Read corrupted data at file offset Some(Inline(520))
/// backtrace ()`.
#[actix::test]
async fn corruption_at_the_start_of_the_data_file_is_explained_plainly() {
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        for n in 0..200 {
            bus.publish(&Num { n }).await.unwrap();
        }
        bus.shutdown().await.unwrap();
    }
    let db = dir.path().join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = !*b;
    }
    std::fs::write(&db, &bytes).unwrap();
    let e = Bus::builder()
        .data_dir(dir.path())
        .open()
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::DataDir { .. }), "{e}");
    assert!(
        text.contains(&dir.path().display().to_string()),
        "names the directory: {text}"
    );
    assert!(text.contains("backup"), "says what to do: {text}");
    assert_plain(&e);
}

/// Found while testing defect 4: a data file damaged in the middle was
/// "recovered" by sled as its intact prefix, and the bus opened with 1 of
/// 200 messages, silently. Each clean shutdown now records the queues'
/// ends, and a store that comes back shorter is refused as damaged.
#[actix::test]
async fn a_store_that_comes_back_shorter_than_it_was_shut_down_is_refused() {
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        for n in 0..200 {
            bus.publish(&Num { n }).await.unwrap();
        }
        bus.shutdown().await.unwrap();
    }
    let db = dir.path().join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().skip(1000).take(100) {
        *b = 0;
    }
    std::fs::write(&db, &bytes).unwrap();
    for _ in 0..2 {
        let e = Bus::builder()
            .data_dir(dir.path())
            .open()
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::DataDir { .. }), "{e}");
        assert!(
            text.contains("damaged") && text.contains("held") && text.contains("backup"),
            "{text}"
        );
        assert_plain(&e);
    }
}

#[actix::test]
async fn an_interrupted_initialisation_is_finished_on_the_next_open() {
    let dir = temp_dir();
    // What a crash right after the marker was first written leaves.
    std::fs::write(dir.path().join("weirmq.store"), b"initialising").unwrap();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let r = bus.publish(&Num { n: 7 }).await.unwrap();
    bus.shutdown().await.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("weirmq.store")).unwrap(),
        b"weirmq-store-v1"
    );
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let got = bus
        .read_queue(Num::TOPIC, r.queue, r.offset, 1)
        .await
        .unwrap();
    assert_eq!(got[0].id(), r.message_id);
    bus.shutdown().await.unwrap();
}
