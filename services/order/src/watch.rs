//! Live order watches, bounded and woken by the database.
//!
//! A watch counts itself in its order's row (`orders.watchers`) for as long
//! as it is open, and a status change of an order with watchers notifies
//! `order_status_changed` with the order id in its transaction (so at
//! commit). Orders nobody watches notify nothing: a NOTIFY holds PostgreSQL's
//! cluster-wide notify lock through its commit's WAL flush, so notifying
//! commits go one at a time. One listener per service instance fans the ids
//! out to the open watches, and each watch reads its order's new changes
//! when its id goes by; a slow poll covers a lost notification. Watches are
//! capped in total (per connection, HTTP/2's stream limit caps them), and each
//! ends when the service shuts down.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The channel a status change notifies, with the order id as payload.
pub const CHANNEL: &str = "order_status_changed";
/// How often a watch reads again with no notification (a lost one, a
/// listener reconnecting).
pub const FALLBACK_POLL: Duration = Duration::from_secs(2);

/// What the open watches share.
#[derive(Clone)]
pub struct Watches {
    changed: broadcast::Sender<Uuid>,
    slots: Arc<Semaphore>,
    limit: usize,
    /// This instance's open watches of each order; the order's row counts
    /// instances, so many watches of one order write it twice, not twice each.
    watching: Arc<tokio::sync::Mutex<HashMap<Uuid, usize>>>,
    pub shutdown: CancellationToken,
}

impl Watches {
    pub fn new(limit: usize, shutdown: CancellationToken) -> Self {
        Watches {
            changed: broadcast::channel(1024).0,
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            watching: Arc::default(),
            shutdown,
        }
    }

    /// Counts a watch of order `id`, so that its status changes notify from
    /// now on; `false` when there is no such order. Only this instance's first
    /// watch of the order writes its row (and the lock is held until that
    /// commits, so a second watch never starts before the first is counted).
    pub async fn start(&self, pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
        let mut watching = self.watching.lock().await;
        if let Some(open) = watching.get_mut(&id) {
            *open += 1;
            return Ok(true);
        }
        let exists = crate::store::count_watch(pool, id, 1).await?;
        if exists {
            watching.insert(id, 1);
        }
        Ok(exists)
    }

    /// Ends a watch [`Watches::start`] counted; this instance's last watch
    /// of the order uncounts it in the order's row.
    pub async fn end(&self, pool: &PgPool, id: Uuid) {
        let mut watching = self.watching.lock().await;
        match watching.get_mut(&id) {
            Some(open) if *open > 1 => {
                *open -= 1;
                return;
            }
            Some(_) => {
                watching.remove(&id);
            }
            None => return,
        }
        if let Err(e) = crate::store::count_watch(pool, id, -1).await {
            tracing::debug!(error = %e, %id, "cannot uncount a watch; its order's changes keep notifying");
        }
    }

    /// A place for one more watch, or `None` when all `limit` are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Ids of orders whose status changed, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.changed.subscribe()
    }

    /// Listens on [`CHANNEL`] and fans its ids out until shutdown.
    pub async fn listen(self, pool: PgPool) {
        while !self.shutdown.is_cancelled() {
            let listener = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = match listener.await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot listen for order changes yet");
                    tokio::select! {
                        _ = tokio::time::sleep(FALLBACK_POLL) => continue,
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    notification = listener.recv() => match notification {
                        Ok(n) => {
                            if let Ok(id) = Uuid::parse_str(n.payload()) {
                                let _ = self.changed.send(id);
                            }
                        }
                        Err(_) => break,
                    },
                    _ = self.shutdown.cancelled() => return,
                }
            }
        }
    }
}
