//! How the order reacts to the saga's events: every event of an order goes on
//! its timeline; the ones that move it change its status. The order service
//! starts compensation itself only for a customer cancel or a deadline.
use std::time::Duration;

use choreo::{Envelope, HandleError, Handler, Outbox, Reject, Tx};
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::Status;
use crate::store;

/// Reads every event of its orders; writes only its own tables (it never
/// needs to answer an event with one of its own).
pub struct OrderHandler {
    pub deadline: Duration,
}

/// Moves an open order to CANCELLING and publishes `order.cancelled`, which
/// walks compensation back through notification, shipping and inventory.
pub async fn start_cancel(
    tx: &mut PgConnection,
    outbox: &Outbox,
    id: Uuid,
    reason: &str,
    deadline: Duration,
) -> Result<(), sqlx::Error> {
    store::set_status(tx, id, Status::Cancelling, Some(reason), deadline).await?;
    outbox
        .emit(
            tx,
            &id.to_string(),
            None,
            &ev::OrderCancelled {
                reason: reason.to_owned(),
            },
        )
        .await?;
    Ok(())
}

fn lines(lines: &[ev::OrderLine]) -> String {
    lines
        .iter()
        .map(|l| format!("{} x{}", l.sku, l.quantity))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an event means to the order.
struct Meaning {
    /// A line for the timeline.
    detail: String,
    /// The status the event asks for, if any.
    status: Option<Status>,
    /// Why the order is being compensated, if the event knows. The first
    /// reason an order hears is the one it keeps, whichever event brings it:
    /// a compensation event can overtake the failure that started it.
    reason: Option<String>,
    /// Why the saga is stuck, for a `choreo.stuck` report.
    stuck: Option<String>,
}

fn meaning(event: &SagaEvent) -> Meaning {
    use SagaEvent::*;
    let m = |detail: String, status: Option<Status>, reason: Option<String>| Meaning {
        detail,
        status,
        reason: reason.filter(|r| !r.is_empty()),
        stuck: None,
    };
    match event {
        OrderCreated(e) => m(
            format!("placed: {} to {}", lines(&e.lines), e.destination),
            None,
            None,
        ),
        OrderCancelled(e) => m(
            format!("compensation started: {}", e.reason),
            None,
            Some(e.reason.clone()),
        ),
        InventoryReserved(e) => m(
            format!("stock held: {}", lines(&e.lines)),
            Some(Status::Reserved),
            None,
        ),
        InventoryRejected(e) => m(
            format!("stock refused: {}", e.reason),
            Some(Status::Cancelled),
            Some(contracts::cause("inventory", &e.reason)),
        ),
        InventoryReleased(e) => m(
            if e.nothing_held {
                "compensated: no stock was held".to_owned()
            } else {
                format!("compensated: stock released: {}", lines(&e.released))
            },
            Some(Status::Cancelled),
            Some(e.cause.clone()),
        ),
        ShippingScheduled(e) => m(
            format!(
                "shipment {} scheduled with {} to {}",
                e.shipment_id, e.carrier, e.destination
            ),
            Some(Status::Scheduled),
            None,
        ),
        ShippingFailed(e) => m(
            format!("shipping failed: {}", e.reason),
            Some(Status::Cancelling),
            Some(contracts::cause("shipping", &e.reason)),
        ),
        ShippingCancelled(e) => m(
            if e.nothing_scheduled {
                "compensated: no shipment to cancel".to_owned()
            } else {
                format!("compensated: shipment {} cancelled", e.shipment_id)
            },
            None,
            Some(e.cause.clone()),
        ),
        NotificationSent(e) => m(
            format!("customer notified by {}", e.channel),
            Some(Status::Completed),
            None,
        ),
        NotificationFailed(e) => m(
            format!("notification failed: {}", e.reason),
            Some(Status::Cancelling),
            Some(contracts::cause("notification", &e.reason)),
        ),
        NotificationCancelled(e) => m(
            if e.notice_sent {
                "compensated: cancellation notice sent".to_owned()
            } else {
                "compensated: no notification to take back".to_owned()
            },
            None,
            Some(e.cause.clone()),
        ),
        Stuck(e) => {
            let stuck = format!(
                "{} keeps failing on {} ({} deliveries so far): {}",
                e.service, e.event_type, e.deliveries, e.error
            );
            Meaning {
                detail: format!("stuck: {stuck}"),
                status: None,
                reason: None,
                stuck: Some(stuck),
            }
        }
    }
}

#[async_trait::async_trait]
impl Handler for OrderHandler {
    async fn handle(&self, tx: &mut Tx, envelope: &Envelope) -> Result<(), HandleError> {
        let event = SagaEvent::decode(envelope)?;
        let id = Uuid::parse_str(&envelope.saga_id).map_err(|_| {
            Reject::Malformed(format!("saga id {:?} is not an order id", envelope.saga_id))
        })?;
        let Some(status) = store::lock(tx, id).await? else {
            return Err(Reject::Malformed(format!(
                "order {id} does not exist in this order service"
            ))
            .into());
        };
        let meaning = meaning(&event);
        store::record_event(tx, id, envelope, &meaning.detail).await?;
        match meaning.status {
            Some(next) if status.may_become(next) => {
                store::set_status(tx, id, next, meaning.reason.as_deref(), self.deadline).await?;
                tracing::info!(from = status.as_str(), to = next.as_str(), "order moved");
            }
            other => {
                if let Some(ignored) = other.filter(|next| *next != status) {
                    tracing::info!(
                        status = status.as_str(),
                        ignored = ignored.as_str(),
                        "late event does not move the order"
                    );
                }
                if let Some(reason) = &meaning.reason {
                    store::keep_first_reason(tx, id, reason).await?;
                }
                if let Some(stuck) = meaning.stuck.as_deref().filter(|_| !status.is_terminal()) {
                    tracing::error!(%stuck, "saga stuck");
                    store::mark_stuck(tx, id, stuck).await?;
                }
            }
        }
        Ok(())
    }
}
