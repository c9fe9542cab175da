//! The order's life: its statuses, which moves between them are allowed, and
//! what a valid order request is.
use contracts::order::v1 as api;

/// Where an order is in the saga (the `orders.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Placed; waiting for inventory.
    Pending,
    /// Stock held; waiting for shipping.
    Reserved,
    /// Shipment made; waiting for the notification.
    Scheduled,
    /// The customer was told; the saga is done.
    Completed,
    /// A step failed or a cancel came; compensation is running.
    Cancelling,
    /// Every step that did work has undone it.
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Reserved,
        Status::Scheduled,
        Status::Completed,
        Status::Cancelling,
        Status::Cancelled,
    ];

    /// The name the database, logs and metric labels use.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Reserved => "RESERVED",
            Status::Scheduled => "SCHEDULED",
            Status::Completed => "COMPLETED",
            Status::Cancelling => "CANCELLING",
            Status::Cancelled => "CANCELLED",
        }
    }

    /// Where the order stands once the choreography's `step` is done (the
    /// last step's success completes it; see the handler).
    pub fn after_step(step: &str) -> Option<Self> {
        match step {
            "reserve" => Some(Status::Reserved),
            "ship" => Some(Status::Scheduled),
            _ => None,
        }
    }

    /// Reaching it is forward progress that gives the order a new deadline
    /// for the next step.
    pub fn restarts_deadline(self) -> bool {
        matches!(self, Status::Reserved | Status::Scheduled)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Cancelled)
    }

    /// Still moving forward: a failure or a cancel may start compensation.
    pub fn is_open(self) -> bool {
        matches!(self, Status::Pending | Status::Reserved | Status::Scheduled)
    }

    /// Whether the saga may move the order from `self` to `next`. Late events
    /// never revive an order: nothing leaves a terminal status, and nothing
    /// goes back from compensation to the forward path.
    pub fn may_become(self, next: Status) -> bool {
        use Status::*;
        match (self, next) {
            (Pending, Reserved) | (Pending | Reserved, Scheduled) => true,
            // Events of one order can arrive out of order after a redelivery:
            // notification.sent proves the forward path finished.
            (from, Completed | Cancelling) => from.is_open(),
            (from, Cancelled) => !from.is_terminal(),
            _ => false,
        }
    }

    /// What the order waits for, for a deadline's reason.
    pub fn waiting_for(self) -> &'static str {
        match self {
            Status::Pending => "inventory to reserve stock",
            Status::Reserved => "shipping to schedule a shipment",
            Status::Scheduled => "notification to reach the customer",
            _ => "nothing",
        }
    }

    pub fn to_proto(self) -> api::OrderStatus {
        match self {
            Status::Pending => api::OrderStatus::Pending,
            Status::Reserved => api::OrderStatus::Reserved,
            Status::Scheduled => api::OrderStatus::Scheduled,
            Status::Completed => api::OrderStatus::Completed,
            Status::Cancelling => api::OrderStatus::Cancelling,
            Status::Cancelled => api::OrderStatus::Cancelled,
        }
    }

    pub fn from_proto(status: api::OrderStatus) -> Option<Self> {
        Some(match status {
            api::OrderStatus::Unspecified => return None,
            api::OrderStatus::Pending => Status::Pending,
            api::OrderStatus::Reserved => Status::Reserved,
            api::OrderStatus::Scheduled => Status::Scheduled,
            api::OrderStatus::Completed => Status::Completed,
            api::OrderStatus::Cancelling => Status::Cancelling,
            api::OrderStatus::Cancelled => Status::Cancelled,
        })
    }
}

pub use contracts::{MAX_LINES, MAX_QUANTITY};
pub const MAX_TEXT: usize = 128;
const MAX_CONTACT: usize = 254;

/// A validated `PlaceOrder` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer: String,
    pub destination: String,
    pub contact: String,
    pub lines: Vec<(String, u32)>,
    pub idempotency_key: String,
}

impl NewOrder {
    /// Checks a request; the error says what to change.
    pub fn validate(request: api::PlaceOrderRequest) -> Result<Self, String> {
        contracts::check_text("customer", &request.customer)?;
        contracts::check_text("contact", &request.contact)?;
        contracts::check_text("idempotency_key", &request.idempotency_key)?;
        let customer = request.customer.trim().to_owned();
        if customer.is_empty() {
            return Err("customer is required".into());
        }
        if customer.len() > MAX_TEXT {
            return Err(format!("customer is longer than {MAX_TEXT} characters"));
        }
        let key = request.idempotency_key.trim().to_owned();
        if key.is_empty() {
            return Err("idempotency_key is required: send a fresh unique value (e.g. a UUID) per order, and the same value when retrying".into());
        }
        if key.len() > MAX_TEXT {
            return Err(format!(
                "idempotency_key is longer than {MAX_TEXT} characters"
            ));
        }
        let destination = request.destination.trim().to_ascii_uppercase();
        if destination.len() != 2 || !destination.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(format!(
                "destination {} is not a two-letter ISO 3166 country code such as \"DE\"",
                contracts::quote(&request.destination)
            ));
        }
        let contact = request.contact.trim().to_owned();
        if contact.len() > MAX_CONTACT {
            return Err(format!("contact is longer than {MAX_CONTACT} characters"));
        }
        if request.items.is_empty() {
            return Err("items is empty: an order needs at least one line".into());
        }
        if request.items.len() > MAX_LINES {
            return Err(format!(
                "{} items is too many: at most {MAX_LINES} lines per order",
                request.items.len()
            ));
        }
        let mut lines: Vec<(String, u32)> = Vec::with_capacity(request.items.len());
        for (i, item) in request.items.into_iter().enumerate() {
            let n = i + 1;
            let sku = item.sku.trim().to_owned();
            contracts::check_sku(&sku).map_err(|e| format!("item {n}: {e}"))?;
            if item.quantity == 0 || item.quantity > MAX_QUANTITY {
                return Err(format!(
                    "item {n}: quantity {} is out of range: order 1 to {MAX_QUANTITY} units",
                    item.quantity
                ));
            }
            if lines.iter().any(|(s, _)| *s == sku) {
                return Err(format!(
                    "item {n}: sku {sku} appears twice: put its whole quantity on one line"
                ));
            }
            lines.push((sku, item.quantity));
        }
        Ok(NewOrder {
            customer,
            destination,
            contact,
            lines,
            idempotency_key: key,
        })
    }

    /// What the idempotency key stands for: a repeat must ask for the same order.
    pub fn fingerprint(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(|(s, q)| format!("{s}x{q}")).collect();
        format!(
            "{}|{}|{}|{}",
            self.customer,
            self.destination,
            self.contact,
            lines.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> api::PlaceOrderRequest {
        api::PlaceOrderRequest {
            customer: "ada".into(),
            destination: "de".into(),
            items: vec![api::OrderItem {
                sku: "BOOK-1".into(),
                quantity: 2,
            }],
            idempotency_key: "k1".into(),
            contact: "ada@example.com".into(),
        }
    }

    #[test]
    fn a_valid_request_is_normalised() {
        let order = NewOrder::validate(request()).unwrap();
        assert_eq!(order.destination, "DE");
        assert_eq!(order.lines, vec![("BOOK-1".to_owned(), 2)]);
    }

    #[test]
    fn bad_requests_say_what_to_fix() {
        type Spoil = fn(&mut api::PlaceOrderRequest);
        let cases: Vec<(Spoil, &str)> = vec![
            (|r| r.customer.clear(), "customer is required"),
            (|r| r.items.clear(), "items is empty"),
            (|r| r.items[0].quantity = 0, "quantity 0 is out of range"),
            (|r| r.items[0].quantity = 1_000_000, "out of range"),
            (|r| r.destination = "Germany".into(), "two-letter"),
            (|r| r.idempotency_key.clear(), "idempotency_key is required"),
            (|r| r.items.push(r.items[0].clone()), "appears twice"),
            (|r| r.customer = "x".repeat(500), "longer than"),
        ];
        for (spoil, expected) in cases {
            let mut r = request();
            spoil(&mut r);
            let error = NewOrder::validate(r).unwrap_err();
            assert!(
                error.contains(expected),
                "{error:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn terminal_orders_never_move_again() {
        for next in [
            Status::Pending,
            Status::Reserved,
            Status::Completed,
            Status::Cancelling,
        ] {
            assert!(!Status::Cancelled.may_become(next));
        }
        assert!(!Status::Completed.may_become(Status::Cancelling));
        assert!(!Status::Cancelling.may_become(Status::Completed));
        assert!(Status::Scheduled.may_become(Status::Completed));
    }
}
