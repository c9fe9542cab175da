//! PlaceOrder's writes, grouped: the orders placed while a transaction
//! runs share the next one (a group commit, as a consumer lane's batch).
//!
//! Each order is written as it would be alone (its row, lines, first status
//! change, timeline line and `order.created` in the outbox), in arrival
//! order, and the group commits once; its events go out after that commit,
//! together. An order alone, on a quiet service, goes at once. If the
//! group's transaction fails, each of its orders is written again in a
//! transaction of its own, so one that cannot be written costs the others a
//! second try, never their order.
//!
//! The transactions run on connections the writer keeps
//! ([`choreo::db::HeldConnection`], as a consumer's lane does): a pooled
//! connection is pinged when taken and again when given back, two round
//! trips on top of the one statement of an order alone (the order and its
//! outbox row together, no transaction around it). A held connection is checked after a failure
//! instead of before each use, so an order alone whose transaction failed
//! is also written again, once: on a connection the database dropped (it
//! restarted), the second try runs on a fresh one.
use std::sync::{Arc, Mutex};

use choreo::db::HeldConnection;
use choreo::grpc::ApiError;
use choreo::{Envelope, Outbox};
use contracts::order::v1 as api;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::domain::NewOrder;
use crate::store;

/// Orders written in one transaction at most.
const MAX_GROUP: usize = 64;
/// Group transactions that may run at once: while they run, the next
/// group gathers.
const TRANSACTIONS_AT_ONCE: usize = 2;
/// Orders that may wait for a transaction (then PlaceOrder waits to queue).
const QUEUED: usize = 1024;

/// One order to write, and where its outcome goes: the order as written,
/// or `None` when its idempotency key was taken (nothing written).
struct Placement {
    id: Uuid,
    order: NewOrder,
    created: Envelope,
    detail: String,
    written: oneshot::Sender<Result<Option<api::Order>, ApiError>>,
}

/// Writes new orders in groups (see the module). Cloned, it queues to the
/// same writer, which runs until the last clone is dropped.
#[derive(Clone)]
pub struct Placer {
    queue: mpsc::Sender<Placement>,
}

impl Placer {
    pub fn new(pool: PgPool, outbox: Outbox, deadline: std::time::Duration) -> Self {
        let (queue, queued) = mpsc::channel(QUEUED);
        tokio::spawn(write_in_groups(pool, outbox, deadline, queued));
        Placer { queue }
    }

    /// Writes `order` (id `id`, placed with `created`) and returns it as
    /// written once committed, its `order.created` on its way to NATS; or
    /// `None` when its idempotency key was used before.
    pub async fn place(
        &self,
        id: Uuid,
        order: NewOrder,
        created: Envelope,
        detail: String,
    ) -> Result<Option<api::Order>, ApiError> {
        let (written, outcome) = oneshot::channel();
        let placement = Placement {
            id,
            order,
            created,
            detail,
            written,
        };
        self.queue
            .send(placement)
            .await
            .map_err(|_| ApiError::Unavailable("the order service is shutting down".into()))?;
        outcome
            .await
            .map_err(|_| ApiError::Internal("the order writer stopped".into()))?
    }
}

async fn write_in_groups(
    pool: PgPool,
    outbox: Outbox,
    deadline: std::time::Duration,
    mut queued: mpsc::Receiver<Placement>,
) {
    let transactions = Arc::new(Semaphore::new(TRANSACTIONS_AT_ONCE));
    // One per transaction at once; a connection lost with its task (a
    // panic) is replaced by a new one, opened on first use.
    let connections: Arc<Mutex<Vec<HeldConnection>>> = Arc::default();
    loop {
        let permit = transactions
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(first) = queued.recv().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queued.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        let mut db = connections
            .lock()
            .expect("the connections' lock")
            .pop()
            .unwrap_or_else(|| HeldConnection::like(&pool));
        let (connections, outbox) = (connections.clone(), outbox.clone());
        tokio::spawn(async move {
            let _permit = permit;
            write_group(&mut db, &outbox, deadline, group).await;
            connections.lock().expect("the connections' lock").push(db);
        });
    }
}

/// Writes `group` in one transaction and tells each its outcome; if that
/// transaction fails, writes each in a transaction of its own (a group of
/// one too: see the module).
async fn write_group(
    db: &mut HeldConnection,
    outbox: &Outbox,
    deadline: std::time::Duration,
    group: Vec<Placement>,
) {
    let together =
        choreo::outbox::publish_after_commit(write(db, outbox, deadline, group.iter().collect()))
            .await;
    if let Ok(outcomes) = together {
        for (placement, outcome) in group.into_iter().zip(outcomes) {
            let _ = placement.written.send(Ok(outcome));
        }
        return;
    }
    for placement in group {
        let outcome =
            choreo::outbox::publish_after_commit(write(db, outbox, deadline, vec![&placement]))
                .await
                .map(|mut outcomes| outcomes.pop().flatten());
        let _ = placement.written.send(outcome);
    }
}

/// Writes `placements` in order, each order and its `order.created` in
/// one statement: an order alone in just that statement, several in one
/// transaction. Each order as written, or `None` where its key was taken.
async fn write(
    db: &mut HeldConnection,
    outbox: &Outbox,
    deadline: std::time::Duration,
    placements: Vec<&Placement>,
) -> Result<Vec<Option<api::Order>>, ApiError> {
    db.run(async |conn| {
        if let [p] = placements[..] {
            let placed = store::insert(
                conn, outbox, p.id, &p.order, deadline, &p.created, &p.detail,
            )
            .await?;
            return Ok(vec![placed]);
        }
        let mut tx = sqlx::Connection::begin(conn).await?;
        let mut outcomes = Vec::with_capacity(placements.len());
        for p in placements {
            outcomes.push(
                store::insert(
                    &mut tx, outbox, p.id, &p.order, deadline, &p.created, &p.detail,
                )
                .await?,
            );
        }
        tx.commit().await?;
        Ok(outcomes)
    })
    .await
}
