//! How the order reacts to the saga's events: every event of an order goes on
//! its timeline; the ones that move it change its status. The order service
//! starts compensation itself only for a customer cancel or a deadline.
use std::time::Duration;

use choreo::choreography;
use choreo::inbox::Batched;
use choreo::step::Cause;
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

/// What one event does to its order's row, held in memory for the rest of
/// its transaction: the status change it makes, if any. A move keeps the
/// first reason the order heard and clears a stuck mark; an event that does
/// not move the order may still bring the reason, or mark its saga stuck.
fn hear(order: &mut store::Heard, meaning: Meaning) -> Option<Status> {
    match meaning.status {
        Some(next) if order.status.may_become(next) => {
            tracing::info!(
                from = order.status.as_str(),
                to = next.as_str(),
                "order moved"
            );
            if order.reason.is_empty() {
                order.reason = meaning.reason.unwrap_or_default();
            }
            order.stuck.clear();
            order.status = next;
            order.changes += 1;
            order.deadline_pushed |= next.restarts_deadline();
            order.moved = true;
            order.touched = true;
            Some(next)
        }
        other => {
            if let Some(ignored) = other.filter(|next| *next != order.status) {
                tracing::info!(
                    status = order.status.as_str(),
                    ignored = ignored.as_str(),
                    "late event does not move the order"
                );
            }
            if let Some(reason) = meaning.reason.filter(|_| order.reason.is_empty()) {
                order.reason = reason;
                order.touched = true;
            }
            if let Some(stuck) = meaning.stuck.filter(|_| !order.status.is_terminal()) {
                tracing::error!(%stuck, "saga stuck");
                order.stuck = stuck;
                order.touched = true;
            }
            None
        }
    }
}

impl OrderHandler {
    /// The effects of one transaction's events, in delivery order, in two
    /// statements whatever their number: lock and read their orders' rows
    /// (all in order id order, so two instances hearing the same orders in
    /// opposite orders never wait on each other in a circle: measured with
    /// two instances before batches locked so, 8 deadlocks in 2000 orders,
    /// each a second's stall), then write
    /// what the events did to them ([`store::write_heard`]).
    async fn hear_all(
        &self,
        tx: &mut Tx<'_>,
        events: &[Batched<'_, SagaEvent>],
    ) -> Result<(), HandleError> {
        let ids = events
            .iter()
            .map(|Batched { envelope, .. }| contracts::order_id_of(envelope))
            .collect::<Result<Vec<Uuid>, Reject>>()?;
        let mut orders = store::lock_heard(tx, &ids).await?;
        let mut changes = Vec::new();
        let mut timeline = Vec::with_capacity(events.len());
        for (
            Batched {
                envelope,
                event,
                span,
            },
            id,
        ) in events.iter().zip(ids)
        {
            let Some(order) = orders.get_mut(&id) else {
                return Err(Reject::Malformed(format!(
                    "order {id} does not exist in this order service"
                ))
                .into());
            };
            let meaning = meaning(envelope, event);
            let detail = meaning.detail.clone();
            if let Some(status) = span.in_scope(|| hear(order, meaning)) {
                changes.push(store::Change {
                    order_id: id,
                    seq: order.changes,
                    status,
                    reason: order.reason.clone(),
                });
            }
            timeline.push(store::Line {
                order_id: id,
                event: envelope,
                detail,
            });
        }
        store::write_heard(tx, &orders, &changes, &timeline, self.deadline).await?;
        Ok(())
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
        // An event alone that moves its order, the usual case below full
        // load, came as one statement ([`Handler::effect_alone`]); here are
        // the others, a replayed dead letter, and a move that did not hold.
        let span = tracing::Span::none();
        self.hear_all(
            tx,
            &[Batched {
                envelope,
                event,
                span,
            }],
        )
        .await
    }

    /// An event that moves its order (each step's success and failure, the
    /// usual case) is applied with its inbox insert as one statement, when it
    /// comes alone: the move, its status history, its timeline line.
    fn effect_alone(&self, envelope: &Envelope, event: &SagaEvent) -> Option<choreo::Effect> {
        let id = contracts::order_id_of(envelope).ok()?;
        let meaning = meaning(envelope, event);
        Some(store::event_and_move_effect(
            id,
            envelope,
            &meaning.detail,
            meaning.status?,
            meaning.reason.as_deref(),
            self.deadline,
        ))
    }

    /// A batch's events in the same two statements as one event's.
    async fn handle_all(
        &self,
        tx: &mut Tx<'_>,
        events: Vec<Batched<'_, SagaEvent>>,
    ) -> Result<(), HandleError> {
        self.hear_all(tx, &events).await
    }
}
