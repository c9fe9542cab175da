//! Two instances of a service on one durable consumer, against a real
//! nats-server and PostgreSQL: the one whose relay leads takes every event
//! while it keeps up, the other takes over at once when it stops leading or
//! is gone, takes what it leaves when it falls behind, and no event is
//! applied twice or waits for a redelivery.
mod common;

use common::*;
use tokio::sync::watch;

/// Commits `n` pings and publishes them.
async fn publish(s: &Setup, n: u32) {
    s.emit(n).await;
    s.relay_until_sent(s.relay(1000), Duration::from_secs(20))
        .await;
}

async fn applied_once(s: &Setup, n: usize) {
    eventually(
        &format!("{n} events applied"),
        Duration::from_secs(20),
        || async { s.effect_counts().await.len() == n },
    )
    .await;
    assert!(
        s.effect_counts().await.iter().all(|&applied| applied == 1),
        "an event was applied twice"
    );
}

async fn pulling_at(what: &str, consumer: &RunningConsumer, priority: usize) {
    eventually(what, Duration::from_secs(20), || async {
        *consumer.stats.pulling_at.lock().unwrap() == Some(priority)
    })
    .await;
}

/// Two instances on durable `svc`: a, whose relay leads, and b, whose does
/// not, with their handlers, each with the sender that moves its
/// leadership; once both pull.
async fn leader_and_standby(
    s: &Setup,
    a_handler: Arc<CountEffects>,
    b_handler: Arc<CountEffects>,
) -> (
    (RunningConsumer, watch::Sender<Option<bool>>),
    (RunningConsumer, watch::Sender<Option<bool>>),
) {
    let (a_leads, a_leading) = watch::channel(Some(true));
    let (b_leads, b_leading) = watch::channel(Some(false));
    let a = s.consume_preferred(a_handler, a_leading, "svc");
    let b = s.consume_preferred(b_handler, b_leading, "svc");
    pulling_at("a pulls first", &a, 0).await;
    pulling_at("b pulls behind it", &b, 1).await;
    ((a, a_leads), (b, b_leads))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leading_instance_takes_every_event_and_the_other_takes_over() {
    let s = setup().await;
    let handler = Arc::new(CountEffects {
        delay: Duration::ZERO,
    });
    let ((a, a_leads), (b, b_leads)) = leader_and_standby(&s, handler.clone(), handler).await;
    let consumer = s.consumer("svc").await;
    assert!(choreo::provision::pulls_by_priority(&consumer));

    // While a leads and keeps up, every event is its own.
    publish(&s, 40).await;
    applied_once(&s, 40).await;
    assert_eq!(a.stats.applied.load(Ordering::SeqCst), 40);
    assert_eq!(b.stats.applied.load(Ordering::SeqCst), 0);

    // Leadership moves to b: both pull again, each at its new place.
    a_leads.send(Some(false)).unwrap();
    b_leads.send(Some(true)).unwrap();
    pulling_at("a pulls behind", &a, 1).await;
    pulling_at("b pulls first", &b, 0).await;
    publish(&s, 40).await;
    applied_once(&s, 80).await;
    assert_eq!(a.stats.applied.load(Ordering::SeqCst), 40);
    assert_eq!(b.stats.applied.load(Ordering::SeqCst), 40);

    // b is gone: a, pulling behind it, gets the events at once, not after
    // their ack wait.
    b.stop().await;
    publish(&s, 40).await;
    applied_once(&s, 120).await;
    assert_eq!(a.stats.applied.load(Ordering::SeqCst), 80);
    assert_eq!(
        a.stats.redeliveries.load(Ordering::SeqCst),
        0,
        "an event waited for its redelivery"
    );
    a.stop().await;
    drop((a_leads, b_leads));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_that_nobody_ranks_take_turns() {
    let s = setup().await;
    let handler = Arc::new(CountEffects {
        delay: Duration::from_millis(20),
    });
    // Two consumers without a relay to rank them pull at the same place.
    let a = s.consume(handler.clone(), 1, "svc");
    let b = s.consume(handler.clone(), 1, "svc");
    pulling_at("a pulls", &a, 0).await;
    pulling_at("b pulls", &b, 0).await;
    publish(&s, 40).await;
    applied_once(&s, 40).await;
    assert!(a.stats.applied.load(Ordering::SeqCst) > 0);
    assert!(b.stats.applied.load(Ordering::SeqCst) > 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_instance_takes_what_the_leading_one_leaves_when_it_falls_behind() {
    let s = setup().await;
    // 10 ms per event: the leading instance cannot keep up with 500 at once.
    let handler = Arc::new(CountEffects {
        delay: Duration::from_millis(10),
    });
    let ((a, _a_leads), (b, _b_leads)) = leader_and_standby(&s, handler.clone(), handler).await;
    publish(&s, 500).await;
    applied_once(&s, 500).await;
    let (by_a, by_b) = (
        a.stats.applied.load(Ordering::SeqCst),
        b.stats.applied.load(Ordering::SeqCst),
    );
    assert_eq!(by_a + by_b, 500);
    assert!(by_a > 0 && by_b > 0, "a applied {by_a}, b {by_b}");
    a.stop().await;
    b.stop().await;
}

/// Moves instance a between the front and the back twenty times, each
/// time while events flow (`to_front`: to the front; else to the back) and
/// back again while nothing flows. When it moves, it asks at its new place
/// from then on and reads what the broker sends its requests at the old one
/// until they are over, so no event sent meanwhile waits for its ack wait.
async fn move_among_events(to_front: bool) {
    let s = setup().await;
    let handler = Arc::new(CountEffects {
        delay: Duration::ZERO,
    });
    let (leads, leading) = watch::channel(Some(true));
    let a = s.consume_preferred(handler, leading, "svc");
    pulling_at("a pulls first", &a, 0).await;
    let relay_shutdown = CancellationToken::new();
    let relay = tokio::spawn(s.relay(1000).run(relay_shutdown.clone()));
    let (from, to) = if to_front { (1, 0) } else { (0, 1) };

    let mut emitted = 0;
    for _ in 0..20 {
        applied_once(&s, emitted).await;
        leads.send(Some(!to_front)).unwrap();
        pulling_at("a pulls where it starts", &a, from).await;
        // An event every millisecond or two, and a moves among them.
        for i in 0..30 {
            s.emit(1).await;
            emitted += 1;
            if i == 10 {
                leads.send(Some(to_front)).unwrap();
            }
        }
        pulling_at("a pulls where it moved", &a, to).await;
    }
    applied_once(&s, emitted).await;
    assert_eq!(
        a.stats.redeliveries.load(Ordering::SeqCst),
        0,
        "an event sent while a moved waited for its redelivery"
    );
    relay_shutdown.cancel();
    relay.await.unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_while_an_instance_begins_to_lead_are_handed_on_not_redelivered() {
    move_among_events(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_while_an_instance_stops_leading_are_handed_on_not_redelivered() {
    move_among_events(false).await;
}

/// An instance that shuts down hands back what the broker sent it and it
/// had not applied: the other instance applies it at once, not after its
/// ack wait (here longer than the test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_shuts_down_hands_back_what_it_was_sent() {
    let mut s = setup().await;
    s.config.ack_wait_secs = 120;
    // a takes 20 ms an event, so what the broker sends it waits in its
    // lane and its subscription; b keeps up.
    let slow = Arc::new(CountEffects {
        delay: Duration::from_millis(20),
    });
    let quick = Arc::new(CountEffects {
        delay: Duration::ZERO,
    });
    let ((a, _a_leads), (b, _b_leads)) = leader_and_standby(&s, slow, quick).await;

    publish(&s, 300).await;
    eventually("a applies some", Duration::from_secs(20), || async {
        a.stats.applied.load(Ordering::SeqCst) >= 10
    })
    .await;
    a.stop().await;
    applied_once(&s, 300).await;
    assert!(
        b.stats.redeliveries.load(Ordering::SeqCst) > 0,
        "a had nothing to hand back: the test showed nothing"
    );
    b.stop().await;
}
