//! A durable consumer's pull requests, each at the priority its instance
//! holds when the request goes out.
//!
//! async-nats' pull stream asks at one priority for as long as it lives, so
//! an instance that moved had to open a new stream and drop the old one, and
//! whatever the broker sent the old one in the instant before it saw the drop
//! came again only after the ack wait. Here the requests at each priority
//! reply to a subscription of their own, which stays until the broker has
//! ended every request it holds there: filled, or expired after [`EXPIRES`]
//! (its 408 says how many messages the request still lacked). A move sends
//! the next requests at the new priority and keeps reading the old
//! subscription until its last request is over, so nothing the broker sends
//! is dropped, and the move is whole within [`EXPIRES`].
//!
//! A request the broker ends without a word (its restart, a consumer leader
//! change on a cluster) is taken for gone once nothing has come for
//! [`EXPIRES`] plus [`SILENCE`] after the last request went out.
use std::future::poll_fn;
use std::task::Poll;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull::BatchConfig};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::{Duration, Instant};

/// Messages one request asks for; the next goes out once half are in.
const BATCH: usize = 200;
/// How long the broker holds a request: how long a move's old requests last
/// at the most, and how often an idle instance asks again.
pub const EXPIRES: Duration = Duration::from_secs(1);
/// How long after a request's expiry its end may take to arrive before the
/// requests still counted are taken for gone.
const SILENCE: Duration = Duration::from_millis(500);
/// How long an old priority's subscription waits for the end of its last
/// requests when the broker forgot them (its restart): then it goes anyway.
const OLD_SILENCE: Duration = Duration::from_secs(30);
/// How long [`Pulls::hand_back`] waits for the broker at shutdown.
const HAND_BACK: Duration = Duration::from_secs(2);

/// What [`Pulls::next`] brought.
pub enum Pulled {
    Message(Box<jetstream::Message>),
    /// Every request out now asks at this priority: the last move is whole.
    Settled(Option<usize>),
    /// The broker could not serve a request (it may be away); pulling goes on.
    Hiccup(String),
    /// The consumer is gone or cannot be pulled: get it again.
    Lost(String),
}

/// The requests out at one priority, and the subscription they reply to.
struct Requests {
    priority: Option<usize>,
    inbox: async_nats::Subject,
    subscriber: Subscriber,
    /// Messages the requests still out may bring.
    pending: usize,
    /// When the last request went out.
    sent: Instant,
    /// When the broker last sent anything here.
    heard: Instant,
}

impl Requests {
    /// When the requests still counted are taken for gone: [`SILENCE`]
    /// (at the `current` priority; else [`OLD_SILENCE`]) after the last of
    /// them has expired, or after the broker last sent anything, whichever
    /// is later.
    fn gone_at(&self, current: bool) -> Instant {
        let silence = if current { SILENCE } else { OLD_SILENCE };
        self.sent.max(self.heard) + EXPIRES + silence
    }
}

/// A pull consumer's requests, at the current priority and at any the
/// instance has left whose last requests are not over yet.
pub struct Pulls {
    consumer: PullConsumer,
    js: jetstream::Context,
    /// The current priority's first.
    requests: Vec<Requests>,
    /// The last move became whole since [`Pulls::next`] last returned.
    settled: bool,
}

impl Pulls {
    /// Pulls from `consumer` at `priority` (`None`: without a priority group).
    pub async fn open(
        consumer: PullConsumer,
        js: jetstream::Context,
        priority: Option<usize>,
    ) -> anyhow::Result<Pulls> {
        let mut pulls = Pulls {
            consumer,
            js,
            requests: Vec::with_capacity(2),
            settled: false,
        };
        pulls.requests.push(pulls.subscribe(priority).await?);
        pulls.request().await?;
        Ok(pulls)
    }

    /// The priority the next requests ask at.
    pub fn priority(&self) -> Option<usize> {
        self.requests[0].priority
    }

    /// Asks at `priority` from now on. The requests out at the old one
    /// stay until the broker ends them; what it sends them is read as ever.
    pub async fn move_to(&mut self, priority: Option<usize>) -> anyhow::Result<()> {
        if priority == self.priority() {
            return Ok(());
        }
        let requests = match self.requests.iter().position(|r| r.priority == priority) {
            Some(i) => self.requests.remove(i),
            None => self.subscribe(priority).await?,
        };
        self.requests.insert(0, requests);
        self.drop_ended();
        self.request().await
    }

    /// The next message, or what else happened first. Cancel-safe.
    pub async fn next(&mut self) -> Pulled {
        loop {
            if std::mem::take(&mut self.settled) {
                return Pulled::Settled(self.priority());
            }
            if self.requests[0].pending <= BATCH / 2
                && let Err(e) = self.request().await
            {
                return Pulled::Hiccup(format!("cannot send a pull request: {e}"));
            }
            let deadline = self
                .requests
                .iter()
                .enumerate()
                .filter(|(_, r)| r.pending > 0)
                .map(|(i, r)| r.gone_at(i == 0))
                .min();
            let requests = &mut self.requests;
            let arrived = tokio::select! {
                // The old priorities first: what the broker sent their
                // requests it sent before it saw the current ones.
                arrived = poll_fn(|cx| {
                    for (i, requests) in requests.iter_mut().enumerate().rev() {
                        if let Poll::Ready(message) = requests.subscriber.poll_next_unpin(cx) {
                            return Poll::Ready(Some((i, message)));
                        }
                    }
                    Poll::Pending
                }) => arrived,
                () = sleep_until(deadline) => None,
            };
            let Some((i, message)) = arrived else {
                self.forget_silent();
                self.drop_ended();
                continue;
            };
            let Some(message) = message else {
                return Pulled::Lost("the pull subscription ended".into());
            };
            let requests = &mut self.requests[i];
            requests.heard = Instant::now();
            match message.status {
                None | Some(StatusCode::OK) => {
                    requests.pending = requests.pending.saturating_sub(1);
                    if i > 0 {
                        self.drop_ended();
                    }
                    let context = self.js.clone();
                    return Pulled::Message(Box::new(jetstream::Message { message, context }));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED) => {
                    let description = message.description.unwrap_or_default();
                    if description == "Consumer Deleted" || description == "Consumer is push based"
                    {
                        return Pulled::Lost(description);
                    }
                    // What the ended request still lacked.
                    let lacked = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Pending-Messages"))
                        .and_then(|v| v.as_str().parse().ok())
                        .unwrap_or(BATCH);
                    requests.pending = requests.pending.saturating_sub(lacked);
                    if i > 0 {
                        self.drop_ended();
                    }
                    if description.starts_with("Exceeded MaxRequest") {
                        return Pulled::Lost(description);
                    }
                }
                Some(StatusCode::NO_RESPONDERS) => {
                    // The request reached nobody: JetStream or the consumer's
                    // leader is away.
                    requests.pending = requests.pending.saturating_sub(BATCH);
                    return Pulled::Hiccup("no responders to the pull request".into());
                }
                Some(status) => {
                    return Pulled::Hiccup(format!(
                        "pull status {status}: {}",
                        message.description.unwrap_or_default()
                    ));
                }
            }
        }
    }

    /// Hands back what the broker has sent and nobody has read: every
    /// subscription stops (the broker, seeing nobody listen, sends its
    /// requests nothing more) and each message that had arrived is
    /// refused (nak), so that it goes at once to another instance instead
    /// of after its ack wait. Bounded by [`HAND_BACK`] when the broker is
    /// away (what it sent then waits out its ack wait, as it must).
    pub async fn hand_back(mut self) {
        let client = self.js.client();
        let handed_back = async {
            let mut refused = 0usize;
            for requests in &mut self.requests {
                // An unsubscribe and a ping: the subscription ends once the
                // broker has answered, after whatever it sent before.
                if requests.subscriber.drain().await.is_err() {
                    continue;
                }
                while let Some(message) = requests.subscriber.next().await {
                    if matches!(message.status, None | Some(StatusCode::OK)) {
                        let message = jetstream::Message {
                            message,
                            context: self.js.clone(),
                        };
                        if message.ack_with(AckKind::Nak(None)).await.is_ok() {
                            refused += 1;
                        }
                    }
                }
            }
            let _ = client.flush().await;
            refused
        };
        match tokio::time::timeout(HAND_BACK, handed_back).await {
            Ok(0) => {}
            Ok(refused) => tracing::info!(refused, "handed back the events nobody had read"),
            Err(_) => {
                tracing::warn!("the broker did not answer; what it sent waits for its ack wait")
            }
        }
    }

    async fn subscribe(&self, priority: Option<usize>) -> anyhow::Result<Requests> {
        let client = self.js.client();
        let inbox = async_nats::Subject::from(client.new_inbox());
        let subscriber = client.subscribe(inbox.clone()).await?;
        let now = Instant::now();
        Ok(Requests {
            priority,
            inbox,
            subscriber,
            pending: 0,
            sent: now,
            heard: now,
        })
    }

    /// Sends a request at the current priority.
    async fn request(&mut self) -> anyhow::Result<()> {
        let requests = &mut self.requests[0];
        let config = BatchConfig {
            batch: BATCH,
            expires: Some(EXPIRES),
            group: requests
                .priority
                .map(|_| crate::provision::PULL_GROUP.to_owned()),
            priority: requests.priority,
            ..BatchConfig::default()
        };
        self.consumer
            .request_batch(config, requests.inbox.clone())
            .await?;
        requests.pending += BATCH;
        requests.sent = Instant::now();
        Ok(())
    }

    /// Forgets the requests the broker has ended without a word.
    fn forget_silent(&mut self) {
        let now = Instant::now();
        for (i, requests) in self.requests.iter_mut().enumerate() {
            if requests.pending > 0 && now >= requests.gone_at(i == 0) {
                tracing::debug!(
                    priority = ?requests.priority,
                    pending = requests.pending,
                    "pull requests ended without a word; taken for gone"
                );
                requests.pending = 0;
            }
        }
    }

    /// Lets go of the old priorities whose requests are all over; once none
    /// is left, the move is whole.
    fn drop_ended(&mut self) {
        let before = self.requests.len();
        let mut i = 0;
        self.requests.retain(|requests| {
            let keep = i == 0 || requests.pending > 0;
            i += 1;
            keep
        });
        if before > 1 && self.requests.len() == 1 {
            tracing::debug!(priority = ?self.priority(), "a move's old pull requests are over");
            self.settled = true;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
