#![allow(clippy::unwrap_used)]
//! Reading and following the event log on the in-memory fakes.

use std::time::Duration;

use vmkit_core::testing::FakeHost;
use vmkit_core::{
    CreateRequest, EventFeed, EventKind, NewEvent, StateStore, UserId, VmName, VmSpec,
};

fn name(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

async fn create(host: &FakeHost, n: &str) {
    let request = CreateRequest::new(UserId::LOCAL, VmSpec::new("tiny")).name(name(n));
    host.manager.create(request).await.unwrap();
}

/// Stores `count` events without broadcasting them, as if their broadcasts were
/// lost.
async fn store_unannounced(host: &FakeHost, count: usize) {
    for i in 0..count {
        let kind = EventKind::Reconciled {
            action: format!("unannounced {i}"),
        };
        host.store
            .append_event(
                NewEvent::host(kind),
                &vmkit_core::EventRetention::unlimited(),
            )
            .await
            .unwrap();
    }
}

/// The sequence numbers of the next events of `feed` up to and including `last`.
async fn seqs_until(feed: &mut EventFeed, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.last() != Some(&last) {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .unwrap_or_else(|_| panic!("no event after {seqs:?}; waiting for {last}"))
            .unwrap()
            .expect("the manager lives");
        seqs.push(event.seq);
    }
    seqs
}

#[tokio::test]
async fn feed_takes_events_missing_from_the_broadcast_from_the_store() {
    let host = FakeHost::new().await;
    let mut feed = host.manager.follow_events(0);
    create(&host, "first").await;
    assert_eq!(seqs_until(&mut feed, 2).await, vec![1, 2], "caught up");
    // The feed now waits on the broadcast, which brings 6 after 2.
    store_unannounced(&host, 3).await;
    create(&host, "second").await;
    assert_eq!(seqs_until(&mut feed, 7).await, vec![3, 4, 5, 6, 7]);
    assert_eq!(feed.last_seq(), 7);
}

#[tokio::test]
async fn feed_pages_through_a_long_log_and_catches_up_after_falling_behind_the_broadcast() {
    let host = FakeHost::new().await;
    store_unannounced(&host, 1200).await;
    let mut feed = host.manager.follow_events(0);
    create(&host, "web").await;
    assert_eq!(
        seqs_until(&mut feed, 1202).await,
        (1..=1202).collect::<Vec<_>>(),
        "the stored log, read page by page"
    );
    // Far more than the broadcast holds, none of it read yet: the feed lags.
    for _ in 0..300 {
        host.manager.stop(&name("web")).await.unwrap();
        host.manager.start(&name("web")).await.unwrap();
    }
    let last = host.manager.last_event_seq().await.unwrap();
    assert_eq!(last, 1202 + 300 * 4);
    assert_eq!(
        seqs_until(&mut feed, last).await,
        (1203..=last).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn feed_starts_after_its_cursor() {
    let host = FakeHost::new().await;
    store_unannounced(&host, 5).await;
    let mut feed = host.manager.follow_events(3);
    assert_eq!(feed.last_seq(), 3);
    create(&host, "web").await;
    assert_eq!(seqs_until(&mut feed, 7).await, vec![4, 5, 6, 7]);
}

#[tokio::test]
async fn newest_events_are_the_last_ones_oldest_first() {
    let host = FakeHost::new().await;
    assert!(host.manager.newest_events(10).await.unwrap().is_empty());
    store_unannounced(&host, 30).await;
    let seqs = |events: Vec<vmkit_core::Event>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(host.manager.newest_events(3).await.unwrap()),
        vec![28, 29, 30]
    );
    assert_eq!(
        seqs(host.manager.newest_events(100).await.unwrap()).len(),
        30,
        "a limit beyond the log is the whole log"
    );
}
