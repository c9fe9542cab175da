//! How the order reacts to the saga's events: every event of an order goes on
//! its timeline; the ones that move it change its status. The order service
//! starts compensation itself only for a customer cancel or a deadline.
use std::time::Duration;

use choreo::choreography;
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
    let cancelled = ev::OrderCancelled {
        reason: reason.to_owned(),
    };
    emit_own(tx, outbox, id, cancelled, SagaEvent::OrderCancelled).await
}

/// Writes one of the order's own events to the outbox and, in the same
/// transaction, its line on the order's timeline: the order service records
/// what it writes itself as it writes it, and reads back only what others write.
pub async fn emit_own<P: choreo::EventPayload>(
    tx: &mut PgConnection,
    outbox: &Outbox,
    id: Uuid,
    payload: P,
    as_event: fn(P) -> SagaEvent,
) -> Result<(), sqlx::Error> {
    let envelope = outbox.emit(tx, &id.to_string(), None, &payload).await?;
    store::record_event(tx, id, &envelope, &detail(&as_event(payload)))
        .await?
        .map(|_| ())
        .ok_or(sqlx::Error::RowNotFound)
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

/// The status an event asks for, from its place in the declared choreography:
/// a step done moves the order on, the last one completes it; a failure
/// starts compensation (or ends the order when nothing is held yet); the
/// first step's compensation ends it.
fn status_for(meaning: choreography::Meaning) -> Option<Status> {
    use choreography::Meaning::*;
    match meaning {
        Succeeded { last: true, .. } => Some(Status::Completed),
        Succeeded { step, .. } => Status::after_step(step),
        Failed { first: true, .. } | Compensated { first: true, .. } => Some(Status::Cancelled),
        Failed { first: false, .. } => Some(Status::Cancelling),
        Compensated { .. } | Started | CancelRequested | Stuck | Unknown => None,
    }
}

/// The timeline's line for an event.
pub fn detail(event: &SagaEvent) -> String {
    use SagaEvent::*;
    match event {
        OrderCreated(e) => format!("placed: {} to {}", lines(&e.lines), e.destination),
        OrderCancelled(e) => format!("compensation started: {}", e.reason),
        InventoryReserved(e) => format!("stock held: {}", lines(&e.lines)),
        InventoryRejected(e) => format!("stock refused: {}", e.reason),
        InventoryReleased(e) if e.nothing_held => "compensated: no stock was held".to_owned(),
        InventoryReleased(e) => format!("compensated: stock released: {}", lines(&e.released)),
        ShippingScheduled(e) => format!(
            "shipment {} scheduled with {} to {}",
            e.shipment_id, e.carrier, e.destination
        ),
        ShippingFailed(e) => format!("shipping failed: {}", e.reason),
        ShippingCancelled(e) if e.nothing_scheduled => {
            "compensated: no shipment to cancel".to_owned()
        }
        ShippingCancelled(e) => format!("compensated: shipment {} cancelled", e.shipment_id),
        NotificationSent(e) => format!("customer notified by {}", e.channel),
        NotificationFailed(e) => format!("notification failed: {}", e.reason),
        NotificationCancelled(e) if e.notice_sent => {
            "compensated: cancellation notice sent".to_owned()
        }
        NotificationCancelled(_) => "compensated: no notification to take back".to_owned(),
        Stuck(e) => format!("stuck: {}", stuck(e)),
    }
}

fn stuck(e: &choreo::proto::Stuck) -> String {
    format!(
        "{} keeps failing on {} ({} deliveries so far): {}",
        e.service, e.event_type, e.deliveries, e.error
    )
}

fn meaning(envelope: &Envelope, event: &SagaEvent) -> Meaning {
    Meaning {
        detail: detail(event),
        status: status_for(contracts::CHOREOGRAPHY.meaning(&envelope.event_type)),
        reason: event.cause(envelope),
        stuck: match event {
            SagaEvent::Stuck(e) => Some(stuck(e)),
            _ => None,
        },
    }
}

#[async_trait::async_trait]
impl Handler for OrderHandler {
    type Event = SagaEvent;

    async fn handle(
        &self,
        tx: &mut Tx<'_>,
        envelope: &Envelope,
        event: SagaEvent,
    ) -> Result<(), HandleError> {
        let id = Uuid::parse_str(&envelope.saga_id).map_err(|_| {
            Reject::Malformed(format!("saga id {:?} is not an order id", envelope.saga_id))
        })?;
        let meaning = meaning(envelope, &event);
        // Usually the event moves the order on: one statement does it all.
        if let Some(next) = meaning.status
            && store::record_event_and_move(
                tx,
                id,
                envelope,
                &meaning.detail,
                next,
                meaning.reason.as_deref(),
                self.deadline,
            )
            .await?
        {
            tracing::info!(to = next.as_str(), "order moved");
            return Ok(());
        }
        let Some(status) = store::record_event(tx, id, envelope, &meaning.detail).await? else {
            return Err(Reject::Malformed(format!(
                "order {id} does not exist in this order service"
            ))
            .into());
        };
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

    /// Two instances of this service take one order's events side by side
    /// (the order hears every step's event, and the next step's can arrive
    /// before the last one is applied). A batch locks the rows of all its
    /// orders first, in order id order, so two batches never wait on each
    /// other in a circle (measured with two instances: 8 deadlocks in 2000
    /// orders, each a second's stall, before this).
    async fn before_batch(
        &self,
        tx: &mut Tx<'_>,
        events: &[(&Envelope, &SagaEvent)],
    ) -> Result<(), HandleError> {
        // An unreadable id locks nothing here; its event is refused later.
        let mut ids: Vec<Uuid> = events
            .iter()
            .filter_map(|(envelope, _)| contracts::order_id_of(envelope).ok())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > 1 {
            store::lock_in_order(tx, &ids).await?;
        }
        Ok(())
    }
}
