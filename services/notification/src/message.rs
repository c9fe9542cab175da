//! What a queued message is and where it stands: the `notifications.kind`
//! and `notifications.status` columns, as types.
use std::fmt;

/// What a message tells the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    /// The order is on its way (the notify step's work).
    Confirmation,
    /// The order was cancelled after the confirmation went out.
    Cancellation,
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Queued; the dispatcher sends it when due.
    Pending,
    Sent,
    /// Taken back by a compensation before it went out.
    Withdrawn,
    /// The provider says it can never be delivered.
    Failed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Confirmation => "CONFIRMATION",
            Kind::Cancellation => "CANCELLATION",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
